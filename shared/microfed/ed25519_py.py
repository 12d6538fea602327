"""Portable Ed25519 (RFC 8032, "pure" Ed25519) for MicroPython and CPython, in Python big
ints. Import microfed.ed25519: it is this module's three functions, or the C module's on the
firmware microfed builds (same bytes, same verdicts).

    public_key(seed32) -> bytes (32)
    sign(seed32, msg, pub=None) -> bytes (64)
    verify(pub32, msg, sig64) -> bool     (False for any malformed input, never raises)

Interoperates byte for byte with OpenSSL / ``cryptography``.  Verification is the
cofactorless check used by OpenSSL and ref10: encode([S]B - [k]A) must equal the R bytes,
with S < L and a canonical public key.  All devices and the host therefore accept exactly
the same signatures, which the gossip consensus needs.

Speed and memory (MicroPython has no SHA-512 and small heaps; numbers in docs/ed25519.md):
- field elements are Python ints reduced with ``% p`` after every product: on MicroPython
  each big-int operation costs an allocation, and one ``%`` is as cheap as any shift/mask
  reduction of p = 2^255 - 19;
- points use extended twisted Edwards coordinates with the a = -1 formulas (RFC 8032
  5.1.4), inlined in the hot loops; T is only computed when an addition follows;
- fixed-base [n]B uses a 4-tooth comb (15 affine points, built once on first use, ~4 KB of
  heap): 63 doublings instead of 252;
- verification halves the doublings: a short (c, t) with c = k*t mod 8L (Euclid stopped
  half way) turns the check into one ~128-bit joint loop over -[c]A, -[t]R (width-3 NAF,
  2 odd multiples each) and [t*S mod L]B (the comb); this is exactly equivalent to the
  cofactorless equation, see _verify;
- inversion and square roots use the ref10 addition chain (cheaper than ``pow`` here).
Not constant time: big-int timings on an interpreter leak anyway.  See docs/ed25519.md.
"""

import gc
import sys

from microfed.sha512 import sha512

_MICROPYTHON = sys.implementation.name == "micropython"

_P = (1 << 255) - 19
_L = (1 << 252) + 27742317777372353535851937790883648493
_D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
_D2 = 16295367250680780974490674513165176452449235426866156013048779062215315747161
_SQRT_M1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752
_BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
_BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
_MASK255 = (1 << 255) - 1
_N8L = 8 * _L  # order of the whole curve group

_W = 4  # comb teeth
_S = 64  # comb spacing: _W * _S >= 253 bits of a scalar reduced mod L
_comb = None  # the comb table (_table()): tuple of 16 niels points (index 0 unused)
# Verification's NAF width: digits odd in -(_NAF_H - 1).._NAF_H - 1, so _NAF_H / 2 odd
# multiples of A and of R on the heap while it runs (width 3: P and 3P, 4 points, ~0.9 KB on a
# 32-bit port; width 5 held 16 points for about as many instructions, docs/ed25519.md).
_NAF_W = 3
_NAF_H = 1 << (_NAF_W - 1)


# --- field ---------------------------------------------------------------------------

def _sqn(x, n, p=_P):
    for _ in range(n):
        x = x * x % p
    return x


def _pow250(z, p=_P):
    # ref10 chain: returns (z^(2^250 - 1), z^11) with 250 squarings and 11 products.
    z2 = z * z % p
    z9 = _sqn(z2, 2) * z % p
    z11 = z9 * z2 % p
    t = z11 * z11 % p * z9 % p  # 2^5 - 1
    t = _sqn(t, 5) * t % p  # 2^10 - 1
    t10 = t
    t = _sqn(t, 10) * t % p  # 2^20 - 1
    t = _sqn(t, 20) * t % p  # 2^40 - 1
    t = _sqn(t, 10) * t10 % p  # 2^50 - 1
    t50 = t
    t = _sqn(t, 50) * t % p  # 2^100 - 1
    t = _sqn(t, 100) * t % p  # 2^200 - 1
    t = _sqn(t, 50) * t50 % p  # 2^250 - 1
    return t, z11


