"""Ed25519 keys on the host, through `cryptography` (interoperates byte for byte with the
portable microfed.ed25519 the devices run).

Private keys are 32-byte RFC 8032 seeds stored as one hex line in a file created 0600 with
O_EXCL, so an existing key is never overwritten unless the caller explicitly forces it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

SEED_LEN = 32
PUB_LEN = 32
SIG_LEN = 64
PRIVATE_TAG = "ed25519-seed"
PUBLIC_TAG = "ed25519-pub"


class KeyFileError(Exception):
    """A key file is missing, malformed, too permissive, or would be overwritten."""


def generate_seed() -> bytes:
    return os.urandom(SEED_LEN)


def _private(seed: bytes) -> Ed25519PrivateKey:
    if len(seed) != SEED_LEN:
        raise KeyFileError(f"an Ed25519 seed is {SEED_LEN} bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_key(seed: bytes) -> bytes:
    return _private(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(seed: bytes, msg: bytes) -> bytes:
    return _private(seed).sign(msg)


def x25519(scalar: bytes, pub: bytes) -> bytes:
    """X25519 through `cryptography`, with microfed.x25519's contract (the host's fast path
    for secure aggregation): 32 zero bytes for a low-order public key instead of an error."""
    try:
        return X25519PrivateKey.from_private_bytes(scalar).exchange(
            X25519PublicKey.from_public_bytes(pub))
    except ValueError:
        return bytes(32)


def signer(seed: bytes) -> Callable[[bytes], bytes]:
    """A `sign(msg) -> sig64` callable for microfed.wire.encode, holding one parsed key."""
    key = _private(seed)
    return key.sign


@lru_cache(maxsize=1024)
def _public(pub: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(pub)


def check_signature(pub: bytes, msg: bytes, sig: bytes) -> bool:
    """The verifier's pluggable signature check: False for anything malformed, never raises."""
    if not isinstance(pub, bytes | bytearray) or len(pub) != PUB_LEN:
        return False
    if not isinstance(sig, bytes | bytearray) or len(sig) != SIG_LEN:
        return False
    try:
        _public(bytes(pub)).verify(bytes(sig), bytes(msg))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _write_exclusive(path: Path, text: str, mode: int, force: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (use --force)")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    if force:
        os.replace(tmp, path)
        return
    # Without force, link() fails if someone created the file meanwhile: never clobber.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key (use --force)") from None
    finally:
        tmp.unlink()


def write_private_key(path: Path, seed: bytes, force: bool = False) -> None:
    _private(seed)
    _write_exclusive(Path(path), f"{PRIVATE_TAG} {seed.hex()}\n", 0o600, force)


def write_public_key(path: Path, pub: bytes, force: bool = False) -> None:
    if len(pub) != PUB_LEN:
        raise KeyFileError(f"an Ed25519 public key is {PUB_LEN} bytes")
    _write_exclusive(Path(path), f"{PUBLIC_TAG} {pub.hex()}\n", 0o644, force)


def write_secret_file(path: Path, text: str) -> None:
    """A file holding a secret that may be regenerated (a device bundle): 0600, replaced
    atomically."""
    _write_exclusive(Path(path), text, 0o600, force=True)


def _read_tagged(path: Path, tag: str, length: int) -> bytes:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise KeyFileError(f"cannot read {path}: {e.strerror}") from None
    parts = text.split()
    if len(parts) != 2 or parts[0] != tag:
        raise KeyFileError(f"{path} is not a microfed {tag} file")
    try:
        raw = bytes.fromhex(parts[1])
    except ValueError:
        raise KeyFileError(f"{path}: key is not hex") from None
    if len(raw) != length:
        raise KeyFileError(f"{path}: key is {len(raw)} bytes, expected {length}")
    return raw


def read_private_key(path: Path) -> bytes:
    p = Path(path)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
    except OSError as e:
        raise KeyFileError(f"cannot read {p}: {e.strerror}") from None
    if mode & 0o077:
        raise KeyFileError(f"{p} is accessible by group/others (mode {mode:o}): chmod 600 {p}")
    return _read_tagged(p, PRIVATE_TAG, SEED_LEN)


def read_public_key(path: Path) -> bytes:
    return _read_tagged(Path(path), PUBLIC_TAG, PUB_LEN)
