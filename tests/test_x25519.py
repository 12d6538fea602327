"""X25519 (shared/microfed/x25519.py): the RFC 7748 vectors (section 5.2, including the 1 and
1 000 iteration ones; the 10^6 one takes ~1 h in pure Python and is not run), the section 6.1
Diffie-Hellman example, interop with `cryptography` in both directions on random keys, and the
same results on the MicroPython unix port."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from microfed import x25519
from microfed_host import upy

H = bytes.fromhex

# RFC 7748 section 5.2: (scalar, u, output).
VECTORS = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]
ITER_1 = "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
ITER_1000 = "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
# Section 6.1.
ALICE = ("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
         "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB = ("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
       "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def _iterate(n: int) -> bytes:
    k = u = (9).to_bytes(32, "little")
    for _ in range(n):
        k, u = x25519.x25519(k, u), k
    return k


@pytest.mark.parametrize("k,u,out", VECTORS)
def test_rfc7748_vectors(k: str, u: str, out: str) -> None:
    assert x25519.x25519(H(k), H(u)).hex() == out


def test_rfc7748_iterated_1_and_1000() -> None:
    assert _iterate(1).hex() == ITER_1
    assert _iterate(1000).hex() == ITER_1000


def test_rfc7748_diffie_hellman() -> None:
    assert x25519.public_key(H(ALICE[0])).hex() == ALICE[1]
    assert x25519.public_key(H(BOB[0])).hex() == BOB[1]
    assert x25519.x25519(H(ALICE[0]), H(BOB[1])).hex() == SHARED
    assert x25519.x25519(H(BOB[0]), H(ALICE[1])).hex() == SHARED


def _raw_pub(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_interop_with_cryptography_both_ways() -> None:
    rng = random.Random(7748)
    for _ in range(40):
        a, b = rng.randbytes(32), rng.randbytes(32)
        ca, cb = X25519PrivateKey.from_private_bytes(a), X25519PrivateKey.from_private_bytes(b)
        assert x25519.public_key(a) == _raw_pub(ca)
        # ours(a) with their public key of b == theirs(b) with our public key of a
        ours = x25519.x25519(a, _raw_pub(cb))
        theirs = cb.exchange(X25519PublicKey.from_public_bytes(x25519.public_key(a)))
        assert ours == theirs == ca.exchange(X25519PublicKey.from_public_bytes(_raw_pub(cb)))


def test_u_decoding_masks_the_top_bit_and_reduces() -> None:
    k = os.urandom(32)
    u = bytearray(os.urandom(32))
    u[31] |= 0x80
    assert x25519.x25519(k, bytes(u)) == x25519.x25519(k, bytes(u[:31]) + bytes([u[31] & 0x7F]))
    # p + 9 is the non-canonical encoding of 9.
    p9 = ((1 << 255) - 19 + 9).to_bytes(32, "little")
    assert x25519.x25519(k, p9) == x25519.public_key(k)
    # A low-order point gives all zeros (callers refuse it).
    assert x25519.x25519(k, bytes(32)) == bytes(32)


def test_bad_lengths_raise_value_error() -> None:
    for k, u in ((b"", bytes(32)), (bytes(32), b"\x09"), (bytes(33), bytes(32))):
        with pytest.raises(ValueError):
            x25519.x25519(k, u)


MP_SCRIPT = r"""
import sys, json
from microfed import x25519
f = open(sys.argv[1]); doc = json.load(f); f.close()
out = []
for k, u in doc["pairs"]:
    out.append(x25519.x25519(bytes.fromhex(k), bytes.fromhex(u)).hex())
k = u = (9).to_bytes(32, "little")
for _ in range(doc["iterations"]):
    k, u = x25519.x25519(k, u), k
out.append(k.hex())
print(json.dumps(out))
"""


def test_micropython_same_results(micropython: str, tmp_path: Path) -> None:
    rng = random.Random(25519)
    pairs = [(k, u) for k, u, _ in VECTORS] + [(rng.randbytes(32).hex(), rng.randbytes(32).hex())
                                              for _ in range(8)]
    (tmp_path / "in.json").write_text(json.dumps({"pairs": pairs, "iterations": 1000}))
    (tmp_path / "x.py").write_text(MP_SCRIPT)
    got = json.loads(upy.run([str(tmp_path / "x.py"), str(tmp_path / "in.json")]))
    want = [x25519.x25519(H(k), H(u)).hex() for k, u in pairs] + [ITER_1000]
    assert got == want
    assert got[:2] == [v[2] for v in VECTORS]