def _inv(z, p=_P):
    # z^(p - 2) = z^(2^255 - 21)
    t, z11 = _pow250(z)
    return _sqn(t, 5) * z11 % p


# --- points --------------------------------------------------------------------------
# Extended coordinates (X, Y, Z, T): x = X/Z, y = Y/Z, x*y = T/Z.
# "niels" form of an affine point: (y + x, y - x, 2*d*x*y); "cached" form of an extended
# point: (Y + X, Y - X, 2*Z, 2*d*T).  Stored table entries are compacted with "| 0": a
# remainder keeps the dividend's digit buffer (128 bytes on MicroPython, 64 once copied).
#
# The hot loops in _mul_base and _verify inline the formulas (no calls, no tuples) and
# compute T only when an addition follows.  Doubling is RFC 8032 5.1.4 with E = -2XY and
# the point scaled by -1 (same projective point), which saves one big-int operation:
#   a = X^2, b = Y^2, e = 2XY, h = a + b, g = b - a, f = 2Z^2 - g
#   X3 = e*f, Y3 = g*h, Z3 = f*g, T3 = e*h

def _dbl(X, Y, Z, p=_P):
    a = X * X % p
    b = Y * Y % p
    zz = Z * Z % p
    e = X * Y * 2 % p
    h = a + b
    g = b - a
    f = zz + zz - g
    return e * f % p, g * h % p, f * g % p, e * h % p


def _add(X, Y, Z, T, q, p=_P):
    # add-2008-hwcd-3 (complete on Ed25519) with q in cached form; for table building.
    a = (Y - X) * q[1] % p
    b = (Y + X) * q[0] % p
    t = T * q[3] % p
    zz = Z * q[2] % p
    e = b - a
    h = b + a
    f = zz - t
    g = zz + t
    return e * f % p, g * h % p, f * g % p, e * h % p


def _cached(X, Y, Z, T, p=_P):
    return ((Y + X) % p | 0, (Y - X) % p | 0, (Z + Z) % p | 0, T * _D2 % p | 0)


def _encode(X, Y, Z, p=_P):
    zi = _inv(Z)
    x = X * zi % p
    y = Y * zi % p
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decode(s, p=_P):
    # RFC 8032 5.1.3; returns affine (x, y) or None.  Rejects y >= p and x = 0 with sign 1.
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= _MASK255
    if y >= p:
        return None
    yy = y * y % p
    u = yy - 1
    v = (_D * yy + 1) % p
    v3 = v * v % p * v % p
    uv3 = u * v3 % p
    uv7 = uv3 * v3 % p * v % p
    t, _ = _pow250(uv7)
    t = t * t % p
    x = uv3 * (t * t % p * uv7 % p) % p  # u v^3 (u v^7)^(2^252 - 3)
    vxx = v * x % p * x % p
    if vxx != u % p:
        if vxx != (-u) % p:
            return None
        x = x * _SQRT_M1 % p
    if x == 0 and sign:
        return None
    if (x & 1) != sign:
        x = p - x
    return x, y


def _table():
    # Frozen firmware carries the table as constants in flash
    # (boards/firmware/microfed/ed25519_comb.py); anywhere else it is built once, here.
    global _comb
    try:
        from microfed.ed25519_comb import COMB  # pyright: ignore[reportMissingImports]
    except ImportError:
        return _build_comb()  # sets _comb itself
    _comb = COMB
    return _comb


