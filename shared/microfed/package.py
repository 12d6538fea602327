# Signed model packages: the global model of a round as one file that the coordinator signs and
# that any holder of its public key can check, on the host or on a device that only runs
# inference (docs/package.md has the format). Written by `microfed export`, checked by
# `microfed verify-package` and by load_for_inference below on a board.
#
#   data = encode(fields, params, sign)                 # the coordinator (host)
#   pkg = verify(data, coordinator_pub, check_sig)      # anyone: PackageError, or the package
#   mdl, params = load_for_inference(data, coordinator_pub, check_sig)
#
# Layout (little-endian), all of it covered by the signature:
#   magic "MFPK" | version u8 | mesh_id 8 | round u32 | timestamp i64 | model name (u8 len,
#   ASCII) | n_features u16 | n_classes u16 | rule name (u8 len, ASCII; "" for the initial
#   model) | p1 u8 | p2 u8 | config digest 32 | n_params u32 | params n_params x i32 |
#   params digest 32 (= model.params_digest) | signer public key 32 | signature 64
# The signature is Ed25519 over SHA-256("microfed/package/1" 0x00 everything before it).
# Portable MicroPython 1.29 / CPython; no floats, no f-strings. decode and verify are total:
# they return or raise PackageError.

import hashlib
import struct

from microfed import model
from microfed.wire import WireError
from microfed.q16 import MAX_RAW, MIN_RAW

MAGIC = b"MFPK"
VERSION = 1
DOMAIN = b"microfed/package/1"
SIG_LEN = 64
KEY_LEN = 32
MAX_NAME = 32
# 1 MB of parameters: far beyond the models a board holds, and a bound checked before the
# length is used for anything.
MAX_PARAMS = 1 << 18
_FIXED = "<4sB8sIq"  # magic, version, mesh_id, round, timestamp
_FIXED_LEN = 25


class PackageError(WireError):
    """The only exception decode and verify raise: PackageError(reason, message), shaped like
    (and caught as) the wire's errors."""


class Package:
    def __init__(self, mesh_id, round_, timestamp, model_name, n_features, n_classes, rule,
                 p1, p2, config_digest, params, params_digest, signer, signature,
                 signing_digest):
        self.mesh_id = mesh_id
        self.round = round_
        self.timestamp = timestamp
        self.model = model_name
        self.n_features = n_features
        self.n_classes = n_classes
        self.rule = rule
        self.p1 = p1
        self.p2 = p2
        self.config_digest = config_digest
        self.params = params
        self.params_digest = params_digest
        self.signer = signer
        self.signature = signature
        self.signing_digest = signing_digest


def _name(s, what):
    b = s.encode() if isinstance(s, str) else bytes(s)
    if len(b) > MAX_NAME:
        raise PackageError("bad_field", "%s longer than %d bytes" % (what, MAX_NAME))
    for c in b:
        if not (0x21 <= c <= 0x7E):
            raise PackageError("bad_field", "%s must be printable ASCII without spaces" % what)
    return b


def signing_digest(body):
    h = hashlib.sha256(DOMAIN)
    h.update(b"\x00")
    h.update(body)
    return h.digest()


def encode(mesh_id, round_, timestamp, model_name, n_features, n_classes, rule, p1, p2,
           config_digest, params, signer, sign):
    """The signed package. `signer`: the coordinator's public key (stored, so a reader can
    tell which key signed it); `sign(msg32) -> sig64` holds its private key."""
    mb = _name(model_name, "model name")
    rb = _name(rule or "", "rule name")
    if len(mesh_id) != 8 or len(config_digest) != 32 or len(signer) != KEY_LEN:
        raise PackageError("bad_field", "mesh id, config digest or signer key has the wrong length")
    n = len(params)
    if not 1 <= n <= MAX_PARAMS:
        raise PackageError("bad_length", "%d parameters (1..%d)" % (n, MAX_PARAMS))
    out = bytearray(struct.pack(_FIXED, MAGIC, VERSION, bytes(mesh_id), round_, timestamp))
    out += bytes((len(mb),)) + mb + struct.pack("<HH", n_features, n_classes)
    out += bytes((len(rb),)) + rb + bytes((p1, p2)) + bytes(config_digest)
    out += struct.pack("<I", n)
    for i in range(0, n, 64):
        chunk = params[i:i + 64]
        for v in chunk:
            if type(v) is not int or not MIN_RAW <= v <= MAX_RAW:
                raise PackageError("bad_field", "parameters must be int32 raw Q16.16 values")
        out += struct.pack("<%di" % len(chunk), *chunk)
    out += model.params_digest(params) + bytes(signer)
    sig = sign(signing_digest(out))
    if len(sig) != SIG_LEN:
        raise PackageError("bad_signature", "signer returned %d bytes" % len(sig))
    return bytes(out + sig)


