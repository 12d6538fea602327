"""Instructions per phase of a node's work on the emulated MCUs (QEMU -icount shift=0: one
instruction = 1 ns of guest time, so counts repeat). Prints a Markdown table for docs/boards.md.

    .venv/bin/python benchmarks/device.py [--board mps2-an385 --board virt-rv32]
"""

from __future__ import annotations

import argparse

from microfed_tools import devicecost
from microfed_tools.boards import load_board


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--board", action="append", default=None)
    a = ap.parse_args()
    boards = a.board or ["mps2-an385", "virt-rv32"]
    results = {b: devicecost.measure_board(load_board(b))[0] for b in boards}
    want = devicecost.host_expectations()
    print("| phase | " + " | ".join(boards) + " |")
    print("| --- | " + " | ".join("---:" for _ in boards) + " |")
    for phase in devicecost.PHASES:
        cells = [f"{int(results[b][phase]):,}".replace(",", " ") for b in boards]
        print(f"| {phase} | " + " | ".join(cells) + " |")
    heap = ["{:,}".format(int(results[b]["import_heap"])).replace(",", " ") + " B" for b in boards]
    print("| heap taken by the frozen imports | " + " | ".join(heap) + " |")
    same = all({k: results[b][k] for k in want} == want for b in boards)
    print(f"\nresults equal the host's (signature verifies, training digest, Krum winner): {same}")


if __name__ == "__main__":
    main()
