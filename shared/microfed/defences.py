# Exact-integer defences over Q16.16 vectors, pinned in docs/determinism.md (4.7-4.9):
# nearest-neighbour mixing (Allouah et al. 2023) and bucketing (Karimireddy et al. 2022), two
# pre-aggregation steps that turn n updates into new ones for any rule, and centered clipping
# (Karimireddy et al. 2021), a rule. Like microfed.aggregate this IS the reference: the numpy
# fast path (microfed_host.fast) and every device reproduce it bit for bit.
# Portable down to MicroPython 1.9.2 (no f-strings, no floats, no math.isqrt, no
# int.bit_length), except `bucket_order`, which needs hashlib.sha256 (absent on the micro:bit).
# Kept out of microfed.aggregate so that a node importing the rules does not pay for these.

try:
    from microfed.aggregate import AggregationError, distance_matrix, mean, median
    from microfed.q16 import rdiv
except ImportError:
    pass  # on a board fed definition by definition they are already in the namespace

BUCKET_DOMAIN = b"microfed/v1/bucketing"
MAX_ITERS = 1000
MAX_SEED = 4294967295
MAX_TAU = 2147483647


def isqrt(n):
    # floor(sqrt(n)) of a non-negative integer of any width: Newton's iteration from a power
    # of two above the root (2^b with 4^b > n), which decreases to the floor and stops there.
    if n < 0:
        raise AggregationError("isqrt of a negative number: %d" % n)
    if n == 0:
        return 0
    x = 1
    t = n
    while t:
        t >>= 2
        x <<= 1
    while True:
        y = (x + n // x) >> 1
        if y >= x:
            return x
        x = y


def isqrt_ceil(n):
    r = isqrt(n)
    if r * r < n:
        r += 1
    return r


def nnm(ids, vecs, f):
    # Nearest-neighbour mixing: update i becomes the rounded mean of its n - f nearest updates
    # (itself included, at distance 0), nearest by (exact squared distance, id).
    n = len(vecs)
    if f < 0 or n < 2 * f + 1:
        raise AggregationError("nnm needs n >= 2f + 1: n=%d, f=%d" % (n, f))
    k = n - f
    dm = distance_matrix(vecs)
    out = []
    for i in range(n):
        row = dm[i]
        near = sorted(range(n), key=lambda j: (row[j], ids[j]))[:k]
        out.append(mean([vecs[j] for j in near]))
    return out


def bucket_order(ids, seed):
    # The permutation: indices sorted by (SHA-256(BUCKET_DOMAIN || seed as 4 bytes
    # little-endian || UTF-8 id), id). It depends on the ids and the seed, not on input order.
    import hashlib
    if seed < 0 or seed > MAX_SEED:
        raise AggregationError("bucketing seed must be in [0, 2^32-1]: %d" % seed)
    sb = bytes([seed & 255, (seed >> 8) & 255, (seed >> 16) & 255, (seed >> 24) & 255])
    keys = [hashlib.sha256(BUCKET_DOMAIN + sb + i.encode("utf-8")).digest() for i in ids]
    return sorted(range(len(ids)), key=lambda i: (keys[i], ids[i]))


def bucket_groups(n, s, order):
    # ceil(n/s) consecutive runs of the permuted indices; the last one may be shorter.
    if s < 1:
        raise AggregationError("bucketing needs bucket >= 1: bucket=%d" % s)
    return [order[b:b + s] for b in range(0, n, s)]


def bucketing(ids, vecs, s, seed):
    # (labels, bucket means, member ids per bucket); a bucket is named by its first member.
    groups = bucket_groups(len(vecs), s, bucket_order(ids, seed))
    labels = [ids[g[0]] for g in groups]
    means = [mean([vecs[i] for i in g]) for g in groups]
    return labels, means, [[ids[i] for i in g] for g in groups]


def clip_into(acc, u, tau):
    # acc += clip(u, tau): u itself when |u|^2 <= tau^2, else u * tau / ceil(sqrt(|u|^2)) with
    # every coordinate rounded toward zero, so the added vector's norm never exceeds tau.
    nn = 0
    for t in u:
        nn += t * t
    if nn <= tau * tau:
        for k in range(len(u)):
            acc[k] += u[k]
        return False
    r = isqrt_ceil(nn)
    for k in range(len(u)):
        t = u[k]
        if t >= 0:
            acc[k] += t * tau // r
        else:
            acc[k] -= (-t) * tau // r
    return True


def centered_clipping(vecs, tau, iters):
    # v0 = the coordinate-wise median; then `iters` times v += rdiv(sum_i clip(x_i - v, tau), n).
    if tau < 1 or tau > MAX_TAU:
        raise AggregationError("centered_clipping needs 1 <= tau <= 2^31-1: tau=%d" % tau)
    if iters < 1 or iters > MAX_ITERS:
        raise AggregationError("centered_clipping needs 1 <= iters <= %d: iters=%d"
                               % (MAX_ITERS, iters))
    v = median(vecs)
    n = len(vecs)
    d = len(v)
    for _ in range(iters):
        acc = [0] * d
        for x in vecs:
            clip_into(acc, [x[k] - v[k] for k in range(d)], tau)
        v = [v[k] + rdiv(acc[k], n) for k in range(d)]
    return v
