"""Aggregation speed: microfed's exact fast path against peers, on the same data, in one run.

Krum: microfed exact (integer-exact Gram via float64 limbs) vs a plain numpy float64 Gram-matrix
Krum (the speed floor, not exact), qora-fl's Krum, Flower 1.42's Krum (``select_multikrum`` +
``aggregate_arrayrecords``, what its Message-API ``Krum`` strategy runs) and flwr's legacy
``aggregate_krum``. Median and trimmed mean: microfed vs qora-fl and Flower 1.42's FedMedian /
FedTrimmedAvg arithmetic. Then Flower strategies end to end: each ``aggregate_train`` on the same
reply Messages, microfed's exact strategies (cross-check off) against Flower's Krum, MultiKrum,
Bulyan, FedMedian and FedTrimmedAvg. Times are medians of interleaved repeats; the tables report
ratios to microfed, because the machines are shared and noisy. Peers that are not installed are
reported as missing (install them with `./dev bench`, which uses a separate venv).

    python benchmarks/aggregate.py [--quick] [--repeat N] [--markdown FILE]
    python benchmarks/aggregate.py --case    # Flower's float Krum vs exact Krum: other winner
"""

from __future__ import annotations

import argparse
import logging
import os
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
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        from flwr.server.strategy.aggregate import aggregate_krum

        found["flwr_krum"] = aggregate_krum
    except ImportError:
        pass
    try:
        from flwr.serverapp.strategy import multikrum

        found["flwr142"] = multikrum
        logging.getLogger("flwr").setLevel(logging.WARNING)  # one INFO line per aggregate
    except ImportError:
        pass
    return found


def flwr142_contents(xf: np.ndarray) -> list:
    """One reply RecordDict per client, as Flower's ClientApps send them (float64 arrays)."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    return [RecordDict({"arrays": ArrayRecord({"params": Array(row)}),
                        "metrics": MetricRecord({"num-examples": 1})}) for row in xf]


def flwr142_replies(xf: np.ndarray) -> list:
    """The same as reply Messages (src_node_id 1..n) for the strategies' aggregate_train."""
    from flwr.app import Message, Metadata

    out = []
    for i, content in enumerate(flwr142_contents(xf)):
        md = Metadata(run_id=1, message_id="", src_node_id=i + 1, dst_node_id=0,
                      reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                      message_type="train")
        out.append(Message(content=content, metadata=md))
    return out


