"""numpy fast path for every aggregation rule, bit-identical to `microfed.aggregate`.

Exactness without giving up BLAS: a float64 product or sum of integers is exact while every
intermediate stays below 2^53. Krum needs exact squared distances (values up to ~2^84):

1. The common case (`_krum_scores_int64`): convert to float64 in cache-sized chunks, one Gram
   matrix by BLAS, and certify exactness afterwards from its diagonal (see the function's
   docstring); distances and scores then stay in int64.
2. When the certificate fails (wide values): centre each coordinate (distances are
   translation-invariant), split values wider than 2^20 into two signed 16-bit limbs, cut the
   d axis into chunks with chunk * max|limb|^2 < 2^53, multiply each chunk in float64 (exact),
   accumulate in int64 and combine limbs in Python ints (`exact_gram`).

Everything else (median, trimmed mean, means) is integer numpy with floor division, which
matches the reference's round-half-up `(2*s + m) // (2*m)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from microfed.aggregate import AggregationError

FLOAT_EXACT = 1 << 53
ONE_LIMB_MAX = 1 << 20  # up to here a single limb still allows chunks of >= 8192 columns
LIMB_BITS = 16
INT64_SAFE_CHUNKS = 1000  # 1000 * 2^53 < 2^63: int64 chunk accumulation cannot overflow


def as_matrix(vecs: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
    """Updates as an (n, d) integer matrix (int32 kept as is, anything else int64); rejects
    ragged or empty input like the reference."""
    if isinstance(vecs, np.ndarray):
        x = vecs
        if x.dtype != np.int32:
            if not np.issubdtype(x.dtype, np.integer):
                raise AggregationError(f"integer matrix expected, got {x.dtype}")
            x = x.astype(np.int64, copy=False)
    else:
        if len(vecs) == 0:
            raise AggregationError("no updates")
        d = len(vecs[0])
        for v in vecs:
            if len(v) != d:
                raise AggregationError(f"ragged vectors: lengths {d} and {len(v)}")
        x = np.asarray(vecs, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise AggregationError("no updates")
    if x.shape[1] < 1:
        raise AggregationError("empty vector")
    return x


def _abs_bound(x: np.ndarray) -> int:
    # Two reductions without a temporary, cheaper than np.abs(x).max() on big matrices.
    return max(-int(x.min()), int(x.max()))


def _limbs(x: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Pieces whose float64 products are exact, and the bound on their absolute values."""
    bound = _abs_bound(x)
    if bound > ONE_LIMB_MAX:
        # Distances are translation-invariant: centring each coordinate halves the range and
        # often brings it back under the single-limb bound.
        x64 = x.astype(np.int64)
        x = x64 - (x64.min(axis=0) + x64.max(axis=0)) // 2
        bound = _abs_bound(x)
    if bound <= ONE_LIMB_MAX:
        return [x], max(bound, 1)
    half = 1 << (LIMB_BITS - 1)
    lo = ((x + half) & ((1 << LIMB_BITS) - 1)) - half  # signed low limb in [-2^15, 2^15)
    hi = (x - lo) >> LIMB_BITS
    return [hi, lo], max(_abs_bound(lo), _abs_bound(hi), 1)