def _build_comb(p=_P):
    # table[i] = sum of 2^(64 j) B over the bits j of i, as niels points; 15 entries.
    global _comb
    X, Y, Z, T = _BX, _BY, 1, _BX * _BY % p
    pts = [None] * (1 << _W)
    pts[1] = (X, Y, Z, T)
    for j in range(1, _W):
        for _ in range(_S):
            X, Y, Z, T = _dbl(X, Y, Z)
        tooth = 1 << j
        pts[tooth] = (X | 0, Y | 0, Z | 0, T | 0)
        q = _cached(X, Y, Z, T)
        for i in range(1, tooth):
            r = pts[i]
            r = _add(r[0], r[1], r[2], r[3], q)
            pts[tooth + i] = (r[0] | 0, r[1] | 0, r[2] | 0, r[3] | 0)
    # One inversion for all the Z (Montgomery's trick).
    n = 1 << _W
    acc = [1] * n
    run = 1
    for i in range(1, n):
        acc[i] = run
        run = run * pts[i][2] % p | 0
    run = _inv(run)
    table = [None] * n
    for i in range(n - 1, 0, -1):
        X, Y, Z, _T = pts[i]
        zi = run * acc[i] % p
        run = run * Z % p
        x = X * zi % p
        y = Y * zi % p
        table[i] = ((y + x) % p, (y - x) % p, x * y % p * _D2 % p)
        pts[i] = None
    pts = acc = None
    if _MICROPYTHON:
        # The table lives for good: copy it after a collection so that it lands in the
        # lowest free blocks instead of being scattered through the heap, where it would
        # fragment the free space that sign and verify need later.
        gc.collect()
    _comb = tuple([None] + [(q[0] | 0, q[1] | 0, q[2] | 0) for q in table[1:]])
    return _comb


def _comb_digits(n):
    # Digit i of the comb: bit i + 64 j of n becomes bit j.
    kb = n.to_bytes(32, "little")
    out = bytearray(_S)
    for j in range(_W):
        bit = 1 << j
        base = j * (_S >> 3)
        for i in range(_S >> 3):
            v = kb[base + i]
            o = i << 3
            while v:
                if v & 1:
                    out[o] |= bit
                v >>= 1
                o += 1
    return out


def _mul_base(n, p=_P):
    # [n]B for 0 <= n < 2^256, in projective (X, Y, Z): 63 doublings, <= 64 additions.
    table = _comb or _table()
    dig = _comb_digits(n)
    X = 0
    Y = 1
    Z = 1
    T = 0
    for i in range(_S - 1, -1, -1):
        c = dig[i]
        if i != _S - 1:
            a = X * X % p
            b = Y * Y % p
            zz = Z * Z % p
            e = X * Y * 2 % p
            h = a + b
            g = b - a
            f = zz + zz - g
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            if c:
                T = e * h % p
        if c:
            q = table[c]
            a = (Y - X) * q[1] % p
            b = (Y + X) * q[0] % p
            t = T * q[2] % p
            zz = Z + Z
            e = b - a
            h = b + a
            f = zz - t
            g = zz + t
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
    return X, Y, Z


def _wnaf(n, size):
    # Width-_NAF_W NAF of 0 <= n < 2^(size - 3), size a multiple of 8.  out[i] = 0 for a
    # zero digit, else digit + _NAF_H (digits are odd, in -(_NAF_H - 1).._NAF_H - 1, so a
    # stored digit is never 0).
    kb = n.to_bytes((size >> 3) + 1, "little")
    out = bytearray(size)
    w = _NAF_W
    half = _NAF_H
    mask = (half << 1) - 1
    i = 0
    carry = 0
    while i < size - 1:
        j = i >> 3
        win = ((kb[j] | (kb[j + 1] << 8)) >> (i & 7)) & mask
        if not (win + carry) & 1:
            carry = ((win & 1) + carry) >> 1
            i += 1
            continue
        win += carry
        if win >= half:
            out[i] = win - half
            carry = 1
        else:
            out[i] = win + half
            carry = 0
        i += w
    return out


def _is_bytes(b, n):
    return isinstance(b, (bytes, bytearray)) and (n is None or len(b) == n)


def _expand(seed):
    if not isinstance(seed, (bytes, bytearray)):
        raise TypeError("Ed25519 seed must be bytes")
    if len(seed) != 32:
        raise ValueError("Ed25519 seed must be 32 bytes, got %d" % len(seed))
    h = sha512(bytes(seed))
    a = int.from_bytes(h[:32], "little")
    a = (a & ((1 << 254) - 8)) | (1 << 254)
    return a, h[32:]


