"""Shared fixtures: paths, the MicroPython unix port, vector files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"
sys.path.insert(0, str(ROOT / "tests"))


def load_vectors(name: str) -> list[dict]:
    return json.loads((VECTORS / name).read_text())["cases"]


@pytest.fixture(scope="session")
def micropython() -> str:
    """Path of the MicroPython unix port; skips (naming the package) when it is missing."""
    from microfed_host import upy

    exe = upy.find_micropython()
    if exe is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")
    return exe


def run_microfed(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The `microfed` command as a user runs it (a fresh interpreter), output captured."""
    return subprocess.run([sys.executable, "-m", "microfed_tools.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def inproc_run(tmp_path: Path, rounds: int) -> tuple[Path, str]:
    """A small real run directory (in-process engine: coordinator store, mesh directory,
    scenario, summary, plots) and what the run printed."""
    run = tmp_path / "run"
    r = run_microfed("mesh", "run", "--transport", "inproc", "--rounds", str(rounds),
                     "--honest", "4", "--byzantine", "0", "--f", "0", "--rule", "fedavg",
                     "--mode", "coordinated", "--out", str(run))
    assert r.returncode == 0, r.stdout + r.stderr
    return run, r.stdout


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """A test's cleanup: kill and reap whatever of `procs` is still running."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
