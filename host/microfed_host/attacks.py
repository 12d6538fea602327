"""The optimised model-poisoning attacks of the robust-aggregation literature, as functions of
the round's honest updates (rows of `honest`, raw Q16.16 as float64): what the adversary's
compromised nodes send (microfed_host.adversary). Crafting poison is not on a consensus path:
floats are fine here, and the result is rounded and clipped to int32 by the caller.

    min_max(honest)          Shejwalkar & Houmansadr, NDSS 2021 ("AGR-agnostic" min-max)
    min_sum(honest)          the same paper, min-sum
    fang_krum(honest, f, c)  Fang et al., USENIX Security 2020, the attack tailored to Krum
                             (full knowledge: the honest updates and the rule)
    mimic(honest)            Karimireddy, He & Jaggi, ICLR 2022: every attacker copies one
                             honest update, over-weighting it
    adaptive_reputation(honest, c, reward_band)
                             an attacker that knows microfed's reputation rule
                             (docs/reputation.md) and stays just inside its reward band

min-max and min-sum use the paper's "inverse unit vector" perturbation (-mean / |mean|) and
its binary search for the largest gamma that keeps the malicious update within the honest
updates' own spread (to 1e-5 of that gamma, the paper code's threshold).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

GAMMA_INIT = 10.0
GAMMA_TOL = 1e-5


def _perturbation(honest: np.ndarray) -> np.ndarray:
    mu = honest.mean(axis=0)
    norm = float(np.linalg.norm(mu))
    return -mu / norm if norm > 0 else np.zeros_like(mu)


def _pairwise_sq(x: np.ndarray) -> np.ndarray:
    g = x @ x.T
    d = np.diag(g)
    return np.maximum(d[:, None] + d[None, :] - 2 * g, 0.0)


def _search(ok: Callable[[float], bool], scale: float) -> float:
    """The largest gamma in [0, GAMMA_INIT * scale] with ok(gamma), by the paper's halving
    search (ok is monotone: larger gamma, further from the honest updates)."""
    gamma = GAMMA_INIT * scale
    step = gamma / 2
    best = 0.0
    # Until the step is 1e-5 of the gamma found (of 1.0 raw unit while none is).
    while step > GAMMA_TOL * max(best, 1.0):
        if ok(gamma):
            best = max(best, gamma)
            gamma += step
        else:
            gamma -= step
        step /= 2
    return best


def min_max(honest: np.ndarray) -> np.ndarray:
    """mu + gamma p with the largest gamma such that the malicious update's largest distance
    to an honest one is at most the largest distance between two honest ones."""
    mu = honest.mean(axis=0)
    p = _perturbation(honest)
    bound = float(np.sqrt(_pairwise_sq(honest).max()))

    def ok(gamma: float) -> bool:
        m = mu + gamma * p
        return float(np.sqrt(((honest - m) ** 2).sum(axis=1)).max()) <= bound

    return mu + _search(ok, max(bound, 1.0)) * p


def min_sum(honest: np.ndarray) -> np.ndarray:
    """mu + gamma p with the largest gamma such that the malicious update's sum of squared
    distances to the honest ones is at most the largest such sum of an honest one."""
    mu = honest.mean(axis=0)
    p = _perturbation(honest)
    bound = float(_pairwise_sq(honest).sum(axis=1).max())

    def ok(gamma: float) -> bool:
        m = mu + gamma * p
        return float(((honest - m) ** 2).sum()) <= bound

    return mu + _search(ok, max(float(np.sqrt(bound)), 1.0)) * p


def _krum_pick(x: np.ndarray, f: int) -> int:
    """Krum's choice (the lowest score, the first on a tie) among the rows of x."""
    n = len(x)
    d = _pairwise_sq(x)
    k = n - f - 2
    scores = [float(np.sort(np.delete(d[i], i))[:k].sum()) for i in range(n)]
    return int(np.argmin(scores))


def fang_krum(honest: np.ndarray, f: int, c: int) -> np.ndarray:
    """Fang et al.'s full-knowledge attack on Krum: every one of the c attackers sends
    w = -lambda * s, s = sign(mean of the honest updates) (the direction the honest nodes
    would move the model), with lambda halved from its upper bound until Krum (with f) picks
    one of the c copies; lambda = 0 when none works (then the attackers send zeros)."""
    n_h, d = honest.shape
    s = np.sign(honest.mean(axis=0))
    if n_h + c < 2 * f + 3 or d == 0:
        return np.zeros(d)
    # The paper's upper bound on lambda: the honest updates' spread around the origin.
    dist = _pairwise_sq(honest)
    k = max(n_h - f - 2, 1)
    near = min(float(np.sort(np.delete(dist[i], i))[:k].sum()) for i in range(n_h))
    far = float(np.sqrt((honest ** 2).sum(axis=1)).max())
    lam = float(np.sqrt(near / ((n_h - 2 * f - 1) * d))) if n_h > 2 * f + 1 else 0.0
    lam += far / np.sqrt(d)
    threshold = 1e-5 * max(lam, 1.0)
    while lam > threshold:
        w = -lam * s
        x = np.vstack([np.repeat(w[None, :], c, axis=0), honest])
        if _krum_pick(x, f) < c:
            return w
        lam /= 2
    return np.zeros(d)


def mimic(honest: np.ndarray) -> np.ndarray:
    """The honest update furthest from the honest mean (the first on a tie): copied by every
    attacker, it gets c + 1 times its weight (the paper picks a fixed node along the spread's
    main direction; this is the deterministic, omniscient version of that choice)."""
    mu = honest.mean(axis=0)
    return honest[int(np.argmax(((honest - mu) ** 2).sum(axis=1)))].copy()


def adaptive_reputation(honest: np.ndarray, c: int, reward_band: int = 4,
                        margin: float = 0.98) -> np.ndarray:
    """Against microfed's reputation rule (docs/reputation.md): the update furthest along
    -unit(mean) from the cohort's coordinate-wise median that the rule still rewards. The
    cohort is the honest updates and the c identical copies; an update is rewarded when its
    squared distance to the median is at most reward_band x the cohort's median squared
    distance and it is not misaligned (cosine with the median below -1/4). gamma is searched
    with `margin` (2 %) of slack under that band and that cosine, so rounding to int32 keeps
    it inside."""
    p = _perturbation(honest)
    n = len(honest)

    def cohort(x: np.ndarray) -> tuple[np.ndarray, float]:
        rows = np.vstack([np.repeat(x[None, :], c, axis=0), honest])
        ref = np.median(rows, axis=0)
        devs = ((rows - ref) ** 2).sum(axis=1)
        return ref, float(np.median(devs))

    base, _ = cohort(np.median(honest, axis=0))

    def ok(gamma: float) -> bool:
        x = base + gamma * p
        ref, med = cohort(x)
        dev = float(((x - ref) ** 2).sum())
        dot = float(x @ ref)
        misaligned = dot < 0 and 16 * dot * dot > margin * float(x @ x) * float(ref @ ref)
        return dev <= margin * reward_band * med and not misaligned

    scale = max(float(np.sqrt(((honest - base) ** 2).sum(axis=1).max())), 1.0) if n else 1.0
    return base + _search(ok, scale) * p