def exact_gram(x: np.ndarray) -> list[list[int]]:
    """Exact Gram matrix of the rows, up to a common translation (Python ints, n x n)."""
    n, d = x.shape
    limbs, bound = _limbs(x)
    nl = len(limbs)
    chunk = max(1, (FLOAT_EXACT - 1) // (bound * bound))
    if nl == 1 and chunk >= d:
        # One limb, one chunk: one conversion, one BLAS call, every partial sum exact.
        z = limbs[0].astype(np.float64)
        return (z @ z.T).astype(np.int64).tolist()
    acc_py: list[list[int]] | None = None
    acc = np.zeros((nl * n, nl * n), dtype=np.int64)
    pending = 0
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        z = np.concatenate([limb[:, start:stop] for limb in limbs]).astype(np.float64)
        acc += (z @ z.T).astype(np.int64)
        pending += 1
        if pending == INT64_SAFE_CHUNKS:
            acc_py = _add_py(acc_py, acc.tolist())
            acc[:] = 0
            pending = 0
    full = _add_py(acc_py, acc.tolist())
    if nl == 1:
        return full
    weights = [1 << (LIMB_BITS * (nl - 1 - a)) for a in range(nl)]  # hi first
    out = [[0] * n for _ in range(n)]
    for a in range(nl):
        for b in range(nl):
            w = weights[a] * weights[b]
            for i in range(n):
                row = full[a * n + i]
                oi = out[i]
                for j in range(n):
                    oi[j] += w * row[b * n + j]
    return out


def _add_py(acc: list[list[int]] | None, block: list[list[int]]) -> list[list[int]]:
    if acc is None:
        return block
    return [[p + q for p, q in zip(ra, rb, strict=True)] for ra, rb in zip(acc, block, strict=True)]


def sq_distances(x: np.ndarray) -> list[list[int]]:
    """Exact pairwise squared Euclidean distances (Python ints)."""
    g = exact_gram(x)
    n = len(g)
    return [[g[i][i] + g[j][j] - 2 * g[i][j] for j in range(n)] for i in range(n)]


def krum_scores(x: np.ndarray, f: int) -> list[int]:
    n = x.shape[0]
    if f < 0:
        raise AggregationError("f must be >= 0")
    if n < 2 * f + 3:
        raise AggregationError(f"krum needs n >= 2f + 3: n={n}, f={f}")
    k = n - f - 2
    scores = _krum_scores_int64(x, k)
    if scores is not None:
        return scores
    dm = sq_distances(x)
    out = []
    for i in range(n):
        row = dm[i][:i] + dm[i][i + 1 :]
        row.sort()
        out.append(sum(row[:k]))
    return out


CONVERT_CHUNK = 8192  # columns converted to float64 at a time: the chunk stays in cache


def _float_gram(x: np.ndarray) -> np.ndarray:
    """x @ x.T in float64, converting the integer input chunk by chunk (measured ~1.3x faster
    than converting the whole matrix first, for n x d up to 20 x 10^6). Summing chunk Grams is
    just another summation order, so the exactness certificate below still applies."""
    n, d = x.shape
    if d <= CONVERT_CHUNK:
        z = x.astype(np.float64)
        return z @ z.T
    buf = np.empty((n, CONVERT_CHUNK), dtype=np.float64)
    g = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, CONVERT_CHUNK):
        stop = min(d, start + CONVERT_CHUNK)
        b = buf[:, : stop - start]
        np.copyto(b, x[:, start:stop], casting="unsafe")  # int32/int64 -> float64, exact
        g += b @ b.T
    return g


def _krum_scores_int64(x: np.ndarray, k: int) -> list[int] | None:
    """The common case entirely in numpy, with exactness certified after the fact.

    Every computed diagonal entry of the float64 Gram below 2^53 proves the whole Gram exact:
    a diagonal entry is a sum of non-negative terms, and rounding is monotonic, so a true value
    >= 2^53 could never come out below it; once the diagonal is exact, each |x_ik| < 2^26.5 (so
    every product is an exact integer) and, by Cauchy-Schwarz, every partial sum of an
    off-diagonal entry is bounded by the larger diagonal entry. No pre-pass over the data is
    needed. Returns None when the certificate fails or the scores could leave int64.
    """
    if k >= 1 << 7:  # distances < 2^55, so k of them stay below 2^62
        return None
    gf = _float_gram(x)
    if not float(np.diagonal(gf).max()) < FLOAT_EXACT:
        return None
    g = gf.astype(np.int64)
    sq = np.diagonal(g)
    dist = sq[:, None] + sq[None, :] - 2 * g
    # The row's own zero is its smallest entry; dropping one zero per row drops exactly it.
    srt = np.sort(dist, axis=1)
    return [int(v) for v in srt[:, 1 : k + 1].sum(axis=1)]


def _rank(ids: Sequence[str], scores: Sequence[int]) -> list[int]:
    # str order is code-point order, which equals UTF-8 byte order (see docs/determinism.md).
    return sorted(range(len(ids)), key=lambda i: (scores[i], ids[i]))


def rdiv(s: np.ndarray, m: int) -> np.ndarray:
    """Round-half-up integer division by a positive int (numpy // floors), in int64."""
    s = s.astype(np.int64, copy=False)
    return (2 * s + m) // (2 * m)


def krum(ids: Sequence[str], vecs: np.ndarray, f: int) -> tuple[np.ndarray, list[str], list[int]]:
    x = as_matrix(vecs)
    scores = krum_scores(x, f)
    w = _rank(ids, scores)[0]
    return x[w].astype(np.int64), [ids[w]], scores


