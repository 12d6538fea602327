# Reputation book, pinned in docs/reputation.md: a deviation-derived, cohort-relative signal
# in Q16.16. Portable (CPython and the MicroPython unix port): integers only, no f-strings.
#
# Why cohort-relative: every threshold is a multiple of the round's median deviation, so an
# honest cohort whose updates are huge or widely spread is judged against itself and nobody
# is banned for the size of their updates. Why the coordinate-wise median as the reference
# and not the aggregation rule's output: being selected by Krum must earn nothing (a strong
# ALIE attacker is selected every round); the verdict depends on deviation alone.
# Why a direction check beside the distance bands (verdict "misaligned", half a penalty): when honest updates are noisy relative to
# their common direction (late training, small shards), a sign-flipped update is no farther
# from the median than an honest one, yet it points the other way. The sign of its dot product
# with the cohort median is scale-free, so it keeps the rule cohort-relative.

import struct

from microfed.aggregate import dist, median
from microfed.q16 import MAX_RAW, MIN_RAW, ONE, mul, rdiv

REWARD = "reward"
PENALTY = "penalty"
MISALIGNED = "misaligned"
NEUTRAL = "neutral"
BANNED = "banned"
NO_SIGNAL = "no_signal"

WEIGHT_CAP = 52429  # 0.8 = floor(0.8 * 65536 + 0.5)
MAGIC = b"MFRP"
VERSION = 1
MAX_NODES = 65535
MAX_ID_BYTES = 64
MAX_BAND = 65536
MAX_COUNT = 0xFFFFFFFF  # counters saturate here (they are u32 on the wire)
HEADER_SIZE = 41  # magic 4 + version 1 + 8 params * 4 + node count 4
NODE_MIN_SIZE = 19  # id length 1 + id >= 1 + rep 4 + flags 1 + 3 counters * 4

# Per-node state: a list, indexed by these.
_REP = 0
_BANNED = 1
_ROUNDS = 2
_REWARDS = 3
_PENALTIES = 4

_PARAMS = ("initial", "reward", "penalty", "ban_below", "reward_band", "penalty_band",
           "decay", "min_cohort")


def _is_int(x):
    # bool is an int subclass on CPython; True is not a Q16.16 value.
    return type(x) is int


def _check_params(p):
    for name in _PARAMS:
        v = p[name]
        if not _is_int(v):
            raise ValueError("reputation parameter %s must be an integer" % name)
    for name in ("initial", "reward", "penalty", "ban_below", "decay"):
        if p[name] < 0 or p[name] > ONE:
            raise ValueError("reputation parameter %s must be a Q16.16 fraction in [0, %d]: %d"
                             % (name, ONE, p[name]))
    if not 1 <= p["reward_band"] <= p["penalty_band"] <= MAX_BAND:
        raise ValueError("reputation bands need 1 <= reward_band <= penalty_band <= %d: %d, %d"
                         % (MAX_BAND, p["reward_band"], p["penalty_band"]))
    # Fewer than 3 updates cannot tell an outlier from the rest: with 2 the median is their
    # midpoint and both deviations are equal.
    if not 3 <= p["min_cohort"] <= MAX_NODES:
        raise ValueError("reputation parameter min_cohort must be in [3, %d]: %d"
                         % (MAX_NODES, p["min_cohort"]))


def _id_bytes(node):
    if type(node) is not str:
        raise ValueError("node id must be a string")
    try:
        b = node.encode("utf-8")
    except Exception:  # CPython: lone surrogates
        raise ValueError("node id is not encodable as UTF-8")
    if not 1 <= len(b) <= MAX_ID_BYTES:
        raise ValueError("node id must be 1..%d UTF-8 bytes: %d" % (MAX_ID_BYTES, len(b)))
    # MicroPython strings can hold surrogates (e.g. from JSON "\ud83d"); such an id would be
    # written by to_bytes and then refused by from_bytes.
    if not _valid_utf8(b):
        raise ValueError("node id is not valid UTF-8")
    return b


