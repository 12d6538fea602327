"""Node-side differential privacy (microfed.dp): the exact L2 clip, local DP in the node's
update step (microfed.noderound.local_update), the same privatised update on CPython and
MicroPython, config.json's "dp" key."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest
from dgauss_runner import run_job
from hypothesis import given, settings
from hypothesis import strategies as st

from microfed import dgauss, dp, model, noderound
from microfed.q16 import MAX_RAW, MIN_RAW
from microfed_host import upy

int32 = st.integers(MIN_RAW, MAX_RAW)


def _norm2(v: list[int]) -> int:
    return sum(x * x for x in v)


@settings(max_examples=300, deadline=None)
@given(st.lists(int32, min_size=1, max_size=40), st.integers(1, MAX_RAW))
def test_l2_clip_bound_holds_exactly(values: list[int], bound: int) -> None:
    out = dp.l2_clip(values, bound)
    assert len(out) == len(values)
    assert _norm2(out) <= bound * bound
    if _norm2(values) <= bound * bound:
        assert out == values
    else:
        # the documented rule, recomputed exactly (integers only: a float quotient is not)
        n2 = _norm2(values)
        ceil_c = dgauss.isqrt(n2)
        ceil_c += ceil_c * ceil_c < n2
        for v, w in zip(values, out, strict=True):
            assert abs(w) == abs(v) * bound // ceil_c
            assert w == 0 or (w > 0) == (v > 0)
            # |w| <= |v| * bound / sqrt(n2), squared
            assert w * w * n2 <= (v * bound) ** 2
        # nothing is lost beyond the ceiling (< 1) and rounding toward zero (< 1 per
        # coordinate): the norm is at least bound - 1 - sqrt(d)
        assert math.sqrt(_norm2(out)) >= (bound - 1 - math.sqrt(len(values))) * (1 - 1e-12)


def test_l2_clip_examples_and_errors() -> None:
    assert dp.l2_clip([3, 4], 5) == [3, 4]
    assert dp.l2_clip([3, -4], 1) == [0, 0]  # |3| * 1 // 5 = 0
    assert dp.l2_clip([30000, -40000], 5000) == [3000, -4000]
    v = [65536 * 3, -65536 * 4]
    assert dp.l2_clip(v, 65536) == [39321, -52428]  # floor(0.6 * 65536), floor(0.8 * 65536)
    assert v == [65536 * 3, -65536 * 4]  # l2_clip copies; l2_clip_into works in place
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="bound"):
            dp.l2_clip([1], bad)


def test_share_sigma2_splits_the_variance() -> None:
    num, den = 25, 2
    for n in (1, 5, 100):
        a, b = dp.share_sigma2(num, den, n)
        assert Fraction(a, b) * n == Fraction(num, den)
    with pytest.raises(ValueError):
        dp.share_sigma2(1, 1, 0)


def _delta(d: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(-200_000, 200_000) for _ in range(d)]


def test_node_dp_is_clip_then_discrete_gaussian() -> None:
    clip, num, den = 65536, (65536 * 3) ** 2, 4
    delta = _delta(650, 1)
    nd = dp.NodeDP(clip, num, den, "seeded", 7, "node-01")
    out = nd.apply(list(delta), 3)
    clipped = dp.l2_clip(delta, clip)
    src = dgauss.Sha256Stream(dp.noise_key(7, 3, "node-01"))
    g = dgauss.DGauss(num, den)
    assert out == [c + g.sample(src) for c in clipped]
    # seeded noise depends on round and node; os.urandom noise is fresh each time
    assert nd.apply(list(delta), 4) != out
    assert dp.NodeDP(clip, num, den, "seeded", 7, "node-02").apply(list(delta), 3) != out
    ur = dp.NodeDP(clip, num, den)
    assert ur.apply(list(delta), 3) != ur.apply(list(delta), 3)


def test_node_dp_clamps_to_the_accepted_range() -> None:
    nd = dp.NodeDP(1, 10 ** 12, 1, "seeded", 1, "n", limit=1000)  # sigma = 10^6 >> limit
    out = nd.apply([0] * 200, 1)
    assert max(out) == 1000 and min(out) == -1000


def test_local_update_applies_dp_in_the_update_step() -> None:
    m = model.get("softmax", n_features=4, n_classes=3)
    rng = random.Random(2)
    xs = [[rng.randrange(0, 65536) for _ in range(4)] for _ in range(12)]
    ys = [rng.randrange(3) for _ in range(12)]
    g = m.init(5)
    train = {"lr": 32768, "epochs": 1, "batch": 4, "seed": 9}
    plain = noderound.local_update(m, (xs, ys), train, 2, "node-03", list(g))
    nd = dp.NodeDP(20000, 5000 ** 2, 1, "seeded", 9, "node-03")
    noised = noderound.local_update(m, (xs, ys), train, 2, "node-03", list(g), nd)
    assert noised == nd.apply(list(plain), 2)
    assert noised != plain


def test_privatized_update_same_on_micropython(micropython: str) -> None:
    jobs = [{"kind": "privatize", "clip": "65536", "num": str((65536 * 4361) ** 2),
             "den": str(10_000 ** 2), "seed": 1, "node": "node-05", "round": 4,
             "limit": str(256 * 65536), "delta": [str(v) for v in _delta(650, 4)]},
            {"kind": "clip", "values": [str(v) for v in _delta(300, 5)], "bound": "65536"},
            {"kind": "clip", "values": [str(MIN_RAW)] * 50 + [str(MAX_RAW)] * 50, "bound": "3"}]
    out = upy.run(["-c", "import dgauss_runner as m; m.main()"], stdin=json.dumps(jobs),
                  path=[upy.SHARED, upy.REPO / "tests"])
    assert json.loads(out) == [run_job(j) for j in jobs]


def test_node_dp_config_checks() -> None:
    assert dp.node_dp(None, 1, "n") is None
    nd = dp.node_dp({"clip": 65536, "sigma2": [9, 4], "noise": "seeded"}, 1, "n")
    assert nd is not None and nd.clip == 65536 and (nd.gauss.num, nd.gauss.den) == (9, 4)
    for bad, msg in (({"clip": 0, "sigma2": [1, 1]}, "clip"),
                     ({"clip": 1, "sigma2": [0, 1]}, "sigma2"),
                     ({"clip": 1, "sigma2": 5}, "sigma2"),
                     ({"clip": 1, "sigma2": [1, 1], "noise": "rand"}, "noise"),
                     ({"clip": 1, "sigma2": [1, 1], "eps": 3}, "dp.eps"),
                     ([1], "dp")):
        with pytest.raises(ValueError, match=msg):
            dp.node_dp(bad, 1, "n")


def test_firmware_config_dp_key(tmp_path: object) -> None:
    import sys

    sys.path.insert(0, str(upy.FIRMWARE))
    try:
        import config
    finally:
        sys.path.remove(str(upy.FIRMWARE))
    cfg = config.read_config(None, {"dp": {"clip": 65536, "sigma2": [10, 3], "noise": "urandom"}})
    assert cfg.dp == {"clip": 65536, "sigma2": [10, 3], "noise": "urandom"}
    assert config.read_config(None, {}).dp is None
    with pytest.raises(config.ConfigError, match="sigma2"):
        config.read_config(None, {"dp": {"clip": 65536, "sigma2": [10]}})


def test_distributed_dp_share_in_config_and_firmware_checks() -> None:
    """config.json "dp.nodes" = n: the node adds share_sigma2(sigma2, n); only with privacy
    secagg (alone, a share protects nothing), and there dp.clip is the one clip."""
    import sys

    nd = dp.node_dp({"clip": 65536, "sigma2": [9, 4], "noise": "seeded", "nodes": 5}, 1, "n")
    assert nd is not None and (nd.gauss.num, nd.gauss.den) == dp.share_sigma2(9, 4, 5)
    for bad in (0, 1001, True, "5"):
        with pytest.raises(ValueError, match="dp.nodes"):
            dp.node_dp({"clip": 1, "sigma2": [1, 1], "nodes": bad}, 1, "n")
    sys.path.insert(0, str(upy.FIRMWARE))
    try:
        import config
    finally:
        sys.path.remove(str(upy.FIRMWARE))
    share = {"clip": 65536, "sigma2": [10, 3], "noise": "urandom", "nodes": 5}
    cfg = config.read_config(None, {"privacy": "secagg", "dp": share})
    assert cfg.dp == share and cfg.privacy == "secagg"
    with pytest.raises(config.ConfigError, match="'dp.nodes' 5 .* needs 'privacy' secagg"):
        config.read_config(None, {"dp": share})
    with pytest.raises(config.ConfigError, match="'dp.clip' is the clip"):
        config.read_config(None, {"privacy": "secagg", "dp": share, "clip_l2": 1 << 20})
    config.read_config(None, {"privacy": "secagg", "dp": share, "clip_l2": 65536})  # the same: fine


def test_secagg_begin_with_dp_is_clip_noise_share_weight_one() -> None:
    """noderound.secagg_begin with a NodeDP: the Client keeps dp.clip(delta) + this node's
    noise, weighted 1 (the node's sample count and the clip_l2 argument do not apply)."""
    from microfed import secagg

    delta = _delta(650, 8)
    nd = dp.NodeDP(65536, (65536 * 3) ** 2, 4 * 5, "seeded", 7, "node-01")
    c = secagg.Client("node-01", b"m" * 8, random.Random(1).randbytes)
    noderound.secagg_begin(c, 3, list(delta), 120, 1 << 20, nd)
    assert c.y == secagg.weigh(nd.apply(list(delta), 3), 1) and c.clipped
    plain = secagg.Client("node-01", b"m" * 8, random.Random(1).randbytes)
    noderound.secagg_begin(plain, 3, list(delta), 120, 1 << 20)
    assert plain.y == secagg.weigh(dp.l2_clip(delta, 1 << 20), 120)
