"""The reference task's data: scikit-learn's bundled digits, split, quantised and sharded.

Everything here is deterministic in its seed (numpy ``Generator``) and runs on the host only.
Quantisation to Q16.16 happens here, at the edge: a pixel in 0..16 becomes
``raw = floor(pixel * 65536 / 16 + 0.5)``, which is exactly ``pixel << 12``; that is why a shard
file can carry one byte per pixel and a shift, and the node rebuilds the same raw values with
integer arithmetic (``microfed.model.decode_shard``).

Shard file (``.mfds``), all integers little-endian::

    offset size  field
    0      4     magic b"MFDS"
    4      1     version = 1
    5      1     shift: raw Q16.16 feature = stored byte << shift (12 for digits)
    6      2     n_features (u16)
    8      2     n_classes (u16)
    10     4     n_samples (u32)
    14     2     shard index (u16)
    16     2     shard count (u16)
    18     n_samples * n_features   feature bytes (u8), sample-major
    ...    n_samples                labels (u8, < n_classes)
    ...    32    SHA-256 of every byte before it
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from microfed import q16

MAGIC = b"MFDS"
VERSION = 1
HEADER = struct.Struct("<4sBBHHIHH")
DIGITS_MAX = 16  # digits pixels are integers 0..16
DIGITS_SHIFT = 12  # 65536 / 16 = 4096 = 1 << 12


class DataError(ValueError):
    """Bad data or arguments: the message says which and why."""


@dataclass(frozen=True)
class Dataset:
    """Features already quantised to raw Q16.16 (int64), labels as int64."""

    x: np.ndarray  # (n, n_features) raw Q16.16
    y: np.ndarray  # (n,)
    n_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], self.n_classes)

    def as_lists(self) -> tuple[list[list[int]], list[int]]:
        """The form `microfed.model` trains on: lists of Python ints."""
        return [list(map(int, row)) for row in self.x], [int(v) for v in self.y]


@dataclass(frozen=True)
class Split:
    train: Dataset
    test: Dataset


def quantise(pixels: np.ndarray, scale_max: float = DIGITS_MAX) -> np.ndarray:
    """raw = floor(x * 65536 / scale_max + 0.5), saturated to int32: the edge conversion."""
    if not np.all(np.isfinite(pixels)):
        raise DataError("features contain NaN or infinity")
    raw = np.floor(pixels.astype(np.float64) * (q16.ONE / scale_max) + 0.5)
    return np.clip(raw, q16.MIN_RAW, q16.MAX_RAW).astype(np.int64)


def load_digits_q16() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits (8x8, 0..16) as raw Q16.16 features and int labels. No download."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return quantise(np.asarray(bunch.data)), np.asarray(bunch.target, dtype=np.int64)


def train_test_split(seed: int, test_fraction: float = 0.2) -> Split:
    """Deterministic split of digits: one permutation from ``default_rng(seed)``."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_q16()
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test_idx = np.sort(perm[:n_test])
    train_idx = np.sort(perm[n_test:])
    return Split(Dataset(x[train_idx], y[train_idx], 10), Dataset(x[test_idx], y[test_idx], 10))


def shard_iid(n: int, n_nodes: int, seed: int) -> list[np.ndarray]:
    """Shuffle 0..n-1 and cut into n_nodes near-equal parts (sizes differ by at most one)."""
    _check_nodes(n, n_nodes)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, n_nodes)]