def _valid_utf8(b):
    # Strict RFC 3629 check (no overlongs, no surrogates, <= U+10FFFF). MicroPython's decoder
    # is laxer than CPython's, and both engines must reject exactly the same bytes.
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            k, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            k, lo, hi = 2, 0xA0, 0xBF
        elif 0xE1 <= c <= 0xEC or c == 0xEE or c == 0xEF:
            k, lo, hi = 2, 0x80, 0xBF
        elif c == 0xED:
            k, lo, hi = 2, 0x80, 0x9F
        elif c == 0xF0:
            k, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            k, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            k, lo, hi = 3, 0x80, 0x8F
        else:
            return False
        if i + k >= n:
            return False
        if not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + 1 + k):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += 1 + k
    return True


def median_int(values):
    # Median of integers with the project's rounding rule: odd count -> the middle value,
    # even count -> rdiv(a + b, 2) of the two middle values (round half up).
    s = sorted(values)
    n = len(s)
    h = n // 2
    if n % 2:
        return s[h]
    return rdiv(s[h - 1] + s[h], 2)


def _dot(u, v):
    s = 0
    for a, b in zip(u, v):
        s += a * b
    return s


# An update is misaligned when its cosine with the cohort median is below -1/4:
# dot < 0 and ALIGN_COS2 * dot^2 > |x|^2 * |ref|^2, in exact integers. The margin keeps honest
# updates that are merely orthogonal-ish (label-skewed non-IID shards) out of it.
ALIGN_COS2 = 16


def _misaligned(x, ref, ref_sq):
    d = _dot(x, ref)
    return d < 0 and ALIGN_COS2 * d * d > _dot(x, x) * ref_sq


def _cap(x):
    return x if x < MAX_COUNT else MAX_COUNT


