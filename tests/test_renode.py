"""Renode: the platform and robot files under boards/renode/, and the vectors script they run.

Renode itself is not installable from the registries this project reaches, so the run under
`renode-test` skips unless it is on PATH and an image is given; the script it pastes into the
board is checked here on CPython and on the MicroPython unix port either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from microfed_tools import devicevectors as dv

ROOT = Path(__file__).resolve().parents[1]
RENODE = ROOT / "boards" / "renode"
ROBOT = RENODE / "microfed_vectors.robot"
PLATFORMS = {
    # resc file, UART, env var naming the user's MicroPython ELF
    "stm32f4": ("stm32f4_discovery.resc", "sysbus.usart2", "MICROFED_RENODE_STM32F4_IMAGE"),
    "nrf52840": ("nrf52840.resc", "sysbus.uart0", "MICROFED_RENODE_NRF52840_IMAGE"),
}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("renode") / "microfed_vectors.py"
    path.write_text(dv.render_script(dv.q16_cases() + dv.aggregate_cases(max_cost=120)))
    return path


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_resc_describes_the_platform(platform):
    resc, uart, _ = PLATFORMS[platform]
    text = (RENODE / resc).read_text()
    assert "mach create" in text
    assert "LoadPlatformDescription @platforms/" in text
    assert "$bin?=" in text and "LoadELF $bin" in text
    assert "$uart?=%s" % uart in text


def test_robot_runs_the_vectors_script():
    text = ROBOT.read_text()
    for needle in ("${IMAGE}", "${SCRIPT}", "${PLATFORM}", "${UART}", "Create Terminal Tester",
                   "Send Key To Uart       0x05", "MICROFED VECTORS PASS"):
        assert needle in text, needle


def _expected_pass_line(script: Path) -> str:
    n = script.read_text().count("lambda:")
    return "MICROFED VECTORS PASS %d" % n


def test_vectors_script_passes_on_cpython(script):
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == _expected_pass_line(script)


def test_vectors_script_passes_on_micropython(script, micropython):
    out = subprocess.run([micropython, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == _expected_pass_line(script)


def test_vectors_script_catches_a_wrong_result(script, tmp_path):
    """The check inside the script can fail: break one q16 op and it must say so."""
    bad = tmp_path / "bad.py"
    bad.write_text(script.read_text().replace("def mul(a, b):\n", "def mul(a, b):\n    a += 1\n", 1))
    out = subprocess.run([sys.executable, str(bad)], capture_output=True, text=True, timeout=120)
    assert "MICROFED VECTOR FAIL q16-mul-" in out.stdout
    assert "MICROFED VECTORS FAILED" in out.stdout


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_vectors_under_renode(platform, script):
    exe = shutil.which("renode-test")
    if exe is None:
        pytest.skip("Renode is not installed (renode-test not on PATH): see docs/hil.md")
    resc, uart, env = PLATFORMS[platform]
    image = os.environ.get(env)
    if not image or not Path(image).is_file():
        pytest.skip("set %s to a MicroPython ELF for %s (see docs/hil.md)" % (env, platform))
    out = subprocess.run(
        [exe, str(ROBOT), "--variable", "IMAGE:" + image, "--variable", "SCRIPT:%s" % script,
         "--variable", "PLATFORM:" + resc, "--variable", "UART:" + uart],
        capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
