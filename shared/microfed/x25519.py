"""Portable X25519 (RFC 7748, section 5) for MicroPython and CPython.

    x25519(scalar32, u32) -> bytes (32)    the shared secret / scalar multiplication
    public_key(scalar32) -> bytes (32)     x25519(scalar32, 9)

Pure integer code: the Montgomery ladder of RFC 7748 section 5 over p = 2^255 - 19, with the
RFC's scalar clamping (decodeScalar25519) and u-coordinate decoding (the top bit is masked,
non-canonical values are reduced mod p). The output is never checked for zero here: a
caller that must refuse low-order peer keys (microfed.secagg does) tests for 32 zero bytes,
as RFC 7748 section 6.1 suggests. Interoperates byte for byte with `cryptography`
(tests/test_x25519.py). Not constant time: big-int timings on an interpreter leak anyway
(docs/ed25519.md says the same of ed25519.py).
"""

from microfed.ed25519_py import _inv

_P = (1 << 255) - 19
_A24 = 121665  # (486662 - 2) / 4


def _scalar(k):
    if len(k) != 32:
        raise ValueError("X25519 scalar must be 32 bytes")
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(bytes(b), "little")


def _u(u):
    if len(u) != 32:
        raise ValueError("X25519 u-coordinate must be 32 bytes")
    b = bytearray(u)
    b[31] &= 127
    return int.from_bytes(bytes(b), "little") % _P


def x25519(scalar32, u32):
    """RFC 7748 X25519(k, u): 32 bytes, little-endian u of [clamp(k)] * u."""
    k = _scalar(scalar32)
    x1 = _u(u32)
    p = _P
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    t = 254
    while t >= 0:
        kt = (k >> t) & 1
        if swap ^ kt:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = kt
        a = x2 + z2
        aa = a * a % p
        b = x2 - z2
        bb = b * b % p
        e = aa - bb
        c = x3 + z3
        d = x3 - z3
        da = d * a % p
        cb = c * b % p
        x3 = da + cb
        x3 = x3 * x3 % p
        z3 = da - cb
        z3 = x1 * (z3 * z3 % p) % p
        x2 = aa * bb % p
        z2 = e * (aa + _A24 * e) % p
        t -= 1
    if swap:
        x2, z2 = x3, z3
    return (x2 * _inv(z2) % p).to_bytes(32, "little")


_BASE = (9).to_bytes(32, "little")


def public_key(scalar32):
    """The public key of a 32-byte X25519 private scalar: X25519(k, 9)."""
    return x25519(scalar32, _BASE)
