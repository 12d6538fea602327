"""Shared fixtures: paths, the MicroPython unix port, vector files."""

from __future__ import annotations

import json
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
