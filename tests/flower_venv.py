"""What the Flower test files share: flwr >= 1.42 pins libraries the dev venv keeps newer
(starlette, uvicorn, typer), so they run in their own venv, `.venv-flower` (`./dev flower`
makes it and runs them there). From the dev venv, each file's `test_in_flower_venv` calls
`run_in_flower_venv` on itself."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_PY = Path(os.environ.get("MICROFED_FLOWER_VENV", ROOT / ".venv-flower")) / "bin" / "python"


def have(module: str) -> bool:
    """flwr >= 1.42 (with `module`, e.g. flwr.serverapp.strategy) is importable here."""
    return importlib.util.find_spec("flwr") is not None and (
        importlib.util.find_spec(module) is not None)


def env() -> dict:
    """This process's environment with the source tree's import roots as PYTHONPATH."""
    out = dict(os.environ)
    out["PYTHONPATH"] = os.pathsep.join(str(ROOT / p) for p in ("shared", "host", "tools"))
    return out


def run_in_flower_venv(test_file: str, timeout: float) -> None:
    """Run one test file with .venv-flower's pytest; skip (saying how to make the venv) when
    it does not exist, fail with the tail of its output when it fails."""
    if not FLOWER_PY.exists():
        pytest.skip("no .venv-flower: `./dev flower` creates it and runs this file there")
    out = subprocess.run([str(FLOWER_PY), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(Path(test_file))], capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
