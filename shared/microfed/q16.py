# Q16.16 fixed-point arithmetic, exactly as docs/determinism.md pins it.
# Portable: CPython 3.11, MicroPython unix port and MicroPython 1.9.2 (micro:bit), so no
# f-strings and no float anywhere except the edge conversions at the bottom.
# A value is a signed 32-bit int `raw`; value = raw / 65536.

ONE = 65536
HALF = 32768
MIN_RAW = -2147483648
MAX_RAW = 2147483647


def sat(x):
    if x > MAX_RAW:
        return MAX_RAW
    if x < MIN_RAW:
        return MIN_RAW
    return x


def add(a, b):
    return sat(a + b)


def sub(a, b):
    return sat(a - b)


def mul(a, b):
    # `>>` on a negative int is an arithmetic shift (floor) on both interpreters.
    return sat((a * b + HALF) >> 16)


def rdiv(s, m):
    # floor(s / m + 1/2) for m > 0: every division on a consensus path rounds half up.
    if m <= 0:
        raise ValueError("rdiv: divisor must be positive")
    return (2 * s + m) // (2 * m)


def div(a, b):
    # Q16.16 quotient a / b, rounded half up, saturated.
    if b == 0:
        raise ZeroDivisionError("q16.div by zero")
    s = a * ONE
    if b < 0:
        s = -s
        b = -b
    return sat(rdiv(s, b))


def exact_list(seq):
    # A list of seq's items (a list or tuple) allocated at its exact length. MicroPython's
    # list(x) appends item by item and doubles as it goes: 650 values end in a 4 KB block
    # after 2, 1 and 0.5 KB ones, which a 64 KB heap cannot always find (measured on the
    # Cortex-M3 build). Slice assignment sizes the list once.
    out = []
    out[:] = seq
    return out


def vadd(u, v):
    return [sat(a + b) for a, b in zip(u, v)]


def vsub(u, v):
    return [sat(a - b) for a, b in zip(u, v)]


def vscale(u, k):
    # Multiply each element by the Q16.16 scalar k.
    return [sat((a * k + HALF) >> 16) for a in u]


def from_float(x):
    # Edge only (host data loading): raw = floor(x * 65536 + 0.5), saturated.
    # Never called on a device's consensus path. Computed exactly: x * 65536 is exact (a power
    # of two), and so are its floor and fraction, where adding 0.5 in floating point would
    # round 0.49999999999999994 up to 1.
    import math
    if x != x:
        raise ValueError("q16.from_float: NaN")
    y = x * ONE
    if y >= MAX_RAW:
        return MAX_RAW
    if y <= MIN_RAW:
        return MIN_RAW
    f = math.floor(y)
    return int(f) + (1 if y - f >= 0.5 else 0)


def to_float(raw):
    # Display only.
    return raw / ONE
