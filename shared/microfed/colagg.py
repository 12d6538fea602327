# The aggregation rules of microfed.aggregate, computed a chunk of coordinates at a time, for a
# node that keeps its peers' updates in flash (or in one preallocated buffer) instead of as n
# lists in RAM. What a node needs from the aggregate is its digest (GOSSIP_DIGEST), so the
# result is never held whole either: it is hashed as it is produced.
#
#   digest, selected = run(rule, ids, read_into, d, params)
#
# `read_into(i, start, count, out)` puts values [start, start + count) of update i into
# out[0:count] (`out`: an array("i")). RAM: one `chunk`-value array per update, refilled for
# every chunk (a board's heap sees no allocation per chunk), plus the n (n - 1) / 2 distances
# of the Krum rules. A node passes `cols` (buffers(), allocated once at boot): mid-run, on a
# fragmented heap, 13 blocks of 256 B were not there with 14 KB free (measured on the
# Cortex-M3 with a 64 KB heap: docs/boards.md). Every rule is exactly microfed.aggregate's
# (same integers, same ties, same errors): tests/test_colagg.py compares them bit for bit on
# random and adversarial cases.
# Portable MicroPython 1.29 / CPython; no floats.

import hashlib
import struct
import sys
from array import array

from microfed import aggregate as agg
from microfed.aggregate import AggregationError
from microfed.q16 import rdiv

CHUNK = 32  # values per column buffer: 13 x 144 B at boot (64: a 48 KB gossip node ran out)


def buffers(n, chunk=CHUNK):
    """n arrays of `chunk` int32 values: what run() needs for n updates, to allocate once."""
    return [array("i", bytes(4 * chunk)) for _ in range(n)]


def _buffers(n, chunk, cols):
    # The caller's buffers when there are enough of them and they are long enough; else new.
    if cols is not None and len(cols) >= n and (n == 0 or len(cols[0]) >= chunk):
        return cols[:n]
    return buffers(n, chunk)


def _fill(read_into, cols, start, count):
    for i in range(len(cols)):
        read_into(i, start, count, cols[i])


# An array("i") holds int32 in the machine's order: little-endian on every board and host we
# build for, and then its bytes are the digest's input as they are (no slice, argument tuple
# and packed copy per chunk: blocks a fragmented 64 KB heap could not find, docs/boards.md).
_LE = sys.byteorder == "little"


def _hash_chunk(h, values, count):
    if _LE and isinstance(values, array):
        h.update(memoryview(values)[:count])
    else:
        h.update(struct.pack("<%di" % count, *values[:count]))


def krum_scores(read_into, n, d, f, chunk=CHUNK, cols=None, max_abs=None):
    """microfed.aggregate.krum_scores: the pairwise squared distances are summed over chunks
    (an exact sum of exact parts). Each pair's distance is kept once: row a holds those of
    update a to a + 1 .. n - 1, as int64 (an array per row) when `max_abs`, a bound on every
    |value|, proves they fit (d * (2 max_abs)^2 < 2^63), else as Python ints (a list per
    row). For 13 updates on a 32-bit port the arrays take ~0.8 KB in blocks of at most 112
    bytes, where the full matrix as lists of long ints took ~3.5 KB, more than a gossip
    node's 48 KB unix32 heap had left mid-run (docs/results.md); one 624-byte block for all of
    them was not always there either."""
    if f < 0:
        raise AggregationError("f must be >= 0")
    if n < 2 * f + 3:
        raise AggregationError("krum needs n >= 2f + 3: n=%d, f=%d" % (n, f))
    if max_abs is not None and d * (2 * max_abs) ** 2 < (1 << 63):
        # range(), not bytes(): the array is made at its size, with no temporary beside it.
        tri = [array("q", range(n - 1 - a)) for a in range(n - 1)]
        for row in tri:
            for b in range(len(row)):
                row[b] = 0
    else:
        tri = [[0] * (n - 1 - a) for a in range(n - 1)]
    cols = _buffers(n, chunk, cols)
    for start in range(0, d, chunk):
        count = min(chunk, d - start)
        _fill(read_into, cols, start, count)
        for i in range(n - 1):
            u = cols[i]
            row = tri[i]
            for j in range(i + 1, n):
                v = cols[j]
                s = 0
                for x in range(count):  # indexing: no tuple per step, as zip would make
                    t = u[x] - v[x]
                    s += t * t
                row[j - i - 1] += s
    cols = None
    return _scores(tri, n, f)