def _take_name(data, off, what):
    if off >= len(data):
        raise PackageError("truncated", "package ends before the %s" % what)
    ln = data[off]
    if ln > MAX_NAME or off + 1 + ln > len(data):
        raise PackageError("truncated", "%s of %d bytes does not fit" % (what, ln))
    b = bytes(data[off + 1:off + 1 + ln])
    _name(b, what)
    return b.decode(), off + 1 + ln


def decode(data):
    """The package's fields, checked for structure (lengths, names, the params digest), not
    yet for who signed it: use verify for that."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PackageError("bad_type", "package must be bytes")
    data = bytes(data)
    n = len(data)
    if n < _FIXED_LEN:
        raise PackageError("truncated", "package of %d bytes is shorter than its header" % n)
    magic, version, mesh_id, round_, ts = struct.unpack_from(_FIXED, data, 0)
    if magic != MAGIC:
        raise PackageError("bad_magic", "not a microfed model package")
    if version != VERSION:
        raise PackageError("bad_version", "package version %d, expected %d" % (version, VERSION))
    name, off = _take_name(data, _FIXED_LEN, "model name")
    if off + 4 > n:
        raise PackageError("truncated", "package ends in the model shape")
    d, k = struct.unpack_from("<HH", data, off)
    rule, off = _take_name(data, off + 4, "rule name")
    if off + 2 + 32 + 4 > n:
        raise PackageError("truncated", "package ends before its parameters")
    p1, p2 = data[off], data[off + 1]
    config_digest = data[off + 2:off + 34]
    (count,) = struct.unpack_from("<I", data, off + 34)
    off += 38
    if not 1 <= count <= MAX_PARAMS:
        raise PackageError("bad_length", "%d parameters (1..%d)" % (count, MAX_PARAMS))
    end = off + 4 * count
    total = end + 32 + KEY_LEN + SIG_LEN
    if n != total:
        raise PackageError("truncated" if n < total else "bad_length",
                           "package has %d bytes, its header declares %d" % (n, total))
    params = [0] * count
    i = 0
    while i < count:
        c = count - i if count - i < 64 else 64
        params[i:i + c] = struct.unpack_from("<%di" % c, data, off + 4 * i)
        i += c
    digest = data[end:end + 32]
    if model.params_digest(params) != digest:
        raise PackageError("bad_digest", "parameters do not match their digest")
    signer = data[end + 32:end + 32 + KEY_LEN]
    return Package(mesh_id, round_, ts, name, d, k, rule or None, p1, p2, config_digest, params,
                   digest, signer, data[end + 32 + KEY_LEN:],
                   signing_digest(memoryview(data)[:end + 32 + KEY_LEN]))


def verify(data, coordinator_pub, check_sig, mesh_id=None):
    """decode, then: signed by `coordinator_pub` (the key the caller trusts, not the one the
    package names) and, when given, for mesh `mesh_id`. -> Package, or PackageError."""
    pkg = decode(data)
    if bytes(pkg.signer) != bytes(coordinator_pub):
        raise PackageError("wrong_key", "package is signed by another key than the coordinator's")
    if not check_sig(bytes(coordinator_pub), pkg.signing_digest, pkg.signature):
        raise PackageError("bad_signature", "package signature does not verify")
    if mesh_id is not None and bytes(pkg.mesh_id) != bytes(mesh_id):
        raise PackageError("wrong_mesh", "package is for another mesh")
    return pkg


def load_for_inference(data, coordinator_pub, check_sig, mesh_id=None):
    """A verified package as (model, params) for model.predict: the model is built from the
    package's name and shape, which must account for exactly its parameters."""
    pkg = verify(data, coordinator_pub, check_sig, mesh_id)
    try:
        mdl = model.get(pkg.model, n_features=pkg.n_features, n_classes=pkg.n_classes)
    except model.ModelError as e:
        raise PackageError("bad_model", str(e))
    if mdl.n_params != len(pkg.params):
        raise PackageError("bad_model", "%s %dx%d has %d parameters, the package %d" % (
            pkg.model, pkg.n_features, pkg.n_classes, mdl.n_params, len(pkg.params)))
    return mdl, pkg.params
