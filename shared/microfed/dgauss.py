# The exact discrete Gaussian sampler of Canonne, Kamath and Steinke, "The Discrete Gaussian
# for Differential Privacy" (NeurIPS 2020, arXiv:2004.00010), Algorithms 1-3, in integer
# arithmetic only: no float anywhere, so it runs the same on a microcontroller as on x86
# (docs/privacy.md, "Differential privacy").
#
#   N_Z(0, s2): P[X = x] = exp(-x^2 / (2 s2)) / sum_y exp(-y^2 / (2 s2)),  x in Z,
#   with the variance parameter s2 = num / den a positive rational (need not be an integer).
#
# Randomness comes from a byte source with read(n) -> n bytes:
#   UrandomSource   the device's os.urandom (production);
#   Sha256Stream    SHA-256 in counter mode from a key (reproducible experiments and tests:
#                   the same key gives the same samples on every engine, bit for bit).
# Every random choice is one randbelow(m) call (below), so the byte stream fixes the samples.
#
# Portable: CPython 3.11 and MicroPython 1.29 (no int.bit_length, no math.gcd, no f-strings).

import hashlib

STREAM_DOMAIN = b"microfed/dgauss/stream/v1"


def nbits(x):
    """Bit length of an integer x >= 0 (int.bit_length, which MicroPython lacks)."""
    n = 0
    while x >= 0x1000000:
        x >>= 24
        n += 24
    while x:
        x >>= 1
        n += 1
    return n


def isqrt(n):
    """floor(sqrt(n)) for an integer n >= 0, exact (Newton's method from above)."""
    if n < 0:
        raise ValueError("isqrt of a negative number")
    if n < 2:
        return n
    x = 1 << ((nbits(n) + 1) >> 1)  # >= sqrt(n)
    while True:
        y = (x + n // x) >> 1
        if y >= x:
            return x
        x = y


class _Source:
    """A byte stream consumed in order; subclasses provide refill() -> the next block."""

    def __init__(self):
        self.buf = b""
        self.pos = 0

    def refill(self):
        raise NotImplementedError

    def read(self, n):
        p = self.pos
        if p + n <= len(self.buf):
            self.pos = p + n
            return self.buf[p:p + n]
        out = self.buf[p:]
        n -= len(out)
        while True:
            self.buf = self.refill()
            if n <= len(self.buf):
                self.pos = n
                return out + self.buf[:n]
            out += self.buf
            n -= len(self.buf)

    def randbelow(self, m):
        """A uniform integer in [0, m), m >= 1: take the fewest whole bytes that hold m - 1,
        read them big-endian, keep the low nbits(m - 1) bits, retry while >= m. m = 1 reads
        nothing. This rule (not only the distribution) is fixed: it is what makes a byte
        stream give the same samples everywhere."""
        if m <= 1:
            if m == 1:
                return 0
            raise ValueError("randbelow: m must be >= 1")
        k = nbits(m - 1)
        nb = (k + 7) >> 3
        mask = (1 << k) - 1
        while True:
            x = int.from_bytes(self.read(nb), "big") & mask
            if x < m:
                return x


class Sha256Stream(_Source):
    """The bytes of SHA-256(k || u64le(0)), SHA-256(k || u64le(1)), ... in order, with
    k = SHA-256(STREAM_DOMAIN || key)."""

    def __init__(self, key):
        _Source.__init__(self)
        self.k = hashlib.sha256(STREAM_DOMAIN + bytes(key)).digest()
        self.ctr = 0

    def refill(self):
        b = hashlib.sha256(self.k + self.ctr.to_bytes(8, "little")).digest()
        self.ctr += 1
        return b


class UrandomSource(_Source):
    """The device's random number generator (os.urandom: the hardware RNG on an ESP32), read
    `chunk` bytes at a time."""

    def __init__(self, chunk=64):
        import os

        _Source.__init__(self)
        self._urandom = os.urandom
        self.chunk = chunk

    def refill(self):
        return self._urandom(self.chunk)


# ---------------------------------------------------------------- CKS20 Algorithm 1

def bern_exp(src, n, d):
    """1 with probability exp(-n/d), else 0 (n >= 0, d >= 1 integers). CKS20 Algorithm 1:
    for gamma = n/d in [0, 1], K = 1; while Bernoulli(gamma / K): K += 1; return K odd.
    For gamma > 1: one Bernoulli(exp(-1)) per whole unit above 1 (any 0 returns 0), then
    the remainder in (0, 1]. Bernoulli(a / b) is randbelow(b) < a."""
    while n > d:
        if not _bern_exp_le1(src, 1, 1):
            return 0
        n -= d
    return _bern_exp_le1(src, n, d)


def _bern_exp_le1(src, n, d):
    k = 1
    while src.randbelow(d * k) < n:
        k += 1
    return k & 1


# ---------------------------------------------------------------- CKS20 Algorithm 2 (s = 1)

def dlaplace(src, t):
    """Discrete Laplace with scale t (integer >= 1): P[Y = y] proportional to exp(-|y| / t).
    CKS20 Algorithm 2 with s = 1: U uniform in [0, t), kept with probability exp(-U/t);
    V geometric (count of Bernoulli(exp(-1)) successes); X = U + t V; a sign bit B, and
    (B = 1, X = 0) rejected so that 0 is not counted twice."""
    while True:
        u = src.randbelow(t)
        if not bern_exp(src, u, t):
            continue
        v = 0
        while _bern_exp_le1(src, 1, 1):
            v += 1
        x = u + t * v
        if src.randbelow(2):
            if x == 0:
                continue
            return -x
        return x


# ---------------------------------------------------------------- CKS20 Algorithm 3

class DGauss:
    """N_Z(0, num/den). CKS20 Algorithm 3: t = floor(sigma) + 1; Y = dlaplace(t), accepted
    with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)). With sigma^2 = num/den that
    exponent is the exact rational (|Y| t den - num)^2 / (2 num t^2 den)."""

    def __init__(self, num, den):
        for name, v in (("num", num), ("den", den)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError("discrete Gaussian: sigma^2 %s must be an int >= 1, got %r"
                                 % (name, v))
        self.num = num
        self.den = den
        t = isqrt(num // den) + 1  # floor(sqrt(num/den)) = isqrt(floor(num/den))
        self.t = t
        self.tden = t * den
        self.gden = 2 * num * t * t * den

    def sample(self, src):
        t = self.t
        num = self.num
        tden = self.tden
        gden = self.gden
        while True:
            y = dlaplace(src, t)
            a = (y if y >= 0 else -y) * tden - num
            if bern_exp(src, a * a, gden):
                return y

    def samples(self, src, n):
        return [self.sample(src) for _ in range(n)]
