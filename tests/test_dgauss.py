"""The exact discrete Gaussian sampler (microfed.dgauss): goodness of fit against the exact pmf
on CPython and on the MicroPython unix port, the same samples from the same seed on both,
and its integer building blocks."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest
from dgauss_gof import chi_square
from dgauss_runner import run_job

from microfed import dgauss
from microfed_host import upy

# Significance of the goodness-of-fit tests. Seeds are fixed, so each outcome is reproducible;
# the power check below shows a 4 % error in the variance is caught at these sample counts.
ALPHA = 1e-3
N = 100_000
# sigma^2 = num / den, non-integer ones included; the last is the order of magnitude a mesh
# uses (raw Q16.16 units: noise multiplier 0.4361 x clip 1.0, i.e. sigma = 28581.3).
CPYTHON_SIGMA2 = ((2, 3), (1, 1), (25, 2), ((4361 * 65536) ** 2, 10_000 ** 2))
MICROPYTHON_SIGMA2 = ((2, 3), (25, 2))
SAME_SEQUENCE_SIGMA2 = ((2, 3), (25, 2), ((4361 * 65536) ** 2, 10_000 ** 2), (7, 1))


def _job(num: int, den: int, n: int, keep: int, key: str) -> dict:
    return {"kind": "sample", "num": str(num), "den": str(den), "n": n, "keep": keep, "key": key}


def _min_expected(num: int, den: int) -> float:
    # One integer per bin where the pmf allows; for a wide sigma ~200 bins of >= N/200.
    return 5.0 if num / den < 1e4 else N / 200


@pytest.fixture(scope="module")
def cpython_runs() -> dict[tuple[int, int], dict]:
    return {(num, den): run_job(_job(num, den, N, 0, f"gof {num}/{den}"))
            for num, den in CPYTHON_SIGMA2}


@pytest.mark.parametrize(("num", "den"), CPYTHON_SIGMA2)
def test_goodness_of_fit_cpython(cpython_runs: dict, num: int, den: int) -> None:
    res = cpython_runs[(num, den)]
    hist = dict(map(tuple, res["hist"]))
    assert sum(hist.values()) == N
    stat, dof, p = chi_square(hist, num, den, _min_expected(num, den))
    assert dof >= 3
    assert p > ALPHA, f"sigma^2 = {num}/{den}: chi2 {stat:.1f} on {dof} dof, p = {p:.2e}"


def test_goodness_of_fit_has_power(cpython_runs: dict) -> None:
    """The same test rejects the right samples against a pmf 4 % wider or narrower, and
    against the rounded continuous Gaussian (a different distribution at small sigma)."""
    hist = dict(map(tuple, cpython_runs[(25, 2)]["hist"]))
    for num, den in ((13, 1), (12, 1)):
        _stat, _dof, p = chi_square(hist, num, den)
        assert p < 1e-6, f"samples of sigma^2 12.5 pass as {num}/{den} (p = {p:.2e})"
    rng = random.Random(5)
    s = math.sqrt(2 / 3)
    rounded = [round(rng.gauss(0.0, s)) for _ in range(N)]
    _stat, _dof, p = chi_square(rounded, 2, 3)
    assert p < 1e-6


@pytest.fixture(scope="module")
def micropython_runs(micropython: str) -> list[dict]:
    jobs = [_job(num, den, N, 0, f"gof {num}/{den}") for num, den in MICROPYTHON_SIGMA2]
    jobs += [_job(num, den, 3000, 3000, f"same {num}/{den}") for num, den in SAME_SEQUENCE_SIGMA2]
    out = upy.run(["-c", "import dgauss_runner as m; m.main()"], stdin=json.dumps(jobs),
                  path=[upy.SHARED, upy.REPO / "tests"], timeout=300)
    return json.loads(out)


@pytest.mark.parametrize("i", range(len(MICROPYTHON_SIGMA2)))
def test_goodness_of_fit_micropython(micropython_runs: list[dict], i: int) -> None:
    num, den = MICROPYTHON_SIGMA2[i]
    hist = {int(k): int(v) for k, v in micropython_runs[i]["hist"]}
    assert sum(hist.values()) == N
    stat, dof, p = chi_square(hist, num, den)
    assert p > ALPHA, f"MicroPython sigma^2 = {num}/{den}: chi2 {stat:.1f} on {dof} dof, p = {p:.2e}"


@pytest.mark.parametrize("i", range(len(SAME_SEQUENCE_SIGMA2)))
def test_same_seed_same_samples_on_cpython_and_micropython(micropython_runs: list[dict],
                                                            i: int) -> None:
    num, den = SAME_SEQUENCE_SIGMA2[i]
    upy_res = micropython_runs[len(MICROPYTHON_SIGMA2) + i]
    cpy_res = run_job(_job(num, den, 3000, 3000, f"same {num}/{den}"))
    assert len(cpy_res["first"]) == 3000
    assert upy_res["first"] == cpy_res["first"]
    assert upy_res["sha256"] == cpy_res["sha256"]
    assert upy_res["stream_blocks"] == cpy_res["stream_blocks"]
    # and a different seed gives different samples
    other = run_job(_job(num, den, 3000, 3000, f"other {num}/{den}"))
    assert other["first"] != cpy_res["first"]


def test_micropython_gof_samples_equal_cpython(micropython_runs: list[dict],
                                               cpython_runs: dict) -> None:
    """The 10^5-sample MicroPython runs are the CPython runs of the same seeds, bit for bit."""
    for i, (num, den) in enumerate(MICROPYTHON_SIGMA2):
        assert micropython_runs[i]["sha256"] == cpython_runs[(num, den)]["sha256"]


# ---------------------------------------------------------------- building blocks

def test_sha256_stream_is_counter_mode() -> None:
    src = dgauss.Sha256Stream(b"key")
    k = hashlib.sha256(dgauss.STREAM_DOMAIN + b"key").digest()
    want = b"".join(hashlib.sha256(k + i.to_bytes(8, "little")).digest() for i in range(4))
    got = src.read(5) + src.read(0) + src.read(40) + src.read(1) + src.read(82)
    assert got == want


def test_randbelow_rule_and_uniformity() -> None:
    src = dgauss.Sha256Stream(b"rb")
    ref = dgauss.Sha256Stream(b"rb")
    for m in (1, 2, 3, 255, 256, 257, 1000, 2 ** 64 + 13):
        x = src.randbelow(m)
        # the documented rule, recomputed: fewest whole bytes, low bits, retry while >= m
        if m == 1:
            want = 0
        else:
            k = (m - 1).bit_length()
            while True:
                want = int.from_bytes(ref.read((k + 7) // 8), "big") & ((1 << k) - 1)
                if want < m:
                    break
        assert x == want
    counts = [0] * 3
    for _ in range(30_000):
        counts[src.randbelow(3)] += 1
    stat = sum((c - 10_000) ** 2 / 10_000 for c in counts)
    assert stat < 13.8  # chi2(2) at 0.001
    with pytest.raises(ValueError):
        src.randbelow(0)


@pytest.mark.parametrize(("n", "d"), [(0, 1), (1, 3), (1, 1), (5, 2), (7, 3)])
def test_bern_exp_frequency(n: int, d: int) -> None:
    src = dgauss.Sha256Stream(b"bern %d/%d" % (n, d))
    trials = 40_000
    ones = sum(dgauss.bern_exp(src, n, d) for _ in range(trials))
    p = math.exp(-n / d)
    sd = math.sqrt(trials * p * (1 - p)) or 1.0
    assert abs(ones - trials * p) < 4.5 * sd, (n, d, ones / trials, p)


def test_isqrt_and_nbits() -> None:
    rng = random.Random(3)
    values = list(range(0, 5000)) + [rng.getrandbits(b) for b in range(1, 300) for _ in range(5)]
    values += [(1 << b) + e for b in range(1, 200) for e in (-1, 0, 1)]
    for v in values:
        assert dgauss.isqrt(v) == math.isqrt(v)
        assert dgauss.nbits(v) == v.bit_length()
    with pytest.raises(ValueError):
        dgauss.isqrt(-1)


@pytest.mark.parametrize("bad", [(0, 1), (1, 0), (-2, 3), (1.5, 1), (True, 1)])
def test_dgauss_refuses_bad_sigma2(bad: tuple) -> None:
    with pytest.raises(ValueError, match="sigma"):
        dgauss.DGauss(*bad)


def test_urandom_source_samples() -> None:
    g = dgauss.DGauss(25, 2)
    xs = g.samples(dgauss.UrandomSource(), 2000)
    assert len(set(xs)) > 5
    var = sum(x * x for x in xs) / len(xs)
    assert 10.0 < var < 15.0  # 12.5 +- > 5 standard errors