class ReputationBook:
    def __init__(self, initial=49152, reward=6554, penalty=9830, ban_below=13107,
                 reward_band=4, penalty_band=9, decay=0, min_cohort=3):
        p = {"initial": initial, "reward": reward, "penalty": penalty, "ban_below": ban_below,
             "reward_band": reward_band, "penalty_band": penalty_band, "decay": decay,
             "min_cohort": min_cohort}
        _check_params(p)
        self.initial = initial
        self.reward = reward
        self.penalty = penalty
        self.ban_below = ban_below
        self.reward_band = reward_band
        self.penalty_band = penalty_band
        self.decay = decay
        self.min_cohort = min_cohort
        self._nodes = {}

    def params(self):
        return {"initial": self.initial, "reward": self.reward, "penalty": self.penalty,
                "ban_below": self.ban_below, "reward_band": self.reward_band,
                "penalty_band": self.penalty_band, "decay": self.decay,
                "min_cohort": self.min_cohort}

    # --- one round -------------------------------------------------------------------------

    def _check_round(self, ids, vecs):
        if not isinstance(ids, (list, tuple)) or not isinstance(vecs, (list, tuple)):
            raise ValueError("ids and vecs must be lists")
        if len(ids) != len(vecs):
            raise ValueError("one vector per node id: %d ids, %d vectors" % (len(ids), len(vecs)))
        seen = set()
        new = 0
        d = -1
        for i in range(len(ids)):
            node = ids[i]
            _id_bytes(node)
            if node in seen:
                raise ValueError("duplicate node id in round: %s" % node)
            seen.add(node)
            if node not in self._nodes:
                new += 1
            v = vecs[i]
            if not isinstance(v, (list, tuple)):
                raise ValueError("update of %s is not a list" % node)
            if d < 0:
                d = len(v)
                if d < 1:
                    raise ValueError("update of %s is empty" % node)
            elif len(v) != d:
                raise ValueError("ragged updates: lengths %d and %d (node %s)" % (d, len(v), node))
            for x in v:
                if not _is_int(x) or x < MIN_RAW or x > MAX_RAW:
                    raise ValueError("update of %s holds a value that is not a Q16.16 int32" % node)
        if len(self._nodes) + new > MAX_NODES:
            raise ValueError("reputation book full: at most %d nodes" % MAX_NODES)

    def _verdict(self, dev, med, misaligned):
        if med == 0:
            return REWARD if dev == 0 else PENALTY
        if dev > self.penalty_band * med:
            return PENALTY
        if misaligned:
            return MISALIGNED
        if dev <= self.reward_band * med:
            return REWARD
        return NEUTRAL

    def observe(self, ids, vecs):
        """Score one round: ids[i] sent the Q16.16 vector vecs[i]. Returns {node: verdict}.

        The whole round is validated before any state changes (ValueError on bad input)."""
        self._check_round(ids, vecs)
        out = {}
        cohort = []
        for i in range(len(ids)):
            st = self._nodes.get(ids[i])
            if st is not None and st[_BANNED]:
                out[ids[i]] = BANNED
            else:
                cohort.append(i)
        if len(cohort) < self.min_cohort:
            for i in cohort:
                out[ids[i]] = NO_SIGNAL
            return out
        ref = median([vecs[i] for i in cohort])
        devs = [dist(vecs[i], ref) for i in cohort]
        ref_sq = _dot(ref, ref)
        aligns = [_misaligned(vecs[i], ref, ref_sq) for i in cohort]
        med = median_int(devs)
        for j in range(len(cohort)):
            node = ids[cohort[j]]
            st = self._nodes.get(node)
            if st is None:
                st = [self.initial, 0, 0, 0, 0]
                self._nodes[node] = st
            st[_ROUNDS] = _cap(st[_ROUNDS] + 1)
            v = self._verdict(devs[j], med, aligns[j])
            if v == REWARD:
                r = st[_REP] + mul(self.reward, ONE - st[_REP])
                st[_REP] = r if r < ONE else ONE
                st[_REWARDS] = _cap(st[_REWARDS] + 1)
            elif v == PENALTY or v == MISALIGNED:
                # Misalignment alone is weaker evidence (a very noisy honest update can point
                # the wrong way now and then): half a penalty.
                r = st[_REP] - (self.penalty if v == PENALTY else self.penalty >> 1)
                st[_REP] = r if r > 0 else 0
                st[_PENALTIES] = _cap(st[_PENALTIES] + 1)
                if st[_REP] < self.ban_below:
                    st[_BANNED] = 1
            out[node] = v
        if self.decay:
            present = set(ids)
            for node in self._nodes:
                st = self._nodes[node]
                if node not in present and not st[_BANNED]:
                    st[_REP] = st[_REP] + mul(self.decay, self.initial - st[_REP])
        return out

    # --- queries ---------------------------------------------------------------------------

    def rep(self, node):
        st = self._nodes.get(node)
        return self.initial if st is None else st[_REP]

    def weight(self, node):
        """Q16.16 influence: min(rep^3, 0.8); 0 when banned; unknown nodes weigh as `initial`."""
        st = self._nodes.get(node)
        if st is None:
            r = self.initial
        elif st[_BANNED]:
            return 0
        else:
            r = st[_REP]
        w = mul(mul(r, r), r)
        return w if w < WEIGHT_CAP else WEIGHT_CAP

    def is_banned(self, node):
        st = self._nodes.get(node)
        return st is not None and st[_BANNED] == 1

    def banned(self):
        return sorted([n for n in self._nodes if self._nodes[n][_BANNED]],
                      key=lambda s: s.encode("utf-8"))

    def nodes(self):
        return sorted(self._nodes, key=lambda s: s.encode("utf-8"))

    def unban(self, node):
        """Clear a ban and reset the node to `initial`. Returns False (no change) if not banned."""
        st = self._nodes.get(node)
        if st is None or not st[_BANNED]:
            return False
        st[_BANNED] = 0
        st[_REP] = self.initial
        return True

    def snapshot(self):
        nodes = {}
        for n in self._nodes:
            st = self._nodes[n]
            nodes[n] = {"rep": st[_REP], "banned": st[_BANNED] == 1, "rounds": st[_ROUNDS],
                        "rewards": st[_REWARDS], "penalties": st[_PENALTIES],
                        "weight": self.weight(n)}
        return {"params": self.params(), "nodes": nodes}

    # --- serialisation ---------------------------------------------------------------------

    def to_bytes(self):
        out = [MAGIC, struct.pack("<B", VERSION)]
        for name in _PARAMS:
            out.append(struct.pack("<I", getattr(self, name)))
        keys = self.nodes()
        out.append(struct.pack("<I", len(keys)))
        for n in keys:
            b = n.encode("utf-8")
            st = self._nodes[n]
            out.append(struct.pack("<B", len(b)))
            out.append(b)
            out.append(struct.pack("<IBIII", st[_REP], st[_BANNED], st[_ROUNDS], st[_REWARDS],
                                   st[_PENALTIES]))
        return b"".join(out)

    @staticmethod
    def from_bytes(b):
        return from_bytes(b)

    def __eq__(self, other):
        return isinstance(other, ReputationBook) and self.to_bytes() == other.to_bytes()

    def __ne__(self, other):
        return not self.__eq__(other)


