"""benchmarks/node_feed_heap.py, run at two heaps: a complete coordinated node (the frozen
unix32 firmware's own boot, handler and round) trains, signs and persists three rounds in a
44 KB heap, and at 24 KB it cannot boot, which the table says instead of crashing. A regression
gate for what the node holds: docs/results.md quotes the tool at 36-44 KB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_a_complete_coordinated_node_runs_three_rounds_in_44k() -> None:
    from microfed_tools import firmware

    why = firmware.missing_tools(firmware.TARGETS["unix32"])
    if why:
        pytest.skip(why)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / d) for d in ("shared", "host", "tools", "benchmarks")))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "node_feed_heap.py"),
                           "--heaps", "44k,24k"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("| ") and line[2].isdigit():
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    assert rows["44k"][1:] == ["update", "update", "update"], rows["44k"]
    assert int(rows["44k"][0]) > 0
    assert rows["24k"][0] == "–" and rows["24k"][1].startswith("boot failed: MemoryError")
