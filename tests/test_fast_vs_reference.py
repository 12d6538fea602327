"""Property-based: random updates, with ties and extreme values generated on purpose, through
the numpy fast path and the portable reference; any difference in any bit fails."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microfed import audit
from microfed_host import fast

LO, HI = -(2**31), 2**31 - 1
EXTREMES = [LO, LO + 1, -65536, -32768, -1, 0, 1, 32768, 65536, HI - 1, HI]


@st.composite
def updates(draw: st.DrawFn) -> tuple[list[str], list[list[int]], int]:
    f = draw(st.integers(0, 3))
    n = draw(st.integers(2 * f + 3, 2 * f + 7))
    d = draw(st.integers(1, 12))
    scale = draw(st.sampled_from(["tiny", "q16", "full", "extreme"]))
    if scale == "tiny":
        value = st.integers(-3, 3)  # many exact ties in distances and scores
    elif scale == "q16":
        value = st.integers(-(1 << 20), 1 << 20)
    elif scale == "full":
        value = st.integers(LO, HI)
    else:
        value = st.sampled_from(EXTREMES)
    rows = draw(st.lists(st.lists(value, min_size=d, max_size=d), min_size=n, max_size=n))
    if draw(st.booleans()):  # duplicate rows: identical updates tie exactly
        k = draw(st.integers(0, n - 1))
        rows[(k + 1) % n] = list(rows[k])
    ids = draw(st.lists(st.text(min_size=1, max_size=4).filter(
        lambda s: len(s.encode("utf-8", "surrogatepass")) <= 64 and not any(
            0xD800 <= ord(c) <= 0xDFFF for c in s)), min_size=n, max_size=n, unique=True))
    return ids, rows, f


def both(rule: str, ids: list[str], rows: list[list[int]], params: dict) -> None:
    ref = audit.run(rule, ids, rows, params)
    for dtype in (np.int64, np.int32):
        got = fast.run(rule, ids, np.asarray(rows, dtype=dtype), params)
        assert got == ref, (rule, dtype)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(updates())
def test_krum_family(u: tuple[list[str], list[list[int]], int]) -> None:
    ids, rows, f = u
    both("krum", ids, rows, {"f": f})
    n = len(rows)
    for m in (1, n - f):
        both("multi_krum", ids, rows, {"f": f, "m": m})


@SETTINGS
@given(updates(), st.data())
def test_coordinate_rules(u: tuple[list[str], list[list[int]], int], data: st.DataObject) -> None:
    ids, rows, _ = u
    n = len(rows)
    both("median", ids, rows, {})
    both("trimmed_mean", ids, rows, {"trim": data.draw(st.integers(0, (n - 1) // 2))})
    weights = data.draw(st.lists(st.sampled_from([0, 1, 3, 1000, HI]), min_size=n, max_size=n))
    if sum(weights) == 0:
        weights[0] = 1
    both("fedavg", ids, rows, {"weights": weights})


def test_two_limb_and_chunked_paths_are_exercised() -> None:
    """Force the slow exact paths (two limbs; many chunks) and compare with the reference."""
    rng = np.random.default_rng(7)
    wide = rng.integers(LO, HI, size=(5, 3000), endpoint=True)
    ids = [f"w{i}" for i in range(5)]
    limbs, bound = fast._limbs(wide)
    assert len(limbs) == 2 and bound <= 1 << 16
    both("krum", ids, wide.tolist(), {"f": 1})
    # Values just above the single-limb bound after centring, d large enough to need chunks.
    mid = rng.integers(-(1 << 20), 1 << 20, size=(5, 20000), endpoint=True)
    limbs, bound = fast._limbs(mid)
    assert len(limbs) == 1 and (2**53 - 1) // (bound * bound) < 20000
    both("krum", ids, mid.tolist(), {"f": 1})


def test_certified_float_path_is_taken_and_exact() -> None:
    """Typical Q16.16 deltas take the all-numpy path (chunked conversion included) and its
    scores equal the reference's exact integer scores; full-range data is refused by the
    certificate and falls back."""
    from microfed import aggregate

    rng = np.random.default_rng(11)
    x = np.clip(np.rint(rng.normal(0, 0.5, size=(7, fast.CONVERT_CHUNK + 333)) * 65536),
                LO, HI).astype(np.int32)
    k = 7 - 2 - 2
    got = fast._krum_scores_int64(x, k)
    assert got is not None
    assert got == aggregate.krum_scores(x.tolist(), 2)
    wide = rng.integers(LO, HI, size=(5, 100), endpoint=True)
    assert fast._krum_scores_int64(wide, 1) is None