def public_key(seed):
    """The 32-byte public key of a 32-byte secret seed (RFC 8032 5.1.5)."""
    a, _ = _expand(seed)
    X, Y, Z = _mul_base(a % _L)
    return _encode(X, Y, Z)


def sign(seed, msg, pub=None):
    """The 64-byte signature R || S of bytes ``msg`` under a 32-byte seed (RFC 8032 5.1.6).
    ``pub``: the seed's public key, when the caller holds it (a node checks it against its
    seed once, at boot): the signature is the same, without the scalar multiplication that
    would derive it again (about half of a signature's instructions on the Cortex-M3: the
    public_key and sign rows of docs/boards.md). A ``pub`` that is not the seed's gives a
    signature that does not verify; it is never checked here, because checking costs what
    passing it saves."""
    if not isinstance(msg, (bytes, bytearray)):
        raise TypeError("message must be bytes")
    if pub is not None and (not isinstance(pub, (bytes, bytearray)) or len(pub) != 32):
        raise ValueError("Ed25519 public key must be 32 bytes")
    p = _P
    a, prefix = _expand(seed)
    msg = bytes(msg)
    r = int.from_bytes(sha512(prefix + msg), "little") % _L
    RX, RY, RZ = _mul_base(r)
    if pub is None:
        AX, AY, AZ = _mul_base(a % _L)
        # One inversion for both encodings.
        i = _inv(AZ * RZ % p)
        ai = i * RZ % p
        ri = i * AZ % p
        ax = AX * ai % p
        rx = RX * ri % p
        pub = ((AY * ai % p) | ((ax & 1) << 255)).to_bytes(32, "little")
        rs = ((RY * ri % p) | ((rx & 1) << 255)).to_bytes(32, "little")
    else:
        pub = bytes(pub)
        rs = _encode(RX, RY, RZ)
    k = int.from_bytes(sha512(rs + pub + msg), "little") % _L
    s = (r + k * a) % _L
    return rs + s.to_bytes(32, "little")


def verify(pub, msg, sig):
    """True iff ``sig`` is a valid signature of ``msg`` by ``pub``; False for any bad input."""
    try:
        return _verify(pub, msg, sig)
    except MemoryError:
        # Out of heap says nothing about the signature: "False" here would report a device
        # that ran out of memory as a forged frame (seen on unix32 at a 29 KB heap).
        raise
    except Exception:  # fail closed: malformed input of any kind is "not valid"
        return False


