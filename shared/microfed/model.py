# On-device models in Q16.16, pinned in docs/model.md (merged into docs/determinism.md).
# Portable: CPython 3.11 and the MicroPython unix port / ESP32. The training path is pure
# integer code: no float anywhere in this module, no f-strings, no typing, plain classes.
# This module IS the reference: any other implementation (a numpy fast path, C firmware)
# must reproduce init, logits, exp, softmax and train bit for bit (tests/vectors/model.json).
#
# Layout of the flat parameter vector of SoftmaxRegression(d features, k classes):
#   params[c * d + j]  weight of class c for feature j   (c < k, j < d; row-major by class)
#   params[k * d + c]  bias of class c
# For the reference task (digits, d = 64, k = 10) that is 640 weights then 10 biases = 650.

import hashlib
import struct
from array import array

from microfed.q16 import MAX_RAW, MIN_RAW, ONE, exact_list, sat

# ---- fixed-point exp ------------------------------------------------------------------------
# exp(x) for a raw Q16.16 x, as a raw Q16.16 result, saturated to MAX_RAW. Internals in Q30.
LOG2E_Q30 = 1549082005  # round(log2(e) * 2^30)
LN2_Q30 = 744261118  # round(ln(2) * 2^30)
ONE_Q30 = 1073741824  # 2^30
HALF_Q30 = 536870912  # 2^29: 1/2 in Q30, also the rounding term of a >> 30
C3_Q30 = 178956971  # round(2^30 / 6)
# EXP2_16[h] = round(2^(h/16) * 2^30), h = 0..15
EXP2_16 = (
    1073741824, 1121280436, 1170923762, 1222764986, 1276901417, 1333434672, 1392470869,
    1454120821, 1518500250, 1585730000, 1655936265, 1729250827, 1805811301, 1885761398,
    1969251188, 2056437387,
)
# Shortcuts, equal to the full formula because y is monotone in x: below -16.0, k <= -24
# (result 0); above 11.0, k >= 15 (saturated). They keep every product in 64 bits.
EXP_ZERO_BELOW = -1048576  # -16.0
EXP_SAT_ABOVE = 720896  # 11.0


def exp(x):
    # exp(x) = 2^y, y = x * log2(e) = k + f with integer k = floor(y) and f in [0, 1).
    # y is kept in Q30 (x * LOG2E_Q30 is exact at scale 2^46, rounded half up to 2^30).
    if x < EXP_ZERO_BELOW:
        return 0
    if x > EXP_SAT_ABOVE:
        return MAX_RAW
    y = (x * LOG2E_Q30 + 32768) >> 16
    k = y >> 30
    if k > 14:
        return MAX_RAW
    if k < -17:
        return 0
    f = y & 0x3FFFFFFF
    # 2^f = 2^(h/16) * e^v: a table for the top 4 bits h of f, and a cubic Taylor polynomial
    # for v = (f - h/16) * ln 2 < 0.0434 (its v^4/24 remainder is < 1.5e-7), Horner in Q30.
    v = ((f & 0x3FFFFFF) * LN2_Q30 + HALF_Q30) >> 30
    a = HALF_Q30 + ((v * C3_Q30 + HALF_Q30) >> 30)
    b = ONE_Q30 + ((v * a + HALF_Q30) >> 30)
    p = ONE_Q30 + ((v * b + HALF_Q30) >> 30)
    t = (EXP2_16[f >> 26] * p + HALF_Q30) >> 30
    # t = 2^f in Q30, in [2^30, 2^31). Q16.16 result = t * 2^k / 2^14, rounded half up.
    s = 14 - k
    if s == 0:
        return t
    return (t + (1 << (s - 1))) >> s


