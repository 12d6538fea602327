"""benchmarks/node_feed_heap.py, run at two heaps: a complete coordinated node (the frozen
unix32 firmware's own boot, handler and round) trains, signs and persists three rounds in the
issue's 32 KB heap, and at 24 KB it cannot boot, which the table says instead of crashing. A
regression gate for what the node holds: docs/results.md quotes the tool at 31-34 KB (32 KB
ran all three rounds in every provisioning tried, 2026-11-28; the gate was 40 KB while
Ed25519 was Python big ints)."""

from __future__ import annotations

from benchrun import run_unix32_benchmark


def test_a_complete_coordinated_node_runs_three_rounds_in_32k() -> None:
    out = run_unix32_benchmark("node_feed_heap.py", "--heaps", "32k,24k")
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and line[2].isdigit():
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    assert rows["32k"][1:] == ["update", "update", "update"], rows["32k"]
    assert int(rows["32k"][0]) > 0
    assert rows["24k"][0] == "–" and rows["24k"][1].startswith("boot failed: MemoryError")
