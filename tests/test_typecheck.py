"""firmware/ and shared/ type-check against the MicroPython ESP32 stubs (tools/typecheck.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "typecheck.py"


def _require_pyright() -> None:
    if not (Path(sys.executable).parent / "pyright").exists() and not shutil.which("pyright"):
        pytest.skip("pyright not installed: pip install pyright")


def _typecheck(*files: str) -> subprocess.CompletedProcess[str]:
    _require_pyright()
    proc = subprocess.run([sys.executable, str(TOOL), *files], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    if proc.returncode == 2 and "cannot install" in proc.stderr:
        pytest.skip(f"micropython-esp32-stubs not installable here: {proc.stderr.strip()}")
    return proc


def test_config_checks_device_code_against_stubs():
    cfg = json.loads((ROOT / "pyrightconfig.json").read_text())
    assert set(cfg["include"]) == {"firmware", "shared"}
    assert cfg["typeshedPath"] == "typings"
    assert cfg["reportAttributeAccessIssue"] == "error"
    assert cfg["reportMissingImports"] == "error"


def test_firmware_and_shared_have_no_type_errors():
    proc = _typecheck()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "typecheck: 0 errors" in proc.stdout


def test_sha512_on_device_is_flagged(tmp_path):
    """The same config rejects what CPython accepts but MicroPython lacks."""
    bad = tmp_path / "node_sign.py"
    bad.write_text(
        "import hashlib\n"
        "\n"
        "def ok(b):\n"
        "    return hashlib.sha256(b).digest()\n"
        "\n"
        "def digest(b):\n"
        "    return hashlib.sha512(b).digest()\n"
    )
    proc = _typecheck(str(bad))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stdout.splitlines() if ": error: " in ln]
    assert len(errors) == 1, errors
    assert "node_sign.py:7:" in errors[0] and "sha512" in errors[0]
    assert "typecheck: 1 error " in proc.stdout
