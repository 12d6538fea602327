"""Agreement with the literature's implementation: ByzFL's Krum, trimmed mean, median,
nearest-neighbour mixing and centered clipping against microfed's exact rules, on the same
inputs (issue 12, item 5).

    python benchmarks/byzfl_agreement.py [--trials 300] [--write docs/results.md]

ByzFL (byzfl 0.0.11 on PyPI) computes in float64 (numpy/scipy, or torch); microfed in exact
Q16.16 integers. Each trial draws n = 13 updates of d = 650 Q16.16 values (the mesh's model),
f = 3, from one of three families: "gaussian" (N(0, 0.5) in model units), "duplicates" (three
identical copies among them: mimic/Fang-style attackers, where Krum's ties decide), "offset"
(a common offset of 2^14 model units on every update, so that float distances lose digits),
"fang" (three copies of mean(honest) - lambda sign(mean(honest)), lambda in [0.05, 0.6]: Fang
et al.'s attack on Krum, where which neighbours a score counts decides the pick).
For each rule: how often the same update is selected (Krum) or the same vector results,
and how far apart the outputs are in Q16.16 steps (ByzFL's float output rounded to the
nearest raw value). Then the why: definitions (ByzFL's Krum scores sum n - f - 1 neighbours,
Blanchard et al. and microfed n - f - 2), ties (argmin takes the first index; microfed the
smallest node id), rounding (microfed rounds every mean half away from zero), float error.

It needs torch (CPU) and byzfl, which the main venv does not carry: it makes `.venv-byzfl`
on first use (pip: byzfl==0.0.11 with torch==2.13.0) and runs itself there. ByzFL's package
__init__ imports its training framework, which imports torchvision (which fails to import
beside that torch); the aggregators do not need it, so they are imported on their own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-byzfl"
PINS = ["byzfl==0.0.11", "torch==2.13.0", "numpy", "scipy"]
N, D, F = 13, 650, 3
Q = 65536


def _ensure_venv() -> None:
    try:
        import scipy  # noqa: F401
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if not py.exists():
        print(f"creating {VENV} with {' '.join(PINS)} (once; a CPU torch)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PINS], check=True)
    os.execv(str(py), [str(py), *sys.argv])


def _byzfl() -> types.ModuleType:
    import site

    for base in site.getsitepackages():
        pkg = Path(base) / "byzfl"
        if pkg.is_dir():
            mod = types.ModuleType("byzfl")
            mod.__path__ = [str(pkg)]  # the package without its __init__ (torchvision)
            sys.modules["byzfl"] = mod
            return importlib.import_module("byzfl.aggregators")
    raise SystemExit("byzfl is not installed in " + sys.prefix)


def draw(kind: str, rng: object) -> list[list[int]]:
    import numpy as np

    assert isinstance(rng, np.random.Generator)
    x = rng.normal(0.0, 0.5, size=(N, D))
    if kind == "duplicates":
        x[N - 3:] = x[0] * -1.0  # three identical updates
    elif kind == "fang":  # Fang et al.'s attack on Krum: three copies just off the honest mean
        mu = x[:N - 3].mean(axis=0)
        x[N - 3:] = mu - rng.uniform(0.05, 0.6) * np.sign(mu)
    elif kind == "offset":
        x += 2.0 ** 14
    raw = np.clip(np.round(x * Q), -(2 ** 31), 2 ** 31 - 1).astype(np.int64)
    return [[int(v) for v in row] for row in raw]


def _krum_index(dm: list[list[int]], k: int, ids: list[str]) -> int:
    scores = []
    for i in range(len(dm)):
        row = sorted(dm[i][:i] + dm[i][i + 1:])
        scores.append(sum(row[:k]))
    return min(range(len(dm)), key=lambda i: (scores[i], ids[i]))


def trial(kind: str, seed: int, bz: types.ModuleType) -> dict[str, object]:
    import numpy as np

    from microfed import aggregate as agg
    from microfed import defences as dfn

    rng = np.random.default_rng(seed)
    vecs = draw(kind, rng)
    ids = ["node-%02d" % (i + 1) for i in range(N)]
    x = np.asarray(vecs, dtype=np.float64) / Q
    out: dict[str, object] = {}
    # Krum: the selection, microfed's definition and ByzFL's neighbour count, exactly.
    dm = [[agg.dist(a, b) for b in vecs] for a in vecs]
    ours = _krum_index(dm, N - F - 2, ids)
    ours_k1 = _krum_index(dm, N - F - 1, ids)
    theirs = bz.Krum(f=F)(x)
    hit = [i for i in range(N) if np.array_equal(x[i], theirs)]
    out["krum_same"] = ours in hit
    out["krum_same_as_exact_with_its_count"] = ours_k1 in hit
    out["krum_tie"] = len(hit) > 1
    # Coordinate-wise rules and the pre step: distance in Q16.16 steps.
    for name, mine, them in (
            ("median", agg.median(vecs), bz.Median()(x)),
            ("trimmed_mean", agg.trimmed_mean(vecs, F), bz.TrMean(f=F)(x)),
            ("nnm", [v for row in dfn.nnm(ids, vecs, F) for v in row],
             bz.NNM(f=F)(x).reshape(-1))):
        diff = np.abs(np.round(np.asarray(them, dtype=np.float64) * Q)
                      - np.asarray(mine, dtype=np.float64))
        out[name + "_max_steps"] = float(diff.max())
        out[name + "_exact"] = bool(diff.max() == 0)
    # Centered clipping from the same start (microfed: the coordinate median; ByzFL's own
    # default is zero and its constructor rejects every start it is given, so it is set on the
    # instance), tau = 1.0 model units, 3 iterations.
    tau, iters = Q, 3
    mine_cc = dfn.centered_clipping(vecs, tau, iters)
    cc = bz.CenteredClipping(L=iters, tau=1.0)
    cc.m = np.asarray(agg.median(vecs), dtype=np.float64) / Q
    diff = np.abs(np.round(cc(x) * Q) - np.asarray(mine_cc, dtype=np.float64))
    out["cc_max_steps"] = float(diff.max())
    out["cc_exact"] = bool(diff.max() == 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300, help="per family (default 300)")
    ap.add_argument("--write", metavar="MD", help="put the table into this markdown file")
    a = ap.parse_args()
    _ensure_venv()
    sys.path[:0] = [str(ROOT / "shared"), str(ROOT / "host"), str(ROOT / "benchmarks")]
    bz = _byzfl()
    from importlib.metadata import version

    import numpy as np
    import torch

    t0 = time.monotonic()
    rows = []
    for kind in ("gaussian", "duplicates", "offset", "fang"):
        res = [trial(kind, 1000 * i + 7, bz) for i in range(a.trials)]
        rows.append((kind, res))
        print(f"  {kind}: {len(res)} trials", file=sys.stderr)
    command = f"python benchmarks/byzfl_agreement.py --trials {a.trials}"
    lines = [f"byzfl {version('byzfl')}, torch {torch.__version__}, "
             f"numpy {np.__version__}; n = {N}, d = {D}, f = {F}; {a.trials} trials per family "
             f"({time.monotonic() - t0:.0f} s).", "",
             "| family | Krum: same pick | Krum, same neighbour count (n-f-1): same pick | "
             "ByzFL Krum ties | median: identical / max steps | trimmed mean: identical / max "
             "steps | NNM: identical / max steps | centered clipping: identical / max steps |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def pct(res: list[dict[str, object]], key: str) -> str:
        return f"{100 * sum(1 for r in res if r[key]) / len(res):.1f} %"

    def steps(res: list[dict[str, object]], name: str) -> str:
        worst = max(float(r[name + "_max_steps"]) for r in res)  # type: ignore[arg-type]
        return f"{pct(res, name + '_exact')} / {worst:g}"

    for kind, res in rows:
        lines.append(f"| {kind} | {pct(res, 'krum_same')} | "
                     f"{pct(res, 'krum_same_as_exact_with_its_count')} | {pct(res, 'krum_tie')} | "
                     f"{steps(res, 'median')} | {steps(res, 'trimmed_mean')} | "
                     f"{steps(res, 'nnm')} | {steps(res, 'cc')} |")
    table = "\n".join(lines)
    print(f"{command}\n\n{table}")
    if a.write:
        from markers import write_between

        write_between(Path(a.write), "benchmarks/byzfl_agreement.py", command, table)


if __name__ == "__main__":
    main()