def _need(b, off, k, what):
    if off + k > len(b):
        raise ValueError("reputation bytes truncated: %s needs %d bytes at offset %d, %d left"
                         % (what, k, off, len(b) - off))


def _u32(b, off):
    return b[off] | (b[off + 1] << 8) | (b[off + 2] << 16) | (b[off + 3] << 24)


def from_bytes(b):
    """Inverse of ReputationBook.to_bytes; ValueError names whatever is wrong with `b`."""
    if not isinstance(b, (bytes, bytearray)):
        raise ValueError("reputation bytes must be bytes")
    _need(b, 0, HEADER_SIZE, "header")
    if bytes(b[0:4]) != MAGIC:
        raise ValueError("not a reputation book: bad magic")
    if b[4] != VERSION:
        raise ValueError("unsupported reputation book version %d (expected %d)" % (b[4], VERSION))
    p = {}
    off = 5
    for name in _PARAMS:
        p[name] = _u32(b, off)
        off += 4
    _check_params(p)
    count = _u32(b, off)
    off += 4
    if count > MAX_NODES:
        raise ValueError("reputation book claims %d nodes (max %d)" % (count, MAX_NODES))
    _need(b, off, count * NODE_MIN_SIZE, "%d node records" % count)
    book = ReputationBook(p["initial"], p["reward"], p["penalty"], p["ban_below"],
                          p["reward_band"], p["penalty_band"], p["decay"], p["min_cohort"])
    prev = None
    for k in range(count):
        _need(b, off, 1, "node %d id length" % k)
        n = b[off]
        off += 1
        if not 1 <= n <= MAX_ID_BYTES:
            raise ValueError("node %d id length %d out of range 1..%d" % (k, n, MAX_ID_BYTES))
        _need(b, off, n + 17, "node %d record" % k)
        raw = bytes(b[off:off + n])
        off += n
        if not _valid_utf8(raw):
            raise ValueError("node %d id is not valid UTF-8" % k)
        if prev is not None and raw <= prev:
            raise ValueError("node ids not in strictly increasing byte order at node %d" % k)
        prev = raw
        rep = _u32(b, off)
        flags = b[off + 4]
        rounds = _u32(b, off + 5)
        rewards = _u32(b, off + 9)
        penalties = _u32(b, off + 13)
        off += 17
        if rep > ONE:
            raise ValueError("node %d reputation %d above ONE" % (k, rep))
        if flags > 1:
            raise ValueError("node %d has unknown flags 0x%02x" % (k, flags))
        if flags and rep >= p["ban_below"]:
            raise ValueError("node %d is banned with reputation %d >= ban_below" % (k, rep))
        book._nodes[raw.decode("utf-8")] = [rep, flags, rounds, rewards, penalties]
    if off != len(b):
        raise ValueError("reputation bytes have %d trailing bytes" % (len(b) - off))
    return book
