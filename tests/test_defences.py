"""The exact-integer defences (microfed.defences, docs/determinism.md 4.7-4.9): properties and
hand-computed cases of the reference, its request validation, and the numpy fast path bit for
bit against it. The vectors in tests/vectors/aggregate.json replay them on every engine."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pytest

from microfed import aggregate as agg
from microfed import audit, defences
from microfed.aggregate import AggregationError
from microfed_host import fast, upy

LO, HI = -(1 << 31), (1 << 31) - 1


def ref(req: dict) -> dict:
    return audit.run(*audit.parse(req))


def fst(req: dict) -> dict:
    rule, ids, vecs, params = audit.parse(req)
    return fast.run(rule, ids, fast.as_matrix(vecs), params)


def request(rule: str, vecs: list[list[int]], ids: list[str] | None = None, **kw: object) -> dict:
    ids = ids or ["n%d" % i for i in range(len(vecs))]
    return {"rule": rule, **kw, "updates": [{"node": i, "vector": v, "weight": 1}
                                            for i, v in zip(ids, vecs, strict=True)]}


def norm2(v: list[int]) -> int:
    return sum(t * t for t in v)


# ------------------------------------------------------------------ isqrt


def test_isqrt_is_floor_sqrt_small_and_huge() -> None:
    for n in range(0, 5000):
        assert defences.isqrt(n) == math.isqrt(n), n
    rng = random.Random(5)
    for _ in range(2000):
        n = rng.getrandbits(rng.randint(1, 200))
        for m in (n, n * n, n * n - 1 if n else 0, n * n + 1):
            assert defences.isqrt(m) == math.isqrt(m), m
            c = defences.isqrt_ceil(m)
            assert c * c >= m and (c - 1) * (c - 1) < m or m == 0
    with pytest.raises(AggregationError, match="negative"):
        defences.isqrt(-1)


def test_isqrt_on_micropython(micropython: str) -> None:
    """MicroPython has no math.isqrt: the portable one gives the same integers there."""
    nums = [0, 1, 2, 3, 15, 16, 17, (1 << 62) - 1, 1 << 62, (1 << 64) + 7, 10 ** 40 + 1,
            (2 ** 32 - 1) ** 2 * 100000]
    code = ("import json, sys\nfrom microfed import defences\n"
            "print(json.dumps([str(defences.isqrt(int(s))) for s in json.loads(sys.stdin.read())]))")
    out = upy.run(["-c", code], stdin=json.dumps([str(n) for n in nums]))
    assert [int(s) for s in json.loads(out)] == [math.isqrt(n) for n in nums]


# -------------------------------------------------------------------- NNM


def test_nnm_of_identical_updates_is_the_identity() -> None:
    vecs = [[5, -7, 65536, LO, HI]] * 5
    assert defences.nnm(["e", "d", "c", "b", "a"], vecs, 2) == vecs
    out = ref(request("krum", vecs, pre="nnm", f=1))
    assert out["vector"] == vecs[0] and out["pre"] == "nnm"


def test_nnm_with_f_zero_makes_every_update_the_mean() -> None:
    vecs = [[1, -3], [2, 5], [4, 0], [-7, 1]]
    assert defences.nnm(list("abcd"), vecs, 0) == [agg.mean(vecs)] * 4


def test_nnm_hand_computed_with_an_id_tie() -> None:
    # Points 0, 2, 4, 100 on a line; f = 1, so each mixes with its 3 nearest (itself included).
    # "b" (at 2) is equidistant from "a" (0) and "c" (4): both are among its 3, no tie to break.
    # "c" (4): distances a=16, b=4, c=0, d=9216 -> {c, b, a}: (4 + 2 + 0) / 3 = 2.
    # "d" (100): c=9216, b=9604, a=10000 -> {d, c, b}: 106 / 3 = 35.33 -> 35.
    ids, vecs = ["a", "b", "c", "d"], [[0], [2], [4], [100]]
    assert defences.nnm(ids, vecs, 1) == [[2], [2], [2], [35]]
    # A genuine tie: "m" at 0 has "x" and "y" both at distance 1; k = 2 keeps m and the smaller
    # id. Naming the points the other way round changes which one, so the tie-break is visible.
    assert defences.nnm(["m", "x", "y"], [[0], [1], [-1]], 1)[0] == [1]  # rdiv(0 + 1, 2)
    assert defences.nnm(["m", "y", "x"], [[0], [1], [-1]], 1)[0] == [0]  # rdiv(0 - 1, 2)


def test_nnm_does_not_depend_on_input_order() -> None:
    rng = random.Random(3)
    ids = ["u%d" % i for i in range(9)]
    vecs = [[rng.randint(-50, 50) for _ in range(3)] for _ in ids]
    vecs[4] = list(vecs[1])  # a tie at distance 0
    base = dict(zip(ids, defences.nnm(ids, vecs, 3), strict=True))
    order = list(range(9))
    for _ in range(5):
        rng.shuffle(order)
        got = defences.nnm([ids[i] for i in order], [vecs[i] for i in order], 3)
        assert dict(zip([ids[i] for i in order], got, strict=True)) == base


def test_nnm_needs_an_honest_majority() -> None:
    with pytest.raises(AggregationError, match=r"nnm needs n >= 2f \+ 1: n=4, f=2"):
        defences.nnm(list("abcd"), [[1]] * 4, 2)
    with pytest.raises(audit.InputError, match=r"pre nnm needs n >= 2f \+ 1: n=4, f=2"):
        audit.parse(request("median", [[1]] * 4, pre="nnm", f=2))


# -------------------------------------------------------------- bucketing


def test_bucket_order_is_the_documented_hash_order_and_ignores_input_order() -> None:
    ids = ["n%d" % i for i in range(10)] + ["\u00e4", "\U0001F600"]
    seed = 0x01020304
    keys = {i: hashlib.sha256(b"microfed/v1/bucketing" + bytes([4, 3, 2, 1]) + i.encode())
            .digest() for i in ids}
    want = sorted(ids, key=lambda i: keys[i])
    assert [ids[i] for i in defences.bucket_order(ids, seed)] == want
    rev = ids[::-1]
    assert [rev[i] for i in defences.bucket_order(rev, seed)] == want
    assert [ids[i] for i in defences.bucket_order(ids, seed + 1)] != want


def test_bucketing_with_one_per_bucket_is_the_plain_rule() -> None:
    rng = random.Random(11)
    ids = ["b%d" % i for i in range(9)]
    vecs = [[rng.randint(-1000, 1000) for _ in range(4)] for _ in ids]
    for rule, kw in (("krum", {"f": 2}), ("multi_krum", {"f": 1, "m": 3}), ("median", {}),
                     ("trimmed_mean", {"trim": 2}),
                     ("centered_clipping", {"tau": 300, "iters": 3})):
        plain = ref(request(rule, vecs, ids, **kw))
        b = ref(request(rule, vecs, ids, pre="bucketing", bucket=1, seed=42, **kw))
        assert b["vector"] == plain["vector"], rule
        assert b.get("selected") == plain.get("selected")
        assert sorted(g[0] for g in b["buckets"]) == sorted(ids) and b["pre"] == "bucketing"


def test_bucketing_groups_and_uneven_last_bucket() -> None:
    ids = list("abcdefg")
    vecs = [[i * 10, -i] for i in range(7)]
    labels, means, groups = defences.bucketing(ids, vecs, 3, 7)
    order = [ids[i] for i in defences.bucket_order(ids, 7)]
    assert groups == [order[0:3], order[3:6], order[6:7]]
    assert labels == [g[0] for g in groups]
    for g, m in zip(groups, means, strict=True):
        assert m == agg.mean([vecs[ids.index(x)] for x in g])
    # One bucket of everything: the rule sees the mean alone.
    assert ref(request("median", vecs, ids, pre="bucketing", bucket=9, seed=0))["vector"] == \
        agg.mean(vecs)


def test_bucketing_rule_errors_count_buckets() -> None:
    req = request("krum", [[i] for i in range(6)], pre="bucketing", bucket=2, seed=1, f=1)
    with pytest.raises(AggregationError, match=r"n=3, f=1 \(the rule ran on 3 bucket means\)"):
        ref(req)
    with pytest.raises(AggregationError, match=r"n=3, f=1 \(the rule ran on 3 bucket means\)"):
        fst(req)


# ------------------------------------------------------ centered clipping


@pytest.mark.parametrize("u, tau, want", [
    ([3, 4], 5, [3, 4]),       # on the sphere: unchanged
    ([6, 8], 5, [3, 4]),       # |u| = 10, exact scale 1/2
    ([-7, 7], 3, [-2, 2]),     # |u|^2 = 98, ceil(sqrt) = 10: 21 // 10 = 2, toward zero
    ([1, 1], 1, [0, 0]),       # ceil(sqrt(2)) = 2: 1 // 2 = 0
    ([0, -9], 4, [0, -4]),     # one non-zero coordinate lands exactly on tau
])
def test_clip_hand_computed(u: list[int], tau: int, want: list[int]) -> None:
    acc = [0] * len(u)
    defences.clip_into(acc, u, tau)
    assert acc == want


def test_clip_never_exceeds_tau_and_keeps_direction() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        d = rng.randint(1, 8)
        bits = rng.choice([3, 16, 33])
        u = [rng.randint(-(1 << bits) + 1, (1 << bits) - 1) for _ in range(d)]
        tau = rng.choice([1, 2, 3, rng.randint(1, 1 << 20), HI])
        acc = [0] * d
        clipped = defences.clip_into(acc, u, tau)
        assert norm2(acc) <= tau * tau
        assert clipped == (norm2(u) > tau * tau)
        if not clipped:
            assert acc == u
        for a, t in zip(acc, u, strict=True):
            assert abs(a) <= abs(t) and a * t >= 0  # toward zero, never across it


def test_centered_clipping_hand_computed() -> None:
    # [0], [0], [0], [100], tau = 10. v0 = median = rdiv(0 + 0, 2) = 0.
    # Iteration 1: the outlier's difference 100 clips to 10; v = rdiv(10, 4) = 3 (2.5 rounds up).
    # Iteration 2: 97 clips to 10, the others contribute -3 each: v = 3 + rdiv(1, 4) = 3.
    vecs = [[0], [0], [0], [100]]
    assert defences.centered_clipping(vecs, 10, 1) == [3]
    assert defences.centered_clipping(vecs, 10, 2) == [3]
    assert ref(request("centered_clipping", vecs, tau=10, iters=2))["vector"] == [3]


def test_centered_clipping_without_clipping_is_the_mean_after_one_iteration() -> None:
    rng = random.Random(9)
    for _ in range(50):
        # |x - v0|^2 <= 3 * (2^21)^2 < tau^2: nothing is clipped.
        vecs = [[rng.randint(-(1 << 20), 1 << 20) for _ in range(3)]
                for _ in range(rng.randint(1, 8))]
        # rdiv(s - n*v, n) = rdiv(s, n) - v: one unclipped step lands on the mean exactly.
        assert defences.centered_clipping(vecs, HI, 1) == agg.mean(vecs)
        assert defences.centered_clipping(vecs, HI, 3) == agg.mean(vecs)


def test_centered_clipping_moves_at_most_tau_per_iteration_and_stays_in_the_hull() -> None:
    rng = random.Random(13)
    for _ in range(200):
        n, d = rng.randint(1, 9), rng.randint(1, 5)
        vecs = [[rng.choice([LO, HI, rng.randint(LO, HI)]) for _ in range(d)] for _ in range(n)]
        tau = rng.choice([1, 1000, 1 << 24, HI])
        iters = rng.randint(1, 4)
        v = defences.centered_clipping(vecs, tau, iters)
        v0 = agg.median(vecs)
        # Each step is a rounded mean of vectors of norm <= tau: at most tau + sqrt(d)/2 away.
        assert norm2([a - b for a, b in zip(v, v0, strict=True)]) <= (iters * (tau + d)) ** 2
        for k in range(d):
            col = [x[k] for x in vecs] + [v0[k]]
            assert min(col) <= v[k] <= max(col) and LO <= v[k] <= HI


def test_centered_clipping_resists_one_huge_outlier() -> None:
    honest = [[65536 + i, -65536 - i] for i in range(6)]
    out = defences.centered_clipping(honest + [[HI, LO]], 65536, 3)
    assert all(abs(a - b) < 3 * 65536 // 7 + 10 for a, b in zip(out, agg.median(honest),
                                                               strict=True))
    assert abs(agg.mean(honest + [[HI, LO]])[0] - 65536) > 1 << 28  # the mean does not


# ------------------------------------------------------------ validation


@pytest.mark.parametrize("extra, needle", [
    ({"pre": "nnm"}, "pre nnm needs parameter 'f'"),
    ({"pre": "nnm", "f": 2}, "pre nnm needs n >= 2f + 1: n=3, f=2"),
    ({"pre": "mix"}, "unknown pre 'mix'"),
    ({"pre": "bucketing", "bucket": 0, "seed": 1}, "parameter 'bucket' must be >= 1"),
    ({"pre": "bucketing", "bucket": 2}, "pre bucketing needs parameter 'seed'"),
    ({"pre": "bucketing", "bucket": 2, "seed": 1 << 32}, "'seed' must be in [0, 2^32-1]"),
    ({"pre": "bucketing", "bucket": 2, "seed": -1}, "'seed' must be a non-negative integer"),
    ({"pre": "bucketing", "bucket": True, "seed": 1}, "'bucket' must be a non-negative integer"),
    ({"bucket": 2}, "belong to \"pre\": \"bucketing\""),
    ({"seed": 2}, "belong to \"pre\": \"bucketing\""),
])
def test_bad_pre_parameters_are_input_errors(extra: dict, needle: str) -> None:
    with pytest.raises(audit.InputError) as e:
        audit.parse(request("median", [[1], [2], [3]], **extra))
    assert needle in str(e.value)


@pytest.mark.parametrize("extra, needle", [
    ({"iters": 1}, "rule centered_clipping needs parameter 'tau'"),
    ({"tau": 5}, "rule centered_clipping needs parameter 'iters'"),
    ({"tau": 0, "iters": 1}, "'tau' must be a positive Q16.16 radius"),
    ({"tau": HI + 1, "iters": 1}, "'tau' must be a positive Q16.16 radius"),
    ({"tau": 5, "iters": 0}, "'iters' must be in [1, 1000]: 0"),
    ({"tau": 5, "iters": 1001}, "'iters' must be in [1, 1000]: 1001"),
])
def test_bad_centered_clipping_parameters_are_input_errors(extra: dict, needle: str) -> None:
    with pytest.raises(audit.InputError) as e:
        audit.parse(request("centered_clipping", [[1], [2], [3]], **extra))
    assert needle in str(e.value)


def test_bucketing_refuses_fedavg() -> None:
    with pytest.raises(audit.InputError, match="does not combine with fedavg"):
        audit.parse(request("fedavg", [[1], [2]], pre="bucketing", bucket=1, seed=0))


def test_core_checks_survive_without_audit() -> None:
    with pytest.raises(AggregationError, match="bucket >= 1"):
        defences.bucket_groups(3, 0, [0, 1, 2])
    with pytest.raises(AggregationError, match="tau"):
        defences.centered_clipping([[1]], 0, 1)
    with pytest.raises(AggregationError, match="iters"):
        defences.centered_clipping([[1]], 1, 0)


# ------------------------------------------------- numpy fast path, bit for bit


def random_request(rng: random.Random) -> dict:
    n, d = rng.randint(1, 10), rng.randint(1, 7)
    r = rng.choice([8, 1 << 18, 1 << 31])
    vecs = [[rng.randint(-r, min(r, HI)) for _ in range(d)] for _ in range(n)]
    if rng.random() < 0.3:
        vecs[-1] = list(vecs[0])
    if rng.random() < 0.1:
        vecs = [[rng.choice([LO, HI]) for _ in range(d)] for _ in range(n)]
    rule = rng.choice(audit.RULES + audit.DEFENCE_RULES)
    pre = rng.choice([None, "nnm", "bucketing"])
    kw: dict = {}
    f = rng.randint(0, max(0, (n - 1) // 2))
    if rule in ("krum", "multi_krum") or pre == "nnm":
        kw["f"] = f
    if rule == "multi_krum":
        kw["m"] = rng.randint(1, n)
    if rule == "trimmed_mean":
        kw["trim"] = rng.randint(0, n)
    if rule == "centered_clipping":
        kw.update(tau=rng.choice([1, 7, 1 << 16, 1 << 30, HI]), iters=rng.randint(1, 4))
    if pre:
        kw["pre"] = pre
    if pre == "bucketing":
        kw.update(bucket=rng.randint(1, 4), seed=rng.randint(0, (1 << 32) - 1))
    ids = ["i%d" % j for j in range(n)]
    rng.shuffle(ids)
    return request(rule, vecs, ids, **kw)


def outcome(fn, req: dict) -> object:
    try:
        return fn(req)
    except (audit.InputError, AggregationError) as e:
        return ("error", str(e))


def test_fast_equals_reference_on_random_requests() -> None:
    rng = random.Random(20261207)
    ok = 0
    for _ in range(600):
        req = random_request(rng)
        want = outcome(ref, req)
        assert outcome(fst, req) == want, req
        ok += isinstance(want, dict)
    assert ok > 300  # most requests are valid: the comparison is not of error messages only


def test_fast_norms_are_exact_at_the_int32_extremes() -> None:
    rng = random.Random(1)
    for d in (1, 3, 100, 5000):
        u = np.array([[rng.choice([(1 << 32) - 1, -(1 << 32) + 1, rng.randint(-(1 << 32) + 1,
                                                                                (1 << 32) - 1)])
                       for _ in range(d)] for _ in range(3)], dtype=np.int64)
        assert fast.row_sq_norms(u) == [norm2(row) for row in u.tolist()]
        small = u >> 20
        assert fast.row_sq_norms(small) == [norm2(row) for row in small.tolist()]


def test_fast_defences_match_on_wide_full_range_inputs() -> None:
    rng = random.Random(2)
    vecs = [[rng.randint(LO, HI) for _ in range(3000)] for _ in range(6)]
    ids = ["w%d" % i for i in range(6)]
    assert fast.nnm(ids, fast.as_matrix(vecs), 2).tolist() == defences.nnm(ids, vecs, 2)
    assert fast.centered_clipping(fast.as_matrix(vecs), 1 << 28, 3).tolist() == \
        defences.centered_clipping(vecs, 1 << 28, 3)
    labels, means, groups = fast.bucketing(ids, fast.as_matrix(vecs), 4, 99)
    assert (labels, means.tolist(), groups) == defences.bucketing(ids, vecs, 4, 99)
