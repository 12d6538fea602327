"""Generate tests/vectors/q16.json and tests/vectors/aggregate.json from the reference.

The reference (shared/microfed, run on CPython) defines the expected results; every other
implementation (numpy fast path, MicroPython, devices) must reproduce them bit for bit.
Deterministic: re-running produces identical files. Usage: python tools/gen_vectors.py
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "tests"))

import vector_runner  # noqa: E402

from microfed import audit, q16  # noqa: E402

LO, HI = q16.MIN_RAW, q16.MAX_RAW
EDGES = [LO, LO + 1, -65537, -65536, -65535, -32769, -32768, -32767, -2, -1, 0, 1, 2,
         32767, 32768, 32769, 65535, 65536, 65537, HI - 1, HI]


def q16_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def add(op: str, *args: Any) -> None:
        case: dict[str, Any] = {"op": op, "args": list(args)}
        case.update(vector_runner.run_q16(case))
        cases.append(case)

    for op in ("add", "sub", "mul"):
        for a in EDGES[::2]:
            for b in (LO, -65536, -1, 0, 1, 32768, HI):
                add(op, a, b)
    for a, b in [(-1, 32768), (-3, 32768), (1, 32768), (3, 32768), (-1, 1), (-32768, 1),
                 (-32769, 1), (98304, -98304), (-98304, -98304), (1 << 24, 1 << 24)]:
        add("mul", a, b)
    for _ in range(30):
        add("mul", rng.randint(LO, HI), rng.randint(-(1 << 18), 1 << 18))
    for a in (LO, -196608, -98304, -65536, -1, 0, 1, 98304, HI):
        for b in (LO, -131072, -65536, -3, 3, 65536, 131072, 196608, HI, 0):
            add("div", a, b)
    for s, m in [(1, 2), (-1, 2), (3, 2), (-3, 2), (-5, 2), (5, 4), (-6, 4), (-7, 4), (7, 3),
                 (-7, 3), (0, 5), (-(1 << 70), 3), ((1 << 70) + 1, 2), (1, 0), (5, -2)]:
        add("rdiv", s, m)
    for x in (0.0, 0.5 / 65536, -0.5 / 65536, 1.5 / 65536, -1.5 / 65536, 1.0, -1.0, 0.1,
              -0.1, 32767.99999, -32768.0, 40000.0, -40000.0, 1e30, -1e30, 3.14159265):
        add("from_float", x)
    return cases


def expectation(req: dict) -> dict[str, Any]:
    return vector_runner.run_agg(req)


def request(rule: str, ids: list[str], vecs: list[list[int]], f: int = 0, m: int = 1,
            trim: int = 0, weights: list[int] | None = None) -> dict[str, Any]:
    req: dict[str, Any] = {"rule": rule}
    for name, value in (("f", f), ("m", m), ("trim", trim)):
        if name in audit.PARAMS[rule]:
            req[name] = value
    ups = []
    for i, node in enumerate(ids):
        u: dict[str, Any] = {"node": node, "vector": vecs[i]}
        if rule == "fedavg":
            u["weight"] = (weights or [1] * len(ids))[i]
        ups.append(u)
    req["updates"] = ups
    return req


def rule_params(rule: str, n: int, rng: random.Random) -> dict[str, Any]:
    fmax = max(0, (n - 3) // 2)
    f = rng.randint(0, fmax)
    return {"f": f, "m": rng.randint(1, max(1, n - f)), "trim": rng.randint(0, (n - 1) // 2),
            "weights": [rng.choice([0, 1, 7, 100, rng.randint(1, HI)]) for _ in range(n)]}


def agg_cases(rng: random.Random) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    rules = list(audit.RULES)

    def add(name: str, req: dict[str, Any]) -> None:
        cases.append({"name": name, "request": req, "expect": expectation(req)})

    ranges = {"small": (-8, 8), "q16": (-(1 << 18), 1 << 18), "full": (LO, HI)}
    # Random small cases for every rule and value range.
    for i in range(150):
        rule = rules[i % len(rules)]
        n = rng.randint(3, 13)
        d = rng.randint(1, 24)
        rname = list(ranges)[i % 3]
        lo, hi = ranges[rname]
        ids = ["n%02d" % j for j in range(n)]
        rng.shuffle(ids)
        vecs = [[rng.randint(lo, hi) for _ in range(d)] for _ in range(n)]
        p = rule_params(rule, n, rng)
        add("random-%s-%s-%d" % (rule, rname, i),
            request(rule, ids, vecs, p["f"], p["m"], p["trim"], p["weights"]))
    # Saturation corners: every value at an int32 edge.
    for i in range(15):
        rule = rules[i % len(rules)]
        n = 5 + (i % 4)
        ids = ["e%d" % j for j in range(n)]
        vecs = [[rng.choice([LO, HI, LO + 1, HI - 1]) for _ in range(6)] for _ in range(n)]
        p = rule_params(rule, n, rng)
        add("edges-%s-%d" % (rule, i),
            request(rule, ids, vecs, p["f"], p["m"], p["trim"], p["weights"]))
    # Negative rounding: halves that must round toward +infinity.
    for rule in ("median", "trimmed_mean", "fedavg", "multi_krum"):
        vecs = [[-3, -1, 1, -2], [-4, -2, 2, -1], [-3, -1, 1, -2], [-4, -2, 2, -1],
                [-3, -1, 1, -2], [-4, -2, 2, -1]]
        add("neg-rounding-%s" % rule,
            request(rule, ["a", "b", "c", "d", "e", "f"], vecs, f=1, m=2, trim=1,
                    weights=[1, 1, 1, 1, 1, 1]))
    # Identical inputs: every score ties at 0, the smallest id wins.
    for n, f in ((3, 0), (5, 1), (7, 2), (9, 3)):
        ids = ["z", "b", "y", "a", "x", "c", "w", "d", "v"][:n]
        for rule in ("krum", "multi_krum", "median", "trimmed_mean", "fedavg"):
            add("identical-%s-n%d" % (rule, n),
                request(rule, ids, [[5, -7, 65536]] * n, f=f, m=n - f, trim=f))
    # Score ties broken by node id as UTF-8 bytes, including non-ASCII and digit-order traps.
    tie_ids = ["node10", "node9", "Zeta", "zeta", "\u00e4", "\u4e2d", "n\u00e9"]
    for k in range(4):
        ids = tie_ids[k:k + 5] if k + 5 <= len(tie_ids) else tie_ids[:5]
        # Symmetric layout: points on +/- axis, so several scores tie exactly.
        vecs = [[1, 0], [-1, 0], [0, 1], [0, -1], [0, 0]]
        add("tie-ids-krum-%d" % k, request("krum", ids, vecs, f=1))
        add("tie-ids-multi_krum-%d" % k, request("multi_krum", ids, vecs, f=1, m=3))
    # The minimum n = 2f + 3 with an outlier group of size f.
    for f in range(0, 6):
        n = 2 * f + 3
        ids = ["m%d" % j for j in range(n)]
        vecs = [[rng.randint(-100, 100) for _ in range(8)] for _ in range(n - f)]
        vecs += [[rng.choice([LO, HI]) for _ in range(8)] for _ in range(f)]
        add("min-n-krum-f%d" % f, request("krum", ids, vecs, f=f))
        add("min-n-multi_krum-f%d" % f, request("multi_krum", ids, vecs, f=f, m=n - f))
    # The peer pitfall: one coordinate gap of ~182 (saturating distances tie every score).
    ids = ["attacker", "h1", "h2", "h3", "h4"]
    vecs = [[182 * 65536, 0]] + [[j, -j] for j in range(4)]
    add("saturation-pitfall-krum", request("krum", ids, vecs, f=1))
    # Distances far beyond 2^63: full-range values on wide vectors (generated).
    for i, (n, d) in enumerate(((5, 1000), (7, 4096), (9, 20000))):
        f = (n - 3) // 2
        for rule in ("krum", "multi_krum"):
            req = {"rule": rule, "f": f, "m": n - f,
                   "generate": {"seed": 1000 + i, "ids": ["g%d" % j for j in range(n)],
                                "d": d, "lo": LO, "hi": HI}}
            if rule == "krum":
                del req["m"]
            add("huge-distance-%s-n%d-d%d" % (rule, n, d), req)
    # d from 1 to 100 000 for every rule (generated inputs).
    for d in (1, 2, 3, 10, 100, 1000, 10000, 100000):
        for rule in rules:
            n = 5 if d >= 10000 else 7
            req: dict[str, Any] = {"rule": rule}
            req.update({k: v for k, v in (("f", 1), ("m", 3), ("trim", 1))
                        if k in audit.PARAMS[rule]})
            gen: dict[str, Any] = {"seed": d * 7 + rules.index(rule), "d": d,
                                   "ids": ["d%d" % j for j in range(n)],
                                   "lo": -(1 << 20), "hi": 1 << 20}
            if rule == "fedavg":
                gen["weights"] = [j + 1 for j in range(n)]
            req["generate"] = gen
            add("width-%s-d%d" % (rule, d), req)
    # Errors every engine must refuse with the same message.
    three = [[1], [2], [3]]
    add("error-krum-n-too-small", request("krum", ["a", "b", "c", "d"], [[1]] * 4, f=1))
    add("error-multi_krum-m-too-big", request("multi_krum", ["a", "b", "c", "d", "e"],
                                              [[1], [2], [3], [4], [5]], f=1, m=5))
    add("error-multi_krum-m-zero", request("multi_krum", ["a", "b", "c"], three, f=0, m=0))
    add("error-trim-too-big", request("trimmed_mean", ["a", "b", "c"], three, trim=2))
    add("error-fedavg-zero-weight", request("fedavg", ["a", "b", "c"], three, weights=[0, 0, 0]))
    add("error-ragged", request("median", ["a", "b"], [[1, 2], [3]]))
    add("error-non-integer", {"rule": "median", "updates": [{"node": "a", "vector": [1.5]}]})
    add("error-bool", {"rule": "median", "updates": [{"node": "a", "vector": [True]}]})
    add("error-int32-overflow", request("median", ["a"], [[HI + 1]]))
    add("error-int32-underflow", request("median", ["a"], [[LO - 1]]))
    add("error-unknown-rule", {"rule": "bulyan", "updates": [{"node": "a", "vector": [1]}]})
    add("error-duplicate-id", request("median", ["a", "a"], [[1], [2]]))
    add("error-missing-f", {"rule": "krum", "updates": [{"node": "a", "vector": [1]}]})
    add("error-negative-f", request("krum", ["a", "b", "c"], three, f=-1))
    add("error-empty-updates", {"rule": "median", "updates": []})
    add("error-empty-vector", request("median", ["a"], [[]]))
    add("error-unknown-field", {"rule": "median", "updates": [{"node": "a", "vector": [1]}],
                                "trimm": 1})
    return cases


def defence_request(rule: str, ids: list[str], vecs: list[list[int]], pre: str | None = None,
                    **params: int) -> dict[str, Any]:
    """A request for a defence case: only the parameters given, in a fixed key order."""
    req: dict[str, Any] = {"rule": rule}
    if pre is not None:
        req["pre"] = pre
    for name in audit.FIELDS:
        if name in params:
            req[name] = params[name]
    req["updates"] = [{"node": node, "vector": vecs[i]}
                      | ({"weight": params.get("weight", 1 + i % 3)} if rule == "fedavg" else {})
                      for i, node in enumerate(ids)]
    return req


def rule_args(rule: str, n: int, f: int, rng: random.Random) -> dict[str, int]:
    """The rule's own parameters for n inputs (after a pre step), f already chosen."""
    out: dict[str, int] = {}
    if rule in ("krum", "multi_krum"):
        out["f"] = f
    if rule == "multi_krum":
        out["m"] = rng.randint(1, n - f)
    if rule == "trimmed_mean":
        out["trim"] = rng.randint(0, (n - 1) // 2)
    if rule == "centered_clipping":
        out["tau"] = rng.choice([1, 3, 65536, 1 << 20, 1 << 26, HI])
        out["iters"] = rng.randint(1, 4)
    return out


def defence_cases(rng: random.Random) -> list[dict[str, Any]]:
    """Nearest-neighbour mixing, bucketing and centered clipping (docs/determinism.md 4.7-4.9).
    A separate generator so that the cases before them never change."""
    cases: list[dict[str, Any]] = []
    rules = list(audit.RULES + audit.DEFENCE_RULES)

    def add(name: str, req: dict[str, Any]) -> None:
        cases.append({"name": name, "request": req, "expect": expectation(req)})

    ranges = {"small": (-8, 8), "q16": (-(1 << 18), 1 << 18), "full": (LO, HI)}
    # Random small cases: every rule after each pre step, and centered clipping alone.
    for i in range(78):
        pre = (None, "nnm", "bucketing")[i % 3]
        rule = rules[(i // 3) % len(rules)]
        if pre is None:
            rule = "centered_clipping"
        if pre == "bucketing" and rule == "fedavg":
            rule = "median"
        rname = list(ranges)[(i // 2) % 3]
        lo, hi = ranges[rname]
        n = rng.randint(3, 13)
        if pre == "bucketing" and rule in ("krum", "multi_krum"):
            n = rng.randint(9, 13)  # at least 3 buckets of up to 3 (the error has its case)
        d = rng.randint(1, 12)
        ids = ["p%02d" % j for j in range(n)]
        rng.shuffle(ids)
        vecs = [[rng.randint(lo, hi) for _ in range(d)] for _ in range(n)]
        if rng.random() < 0.25:  # duplicates: distance ties, broken by id
            vecs[1] = list(vecs[0])
        extra: dict[str, int] = {}
        n_after = n
        f = 0
        if pre == "nnm":
            f = rng.randint(0, (n - 1) // 2)
            if rule in ("krum", "multi_krum"):
                f = rng.randint(0, (n - 3) // 2)
            extra["f"] = f
        elif pre == "bucketing":
            s = rng.randint(1, 3)
            extra.update(bucket=s, seed=rng.randint(0, MAX_U32))
            n_after = -(-n // s)
        if rule in ("krum", "multi_krum") and pre != "nnm":
            f = rng.randint(0, max(0, (n_after - 3) // 2))
        extra.update(rule_args(rule, n_after, f, rng))
        add("%s-%s-%s-%d" % (pre or "cc", rule, rname, i),
            defence_request(rule, ids, vecs, pre, **extra))
    # NNM of identical updates is the identity; every rule then sees the same inputs.
    for rule in ("krum", "median", "centered_clipping"):
        ids = ["z", "b", "y", "a", "x"]
        extra = {"f": 1} | rule_args(rule, 5, 1, random.Random(0))
        add("nnm-identical-%s" % rule, defence_request(rule, ids, [[5, -7, 65536]] * 5, "nnm",
                                                        **extra))
    # NNM ties: points on the axes, equal distances broken by UTF-8 id (non-ASCII included).
    tie_ids = ["node10", "node9", "\u00e4", "\u4e2d", "Zeta"]
    vecs = [[65536, 0], [-65536, 0], [0, 65536], [0, -65536], [0, 0]]
    for f in (1, 2):
        add("nnm-tie-ids-median-f%d" % f, defence_request("median", tie_ids, vecs, "nnm", f=f))
        add("nnm-tie-ids-krum-f%d" % f, defence_request("krum", tie_ids + ["n\u00e9", "a"],
                                                         vecs + [[1, 1], [-1, -1]], "nnm", f=f))
    # NNM's minimum n = 2f + 1; f = 0 makes every update the mean.
    for f in range(0, 4):
        n = 2 * f + 1
        ids = ["m%d" % j for j in range(n)]
        vecs = [[rng.randint(-100, 100) for _ in range(4)] for _ in range(n - f)]
        vecs += [[rng.choice([LO, HI]) for _ in range(4)] for _ in range(f)]
        add("nnm-min-n-median-f%d" % f, defence_request("median", ids, vecs, "nnm", f=f))
    # Bucketing: one per bucket (the rule alone), all in one, uneven last bucket, seeds.
    ids = ["b%d" % j for j in range(7)]
    vecs = [[rng.randint(-1000, 1000) for _ in range(3)] for _ in range(7)]
    for s in (1, 2, 3, 7, 9):
        for seed in (0, MAX_U32):
            add("bucketing-s%d-seed%d-median" % (s, seed),
                defence_request("median", ids, vecs, "bucketing", bucket=s, seed=seed))
    add("bucketing-s1-krum", defence_request("krum", ids, vecs, "bucketing", bucket=1, seed=5,
                                             f=2))
    add("bucketing-s2-multi_krum", defence_request("multi_krum", ids, vecs, "bucketing",
                                                   bucket=2, seed=5, f=0, m=2))
    # Centered clipping: no clipping (huge tau), clipping of everything (tau = 1), the
    # int32 corners (differences near 2^32 times tau near 2^31), negative rounding.
    ids = ["c%d" % j for j in range(6)]
    corner = [[LO, HI, 0], [HI, LO, HI], [LO, LO, LO], [HI, HI, HI], [0, LO, HI], [HI, 0, LO]]
    small = [[-3, -1, 1], [-4, -2, 2], [5, 1, -7], [-4, -2, 2], [100, -100, 3], [0, 0, 1]]
    for name, vs in (("edges", corner), ("small", small)):
        for tau in (1, 2, 65536, HI):
            for iters in (1, 3):
                add("cc-%s-tau%d-it%d" % (name, tau, iters),
                    defence_request("centered_clipping", ids, vs, tau=tau, iters=iters))
    add("cc-nnm-edges", defence_request("centered_clipping", ids, corner, "nnm", f=2,
                                        tau=1 << 30, iters=2))
    add("cc-bucketing-edges", defence_request("centered_clipping", ids, corner, "bucketing",
                                              bucket=2, seed=9, tau=1 << 30, iters=2))
    # Wide vectors (generated) and distances beyond 2^63 through NNM.
    for d, lo, hi in ((1000, LO, HI), (4096, LO, HI), (10000, -(1 << 20), 1 << 20)):
        for rule, pre, extra in (("krum", "nnm", {"f": 1}), ("median", "bucketing",
                                                             {"bucket": 2, "seed": d}),
                                 ("centered_clipping", None, {"tau": 1 << 24, "iters": 2})):
            req = {"rule": rule} | ({"pre": pre} if pre else {}) | extra
            req["generate"] = {"seed": 77 + d, "ids": ["w%d" % j for j in range(5)], "d": d,
                               "lo": lo, "hi": hi}
            add("width-%s-%s-d%d" % (pre or "cc", rule, d), req)
    # Errors every engine refuses with the same message.
    three = [[1], [2], [3]]
    abc = ["a", "b", "c"]
    add("error-nnm-n-too-small", defence_request("median", abc, three, "nnm", f=2))
    add("error-nnm-missing-f", defence_request("median", abc, three, "nnm"))
    add("error-unknown-pre", {"rule": "median", "pre": "mix",
                              "updates": [{"node": "a", "vector": [1]}]})
    add("error-bucket-zero", defence_request("median", abc, three, "bucketing", bucket=0,
                                             seed=1))
    add("error-bucket-missing-seed", defence_request("median", abc, three, "bucketing",
                                                     bucket=1))
    add("error-seed-too-big", defence_request("median", abc, three, "bucketing", bucket=1,
                                              seed=MAX_U32 + 1))
    add("error-bucket-without-pre", defence_request("median", abc, three, bucket=1))
    add("error-bucketing-fedavg", defence_request("fedavg", abc, three, "bucketing", bucket=1,
                                                  seed=1))
    add("error-bucketing-too-few-buckets-krum",
        defence_request("krum", ["a", "b", "c", "d", "e"], [[1], [2], [3], [4], [5]],
                        "bucketing", bucket=2, seed=1, f=1))
    add("error-cc-tau-zero", defence_request("centered_clipping", abc, three, tau=0, iters=1))
    add("error-cc-tau-too-big", defence_request("centered_clipping", abc, three, tau=HI + 1,
                                                iters=1))
    add("error-cc-iters-zero", defence_request("centered_clipping", abc, three, tau=1, iters=0))
    add("error-cc-iters-too-many", defence_request("centered_clipping", abc, three, tau=1,
                                                   iters=1001))
    add("error-cc-missing-tau", defence_request("centered_clipping", abc, three, iters=1))
    return cases


MAX_U32 = (1 << 32) - 1


def main() -> None:
    rng = random.Random(20261122)
    out = ROOT / "tests" / "vectors"
    out.mkdir(parents=True, exist_ok=True)
    q = q16_cases(rng)
    a = agg_cases(rng) + defence_cases(random.Random(20261207))
    (out / "q16.json").write_text(json.dumps({"version": 1, "cases": q}, indent=0) + "\n")
    (out / "aggregate.json").write_text(json.dumps({"version": 1, "cases": a}, indent=0) + "\n")
    print("q16: %d cases, aggregate: %d cases" % (len(q), len(a)))


if __name__ == "__main__":
    main()
