"""The determinism vectors, executed on the device, compared bit for bit with the x86 reference.

Expectations come from tests/vectors/*.json, which the CPython reference generated; the device
receives only the core definitions a case needs (verified uploads) and the case's inputs, and
prints its result. Which aggregation cases run is sized to the board's heap budget.
"""

from __future__ import annotations

import pytest

from microfed_tools import devicevectors as dv

Q16 = dv.q16_cases()


def _board(config: pytest.Config) -> tuple[int, bool]:
    """The board's heap budget and whether it has hashlib.sha256 (bucketing needs it)."""
    from microfed_tools.boards import BoardError, load_board
    from microfed_tools.rawrepl import board_value

    name = config.getoption("--board")
    try:
        board = load_board(name) if name else None
    except BoardError:
        board = None  # the session fixture reports the bad name
    # Without a profile: size for the smallest board we know (the micro:bit's 9 KB, no hashlib).
    heap = int(getattr(board, "heap_bytes", 0) or 9000)
    return heap, bool(board_value(board, "capabilities", "hashlib_sha256", default=False))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "agg_case" in metafunc.fixturenames:
        heap, sha256 = _board(metafunc.config)
        cases = dv.aggregate_cases(dv.case_budget(heap), sha256=sha256)
        # Grouped by rule so the device reloads definitions as rarely as possible.
        cases.sort(key=lambda c: (c.meta["rule"], c.cost))
        metafunc.parametrize("agg_case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="module")
def namespace(device):
    lib = dv.core_library()
    # A third of the heap for compiled definitions, the rest for inputs and intermediates.
    return dv.DeviceNamespace(device.repl, lib, code_budget=max(2000, device.heap_bytes // 3))


@pytest.fixture(scope="module")
def q16_results(device, namespace):
    """Device results for the q16 cases, computed lazily in heap-sized batches."""
    cache: dict[str, object] = {}
    size = 10 if device.heap_bytes < 50_000 else 200

    def get(case: dv.DeviceCase) -> object:
        if case.id not in cache:
            i = Q16.index(case)
            batch = Q16[i - i % size:i - i % size + size]
            namespace.ensure(sorted({c.meta["op"] for c in batch}))
            for c, r in zip(batch, dv.run_q16_batch(device.repl, batch), strict=True):
                cache[c.id] = r
        return cache[case.id]

    return get


@pytest.mark.parametrize("case", Q16, ids=[c.id for c in Q16])
def test_q16_on_device(q16_results, case):
    got = q16_results(case)
    assert got == case.expect, "%s: %s -> device %r, x86 reference %r" % (
        case.id, case.call, got, case.expect)


def test_aggregate_on_device(device, namespace, agg_case):
    raw = namespace.run(agg_case)
    problems = dv.compare(agg_case, dv.normalise(agg_case, raw))
    assert not problems, "%s (n=%d d=%d) differs from the x86 reference: %s" % (
        agg_case.id, agg_case.meta["n"], agg_case.meta["d"], "; ".join(problems))
