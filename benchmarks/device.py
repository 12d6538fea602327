"""Instructions per phase of a node's work on the emulated MCUs (QEMU -icount shift=0: one
instruction = 1 ns of guest time, so counts repeat), and a node's whole round on recorded
inputs (tools/microfed_tools/roundcase.py) with its heap. Prints Markdown tables for
docs/boards.md.

    .venv/bin/python benchmarks/device.py [--board mps2-an385 --board virt-rv32] [--no-round]
                                          [--write docs/boards.md]
    .venv/bin/python benchmarks/device.py --dp [--board mps2-an385] [--write docs/privacy.md]
    .venv/bin/python benchmarks/device.py --mlp [--write docs/model.md]

--write replaces the text between the `<!-- benchmarks/device.py -->` and
`<!-- end benchmarks/device.py -->` markers of that file with the tables (and the date);
with --dp, the local-DP costs (sampler, clip, privatising a delta) between
`<!-- benchmarks/device.py --dp -->` and `<!-- end benchmarks/device.py --dp -->`; with --mlp,
the MLP's import, init and one epoch, between the `--mlp` markers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

from markers import write_between

from microfed_tools import devicecost, firmware, roundcase
from microfed_tools.boards import load_board


def _n(v: int) -> str:
    return f"{int(v):,}".replace(",", " ")


def components(boards: list[str]) -> None:
    results = {b: devicecost.measure_board(load_board(b))[0] for b in boards}
    want = devicecost.host_expectations()
    print("| phase | " + " | ".join(boards) + " |")
    print("| --- | " + " | ".join("---:" for _ in boards) + " |")
    for phase in devicecost.PHASES:
        print(f"| {phase} | " + " | ".join(_n(results[b][phase]) for b in boards) + " |")
    heap = [_n(results[b]["import_heap"]) + " B" for b in boards]
    print("| heap taken by the frozen imports | " + " | ".join(heap) + " |")
    same = all({k: results[b][k] for k in want} == want for b in boards)
    print(f"\nresults equal the host's (signature verifies, training digest, Krum winner): {same}")


def dp_costs(boards: list[str]) -> None:
    results = {b: devicecost.measure_board(load_board(b), programs=(devicecost.DP_PROGRAM,),
                                           phases=devicecost.DP_PHASES)[0] for b in boards}
    want = devicecost.dp_host_expectations()
    n = devicecost.DP_SAMPLES
    print("| local DP phase (instructions) | " + " | ".join(boards) + " |")
    print("| --- | " + " | ".join("---:" for _ in boards) + " |")
    for phase in devicecost.DP_PHASES:
        print(f"| {phase} | " + " | ".join(_n(results[b][phase]) for b in boards) + " |")
    for name in ("dgauss_mesh", "dgauss_2_3"):
        print(f"| {name}: per sample | "
              + " | ".join(_n(results[b][f"{name}_x{n}"] // n) for b in boards) + " |")
    print("| privatize_650: per coordinate | "
          + " | ".join(_n(results[b]["privatize_650"] // 650) for b in boards) + " |")
    heap = [_n(results[b]["dp_import_heap"]) + " B" for b in boards]
    print("| heap taken by the frozen dgauss + dp imports | " + " | ".join(heap) + " |")
    same = all({k: results[b][k] for k in want} == want for b in boards)
    print(f"\nsamples, clip and privatised delta equal the host's bit for bit: {same}")


def mlp_costs(boards: list[str]) -> None:
    results = {b: devicecost.measure_board(load_board(b), programs=(devicecost.MLP_PROGRAM,),
                                           phases=devicecost.MLP_PHASES)[0] for b in boards}
    want = devicecost.mlp_host_expectations()
    print("| MLP 64-32-10 (instructions) | " + " | ".join(boards) + " |")
    print("| --- | " + " | ".join("---:" for _ in boards) + " |")
    for phase in devicecost.MLP_PHASES:
        label = f"mlp_train_epoch ({devicecost.SAMPLES} samples)" if phase == "mlp_train_epoch" \
            else phase
        print(f"| {label} | " + " | ".join(_n(results[b][phase]) for b in boards) + " |")
    print("| live heap after the epoch: module, parameters, trained copy, sums, samples (B) | "
          + " | ".join(_n(results[b]["mlp_live_heap"]) for b in boards) + " |")
    same = all({k: results[b][k] for k in want} == want for b in boards)
    print(f"\ntrained parameters equal the host's bit for bit: {same}")


PHASES = ("boot_registry", "boot_shard", "check_global", "peer_checks", "aggregate",
          "sign_digest", "train", "sign_update")


def rounds(boards: list[str], m3_heaps: list[int]) -> None:
    """Columns: each board's gossip and coordinated round with shard and vectors in RAM, then
    mps2-an385 with them on its filesystem, from firmware built with each heap in m3_heaps."""
    cases = {m: roundcase.make_case(gossip=m == "gossip") for m in ("gossip", "coordinated")}
    want = {m: roundcase.run_reference(c) for m, c in cases.items()}
    res: dict[tuple[str, str], dict[str, Any]] = {}
    failed: list[str] = []
    for b in boards:
        for m, c in cases.items():
            r = roundcase.measure_board(load_board(b), c)
            r["same"] = r["out"] == want[m]["out"]
            res[(b, m)] = r
    for heap in m3_heaps:
        image = str(firmware.build("mps2-an385", heap=heap))
        for m, c in cases.items():
            col = f"mps2-an385 files {heap // 1024}K-heap"
            try:
                # As hil/test_node_round.py: the program frozen, the messages in files.
                r = roundcase.measure_board(load_board("mps2-an385"), c, files=True, image=image,
                                            frozen=True)
            except Exception as e:  # the board's MemoryError comes back as the REPL's error
                failed.append(f"{col} {m}: {str(e).splitlines()[-1][:120]}")
                continue
            r["same"] = r["out"] == want[m]["out"]
            res[(col, m)] = r
    cols = list(res)
    print("\n| phase (instructions, both rounds) | "
          + " | ".join(f"{b} {m}" for b, m in cols) + " |")
    print("| --- | " + " | ".join("---:" for _ in cols) + " |")
    for p in PHASES:
        print(f"| {p} | " + " | ".join(_n(res[c]["cost"].get(p, 0)) if p in res[c]["cost"]
                                        else "–" for c in cols) + " |")
    for k in ("gossip_round", "coordinated_round", "round_1"):
        cells = [_n(roundcase.round_costs(res[c]).get(k, 0)) if k in roundcase.round_costs(res[c])
                 else "–" for c in cols]
        print(f"| **{k}** | " + " | ".join(cells) + " |")
    print("| live heap, most after any phase (B) | "
          + " | ".join(_n(max(res[c]["live"].values())) for c in cols) + " |")
    for p in PHASES:
        print(f"| live heap after {p} (B) | "
              + " | ".join(_n(res[c]["live"][p]) if p in res[c]["live"] else "–" for c in cols)
              + " |")
    print("\nequal to the x86 reference bit for bit: "
          + ", ".join(f"{b} {m}: {res[(b, m)]['same']}" for b, m in cols))
    for f in failed:
        print(f"\ndid not run: {f}")


def unix32_heap() -> None:
    exe = str(firmware.build("unix32"))
    print("\n| unix32 (files for shard and vectors) | gossip | coordinated |")
    print("| --- | ---: | ---: |")
    live, small = [], []
    for m in ("gossip", "coordinated"):
        c = roundcase.make_case(gossip=m == "gossip")
        r = roundcase.run_unix(exe, c, "512k")
        assert r["out"] == roundcase.run_reference(c)["out"]
        live.append(max(r["live"].values()))
        small.append(roundcase.smallest_heap(exe, c))
    print("| live heap, most after any phase (B) | " + " | ".join(_n(v) for v in live) + " |")
    print("| smallest -X heapsize the round runs in (B) | "
          + " | ".join(_n(v) for v in small) + " |")


def write_into(path: Path, text: str, flags: str = "") -> None:
    write_between(path, f"benchmarks/device.py{flags}", f"python benchmarks/device.py{flags}",
                  text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", action="append", default=None)
    ap.add_argument("--no-round", action="store_true", help="only the component phases")
    ap.add_argument("--m3-heap", type=lambda t: int(t.lower().rstrip("k")) * 1024,
                    action="append", default=None, metavar="KB",
                    help="also run the round on mps2-an385 from a firmware with this heap "
                         "(e.g. 64k; repeatable; default 64k), shard and vectors on its disk")
    ap.add_argument("--dp", action="store_true", help="only the local-DP costs (microfed.dp)")
    ap.add_argument("--mlp", action="store_true", help="only the MLP's costs (microfed.mlp)")
    ap.add_argument("--write", type=Path, default=None, help="also write the tables into this file")
    a = ap.parse_args()
    boards = a.board or (["mps2-an385"] if a.dp else ["mps2-an385", "virt-rv32"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if a.dp:
            dp_costs(boards)
        elif a.mlp:
            mlp_costs(boards)
        else:
            components(boards)
            if not a.no_round:
                rounds(boards, a.m3_heap or [64 * 1024])
                unix32_heap()
    print(out.getvalue())
    if a.write is not None:
        write_into(a.write, out.getvalue(), " --dp" if a.dp else " --mlp" if a.mlp else "")


if __name__ == "__main__":
    main()
