# Differential privacy on the node, in integers (docs/privacy.md, "Differential privacy"):
#
#   l2_clip(values, bound)      exact L2 clip of a raw Q16.16 vector to norm <= bound (the
#                               one clip: local DP and secure aggregation both use it)
#   share_sigma2(num, den, n)   distributed DP: each of n nodes adds N_Z(0, sigma^2 / n), so
#                               the sum of their (securely aggregated) updates carries sigma^2
#   NodeDP                      clip the delta, add N_Z(0, sigma^2) per coordinate
#                               (microfed.dgauss): local DP before the update is signed, or
#                               (nodes = n > 1) one share of distributed DP inside
#                               microfed.secagg.Client.begin, before weighting and masking
#   node_dp(doc, ...)           a NodeDP from config.json's "dp" object, checked
#
# Portable MicroPython 1.29 / CPython; no float anywhere, no f-strings.

import hashlib
import struct

from microfed.dgauss import DGauss, Sha256Stream, UrandomSource, isqrt
from microfed.q16 import MAX_RAW

# Where a node's noise comes from: "urandom" (os.urandom: the only choice that protects
# anything) or "seeded" (SHA-256 counter mode keyed by (seed, round, node id): reproducible
# experiments; anyone who knows the seed can subtract the noise, so it protects nothing).
NOISE_SOURCES = ("urandom", "seeded")
SEED_DOMAIN = b"microfed/dp/noise/v1"
MAX_SIGMA2_PART = 1 << 128  # bounds the rational's parts (heap and time on a device)
MAX_NODES = 1000  # noise shares of distributed DP (secure aggregation takes up to 100)


def l2_clip_flag(values, bound):
    """Clip `values` (raw ints) in place to L2 norm <= bound (an int >= 1); True when that
    changed them.
    With S = sum v_i^2 (exact): if S <= bound^2 nothing changes; else c = ceil(sqrt(S))
    and v_i <- sign(v_i) * floor(|v_i| * bound / c). Rounding toward zero (not the
    consensus rounding rdiv) and the ceiling keep the result's norm <= bound exactly:
    |v_i'| <= |v_i| * bound / c <= |v_i| * bound / sqrt(S)."""
    if not isinstance(bound, int) or isinstance(bound, bool) or bound < 1:
        raise ValueError("l2_clip: bound must be an int >= 1, got %r" % (bound,))
    s = 0
    for v in values:
        s += v * v
    if s <= bound * bound:
        return False
    c = isqrt(s)
    if c * c < s:
        c += 1
    for i in range(len(values)):
        v = values[i]
        if v >= 0:
            values[i] = v * bound // c
        else:
            values[i] = -((-v) * bound // c)
    return True


def l2_clip_into(values, bound):
    """Clip `values` in place (see l2_clip_flag); returns them."""
    l2_clip_flag(values, bound)
    return values


def l2_clip(values, bound):
    """A clipped copy of `values` (see l2_clip_into)."""
    return l2_clip_into(list(values), bound)


def share_sigma2(num, den, n):
    """Distributed DP: the variance (num, den) each of n nodes adds so that the sum of the n
    noises has variance num/den. (The sum of discrete Gaussians is not exactly one: the
    coordinator's accountant uses the bound of Kairouz, Liu and Steinke 2021 for it.)"""
    if not isinstance(n, int) or n < 1:
        raise ValueError("share_sigma2: n must be an int >= 1")
    return num, den * n


def noise_key(seed, round_, node_id):
    """Key of a node's seeded noise stream for one round: SHA-256(SEED_DOMAIN || u32le(seed)
    || u32le(round) || utf8(node_id))."""
    h = hashlib.sha256(SEED_DOMAIN)
    h.update(struct.pack("<II", seed & 0xFFFFFFFF, round_ & 0xFFFFFFFF))
    h.update(node_id.encode() if isinstance(node_id, str) else bytes(node_id))
    return h.digest()


class NodeDP:
    """DP for one node: delta -> clip to `clip` (raw L2 norm) -> + N_Z(0, num/den) per
    coordinate -> clamp to [-limit, limit] (the value range peers and coordinator accept;
    post-processing, so it costs no privacy). `noise`: a NOISE_SOURCES name; "seeded" uses
    `seed`. Under secure aggregation (distributed DP) num/den is this node's share
    (share_sigma2) and the clamp is never reached in practice (docs/privacy.md)."""

    def __init__(self, clip, num, den, noise="urandom", seed=0, node_id="", limit=MAX_RAW):
        if noise not in NOISE_SOURCES:
            raise ValueError("dp noise must be one of %s, got %r" % (", ".join(NOISE_SOURCES), noise))
        if not isinstance(clip, int) or isinstance(clip, bool) or clip < 1 or clip > MAX_RAW:
            raise ValueError("dp clip must be an int in 1..2^31-1 (raw Q16.16 L2 norm)")
        for v in (num, den):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > MAX_SIGMA2_PART:
                raise ValueError("dp sigma2 must be [num, den], ints in 1..2^128")
        if not isinstance(limit, int) or limit < 1 or limit > MAX_RAW:
            raise ValueError("dp limit must be an int in 1..2^31-1")
        self.clip = clip
        self.limit = limit
        self.gauss = DGauss(num, den)
        self.noise = noise
        self.seed = seed
        self.node_id = node_id

    def source(self, round_):
        if self.noise == "seeded":
            return Sha256Stream(noise_key(self.seed, round_, self.node_id))
        return UrandomSource()

    def apply(self, delta, round_):
        """Privatise `delta` in place (the node's update for `round_`); returns it."""
        l2_clip_flag(delta, self.clip)
        return self.noise_into(delta, round_)

    def noise_into(self, delta, round_):
        """Add this round's noise to `delta` (clipped already) in place; returns it."""
        g = self.gauss
        src = self.source(round_)
        hi = self.limit
        lo = -hi
        for i in range(len(delta)):
            v = delta[i] + g.sample(src)
            delta[i] = hi if v > hi else (lo if v < lo else v)
        return delta


def node_dp(doc, seed, node_id, limit=MAX_RAW):
    """A NodeDP from config.json's "dp" object {"clip": int, "sigma2": [num, den], "noise":
    "urandom" | "seeded", "nodes": n}, or None for null. "nodes" (default 1: local DP): the
    number of nodes whose noise shares add up to sigma2 under secure aggregation; the node
    adds share_sigma2(num, den, n). Raises ValueError naming the problem."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ValueError("'dp' must be null or {\"clip\", \"sigma2\", \"noise\", \"nodes\"}")
    for k in doc:
        if k not in ("clip", "sigma2", "noise", "nodes"):
            raise ValueError("unknown key 'dp.%s'" % k)
    s2 = doc.get("sigma2")
    if not isinstance(s2, (list, tuple)) or len(s2) != 2:
        raise ValueError("'dp.sigma2' must be [num, den]")
    n = doc.get("nodes", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > MAX_NODES:
        raise ValueError("'dp.nodes' must be an int in 1..%d" % MAX_NODES)
    num, den = s2[0], s2[1]
    if isinstance(den, int) and not isinstance(den, bool):
        num, den = share_sigma2(num, den, n)
    return NodeDP(doc.get("clip"), num, den, doc.get("noise", "urandom"), seed, node_id,
                  limit)
