"""Float arrays to raw Q16.16 and back, at the edge (docs/flower.md, "Rounding contract").

The rule is the determinism contract's edge conversion, ``raw = floor(x * 65536 + 1/2)``
(round half up, toward +infinity), computed exactly: ``x * 65536`` is exact in float64 (a power
of two), and the half is added by comparing the fractional part instead of adding 0.5 in
floating point, which would round 0.49999999999999994 up to 1 (``microfed.q16.from_float``
rounds the same way). Unlike ``from_float`` nothing saturates here: NaN, an infinity or a value outside [-32768, 32768 - 2^-16] raises
``Q16ConversionError`` carrying the value and its position, because a silently clipped weight is
a different model. No numpy float dtype is wider than float64 here (longdouble is refused).
"""

from __future__ import annotations

import numpy as np

from microfed import q16

FLOAT_KINDS = (np.float16, np.float32, np.float64)


class Q16ConversionError(ValueError):
    """A float cannot become a Q16.16 value: NaN, infinite, out of range, or not a float array.

    ``reason`` is one of "nan", "inf", "overflow", "dtype"; ``value`` the offending float (None
    for "dtype"), ``array`` the array's name, ``index`` the element's index in the array's shape,
    ``node`` the sender when known (set by the Flower strategies)."""

    def __init__(
        self,
        reason: str,
        value: float | None,
        array: str,
        index: tuple[int, ...] | None,
        node: str | None = None,
        detail: str = "",
    ) -> None:
        self.reason = reason
        self.value = value
        self.array = array
        self.index = index
        self.node = node
        self.detail = detail
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"array {self.array!r}"
        if self.index is not None:
            where += f" at index {self.index}"
        if self.node is not None:
            where = f"node {self.node}: " + where
        if self.reason == "dtype":
            return f"{where}: {self.detail}"
        what = {"nan": "NaN", "inf": "infinite value", "overflow": "value out of Q16.16 range"}
        return (f"{where}: {what[self.reason]} {self.value!r} cannot become Q16.16 "
                f"(range [-32768, {q16.MAX_RAW / q16.ONE!r}])")

    def with_node(self, node: str) -> Q16ConversionError:
        return Q16ConversionError(self.reason, self.value, self.array, self.index, node,
                                  self.detail)


def to_raw(a: np.ndarray, name: str = "") -> np.ndarray:
    """The array's values as raw Q16.16 (int64, flattened in C order), or Q16ConversionError."""
    arr = np.asarray(a)
    if arr.dtype.type not in FLOAT_KINDS:
        raise Q16ConversionError("dtype", None, name, None,
                                 detail=f"float16/32/64 array expected, got {arr.dtype}")
    x = arr.astype(np.float64, copy=False).ravel()
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are reported below
        y = x * float(q16.ONE)  # exact unless it overflows to inf: the range check catches it
        r = np.floor(y)
        raw = r + (y - r >= 0.5)  # y - floor(y) is exact: round half up without adding 0.5
    if raw.size and not (raw.min() >= q16.MIN_RAW and raw.max() <= q16.MAX_RAW):
        # NaN fails both comparisons, inf the range: find the first offender, say what it is.
        bad = ~((raw >= q16.MIN_RAW) & (raw <= q16.MAX_RAW))
        i = int(np.flatnonzero(bad)[0])
        v = float(x[i])
        reason = "nan" if v != v else "inf" if v in (float("inf"), float("-inf")) else "overflow"
        raise Q16ConversionError(reason, v, name, _index(arr, i))
    return raw.astype(np.int64)


def from_raw(raw: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Raw Q16.16 back to floats: raw / 65536 is exact in float64; a narrower dtype gets the
    nearest value numpy's cast gives (round to nearest even), which the digest does not cover."""
    out = np.asarray(raw, dtype=np.int64).astype(np.float64) / float(q16.ONE)
    return out.astype(dtype).reshape(shape)


def _index(arr: np.ndarray, flat: int) -> tuple[int, ...]:
    if arr.ndim == 0:
        return ()
    return tuple(int(v) for v in np.unravel_index(flat, arr.shape))
