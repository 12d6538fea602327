"""The heap a complete node needs in a real mesh: the frozen firmware on the 32-bit unix build
(31-bit small ints like an MCU) with its MQTT client, state files, logs and round, at a given
`-X heapsize`, in the default scenario (13 nodes, Krum f = 3, full shards) against mosquitto.
Where tools/microfed_tools/roundcase.py measures one round on recorded inputs, this runs
whole meshes, so what a run adds over time (fragmentation, messages arriving mid-round)
shows. Prints a Markdown table for docs/results.md, one line per heap and run.

    .venv/bin/python benchmarks/node_heap.py --mode gossip --heaps 64k,72k --runs 3
    .venv/bin/python benchmarks/node_heap.py --mode gossip --sweep 64k:512k:16k
    ... [--rounds 3] [--write docs/results.md [--label NAME]]

Each run is `microfed mesh run --boards unix32 --mode MODE --rounds R --unix32-heap H
--broker mosquitto --deadline 20` in a temporary directory. Columns: the rounds the
coordinator completed; per honest node the rounds whose digest it computed and found equal
to the coordinator's (gossip), the `out_of_memory` rejections and the messages its MQTT
client skipped for want of heap (`dropped_oom`), summed over nodes; the node exit codes;
the final digest's first 8 hex digits. --write replaces the text between the
`<!-- benchmarks/node_heap.py LABEL -->` and `<!-- end benchmarks/node_heap.py LABEL -->`
markers of that file (LABEL: --label, else the mode).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from markers import write_between


def parse_heap(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    return int(t[:-1] if mult > 1 else t) * mult


def heaps_of(args: argparse.Namespace) -> list[int]:
    if args.sweep:
        lo, hi, step = (parse_heap(x) for x in args.sweep.split(":"))
        return list(range(lo, hi + 1, step))
    return [parse_heap(h) for h in args.heaps.split(",")]


def node_counters(run_dir: Path) -> list[dict[str, Any]]:
    """The counters each node logged on exit (its last "exit" line), node by node."""
    out = []
    for log in sorted((run_dir / "nodes").glob("*/node.log")):
        last = None
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"ev": "exit"' in line:
                try:
                    last = json.loads(line)["counters"]
                except ValueError:
                    continue  # cut short: the node ran out of heap while writing it
        out.append(last or {})
    return out


def run_once(mode: str, heap: int, rounds: int, work: Path) -> dict[str, Any]:
    out = work / f"{mode}-{heap}"
    cmd = [sys.executable, "-m", "microfed_tools.cli", "mesh", "run", "--boards", "unix32",
           "--mode", mode, "--rounds", str(rounds), "--unix32-heap", str(heap),
           "--broker", "mosquitto", "--deadline", "20", "--out", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    nodes = node_counters(out) if (out / "nodes").exists() else []
    return {
        "heap": heap, "exit": proc.returncode, "summary": summary,
        "rounds": summary.get("rounds", 0),
        "digests": [n.get("digest_agree", 0) for n in nodes],
        "oom": sum(n.get("rejected", {}).get("out_of_memory", 0) for n in nodes),
        "dropped_oom": sum(n.get("mqtt", {}).get("dropped_oom", 0) for n in nodes),
        "error": "" if proc.returncode == 0 else _why(proc.stdout + proc.stderr),
    }


def _why(output: str) -> str:
    """The run's error in one line: which node stopped, and the Python error it printed."""
    lines = [x.strip() for x in output.splitlines() if x.strip()]
    who = next((x for x in lines if "exited with code" in x), lines[-1] if lines else "")
    err = next((x for x in reversed(lines) if x.startswith(("MemoryError", "OSError"))), "")
    who = who.replace("microfed mesh: error: ", "").rstrip(":")
    return (who + (": " + err if err else "")).replace("|", "/")[:160]


def row(mode: str, r: dict[str, Any], rounds: int) -> str:
    s = r["summary"]
    # None: a node the runner had to stop (it had not exited by itself).
    codes = sorted(set((s.get("node_exit_codes") or {}).values()), key=str) if s else []
    digest = (s.get("final_digest") or "")[:8] if s else ""
    if mode == "gossip":
        d = r["digests"]
        full = sum(1 for x in d if x == rounds)
        dig = f"{full}/{len(d)} nodes: {rounds}/{rounds}"
        if d and min(d) < rounds:
            dig += f" (least: {min(d)})"
    else:
        dig = "–"
    return (f"| {r['heap'] // 1024}k | {r['rounds']}/{rounds} | {dig} | {r['oom']} | "
            f"{r['dropped_oom']} | {', '.join(str(c) for c in codes) or '–'} | "
            f"{'`' + digest + '…`' if digest else '–'} | {r['error'] or '–'} |")


def write_into(path: Path, text: str, label: str) -> None:
    """`text`: the command line, then the table."""
    command, _, body = text.partition("\n")
    write_between(path, f"benchmarks/node_heap.py {label}", command, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("gossip", "coordinated"), default="gossip")
    ap.add_argument("--heaps", default="64k", help="comma-separated heaps (e.g. 64k,72k)")
    ap.add_argument("--sweep", default="", metavar="LO:HI:STEP",
                    help="every heap from LO to HI in STEP (e.g. 64k:512k:16k)")
    ap.add_argument("--runs", type=int, default=1, help="runs per heap")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--label", default="", help="the markers' label (default: the mode)")
    a = ap.parse_args()
    heaps = heaps_of(a)
    what = f"--sweep {a.sweep}" if a.sweep else f"--heaps {a.heaps}"
    lines = [f"python benchmarks/node_heap.py --mode {a.mode} {what} --runs {a.runs} "
             f"--rounds {a.rounds}",
             "| heap | rounds | digests agreed (gossip) | out_of_memory | dropped_oom | "
             "node exit codes | final digest | error |",
             "| --- | --- | --- | ---: | ---: | --- | --- | --- |"]
    with tempfile.TemporaryDirectory(prefix="node-heap-") as tmp:
        for heap in heaps:
            for i in range(a.runs):
                r = run_once(a.mode, heap, a.rounds, Path(tmp))
                lines.append(row(a.mode, r, a.rounds))
                print(f"{heap // 1024}k run {i + 1}/{a.runs}: {lines[-1]}", file=sys.stderr,
                      flush=True)
    text = "\n".join(lines)
    print(text)
    if a.write is not None:
        write_into(a.write, text, a.label or a.mode)


if __name__ == "__main__":
    main()