def timeit(fns: dict[str, Callable[[], object]], repeat: int,
           setup: dict[str, Callable[[], object]] | None = None) -> dict[str, float]:
    """Median time per contender; ``setup[name]()`` (untimed) makes the argument a contender
    consumes (Flower's FedMedian, FedTrimmedAvg and Bulyan pop the arrays out of the replies)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    setup = setup or {}
    for _ in range(repeat):
        for name, fn in fns.items():  # interleaved: noise hits every contender alike
            arg = setup[name]() if name in setup else None
            t = time.perf_counter()
            fn() if arg is None else fn(arg)  # type: ignore[call-arg]
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def cell(times: dict[str, float], key: str, base: str) -> str:
    if key not in times:
        return "not installed"
    return f"{times[key] * 1e3:.1f} ({times[key] / times[base]:.2f}x)"


def bench_size(n: int, d: int, p: dict[str, Callable], repeat: int) -> tuple[str, str, str]:
    """One size: Krum contenders, median / trimmed-mean contenders, Flower strategies end to
    end; three table rows."""
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
    contents: list = []
    if "flwr142" in p:
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        mk = p["flwr142"]
        contents = flwr142_contents(xf)
        sel = mk.select_multikrum(contents, f, 1)
        assert sel[0] is contents[int(win[1:])], "flwr 1.42 Krum picked another winner"
        fns["flwr142"] = lambda: aggregate_arrayrecords(
            mk.select_multikrum(contents, f, 1), "num-examples")
    if "flwr_krum" in p:
        results = [([row], 1) for row in xf]
        fns["flwr"] = lambda: p["flwr_krum"](results, f, 0)
    print(f"krum n={n} d={d} f={f} ...", file=sys.stderr, flush=True)
    t = timeit(fns, repeat)

    krum_row = (f"| {n} | {d} | {f} | {t['exact'] * 1e3:.1f} | {cell(t, 'gram', 'exact')} | "
                f"{cell(t, 'qora', 'exact')} | {cell(t, 'flwr142', 'exact')} | "
                f"{cell(t, 'flwr', 'exact')} |")
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
    if "flwr142" in p:
        from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

        # FedMedian / FedTrimmedAvg's arithmetic on the stacked layer (beta = trim / n).
        cfns["fmedian"] = lambda: np.median(np.stack(list(xf)), axis=0)
        cfns["ftrimmed"] = lambda: trim_mean(np.stack(list(xf)), trim / n)
    print(f"median/trimmed n={n} d={d} ...", file=sys.stderr, flush=True)
    c = timeit(cfns, repeat)

    rt_row = (f"| {n} | {d} | {c['median'] * 1e3:.1f} | {cell(c, 'qmedian', 'median')} | "
              f"{cell(c, 'fmedian', 'median')} | {c['trimmed'] * 1e3:.1f} | "
              f"{cell(c, 'qtrimmed', 'trimmed')} | {cell(c, 'ftrimmed', 'trimmed')} |")
    if "flwr142" not in p:
        return krum_row, rt_row, f"| {n} | {d} | {f} | flwr 1.42 not installed |"
    return krum_row, rt_row, bench_strategies(n, d, f, trim, xf, repeat)


def bench_strategies(n: int, d: int, f: int, trim: int, xf: np.ndarray, repeat: int) -> str:
    """Flower strategies end to end: aggregate_train on the same reply Messages. microfed's
    strategies run with the reference cross-check off (its cost is the portable code's, see
    docs/flower.md); the replies decode from Flower's bytes inside every contender."""
    from flwr.serverapp import strategy as fs

    from microfed_host import flower as mf

    m = n - 2 * f  # Multi-Krum's selection: Bulyan's theta for the same f
    beta = trim / n
    strategies = {
        "xkrum": mf.ExactKrum(num_malicious_nodes=f, crosscheck="off"),
        "krum": fs.Krum(num_malicious_nodes=f),
        "xmulti": mf.ExactMultiKrum(num_malicious_nodes=f, num_nodes_to_select=m,
                                    crosscheck="off"),
        "multi": fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m),
        "xmedian": mf.ExactMedian(crosscheck="off"),
        "median": fs.FedMedian(),
        "xtrim": mf.ExactTrimmedMean(trim=trim, crosscheck="off"),
        "trim": fs.FedTrimmedAvg(beta=beta),
    }
    bf = max(0, min(f, (n - 3) // 4))  # Bulyan needs n >= 4f + 3
    strategies["bulyan"] = fs.Bulyan(num_malicious_nodes=bf)
    shared = flwr142_replies(xf)
    fns: dict[str, Callable] = {}
    setup: dict[str, Callable[[], object]] = {}
    for name, st in strategies.items():
        fns[name] = lambda replies, st=st: st.aggregate_train(1, replies)
        # FedMedian, FedTrimmedAvg and Bulyan pop the arrays out of the replies: fresh ones.
        setup[name] = (lambda: flwr142_replies(xf)) if name in ("median", "trim", "bulyan") else (
            lambda: shared)
    print(f"flower strategies n={n} d={d} ...", file=sys.stderr, flush=True)
    t = timeit(fns, repeat, setup)
    return (f"| {n} | {d} | {f} | {t['xkrum'] * 1e3:.1f} | {cell(t, 'krum', 'xkrum')} | "
            f"{t['xmulti'] * 1e3:.1f} | {cell(t, 'multi', 'xmulti')} | "
            f"{cell(t, 'bulyan', 'xkrum')} (f={bf}) | {t['xmedian'] * 1e3:.1f} | "
            f"{cell(t, 'median', 'xmedian')} | {t['xtrim'] * 1e3:.1f} | "
            f"{cell(t, 'trim', 'xtrim')} |")


def krum_case() -> int:
    """A case where Flower 1.42's float Krum picks another winner than exact Krum.

    Seven clients send models near 30000.0 in each of 1000 coordinates (raw Q16.16 values,
    so both sides see the very same numbers): six honest ones within +-3 raw units (4.6e-5) of
    it, one Byzantine client 40 units (6.1e-4) away in every coordinate. Exact Krum (f = 1)
    picks an honest client. Flower computes |x|^2 + |y|^2 - 2 x.y in float64: the norms are
    ~9e11, their rounding error (~1e-4) swamps distances of ~4e-4, every distance comes out
    0.0, and argsort's tie order hands the win to the first client: the Byzantine one."""
    from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

    n, f, d = 7, 1, 1000
    rng = np.random.default_rng(0)
    base = np.full(d, 30000 * 65536, dtype=np.int64)
    raw = base + rng.integers(-3, 4, size=(n, d))
    raw[0] = base + 40  # the Byzantine client
    xf = raw.astype(np.float64) / 65536  # exact: every value is a float64
    ids = [f"client-{i}" for i in range(n)]
    exact = fast.krum(ids, raw.astype(np.int32), f)
    contents = flwr142_contents(xf)
    chosen = select_multikrum(contents, f, 1)[0]
    flwr_winner = ids[next(i for i in range(n) if contents[i] is chosen)]
    dm = compute_distances([c["arrays"] for c in contents])
    exact_d = fast.sq_distances(raw)
    print(f"{n} clients, d = {d}, f = {f}; client-0 is Byzantine (+40 raw units in every "
          "coordinate), the others are within +-3 of 30000.0")
    print(f"squared distance client-0 <-> client-1: exact {exact_d[0][1] / 65536**2:.6g}, "
          f"Flower float64 {dm[0, 1]:.6g}")
    print(f"exact Krum (microfed) winner:     {exact[1][0]} (score "
          f"{exact[2][ids.index(exact[1][0])] / 65536**2:.6g}; client-0 scores "
          f"{exact[2][0] / 65536**2:.6g})")
    print(f"Flower 1.42 Krum (float) winner:  {flwr_winner}")
    return 0 if flwr_winner != exact[1][0] else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--case", action="store_true",
                    help="only show a case where Flower 1.42's float Krum picks another winner")
    args = ap.parse_args()
    p = peers()
    if args.case:
        if "flwr142" not in p:
            print("--case needs flwr >= 1.42 (./dev bench's venv)", file=sys.stderr)
            return 2
        return krum_case()
    sizes = QUICK_SIZES if args.quick else SIZES
    missing = [name for name in ("qora", "flwr142", "flwr_krum") if name not in p]
    lines = ["### Krum (time in ms; ratio = contender / microfed exact)", "",
             "| n | d | f | microfed exact | float64 Gram | qora-fl krum | flwr 1.42 Krum | "
             "flwr aggregate_krum (legacy) |",
             "|---|---|---|---|---|---|---|---|"]
    rows_rt = ["", "### Median and trimmed mean (10% each end)", "",
               "| n | d | microfed median | qora-fl median | flwr 1.42 FedMedian | "
               "microfed trimmed | qora-fl trimmed | flwr 1.42 FedTrimmedAvg |",
               "|---|---|---|---|---|---|---|---|"]
    rows_fs = ["", "### Flower strategies end to end: aggregate_train on the same replies", "",
               "| n | d | f | ExactKrum | Krum | ExactMultiKrum (m = n-2f) | MultiKrum | Bulyan "
               "(ratio to ExactKrum) | ExactMedian | FedMedian | ExactTrimmedMean | "
               "FedTrimmedAvg |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, d in sizes:
        krum_row, rt_row, fs_row = bench_size(n, d, p, args.repeat)
        lines.append(krum_row)
        rows_rt.append(rt_row)
        rows_fs.append(fs_row)
    text = "\n".join(lines + rows_rt + rows_fs)
    if missing:
        text += "\n\nNot installed (run `./dev bench`): " + ", ".join(missing)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