def shard_dirichlet(
    labels: np.ndarray,
    n_nodes: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: for each class, node proportions ~ Dirichlet(alpha * 1).

    The usual construction (Hsu et al. 2019). Draws repeat, from the same generator, until
    every node holds at least ``min_size`` samples, so the result stays a function of the seed.
    """
    if not alpha > 0.0 or not np.isfinite(alpha):
        raise DataError(f"dirichlet alpha must be a positive number, got {alpha}")
    n = int(labels.shape[0])
    _check_nodes(n, n_nodes)
    if min_size * n_nodes > n:
        raise DataError(f"cannot give {n_nodes} nodes {min_size} samples each from {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_nodes)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_nodes, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for node, chunk in enumerate(np.split(idx, cuts)):
                parts[node].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"no Dirichlet({alpha}) split gave every one of {n_nodes} nodes >= {min_size} samples "
        f"in {max_tries} draws; raise alpha or lower min_size"
    )


def shard(
    train: Dataset, n_nodes: int, split: str = "iid", seed: int = 0, alpha: float = 0.5
) -> list[Dataset]:
    """Shards of ``train`` for ``n_nodes`` nodes: ``split`` is ``iid`` or ``dirichlet``."""
    if split == "iid":
        parts = shard_iid(len(train), n_nodes, seed)
    elif split == "dirichlet":
        parts = shard_dirichlet(train.y, n_nodes, alpha, seed)
    else:
        raise DataError(f"unknown split {split!r}: expected 'iid' or 'dirichlet'")
    return [train.subset(p) for p in parts]


def _check_nodes(n: int, n_nodes: int) -> None:
    if n_nodes < 1:
        raise DataError(f"need at least one node, got {n_nodes}")
    if n_nodes > n:
        raise DataError(f"{n_nodes} nodes but only {n} samples")


def encode_shard(ds: Dataset, index: int = 0, count: int = 1, shift: int = DIGITS_SHIFT) -> bytes:
    """Serialise a shard; refuses data that the byte-per-feature form would not carry exactly."""
    n, d = ds.x.shape if ds.x.ndim == 2 else (0, 0)
    if ds.x.ndim != 2 or ds.y.shape != (n,):
        raise DataError("shard: x must be (n, d) and y (n,)")
    if not 0 <= shift <= 31:
        raise DataError(f"shard: shift must be 0..31, got {shift}")
    if not (0 < d < 65536 and 0 < ds.n_classes <= 256 and n < 2**32 and 0 <= index < count < 65536):
        raise DataError(f"shard: sizes out of range (n={n}, d={d}, classes={ds.n_classes})")
    stored = ds.x >> shift
    if np.any(stored << shift != ds.x) or np.any(stored < 0) or np.any(stored > 255):
        raise DataError(f"shard: features are not bytes << {shift}; cannot store them exactly")
    if np.any(ds.y < 0) or np.any(ds.y >= ds.n_classes):
        raise DataError(f"shard: labels outside 0..{ds.n_classes - 1}")
    body = (
        HEADER.pack(MAGIC, VERSION, shift, d, ds.n_classes, n, index, count)
        + stored.astype(np.uint8).tobytes()
        + ds.y.astype(np.uint8).tobytes()
    )
    return body + hashlib.sha256(body).digest()


def write_shard(path: Path, ds: Dataset, index: int = 0, count: int = 1) -> Path:
    path.write_bytes(encode_shard(ds, index, count))
    return path


def write_shards(
    out_dir: Path,
    n_nodes: int,
    split: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
) -> tuple[list[Path], Split]:
    """Split digits, shard the training part, write ``shard-XX.mfds`` files; returns paths."""
    data = train_test_split(seed, test_fraction)
    shards = shard(data.train, n_nodes, split, seed, alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        write_shard(out_dir / f"shard-{i:02d}.mfds", s, i, n_nodes) for i, s in enumerate(shards)
    ]
    return paths, data


def decode_shard(buf: bytes) -> tuple[Dataset, int, int]:
    """Host-side reader (numpy); the portable one is ``microfed.model.decode_shard``."""
    if len(buf) < HEADER.size + 32:
        raise DataError(f"shard: {len(buf)} bytes is too short for a header and checksum")
    body, tag = buf[:-32], buf[-32:]
    if hashlib.sha256(body).digest() != tag:
        raise DataError("shard: SHA-256 mismatch (file truncated or corrupted)")
    magic, version, shift, d, k, n, index, count = HEADER.unpack_from(body)
    if magic != MAGIC or version != VERSION:
        raise DataError(f"shard: not an MFDS v{VERSION} file (magic {magic!r}, version {version})")
    if len(body) != HEADER.size + n * d + n:
        raise DataError("shard: length does not match its header")
    feats = np.frombuffer(body, np.uint8, n * d, HEADER.size).astype(np.int64).reshape(n, d)
    labels = np.frombuffer(body, np.uint8, n, HEADER.size + n * d).astype(np.int64)
    if np.any(labels >= k):
        raise DataError(f"shard: label outside 0..{k - 1}")
    return Dataset(feats << shift, labels, k), index, count
