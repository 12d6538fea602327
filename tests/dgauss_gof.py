"""Goodness of fit of discrete Gaussian samples against the exact pmf (host side of the
sampler tests: tests/test_dgauss.py feeds it samples from CPython and from MicroPython)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from scipy.stats import chi2


def pmf(num: int, den: int) -> tuple[np.ndarray, np.ndarray]:
    """(support, probabilities) of N_Z(0, num/den) over |x| <= 40 sigma + 10 (the mass
    beyond is below 1e-300)."""
    s2 = num / den
    k = int(math.ceil(40 * math.sqrt(s2))) + 10
    xs = np.arange(-k, k + 1, dtype=np.int64)
    w = np.exp(-(xs.astype(np.float64) ** 2) / (2 * s2))
    return xs, w / w.sum()


def chi_square(samples: Iterable[int] | dict[int, int], num: int, den: int,
               min_expected: float = 5.0) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of Pearson's chi-square test of the samples
    (a list, or a {value: count} histogram) against N_Z(0, num/den). Bins: consecutive
    integers from the left, each closed once its expected count reaches min_expected, so the
    tails are pooled into the outermost bins and the centre keeps one integer per bin."""
    if isinstance(samples, dict):
        hist = {int(k): int(v) for k, v in samples.items()}
    else:
        hist = {}
        for x in samples:
            hist[x] = hist.get(x, 0) + 1
    n = sum(hist.values())
    xs, ps = pmf(num, den)
    lo, hi = int(xs[0]), int(xs[-1])
    if min(hist) < lo or max(hist) > hi:
        raise AssertionError(f"sample outside |x| <= {hi}: impossible under the pmf")
    obs_all = np.zeros(len(xs))
    for x, c in hist.items():
        obs_all[x - lo] = c
    exp_all = ps * n
    bins_o: list[float] = []
    bins_e: list[float] = []
    acc_o = acc_e = 0.0
    for o, e in zip(obs_all, exp_all, strict=True):
        acc_o += o
        acc_e += e
        if acc_e >= min_expected:
            bins_o.append(acc_o)
            bins_e.append(acc_e)
            acc_o = acc_e = 0.0
    bins_o[-1] += acc_o  # the right tail's remainder joins the last bin
    bins_e[-1] += acc_e
    o_arr, e_arr = np.asarray(bins_o), np.asarray(bins_e)
    stat = float(((o_arr - e_arr) ** 2 / e_arr).sum())
    dof = len(bins_o) - 1
    return stat, dof, float(chi2.sf(stat, dof))
