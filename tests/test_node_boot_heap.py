"""benchmarks/node_boot_heap.py, run once, so the table docs/results.md quotes cannot rot: the
unix32 firmware boots a real node directory and the parts add up to what it holds."""

from __future__ import annotations

from benchrun import run_unix32_benchmark


def _rows(out: str) -> dict[str, int]:
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith(("| ---", "| coordinated node")):
            name, value = line.strip("| \n").rsplit(" | ", 1)
            rows[name.strip("*")] = int(value.replace(" ", ""))
    return rows


def test_the_boot_heap_table_adds_up() -> None:
    out = run_unix32_benchmark("node_boot_heap.py", "--heap", "48k")
    rows = _rows(out)
    imports = {k: v for k, v in rows.items() if k.startswith("import ")}
    # A coordinated node imports neither peers' code nor the aggregation; every module it
    # imports costs heap.
    assert "import microfed.colagg" not in imports and "import node" in imports
    assert "import microfed.gossip" not in imports
    # Nor the pipeline for peers' frames (microfed.verify): its registry and Rejected come
    # from microfed.registry; and main.boot drops `config` once the files are read.
    assert "import microfed.verify" not in imports and "import microfed.registry" in imports
    assert "import config" not in imports
    assert all(v > 0 for v in imports.values()), imports
    boot = rows["main.boot (imports done)"]
    assert rows["held after boot"] == sum(imports.values()) + boot
    parts = [v for k, v in rows.items() if k.startswith("of which")]
    assert sum(parts) == boot and all(v > 0 for v in parts), rows
    # The round's buffers: a 650-value list, not the update frame (built in the receive
    # buffer, which holds a whole GLOBAL_MODEL).
    assert 650 * 4 <= rows["of which round buffers (the update frame is built in the receive buffer)"] < 2 * 650 * 4
    assert rows["of which MQTT receive buffer"] >= 650 * 4 + 36
    free = rows["free after boot at -X heapsize=48k (49152 B)"]
    assert 0 < rows["its largest free block"] <= free < 49152 - rows["held after boot"] + 1024