def softmax(z, out=None):
    # p_c = rdiv(exp(z_c - max z) * ONE, S), S = sum of those exps (>= ONE, so never zero).
    # z_c - max z is exact (no saturation); exp of anything below -16 is 0 anyway.
    # out: the list to write into (z itself, when the logits are not needed after), else a
    # new one.
    if not z:
        raise ModelError("softmax of an empty vector")
    m = z[0]
    for v in z:
        if v > m:
            m = v
    # In place, in one list of len(z): a comprehension grows its list (4, 8, 16 items), and
    # on a board's split heap its last 64-byte block was the one not found (docs/results.md).
    k = len(z)
    e = [0] * k if out is None else out
    s = 0
    for c in range(k):
        v = exp(z[c] - m)
        e[c] = v
        s += v
    s2 = 2 * s
    for c in range(k):
        e[c] = (2 * ONE * e[c] + s) // s2
    return e


# ---- deterministic pseudo-random numbers ----------------------------------------------------
M32 = 0xFFFFFFFF
SEED_ZERO = 0x9E3779B9  # xorshift32 must not start at 0


class XorShift32:
    # Marsaglia's xorshift32 (13, 17, 5) on a 32-bit state; next() returns the new state.
    def __init__(self, seed):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError("seed must be a non-negative int")
        s = seed & M32
        self.s = s if s else SEED_ZERO

    def next(self):
        s = self.s
        s ^= (s << 13) & M32
        s ^= s >> 17
        s ^= (s << 5) & M32
        self.s = s
        return s

    def shuffle(self, a):
        # Fisher-Yates from the end: j = next() % (i + 1).
        i = len(a) - 1
        while i > 0:
            j = self.next() % (i + 1)
            a[i], a[j] = a[j], a[i]
            i -= 1


def derive_seed(base, round_no, node_id):
    # Per-node, per-round training seed: the first 4 bytes (little-endian) of
    # SHA-256(b"microfed/seed/v1" || u32le(base) || u32le(round) || utf8(node_id)).
    h = hashlib.sha256(b"microfed/seed/v1")
    h.update(struct.pack("<II", base & M32, round_no & M32))
    h.update(node_id.encode() if isinstance(node_id, str) else bytes(node_id))
    return int.from_bytes(h.digest()[:4], "little")


# ---- model protocol -------------------------------------------------------------------------
class ModelError(ValueError):
    pass


