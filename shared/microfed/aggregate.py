# Robust aggregation rules over Q16.16 vectors, pinned in docs/determinism.md.
# This module IS the reference: the numpy fast path and every device must reproduce it bit for
# bit. Portable down to MicroPython 1.9.2 (micro:bit, ~9 KB heap): no f-strings, no floats,
# small functions. Inputs are already validated by the caller (microfed.audit does it for
# untrusted JSON); the checks kept here are the ones whose absence would change a result.

try:
    from microfed.q16 import rdiv
except ImportError:
    pass  # on the micro:bit q16 is sent first into the same namespace


class AggregationError(ValueError):
    pass


def _shape(vecs):
    n = len(vecs)
    if n < 1:
        raise AggregationError("no updates")
    d = len(vecs[0])
    if d < 1:
        raise AggregationError("empty vector")
    for v in vecs:
        if len(v) != d:
            raise AggregationError("ragged vectors: lengths %d and %d" % (d, len(v)))
    return n, d


def dist(u, v):
    # Exact squared Euclidean distance: no saturation, no shift, any width.
    s = 0
    for a, b in zip(u, v):
        t = a - b
        s += t * t
    return s


def krum_scores(vecs, f):
    n, d = _shape(vecs)
    if f < 0:
        raise AggregationError("f must be >= 0")
    if n < 2 * f + 3:
        raise AggregationError("krum needs n >= 2f + 3: n=%d, f=%d" % (n, f))
    return scores_from_distances(distance_matrix(vecs), f)


def distance_matrix(vecs):
    # The full symmetric matrix of exact squared distances (each pair computed once).
    n = len(vecs)
    dm = [[0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            x = dist(vecs[i], vecs[j])
            dm[i][j] = x
            dm[j][i] = x
    return dm


def scores_from_distances(dm, f):
    # Krum score of i: the sum of its n - f - 2 smallest distances to the others (dm is the
    # full symmetric matrix of exact squared distances).
    n = len(dm)
    k = n - f - 2
    scores = []
    for i in range(n):
        row = dm[i][:i] + dm[i][i + 1:]
        row.sort()
        scores.append(sum(row[:k]))
    return scores


def krum_rank(ids, scores):
    # Indices ordered by (score, node id); node ids compare as UTF-8 bytes, which is also
    # code-point order, so plain str comparison gives the same answer on every interpreter.
    return sorted(range(len(ids)), key=lambda i: (scores[i], ids[i]))


def mean(vecs):
    n, d = _shape(vecs)
    out = []
    for k in range(d):
        s = 0
        for v in vecs:
            s += v[k]
        out.append(rdiv(s, n))
    return out


def krum(ids, vecs, f):
    scores = krum_scores(vecs, f)
    w = krum_rank(ids, scores)[0]
    return list(vecs[w]), [ids[w]], scores


def multi_krum(ids, vecs, f, m):
    scores = krum_scores(vecs, f)
    n = len(vecs)
    if m < 1 or m > n - f:
        raise AggregationError("multi_krum needs 1 <= m <= n - f: m=%d, n=%d, f=%d" % (m, n, f))
    sel = krum_rank(ids, scores)[:m]
    return mean([vecs[i] for i in sel]), [ids[i] for i in sel], scores


def median(vecs):
    n, d = _shape(vecs)
    h = n // 2
    out = []
    for k in range(d):
        col = sorted([v[k] for v in vecs])
        if n % 2:
            out.append(col[h])
        else:
            out.append(rdiv(col[h - 1] + col[h], 2))
    return out


def trimmed_mean(vecs, trim):
    n, d = _shape(vecs)
    if trim < 0 or n - 2 * trim < 1:
        raise AggregationError("trimmed_mean needs 0 <= trim and n - 2*trim >= 1: n=%d, trim=%d" % (n, trim))
    keep = n - 2 * trim
    out = []
    for k in range(d):
        col = sorted([v[k] for v in vecs])
        out.append(rdiv(sum(col[trim:trim + keep]), keep))
    return out


def fedavg_total(weights, n):
    # The checked sum of FedAvg's weights (one per update, none negative, some positive).
    if len(weights) != n:
        raise AggregationError("fedavg needs one weight per update")
    total = 0
    for w in weights:
        if w < 0:
            raise AggregationError("fedavg weights must be >= 0")
        total += w
    if total <= 0:
        raise AggregationError("fedavg needs a positive total weight")
    return total


def fedavg(vecs, weights):
    n, d = _shape(vecs)
    total = fedavg_total(weights, n)
    out = []
    for k in range(d):
        s = 0
        for i in range(n):
            s += weights[i] * vecs[i][k]
        out.append(rdiv(s, total))
    return out
