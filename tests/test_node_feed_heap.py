"""benchmarks/node_feed_heap.py, run at two heaps: a complete coordinated node (the frozen
unix32 firmware's own boot, handler and round) trains, signs and persists three rounds in a
40 KB heap, and at 24 KB it cannot boot, which the table says instead of crashing. A regression
gate for what the node holds: docs/results.md quotes the tool at 34-38 KB (36 KB ran all three
rounds in six provisionings out of six, 2026-11-28)."""

from __future__ import annotations

from benchrun import run_unix32_benchmark


def test_a_complete_coordinated_node_runs_three_rounds_in_40k() -> None:
    out = run_unix32_benchmark("node_feed_heap.py", "--heaps", "40k,24k")
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and line[2].isdigit():
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    assert rows["40k"][1:] == ["update", "update", "update"], rows["40k"]
    assert int(rows["40k"][0]) > 0
    assert rows["24k"][0] == "–" and rows["24k"][1].startswith("boot failed: MemoryError")