class TrainConfig:
    # lr: raw Q16.16 learning rate (> 0). epochs, batch: ints >= 1. seed: shuffle seed >= 0.
    def __init__(self, lr=32768, epochs=1, batch=10, seed=0):
        for name, v, lo in (("lr", lr, 1), ("epochs", epochs, 1), ("batch", batch, 1), ("seed", seed, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ModelError("%s must be an int >= %d, got %r" % (name, lo, v))
        if lr > MAX_RAW:
            raise ModelError("lr does not fit Q16.16")
        self.lr = lr
        self.epochs = epochs
        self.batch = batch
        self.seed = seed

    def as_dict(self):
        return {"lr": self.lr, "epochs": self.epochs, "batch": self.batch, "seed": self.seed}


class Model:
    # What a mesh needs from a model: a fixed-length vector of raw Q16.16 parameters, a
    # deterministic init, prediction, and local training. Subclasses set name, n_params, d
    # (features) and k (classes) and implement init, logits and train; predict, check_data,
    # delta, apply and evaluate come for free.
    name = ""
    n_params = 0
    d = 0  # features
    k = 0  # classes

    def init(self, seed):
        raise NotImplementedError

    def logits(self, params, x):
        raise NotImplementedError

    def predict(self, params, x):
        # argmax of the logits, lowest class index on ties.
        z = self.logits(params, x)
        best = 0
        for c in range(1, self.k):
            if z[c] > z[best]:
                best = c
        return best

    def check_data(self, data):
        if isinstance(data, Shard):
            # A Shard checked its labels against its own class count when it was opened.
            if data.d != self.d:
                raise ModelError("data: shard has %d features, expected %d" % (data.d, self.d))
            if data.k > self.k:
                raise ModelError("data: shard has %d classes, the model %d" % (data.k, self.k))
            return
        xs, ys = data
        if len(xs) != len(ys):
            raise ModelError("data: %d feature rows but %d labels" % (len(xs), len(ys)))
        if not xs:
            raise ModelError("data: no samples")
        for i in range(len(xs)):
            if len(xs[i]) != self.d:
                raise ModelError("data: sample %d has %d features, expected %d" % (i, len(xs[i]), self.d))
            y = ys[i]
            if not isinstance(y, int) or y < 0 or y >= self.k:
                raise ModelError("data: label %r of sample %d outside 0..%d" % (y, i, self.k - 1))

    def train(self, params, data, cfg, out=None, scratch=None, order=None, spare=None):
        # out: None, or a list of n_params that becomes the trained parameters (returned);
        # scratch: None, or a list of scratch_len() for the training sums; order: None, or
        # sample_order(n) for the data's n samples. A node passes the same ones every round
        # (noderound.RoundBuffers): no block to find on a fragmented heap mid-run. spare:
        # None, or a writable memoryview whose bytes training may use while it runs (what a
        # node's receive buffer has beyond its update frame). The result is the same with or
        # without them.
        raise NotImplementedError

    def scratch_len(self):
        return 0

    def check_params(self, params):
        if len(params) != self.n_params:
            raise ModelError("%s expects %d parameters, got %d" % (self.name, self.n_params, len(params)))
        for v in params:
            if not isinstance(v, int) or v < MIN_RAW or v > MAX_RAW:
                raise ModelError("parameters must be int32 raw Q16.16 values")

    def delta(self, old, new):
        # What a node publishes: new - old, element-wise, saturated.
        if len(old) != len(new):
            raise ModelError("delta: length mismatch")
        return [sat(b - a) for a, b in zip(old, new)]

    def apply(self, params, delta):
        if len(params) != len(delta):
            raise ModelError("apply: length mismatch")
        return [sat(a + b) for a, b in zip(params, delta)]

    def evaluate(self, params, data):
        # Number of correct predictions (an int: the caller divides for display).
        xs, ys = data
        correct = 0
        for i in range(len(xs)):
            if self.predict(params, xs[i]) == ys[i]:
                correct += 1
        return correct


class SoftmaxRegression(Model):
    # Multinomial logistic regression: z = W x + b, p = softmax(z), cross-entropy loss,
    # mini-batch SGD. Every product is accumulated exactly and rounded once.
    name = "softmax"
    INIT_AMP = 655  # init weights uniform in [-655, 655] raw (about +-0.01), biases 0

    def __init__(self, n_features=64, n_classes=10):
        if n_features < 1 or n_classes < 2:
            raise ModelError("softmax needs n_features >= 1 and n_classes >= 2")
        self.d = n_features
        self.k = n_classes
        self.n_params = n_features * n_classes + n_classes

    def init(self, seed):
        rng = XorShift32(seed)
        span = 2 * self.INIT_AMP + 1
        w = [rng.next() % span - self.INIT_AMP for _ in range(self.d * self.k)]
        return w + [0] * self.k

    def logits(self, params, x):
        # z_c = sat(b_c + round_half_up(sum_j W_cj * x_j / 2^16)); the sum is exact.
        if len(x) != self.d:
            raise ModelError("sample has %d features, expected %d" % (len(x), self.d))
        return self._logits(params, x, _nonzero(x), 0)

    def _logits(self, params, x, nz, shift):
        # x: the features, each exactly x_j >> shift; nz: the indices of the non-zero ones.
        d = self.d
        bo = self.k * d
        z = [0] * self.k  # one block of k items, not a list grown by appends
        for c in range(self.k):
            o = c * d
            acc = 0
            for j in nz:
                acc += params[o + j] * x[j]
            z[c] = sat(params[bo + c] + (((acc << shift) + 32768) >> 16))
        return z

    def probs(self, params, x):
        return softmax(self.logits(params, x))

    def scratch_len(self):
        return self.d

    def train(self, params, data, cfg, out=None, scratch=None, order=None, spare=None):
        # For each epoch: shuffle the sample order (XorShift32(cfg.seed), one generator for
        # the whole call), cut it into batches of cfg.batch (the last may be shorter); per
        # batch of m samples, with the parameters held fixed over the batch:
        #   g_c  = p_c - ONE*[c == y]                       (softmax of the logits, Q16.16)
        #   GW_cj = sum over samples of g_c * x_j           (exact, scale 2^32; one class c
        #                                                    at a time, in d sums: `scratch`)
        #   Gb_c  = sum over samples of g_c                 (exact, scale 2^16)
        #   W_cj <- sat(W_cj - rdiv(lr * GW_cj, m << 32))
        #   b_c  <- sat(b_c  - rdiv(lr * Gb_c,  m << 16))
        # `data` is (xs, ys), lists of raw Q16.16 features, or a Shard, whose features are
        # bytes b with x = b << shift. The sums then run over b and the shift is applied once
        # per sum (exact: (sum w*b) << s == sum w*(b << s)): a 32-bit port multiplies small
        # ints instead of allocating a long int per product, and no decoded copy exists.
        self.check_params(params)
        self.check_data(data)
        row, label, n, shift = _samples(data)
        d = self.d
        k = self.k
        bo = k * d
        lr = cfg.lr
        lrw = lr << shift  # the weights' gradient sums are 2^shift too small
        p = _held(out, self.n_params, "out")
        if p is None:
            p = exact_list(params)
        elif p is not params:
            p[:] = params  # the same length: filled in place
        gw = _held(scratch, d, "scratch")  # zeroed again as each class consumes it
        if gw is None:
            gw = [0] * d
        else:
            for j in range(d):
                gw[j] = 0  # an earlier call that failed mid-batch leaves sums behind
        # Per batch, what the gradient sums need of each sample: its features (a copy: a
        # Shard reuses its row buffer), the indices of the non-zero ones, g. The sums then
        # run one class at a time: d sums instead of k*d (a 2.6 KB block less on a board).
        xs = [None] * cfg.batch
        nzs = [None] * cfg.batch
        qs = [None] * cfg.batch
        # A shard's rows are copied into buffers allocated here, once per call, and their
        # non-zero indices written into `spare` when it has room for a batch's, else into more
        # buffers: per sample nothing is allocated but views and the logits, which their
        # softmax overwrites. On a board's heap, a copy, an index list growing and its bytes
        # for each of a round's 111 samples split the free space (a coordinated unix32 node
        # at 44 KB failed training with 9 KB free), and the index buffers and a softmax list
        # beside each logits list were what a 32 KB node's training did not find
        # (docs/results.md).
        xbuf = nzbuf = nzall = None
        if isinstance(data, Shard) and d <= 256:
            xbuf = [bytearray(d) for _ in range(cfg.batch)]
            if spare is not None and len(spare) >= cfg.batch * d:
                nzall = spare
            else:
                nzbuf = [memoryview(bytearray(d)) for _ in range(cfg.batch)]
        for batch in batches(n, cfg, order):
            m = len(batch)
            for s in range(m):
                i = batch[s]
                x = row(i)
                if xbuf is None:
                    nz = _nonzero(x)
                else:
                    xb = xbuf[s]
                    xb[:] = x
                    x = xb
                    nz = _nonzero_into(x, nzbuf[s] if nzall is None else nzall[s * d:s * d + d])
                q = self._logits(p, x, nz, shift)
                softmax(q, q)
                q[label(i)] -= ONE
                xs[s] = x
                nzs[s] = nz
                qs[s] = q
            mw = m << 32
            mw2 = mw << 1
            mb = m << 16
            mb2 = mb << 1
            for c in range(k):
                gb = 0
                for s in range(m):
                    g = qs[s][c]
                    if g:
                        gb += g
                        x = xs[s]
                        for j in nzs[s]:
                            gw[j] += g * x[j]
                o = c * d
                for j in range(d):
                    g = gw[j]
                    if g:
                        gw[j] = 0
                        v = p[o + j] - (2 * lrw * g + mw) // mw2
                        p[o + j] = MAX_RAW if v > MAX_RAW else (MIN_RAW if v < MIN_RAW else v)
                if gb:
                    v = p[bo + c] - (2 * lr * gb + mb) // mb2
                    p[bo + c] = MAX_RAW if v > MAX_RAW else (MIN_RAW if v < MIN_RAW else v)
            x = None
            for s in range(m):
                xs[s] = nzs[s] = qs[s] = None
        return p


def sample_order(n):
    """The buffer training shuffles the sample order in: 16-bit indices when they fit (half
    the block a list of small ints takes on a 32-bit port). A node keeps one for good
    (noderound.RoundBuffers): made per round, its 222 bytes were at times not to be found on
    a 64 KB Cortex-M3's split heap with 12 KB free (docs/boards.md)."""
    return array("H", range(n)) if n < 65536 else list(range(n))


def batches(n, cfg, order=None):
    # Training's sample order: for each epoch, shuffle (one XorShift32(cfg.seed) for the whole
    # call) and cut into batches of cfg.batch indices, the last one possibly shorter.
    # `order`: sample_order(n)'s buffer, set back to 0 .. n-1 here; else one is made.
    rng = XorShift32(cfg.seed)
    if order is None or len(order) != n:
        order = sample_order(n)
    else:
        for i in range(n):
            order[i] = i
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        for start in range(0, n, cfg.batch):
            yield order[start:start + cfg.batch]


def _held(buf, n, what):
    # A caller's list of exactly n items, or None when the caller gave none.
    if buf is None:
        return None
    if not isinstance(buf, list) or len(buf) != n:
        raise ModelError("train: %s must be a list of %d items" % (what, n))
    return buf


def _samples(data):
    # (row(i), label(i), n, shift) for (xs, ys) lists or a Shard.
    if isinstance(data, Shard):
        return data.row, data.label, data.n, data.shift
    xs, ys = data
    return (lambda i: xs[i]), (lambda i: ys[i]), len(xs), 0


def _nonzero(x):
    # The indices of the non-zero features, as bytes when they fit (one small block per
    # sample): zeros add nothing to an exact sum, and digits images are about half zeros.
    ix = [j for j in range(len(x)) if x[j]]
    return bytes(ix) if len(x) <= 256 else ix


def _nonzero_into(x, buf):
    # _nonzero's indices written into `buf` (a bytearray of len(x) <= 256 bytes); a view of
    # the ones written.
    t = 0
    for j in range(len(x)):
        if x[j]:
            buf[t] = j
            t += 1
    return memoryview(buf)[:t]


MODELS = {"softmax": SoftmaxRegression}
# Models in modules of their own, imported on first use (a softmax node never loads them).
LAZY_MODELS = ("mlp",)


def get(name, **kw):
    cls = MODELS.get(name)
    if cls is None and name == "mlp":
        from microfed.mlp import MLP

        cls = MLP
    if cls is None:
        raise ModelError("unknown model %r (known: %s)"
                         % (name, ", ".join(sorted(list(MODELS) + list(LAZY_MODELS)))))
    return cls(**kw)


def params_digest(params):
    # SHA-256 over the parameters as little-endian int32, in vector order.
    h = hashlib.sha256()
    for i in range(0, len(params), 64):
        chunk = params[i:i + 64]
        h.update(struct.pack("<%di" % len(chunk), *chunk))
    return h.digest()


# ---- data shards (format in host/microfed_host/data.py and docs/model.md) -------------------
SHARD_MAGIC = b"MFDS"
SHARD_HEADER = "<4sBBHHIHH"
SHARD_HEADER_SIZE = 18
_CHUNK = 256


class Shard:
    """An MFDS v1 shard used in place: a row comes out as its d stored bytes (feature =
    byte << shift) and nothing is decoded into lists. `src` is the file's bytes, or a file
    opened "rb": then rows are read from it one at a time (a board keeps one 64-byte row in
    RAM, not the ~38 KB a decoded 111-sample shard takes on a 32-bit port). The whole file is
    checked when the Shard is made: SHA-256 trailer, header, length, labels. Raises only
    ModelError, whatever the bytes."""

    def __init__(self, src):
        self._f = None
        self._mv = None
        if isinstance(src, (bytes, bytearray, memoryview)):
            self._mv = memoryview(src)
            size = len(src)
        else:
            self._f = src
            try:
                size = src.seek(0, 2)
            except Exception as e:
                raise ModelError("shard: cannot seek the file (%r)" % e)
        if size < SHARD_HEADER_SIZE + 32:
            raise ModelError("shard: %d bytes is too short" % size)
        self._check_sha(size)
        magic, version, shift, d, k, n, index, count = struct.unpack(
            SHARD_HEADER, self._read(0, SHARD_HEADER_SIZE))
        if magic != SHARD_MAGIC or version != 1:
            raise ModelError("shard: not an MFDS v1 file")
        if size != SHARD_HEADER_SIZE + n * d + n + 32:
            raise ModelError("shard: length does not match its header")
        if shift > 23:
            # 255 << 23 is the largest stored feature that still fits a Q16.16 int32.
            raise ModelError("shard: shift %d above 23" % shift)
        if n < 1 or d < 1:
            raise ModelError("shard: no samples or no features")
        self.d = d
        self.k = k
        self.n = n
        self.shift = shift
        self.index = index
        self.count = count
        self.labels = self._read(SHARD_HEADER_SIZE + n * d, n)
        for y in self.labels:
            if y >= k:
                raise ModelError("shard: label %d outside 0..%d" % (y, k - 1))
        self._row = bytearray(d) if self._f is not None else None

    def _read(self, off, n):
        if self._mv is not None:
            return bytes(self._mv[off:off + n])
        f = self._f
        f.seek(off)
        b = f.read(n)
        if b is None or len(b) != n:
            raise ModelError("shard: file changed while reading")
        return b

    def _check_sha(self, size):
        h = hashlib.sha256()
        end = size - 32
        if self._mv is not None:
            h.update(self._mv[:end])
        else:
            off = 0
            while off < end:
                step = end - off if end - off < _CHUNK else _CHUNK
                h.update(self._read(off, step))
                off += step
        if h.digest() != self._read(end, 32):
            raise ModelError("shard: SHA-256 mismatch (truncated or corrupted)")

    def info(self):
        return {"n_features": self.d, "n_classes": self.k, "n_samples": self.n,
                "index": self.index, "count": self.count, "shift": self.shift}

    def row(self, i):
        """Sample i's stored feature bytes (a view or a reused buffer: use it before the next
        call)."""
        o = SHARD_HEADER_SIZE + i * self.d
        if self._mv is not None:
            return self._mv[o:o + self.d]
        f = self._f
        f.seek(o)
        if f.readinto(self._row) != self.d:
            raise ModelError("shard: file changed while reading")
        return self._row

    def label(self, i):
        return self.labels[i]


def decode_shard(buf):
    # -> (xs, ys, info); xs rows of raw Q16.16 ints (stored byte << shift): the host's view
    # (evaluation, tests). Raises only ModelError, whatever the bytes.
    if not isinstance(buf, (bytes, bytearray, memoryview)):
        raise ModelError("shard: must be bytes")
    s = Shard(buf)
    sh = s.shift
    xs = [[b << sh for b in s.row(i)] for i in range(s.n)]
    return xs, list(s.labels), s.info()