def _scores(tri, n, f):
    # microfed.aggregate.scores_from_distances over the upper triangle (tri[a][b - a - 1] is
    # the distance of a < b): i's distances to the others, sorted, the n - f - 2 smallest
    # summed (the same numbers, the same sum).
    keep = n - f - 2
    row = [0] * (n - 1)
    scores = []
    for i in range(n):
        r = 0
        for j in range(n):
            if j == i:
                continue
            row[r] = tri[j][i - j - 1] if j < i else tri[i][j - i - 1]
            r += 1
        row.sort()
        s = 0
        for x in range(keep):
            s += row[x]
        scores.append(s)
    return scores


def _column_rule(h, read_into, n, d, chunk, per_coordinate, cols):
    cols = _buffers(n, chunk, cols)
    for start in range(0, d, chunk):
        count = min(chunk, d - start)
        _fill(read_into, cols, start, count)
        out = [per_coordinate([c[x] for c in cols]) for x in range(count)]
        _hash_chunk(h, out, count)


def run(rule, ids, read_into, d, params, chunk=CHUNK, cols=None, max_abs=None):
    """(SHA-256 of the aggregate as little-endian int32 = microfed.audit.digest, selected ids
    or None). Raises AggregationError where microfed.aggregate does. `cols`: buffers(n, chunk)
    or more, reused instead of allocated; their old contents do not matter. `max_abs`: None,
    or a bound on every |value| (a node's: its peers' updates passed that range check), which
    lets Krum keep its distances as int64 (krum_scores)."""
    n = len(ids)
    if n < 1:
        raise AggregationError("no updates")
    if d < 1:
        raise AggregationError("empty vector")
    h = hashlib.sha256()
    selected = None
    if rule == "krum" or rule == "multi_krum":
        f = params["f"]
        scores = krum_scores(read_into, n, d, f, chunk, cols, max_abs)
        order = agg.krum_rank(ids, scores)
        if rule == "krum":
            sel = order[:1]
            w = sel[0]
            buf = _buffers(1, chunk, cols)[0]
            for start in range(0, d, chunk):
                count = min(chunk, d - start)
                read_into(w, start, count, buf)
                _hash_chunk(h, buf, count)
        else:
            m = params["m"]
            if m < 1 or m > n - f:
                raise AggregationError("multi_krum needs 1 <= m <= n - f: m=%d, n=%d, f=%d"
                                       % (m, n, f))
            sel = order[:m]

            def pick(i, start, count, out):
                read_into(sel[i], start, count, out)

            _column_rule(h, pick, m, d, chunk, lambda col: rdiv(sum(col), m), cols)
        selected = [ids[i] for i in sel]
    elif rule == "median":
        half = n // 2
        if n % 2:
            def med(col):
                col.sort()
                return col[half]
        else:
            def med(col):
                col.sort()
                return rdiv(col[half - 1] + col[half], 2)
        _column_rule(h, read_into, n, d, chunk, med, cols)
    elif rule == "trimmed_mean":
        trim = params["trim"]
        if trim < 0 or n - 2 * trim < 1:
            raise AggregationError("trimmed_mean needs 0 <= trim and n - 2*trim >= 1: "
                                   "n=%d, trim=%d" % (n, trim))
        keep = n - 2 * trim

        def tmean(col):
            col.sort()
            return rdiv(sum(col[trim:trim + keep]), keep)

        _column_rule(h, read_into, n, d, chunk, tmean, cols)
    elif rule == "fedavg":
        weights = params["weights"]
        total = agg.fedavg_total(weights, n)

        def wavg(col):
            s = 0
            for i in range(n):
                s += weights[i] * col[i]
            return rdiv(s, total)

        _column_rule(h, read_into, n, d, chunk, wavg, cols)
    else:
        raise AggregationError("unknown rule %r" % (rule,))
    return h.digest(), selected
