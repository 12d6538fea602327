"""The L2 norms of the nodes' deltas on the digits model, which secure aggregation's clip
bound (scenario key clip_l2, default 16.0) is measured against (docs/privacy.md, "Clipping").
Runs plain FedAvg in-process and reads every accepted update back from coordinator.sqlite.

    .venv/bin/python benchmarks/secagg_norms.py [--honest 10] [--rounds 10] [--seeds 1,2,3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from microfed import dgauss, wire
from microfed_host import mesh
from microfed_host.rounds_store import RoundsStore


def norms(honest: int, rounds: int, seed: int, work: Path) -> list[float]:
    sc = mesh.Scenario(name="norms", honest=honest, rule="fedavg", f=0, rounds=rounds,
                       seed=seed, mode="coordinated")
    out = work / f"seed{seed}"
    mesh.run(sc, out, transport="inproc", say=None)
    st = RoundsStore(out / "coordinator.sqlite")
    try:
        found = []
        for r in range(1, rounds + 1):
            for raw in st.accepted_frames(r):
                v = wire.decode(raw).body["values"]
                found.append(dgauss.isqrt(sum(x * x for x in v)) / 65536)
        return found
    finally:
        st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--honest", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="1,2,3")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        allv: list[float] = []
        for s in (int(x) for x in a.seeds.split(",")):
            allv += norms(a.honest, a.rounds, s, Path(d))
    allv.sort()
    print(f"{len(allv)} deltas ({a.honest} nodes x {a.rounds} rounds x seeds {a.seeds}): "
          f"L2 norm min {allv[0]:.3f}, median {statistics.median(allv):.3f}, "
          f"max {allv[-1]:.3f} (model units)")


if __name__ == "__main__":
    main()