def _half(k):
    # A short (c, t) with c = k*t (mod 8L), t odd and 0 < t < L: Euclid on (8L, k) stopped
    # half way.  Every remainder satisfies r_i = t_i * k (mod 8L), consecutive t_i are
    # coprime, so of the last pair, their sum/difference and the next step one has an odd
    # t; the shortest is taken.  Both come out near 2^128, which halves the doublings of
    # verification.  (k, 1) is always valid, if long.
    r0 = _N8L
    r1 = k
    t0 = 0
    t1 = 1
    while r1 >> 128:
        q = r0 // r1
        r0, r1 = r1, r0 - q * r1
        t0, t1 = t1, t0 - q * t1
    best = k
    bt = 1
    bm = k
    for c, t in ((r1, t1), (r0, t0), (r0 - r1, t0 - t1), (r0 + r1, t0 + t1),
                 (r0 - (r0 // r1) * r1, t0 - (r0 // r1) * t1) if r1 else (k, 1)):
        if t & 1:
            m = abs(c) | abs(t)
            if m < bm:
                best, bt, bm = c, t, m
    if bt < 0:
        best = -best
        bt = -bt
    if bt >= _L or (best - k * bt) % _N8L:
        return k, 1
    return best, bt


def _odd_multiples(x, y, p=_P):
    # (2j + 1) P for j = 0.._NAF_H / 2 - 1 in cached form, P = (x, y) affine.
    T = x * y % p
    out = [_cached(x, y, 1, T)]
    X2, Y2, Z2, T2 = _dbl(x, y, 1)
    q = _cached(X2, Y2, Z2, T2)
    X = x
    Y = y
    Z = 1
    for _ in range((_NAF_H >> 1) - 1):
        X, Y, Z, T = _add(X, Y, Z, T, q)
        out.append(_cached(X, Y, Z, T))
    return out


def _joint_terms(pub, msg, sig):
    # _verify's set-up: (terms, comb digits of t*S mod L, top digit), or None for a bad
    # input. A function of its own: on MicroPython a frame's value stack keeps what it
    # popped and the collector scans it, so A, R, k and the copies made here would stay on
    # the heap through the whole joint loop (benchmarks/verify_heap.py: 8 143 -> 7 954 B).
    if not (_is_bytes(pub, 32) and _is_bytes(sig, 64) and _is_bytes(msg, None)):
        return None
    pub = bytes(pub)
    sig = bytes(sig)
    rs = sig[:32]
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return None
    A = _decode(pub)
    if A is None:
        return None
    R = _decode(rs)
    if R is None:
        return None
    k = int.from_bytes(sha512(rs + pub + bytes(msg)), "little") % _L
    c, t = _half(k)
    # Terms: (NAF digits, odd multiples, subtract?).
    # NAF digits needed: ~128-bit scalars (nearly always) fit 136, the rest 176 or 256.
    m = abs(c) | t
    size = 136 if m >> 130 == 0 else (176 if m >> 170 == 0 else 256)
    terms = ((_wnaf(abs(c), size), _odd_multiples(A[0], A[1]), c > 0),
             (_wnaf(t, size), _odd_multiples(R[0], R[1]), True))
    sd = _comb_digits(t * s % _L)
    top = size - 1
    while top >= _S and not (terms[0][0][top] or terms[1][0][top]):
        top -= 1
    return terms, sd, top


def _verify(pub, msg, sig, p=_P):
    # Cofactorless check encode([S]B - [k]A) == R, done as: R decodes, and with a short
    # (c, t) from _half, [t*S mod L]B - [c]A - [t]R is the identity.  That point equals
    # [t]([S]B - [k]A - R) for every curve point because c = k*t mod 8L (the group order),
    # and t is odd and below L, so it is the identity exactly when [S]B - [k]A = R.
    setup = _joint_terms(pub, msg, sig)
    if setup is None:
        return False
    terms, sd, top = setup
    setup = None
    table = _comb or _table()
    half = _NAF_H
    X = 0
    Y = 1
    Z = 1
    T = 0
    for i in range(top, -1, -1):
        c = sd[i] if i < _S else 0
        n = (c != 0) + (terms[0][0][i] != 0) + (terms[1][0][i] != 0)
        if i != top:
            a = X * X % p
            b = Y * Y % p
            zz = Z * Z % p
            e = X * Y * 2 % p
            h = a + b
            g = b - a
            f = zz + zz - g
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            if n:
                T = e * h % p
        for dg, odd, sub in terms:
            d = dg[i]
            if not d:
                continue
            # NAF digit d - _NAF_H; negating a cached point swaps Y + X with Y - X and
            # flips the sign of 2dT.
            if d > half:
                q = odd[(d - half - 1) >> 1]
            else:
                q = odd[(half - 1 - d) >> 1]
            if (d > half) == sub:
                a = (Y - X) * q[0] % p
                b = (Y + X) * q[1] % p
                t = -(T * q[3] % p)
            else:
                a = (Y - X) * q[1] % p
                b = (Y + X) * q[0] % p
                t = T * q[3] % p
            zz = Z * q[2] % p
            e = b - a
            h = b + a
            f = zz - t
            g = zz + t
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
            n -= 1
            if n:
                T = e * h % p
        if c:
            q = table[c]
            a = (Y - X) * q[1] % p
            b = (Y + X) * q[0] % p
            t = T * q[2] % p
            zz = Z + Z
            e = b - a
            h = b + a
            f = zz - t
            g = zz + t
            X = e * f % p
            Y = g * h % p
            Z = f * g % p
    # The identity is (0 : 1 : 1).
    return X % p == 0 and (Y - Z) % p == 0