def multi_krum(
    ids: Sequence[str], vecs: np.ndarray, f: int, m: int
) -> tuple[np.ndarray, list[str], list[int]]:
    x = as_matrix(vecs)
    scores = krum_scores(x, f)
    n = x.shape[0]
    if m < 1 or m > n - f:
        raise AggregationError(f"multi_krum needs 1 <= m <= n - f: m={m}, n={n}, f={f}")
    sel = _rank(ids, scores)[:m]
    return rdiv(x[sel].sum(axis=0, dtype=np.int64), m), [ids[i] for i in sel], scores


def median(vecs: np.ndarray) -> np.ndarray:
    x = as_matrix(vecs)
    n = x.shape[0]
    h = n // 2
    # A full sort along the short axis measured faster than np.partition with two kth values.
    p = np.sort(x, axis=0)
    if n % 2:
        return p[h].astype(np.int64)
    return rdiv(p[h - 1].astype(np.int64) + p[h], 2)


def trimmed_mean(vecs: np.ndarray, trim: int) -> np.ndarray:
    x = as_matrix(vecs)
    n = x.shape[0]
    if trim < 0 or n - 2 * trim < 1:
        raise AggregationError(
            f"trimmed_mean needs 0 <= trim and n - 2*trim >= 1: n={n}, trim={trim}"
        )
    keep = n - 2 * trim
    total = x.sum(axis=0, dtype=np.int64)
    if trim == 0:
        return rdiv(total, keep)
    if trim == 1:
        # Dropping one value from each end is the sum minus the column min and max: no sort.
        return rdiv(total - x.min(axis=0) - x.max(axis=0), keep)
    p = np.sort(x, axis=0)
    return rdiv(p[trim : n - trim].sum(axis=0, dtype=np.int64), keep)


