"""Ed25519 (RFC 8032, "pure" Ed25519) wherever microfed runs:

    public_key(seed32) -> bytes (32)
    sign(seed32, msg, pub=None) -> bytes (64)
    verify(pub32, msg, sig64) -> bool     (False for any malformed input, never raises)

The firmware microfed builds (`microfed firmware build`) carries them in C, the `_ed25519`
module (boards/firmware/ed25519c/): no heap beyond the result, and a fraction of the
instructions. Anywhere else (CPython, MicroPython from PyPI or a stock board image) they are
microfed.ed25519_py's, in Python big ints. Both accept exactly the same signatures and sign
the same bytes: tests/test_ed25519.py runs its MicroPython cases on both, against OpenSSL.
"""

try:
    from _ed25519 import public_key, sign, verify  # noqa: F401  # pyright: ignore[reportMissingImports]
except ImportError:
    from microfed.ed25519_py import public_key, sign, verify  # noqa: F401
