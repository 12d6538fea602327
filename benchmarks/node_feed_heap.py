"""One complete node's rounds at a given heap, without a broker: the frozen firmware on the
32-bit unix build boots node-01 of the default scenario with its own `main.boot` (config, MQTT
transport, Node), then three GLOBAL_MODEL frames signed with the mesh's coordinator key are read
into the transport's receive buffer one by one, as its MQTT client reads them, and handed to
the node's handler; `Node.step()` runs each round (check, train, sign; the publish fails
quietly: no broker). Where benchmarks/node_heap.py runs whole meshes (minutes per heap), this
takes seconds per heap and says where a round ran out.

    .venv/bin/python benchmarks/node_feed_heap.py [--mode coordinated|gossip]
        [--heaps 36k,38k,40k,44k] [--runs N] [--write docs/results.md]   (between the
        `<!-- benchmarks/node_feed_heap.py MODE -->` markers)

Round 1's global carries no announcement; rounds 2 and 3 announce 13 accepted updates (their
hashes are not any real frame's: a gossip node then reports its digest as missing, and the
round goes on). Columns: the free heap after the boot, then per round `update` (trained,
signed, persisted) or the node's rejection (`out_of_memory ... at FILE:LINE`); a boot that
fails says so. The heap layout depends on the provisioning (keys, the mesh's random name), so
a heap at the edge may pass in one provisioning and fail in another: `--runs N` provisions N
meshes and prints one row per heap and mesh, then how many meshes ran all three rounds at
each heap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markers import publish
from node_heap import parse_heap

from microfed import wire
from microfed_host import keys
from microfed_host.scenario import Scenario, prepare
from microfed_tools import firmware

PROGRAM = """import gc, sys, json
import main
try:
    nd, t, hal, wifi, cfg, broker = main.boot([sys.argv[1]])
except MemoryError as e:
    print("MFFEED " + json.dumps({"boot": "MemoryError: " + str(e)}))
    raise SystemExit
gc.collect()
free = gc.mem_free()
rounds = []
def log(ev):
    if ev.get("ev") == "update":
        rounds.append("update")
    elif ev.get("ev") == "reject":
        rounds.append(ev.get("reason", "") + ": " + ev.get("msg", ""))
nd._log = log
for name in sys.argv[2:]:
    f = open(name, "rb"); n = f.readinto(t._rx); f.close()
    nd.on_message(nd.t_global, memoryview(t._rx)[:n])
    nd.step()
print("MFFEED " + json.dumps({"free": free, "rounds": rounds}))
"""


def make_globals(run: Path, out: Path, n_params: int) -> list[Path]:
    """GLOBAL_MODEL frames of rounds 1-3 for the provisioned mesh in `run`, signed with its
    coordinator key, stamped now."""
    md = run / "mesh"
    seed = keys.read_private_key(md / "coordinator.key")
    mesh_id = bytes.fromhex(json.loads((md / "mesh.json").read_text())["mesh_id"])
    now = int(time.time())
    ids = [f"node-{i:02d}" for i in range(1, 14)]
    acc = [(i, hashlib.sha256(i.encode()).digest()) for i in ids]
    g = [((i * 7919) % 4001 - 2000) * 3 for i in range(n_params)]
    paths = []
    for r in (1, 2, 3):
        payload = (wire.encode_global_payload(g) if r == 1 else
                   wire.encode_global_payload(g, "krum", 3, 0,
                                              hashlib.sha256(b"%d" % r).digest(), acc))
        p = out / f"g{r}.bin"
        p.write_bytes(wire.encode(wire.GLOBAL_MODEL, mesh_id, wire.COORDINATOR, r, r, now,
                                  payload, keys.signer(seed)))
        paths.append(p)
        g = [v + 300 for v in g]
    return paths


def run_at(exe: Path, work: Path, node_dir: Path, frames: list[Path], heap: int) -> dict:
    d = work / f"node-{heap}"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(node_dir, d)
    shutil.rmtree(d / "state", ignore_errors=True)
    proc = subprocess.run([str(exe), "-X", f"heapsize={heap}", "prog.py", str(d),
                           *[str(f) for f in frames]], cwd=work, capture_output=True,
                          text=True, timeout=600, env={"MICROPYPATH": ".frozen"})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MFFEED ")), None)
    if line is None:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        return {"boot": tail[0] if tail else f"exit {proc.returncode}"}
    return json.loads(line[7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("coordinated", "gossip"), default="coordinated")
    ap.add_argument("--heaps", default="36k,38k,40k,44k")
    ap.add_argument("--runs", type=int, default=1, help="meshes provisioned, one run each")
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args()
    exe = firmware.build("unix32", say=lambda m: print(m, file=sys.stderr))
    heaps = a.heaps.split(",")
    lines = ["| heap | free after boot | round 1 | round 2 | round 3 |",
             "| --- | ---: | --- | --- | --- |"]
    full = dict.fromkeys(heaps, 0)
    rows: list[tuple[int, str]] = []
    for _ in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="node-feed-heap-") as tmp:
            work = Path(tmp)
            prepare(Scenario(name="heap", honest=13, mode=a.mode), work / "run")
            node_dir = work / "run" / "nodes" / "node-01"
            frames = make_globals(work / "run", work, 650)
            (work / "prog.py").write_text(PROGRAM)
            for k, h in enumerate(heaps):
                res = run_at(exe, work, node_dir, frames, parse_heap(h))
                if "boot" in res:
                    rows.append((k, f"| {h} | – | boot failed: {res['boot']} | | |"))
                    continue
                full[h] += res["rounds"] == ["update"] * 3
                cells = [c.replace("|", "/") for c in res["rounds"]] + [""] * 3
                rows.append((k, f"| {h} | {res['free']} | {cells[0]} | {cells[1]} | "
                                f"{cells[2]} |"))
    lines += [r for _, r in sorted(rows, key=lambda r: r[0])]  # by heap, runs in order
    if a.runs > 1:
        lines += ["", "| heap | meshes that ran all three rounds |", "| --- | ---: |"]
        lines += [f"| {h} | {full[h]} of {a.runs} |" for h in heaps]
    command = f"python benchmarks/node_feed_heap.py --mode {a.mode} --heaps {a.heaps}"
    if a.runs > 1:
        command += f" --runs {a.runs}"
    table = "\n".join(lines)
    publish(command, table, a.write, f"benchmarks/node_feed_heap.py {a.mode}")


if __name__ == "__main__":
    main()
