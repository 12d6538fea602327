"""Aggregation speed: microfed's exact fast path against peers, on the same data, in one run.

Krum: microfed exact (integer-exact Gram via float64 limbs) vs a plain numpy float64 Gram-matrix
Krum (the speed floor, not exact), qora-fl's Krum and flwr's aggregate_krum. Median and trimmed
mean: microfed vs qora-fl. Times are medians of interleaved repeats; the table reports ratios
to microfed, because the machines are shared and noisy. Peers that are not installed are
reported as missing (install them with `./dev bench`, which uses a separate venv).

    python benchmarks/aggregate.py [--quick] [--repeat N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from microfed_host import fast

SIZES = [(10, 100_000), (50, 100_000), (100, 10_000), (20, 1_000_000)]
QUICK_SIZES = [(10, 10_000), (20, 10_000)]


def byzantine_f(n: int) -> int:
    return min(n // 5, (n - 3) // 2)


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Q16.16 model deltas ~ N(0, 0.5) as raw int32, and the same values as float64."""
    rng = np.random.default_rng(seed)
    raw = np.clip(np.rint(rng.normal(0.0, 0.5, size=(n, d)) * 65536), -(2**31), 2**31 - 1)
    x = raw.astype(np.int32)
    return x, x.astype(np.float64) / 65536.0


def float_gram_krum(xf: np.ndarray, f: int) -> int:
    g = xf @ xf.T
    sq = np.diag(g)
    dist = sq[:, None] + sq[None, :] - 2.0 * g
    n = xf.shape[0]
    k = n - f - 2
    np.fill_diagonal(dist, np.inf)
    scores = np.sort(dist, axis=1)[:, :k].sum(axis=1)
    return int(np.argmin(scores))


def peers() -> dict[str, Callable]:
    found: dict[str, Callable] = {}
    try:
        from qora import ByzantineAggregator

        def qora_rule(name: str, trim: float = 0.1) -> Callable:
            agg = ByzantineAggregator(name, trim)
            return lambda ups: agg.aggregate(ups)

        found["qora"] = qora_rule
    except ImportError:
        pass
    try:
        from flwr.server.strategy.aggregate import aggregate_krum

        found["flwr_krum"] = aggregate_krum
    except ImportError:
        pass
    return found


def timeit(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():  # interleaved: noise hits every contender alike
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def cell(times: dict[str, float], key: str, base: str) -> str:
    if key not in times:
        return "not installed"
    return f"{times[key] * 1e3:.1f} ({times[key] / times[base]:.2f}x)"


def bench_size(n: int, d: int, p: dict[str, Callable], repeat: int) -> tuple[str, str]:
    """One size: Krum contenders, then median / trimmed-mean contenders; two table rows."""
    f = byzantine_f(n)
    x, xf = make_data(n, d, seed=n * 1000 + d)
    ids = [f"n{i:03d}" for i in range(n)]
    # Same answer first: a benchmark of a wrong result is worthless.
    win = fast.krum(ids, x, f)[1][0]
    assert ids[float_gram_krum(xf, f)] == win, "float Gram Krum picked another winner"
    fns: dict[str, Callable[[], object]] = {
        "exact": lambda: fast.krum(ids, x, f),
        "gram": lambda: float_gram_krum(xf, f),
    }
    ups2d = [row.reshape(1, -1).astype(np.float32) for row in xf]  # qora takes float32
    if "qora" in p:
        qk = p["qora"](f"krum:{f}")
        fns["qora"] = lambda: qk(ups2d)
    if "flwr_krum" in p:
        results = [([row], 1) for row in xf]
        fns["flwr"] = lambda: p["flwr_krum"](results, f, 0)
    print(f"krum n={n} d={d} f={f} ...", file=sys.stderr, flush=True)
    t = timeit(fns, repeat)

    krum_row = (f"| {n} | {d} | {f} | {t['exact'] * 1e3:.1f} | {cell(t, 'gram', 'exact')} | "
                f"{cell(t, 'qora', 'exact')} | {cell(t, 'flwr', 'exact')} |")
    trim = max(1, n // 10)
    cfns: dict[str, Callable[[], object]] = {
        "median": lambda: fast.median(x),
        "trimmed": lambda: fast.trimmed_mean(x, trim),
    }
    if "qora" in p:
        qm = p["qora"]("median")
        qt = p["qora"]("trimmed_mean", trim / n)
        cfns["qmedian"] = lambda: qm(ups2d)
        cfns["qtrimmed"] = lambda: qt(ups2d)
    print(f"median/trimmed n={n} d={d} ...", file=sys.stderr, flush=True)
    c = timeit(cfns, repeat)

    rt_row = (f"| {n} | {d} | {c['median'] * 1e3:.1f} | {cell(c, 'qmedian', 'median')} | "
              f"{c['trimmed'] * 1e3:.1f} | {cell(c, 'qtrimmed', 'trimmed')} |")
    return krum_row, rt_row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", help="also write the tables to this file")
    args = ap.parse_args()
    sizes = QUICK_SIZES if args.quick else SIZES
    p = peers()
    missing = [name for name in ("qora", "flwr_krum") if name not in p]
    lines = ["### Krum (time in ms; ratio = contender / microfed exact)", "",
             "| n | d | f | microfed exact | float64 Gram | qora-fl krum | flwr aggregate_krum |",
             "|---|---|---|---|---|---|---|"]
    rows_rt = ["", "### Median and trimmed mean (10% each end)", "",
               "| n | d | microfed median | qora-fl median | microfed trimmed | qora-fl trimmed |",
               "|---|---|---|---|---|---|"]
    for n, d in sizes:
        krum_row, rt_row = bench_size(n, d, p, args.repeat)
        lines.append(krum_row)
        rows_rt.append(rt_row)
    text = "\n".join(lines + rows_rt)
    if missing:
        text += "\n\nNot installed (run `./dev bench`): " + ", ".join(missing)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
