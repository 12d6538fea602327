"""Running a benchmark script the way its docs say (a child Python with the repo's import
path), for the tests that keep a benchmark's published table from rotting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_unix32_benchmark(script: str, *args: str) -> str:
    """stdout of benchmarks/SCRIPT ARGS, which needs the unix32 firmware (skips, naming what
    is missing, when it cannot be built here); fails on a non-zero exit."""
    from microfed_tools import firmware

    why = firmware.missing_tools(firmware.TARGETS["unix32"])
    if why:
        pytest.skip(why)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        str(ROOT / d) for d in ("shared", "host", "tools", "benchmarks")))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
