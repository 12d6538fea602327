"""platformio.ini is valid for PlatformIO itself, and agrees with the board profiles.

`pio project config` parses and resolves the file offline (no platform downloads); `--lint`
also reports options PlatformIO does not know, which it otherwise ignores silently.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microfed_tools.boards import board_names, load_board

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "platformio.ini"
PIO_ENVS = {"esp32", "esp32s3", "esp32c3", "pico", "stm32", "nrf52840"}


def _pio() -> str:
    venv_pio = Path(sys.executable).parent / "pio"
    if venv_pio.exists():
        return str(venv_pio)
    found = shutil.which("pio")
    if not found:
        pytest.skip("platformio not installed: pip install platformio")
    return found


def _run_pio(project: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # A private core dir: the test never touches ~/.platformio and never needs the network.
    env["PLATFORMIO_CORE_DIR"] = str(tmp_path / "pio-core")
    env["PLATFORMIO_NO_ANSI"] = "1"
    return subprocess.run([_pio(), "project", "config", "-d", str(project), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def _parse_lint(out: str) -> dict:
    # PlatformIO 6.1 prints the lint result as a Python dict literal, not JSON.
    text = out.strip().splitlines()[-1]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return ast.literal_eval(text)


def _config(project: Path, tmp_path: Path) -> dict[str, dict]:
    proc = _run_pio(project, "--json-output", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return {name: dict(opts) for name, opts in json.loads(proc.stdout)}


def test_pio_resolves_every_environment(tmp_path):
    cfg = _config(ROOT, tmp_path)
    envs = {name.split(":", 1)[1] for name in cfg if name.startswith("env:")}
    assert envs == PIO_ENVS
    for env in envs:
        opts = cfg[f"env:{env}"]
        board = opts["custom_microfed_board"]
        # interpolation resolved per environment: the upload goes to microfed with this board
        assert opts["upload_protocol"] == "custom"
        assert opts["upload_command"].startswith("microfed flash --port $UPLOAD_PORT ")
        assert f"--board {board} " in opts["upload_command"]
        assert opts["upload_command"].endswith("/" + opts["custom_micropython_image"])
        assert opts["extra_scripts"] == ["post:tools/platformio_extra.py"]


def test_pio_lint_is_clean(tmp_path):
    proc = _run_pio(ROOT, "--lint", "--json-output", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _parse_lint(proc.stdout) == {"errors": [], "warnings": []}


def test_pio_lint_catches_a_typo(tmp_path):
    """The lint check above can fail: a misspelt option in a copy is reported."""
    project = tmp_path / "proj"
    project.mkdir()
    text = INI.read_text().replace("monitor_speed = 115200", "monitor_sped = 115200", 1)
    (project / "platformio.ini").write_text(text)
    proc = _run_pio(project, "--lint", "--json-output", tmp_path=tmp_path)
    lint = _parse_lint(proc.stdout)
    assert any("monitor_sped" in w for w in lint["warnings"])


def test_every_env_maps_to_a_board_profile():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(INI)
    known = set(board_names())
    seen = set()
    for section in parser.sections():
        if not section.startswith("env:"):
            continue
        name = parser[section]["custom_microfed_board"]
        assert name in known, f"[{section}] names unknown board profile {name!r}"
        board = load_board(name)
        seen.add(name)
        assert parser[section].getint("monitor_speed") == board.serial_baud
        if board.flasher == "esptool":
            assert parser[section].getint("upload_speed") == board.flash_baud
        # the image file named for the environment matches the profile's image pattern
        stem = board.image.split("*")[0].rstrip("-")
        assert parser[section]["custom_micropython_image"].startswith(Path(stem).name)
    # every real (non-emulated, non-host) board has an environment
    real = {n for n in known if load_board(n).flasher not in ("qemu", "none")}
    assert real <= seen