def fedavg(vecs: np.ndarray, weights: Sequence[int]) -> np.ndarray:
    x = as_matrix(vecs)
    n = x.shape[0]
    if len(weights) != n:
        raise AggregationError("fedavg needs one weight per update")
    if any(w < 0 for w in weights):
        raise AggregationError("fedavg weights must be >= 0")
    total = sum(int(w) for w in weights)
    if total <= 0:
        raise AggregationError("fedavg needs a positive total weight")
    wmax = max(int(w) for w in weights)
    xmax = _abs_bound(x)
    if wmax * xmax * n < (1 << 61) and total < (1 << 61):
        s = np.asarray(weights, dtype=np.int64) @ x.astype(np.int64, copy=False)
        return rdiv(s, total)
    # Huge weights: exact Python-int arithmetic (object dtype) instead of wrapping int64.
    s_obj = (np.asarray([int(w) for w in weights], dtype=object)[:, None] * x.astype(object)).sum(
        axis=0
    )
    return np.asarray([(2 * v + total) // (2 * total) for v in s_obj], dtype=np.int64)


# ------------------------------------------------ defences (docs/determinism.md 4.7-4.9)


def nnm(ids: Sequence[str], vecs: np.ndarray, f: int) -> np.ndarray:
    """`microfed.defences.nnm`: exact distances (`sq_distances`), neighbours ranked by
    (distance, id), means of n - f rows in int64 (n int32 values cannot overflow it)."""
    x = as_matrix(vecs)
    n = x.shape[0]
    if f < 0 or n < 2 * f + 1:
        raise AggregationError(f"nnm needs n >= 2f + 1: n={n}, f={f}")
    k = n - f
    dm = sq_distances(x) if n > 1 else [[0]]
    out = np.empty(x.shape, dtype=np.int64)
    for i in range(n):
        row = dm[i]
        near = sorted(range(n), key=lambda j: (row[j], ids[j]))[:k]
        out[i] = rdiv(x[near].sum(axis=0, dtype=np.int64), k)
    return out


def bucketing(
    ids: Sequence[str], vecs: np.ndarray, s: int, seed: int
) -> tuple[list[str], np.ndarray, list[list[str]]]:
    """`microfed.defences.bucketing`; the permutation is the reference's own (SHA-256 over
    ids, no arithmetic on the values), the bucket means are int64 sums."""
    from microfed import defences

    x = as_matrix(vecs)
    groups = defences.bucket_groups(x.shape[0], s, defences.bucket_order(list(ids), seed))
    means = np.stack([rdiv(x[g].sum(axis=0, dtype=np.int64), len(g)) for g in groups])
    return [ids[g[0]] for g in groups], means, [[ids[i] for i in g] for g in groups]


LIMB = 1 << 16


def row_sq_norms(u: np.ndarray) -> list[int]:
    """Exact sum of squares of each int64 row with |u| < 2^32 (Python ints). One int64 pass
    when it cannot overflow; otherwise u = hi * 2^16 + lo with |lo| <= 2^15, |hi| <= 2^17, and
    the three limb sums (each < 2^63 for d < 2^28) are combined in Python ints."""
    d = u.shape[1]
    bound = _abs_bound(u)
    if bound * bound * d < (1 << 63):
        return [int(v) for v in np.einsum("ij,ij->i", u, u).tolist()]
    if d >= 1 << 28:
        return [sum(int(t) * int(t) for t in row) for row in u.tolist()]
    lo = ((u + LIMB // 2) & (LIMB - 1)) - LIMB // 2
    hi = (u - lo) >> 16
    hh = np.einsum("ij,ij->i", hi, hi).tolist()
    hl = np.einsum("ij,ij->i", hi, lo).tolist()
    ll = np.einsum("ij,ij->i", lo, lo).tolist()
    return [(int(a) << 32) + (int(b) << 17) + int(c) for a, b, c in zip(hh, hl, ll, strict=True)]


def centered_clipping(vecs: np.ndarray, tau: int, iters: int) -> np.ndarray:
    """`microfed.defences.centered_clipping`. Every difference x_i - v stays within 2^32 (v
    never leaves the per-coordinate hull of v0 and the inputs), so |u| * tau < 2^63 and the
    rounding toward zero is an int64 floor division of absolute values."""
    from microfed import defences

    if tau < 1 or tau > defences.MAX_TAU:
        raise AggregationError(f"centered_clipping needs 1 <= tau <= 2^31-1: tau={tau}")
    if iters < 1 or iters > defences.MAX_ITERS:
        raise AggregationError(
            f"centered_clipping needs 1 <= iters <= {defences.MAX_ITERS}: iters={iters}"
        )
    x = as_matrix(vecs).astype(np.int64, copy=False)
    n = x.shape[0]
    v = median(x)
    tau2 = tau * tau
    for _ in range(iters):
        u = x - v
        norms = row_sq_norms(u)
        for i, nn in enumerate(norms):
            if nn > tau2:
                r = math.isqrt(nn)
                if r * r < nn:
                    r += 1
                ui = u[i]
                u[i] = np.sign(ui) * ((np.abs(ui) * tau) // r)
        v = v + rdiv(u.sum(axis=0, dtype=np.int64), n)
    return v


def run(rule: str, ids: Sequence[str], vecs: np.ndarray, params: dict) -> dict:
    """Same contract as `microfed.audit.run`, on the fast path."""
    from microfed import audit

    x = as_matrix(vecs)
    pre = params.get("pre")
    groups: list[list[str]] | None = None
    if pre == "nnm":
        x = nnm(ids, x, params["f"])
    elif pre == "bucketing":
        ids, x, groups = bucketing(ids, x, params["bucket"], params["seed"])
    try:
        out = _run_rule(rule, ids, x, params)
    except AggregationError as e:
        raise audit.after_pre(e, groups) from None
    return audit.with_pre(out, pre, groups)


def _run_rule(rule: str, ids: Sequence[str], x: np.ndarray, params: dict) -> dict:
    from microfed import audit

    selected: list[str] | None = None
    scores: list[int] | None = None
    if rule == "krum":
        vec, selected, scores = krum(ids, x, params["f"])
    elif rule == "multi_krum":
        vec, selected, scores = multi_krum(ids, x, params["f"], params["m"])
    elif rule == "median":
        vec = median(x)
    elif rule == "trimmed_mean":
        vec = trimmed_mean(x, params["trim"])
    elif rule == "fedavg":
        vec = fedavg(x, params["weights"])
    elif rule == "centered_clipping":
        vec = centered_clipping(x, params["tau"], params["iters"])
    else:
        raise AggregationError(f"unknown rule {rule!r}")
    out_vec = [int(v) for v in vec.tolist()]
    return audit.describe(rule, list(ids), out_vec, selected, scores)
