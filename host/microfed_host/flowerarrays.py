"""A Flower model's ArrayRecord as one raw Q16.16 vector and back, written once for the
exact strategies (``microfed_host.flower``) and the MicroPython bridge
(``microfed_host.flowerbridge``).

The layout is the record's keys in order, with each array's shape and float dtype; the
vector is the arrays flattened and concatenated in that order (``floatedge.to_raw``: exact
round half up, an error instead of saturation) and comes back in the same dtypes and shapes
(``floatedge.from_raw``: raw / 65536).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

try:
    from flwr.app import Array, ArrayRecord
except ImportError as e:  # flwr missing, or older than the Message API (1.42)
    raise ImportError(
        "microfed_host.flowerarrays needs Flower >= 1.42 (flwr.app): pip install microfed[flower]"
    ) from e

from microfed_host.floatedge import from_raw, to_raw

__all__ = ["ArrayLayout"]


@dataclass(frozen=True)
class ArrayLayout:
    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, rec: ArrayRecord) -> ArrayLayout:
        arrs = [rec[k].numpy() for k in rec.keys()]
        return cls(tuple(rec.keys()), tuple(a.shape for a in arrs), tuple(a.dtype for a in arrs))

    @property
    def size(self) -> int:
        return sum(self.sizes())

    def sizes(self) -> list[int]:
        return [int(np.prod(s, dtype=np.int64)) for s in self.shapes]

    def raw(self, rec: ArrayRecord) -> np.ndarray:
        """The record's arrays (of this layout) as one int64 vector of raw Q16.16 values;
        Q16ConversionError for a value that is no Q16.16 number."""
        if not self.keys:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([to_raw(rec[k].numpy(), k) for k in self.keys])

    def arrays(self, vec: np.ndarray) -> ArrayRecord:
        """The raw vector as a record of this layout's keys, dtypes and shapes."""
        out: dict[str, Array] = {}
        start = 0
        for key, shape, dtype, size in zip(self.keys, self.shapes, self.dtypes, self.sizes(),
                                           strict=True):
            out[key] = Array(from_raw(vec[start : start + size], dtype, shape))
            start += size
        return ArrayRecord(out)
