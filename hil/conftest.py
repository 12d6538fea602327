"""Hardware-in-the-loop fixtures.

    pytest hil --port /dev/ttyUSB0 --board esp32      a real board
    pytest hil --board microbit-qemu                  the emulated micro:bit (QEMU, booted here)
    pytest hil --board unix                           the MicroPython unix port as a process

Without --port or an emulated/process board every test skips, saying so. The emulator boots
once per session; each test module starts from a soft reset so one module's definitions never
eat the next one's heap on a 9 KB board.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from microfed_tools import rawrepl

NO_DEVICE = ("no device: pass --port PORT --board NAME for a real board, or --board "
             "microbit-qemu to boot the emulated micro:bit (or --board unix for the unix port)")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("microfed-hil", "microfed hardware-in-the-loop")
    g.addoption("--port", default=None, help="serial port or pty of the board (e.g. /dev/ttyUSB0)")
    g.addoption("--board", default=None,
                help="board profile name (boards/*.toml), e.g. esp32, microbit-qemu, unix")
    g.addoption("--broker", default=None,
                help="host:port of an MQTT broker the board can reach (one-round mini-mesh test)")


def selected_board(config: pytest.Config) -> Any:
    name = config.getoption("--board")
    if not name:
        return None
    from microfed_tools.boards import BoardError, load_board

    try:
        return load_board(name)
    except BoardError as e:
        raise pytest.UsageError("--board: %s" % e) from e


@dataclass
class Target:
    """The device under test and what its profile says it can do."""

    repl: rawrepl.RawRepl
    board: Any
    name: str
    heap_bytes: int
    root: str = ""  # device directory where tests may write files ("" = device root)

    def cap(self, key: str, default: Any = None) -> Any:
        return rawrepl.board_value(self.board, "capabilities", key, default=default)

    def fresh(self) -> None:
        """A clean interpreter: nothing left from an earlier module on the heap."""
        self.repl.soft_reset()


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    port = request.config.getoption("--port")
    board = selected_board(request.config)
    if port is None and board is None:
        pytest.skip(NO_DEVICE)
    emu = None
    tmp = None
    if port is None:
        if rawrepl.is_unix_board(board):
            tmp = tempfile.TemporaryDirectory(prefix="microfed-hil-")
            port = "unix:" + tmp.name
        elif getattr(board, "emulator", None):
            from microfed_tools.emulator import Emulator, EmulatorError, missing_requirements

            why = missing_requirements(board)
            if why:
                pytest.skip(why)
            emu = Emulator(board)
            try:
                port = emu.start()
            except EmulatorError as e:
                pytest.fail("emulator did not start: %s" % e)
        else:
            pytest.skip("board %s is real hardware: pass --port PORT" % board.name)
    try:
        repl = rawrepl.connect(port, board, timeout=15, soft_reset=True)
    except rawrepl.ReplError as e:
        if emu:
            emu.stop()
        pytest.fail("cannot reach the device on %s: %s" % (port, e))
    heap = rawrepl.board_value(board, "heap_bytes")
    if not heap:
        heap = int(repl.exec("import gc\ngc.collect()\nprint(gc.mem_free())").strip())
    name = getattr(board, "name", None) or port
    try:
        yield Target(repl, board, name, int(heap))
    finally:
        repl.close()
        if emu:
            emu.stop()
        if tmp:
            tmp.cleanup()


@pytest.fixture(scope="module")
def device(target: Target) -> Target:
    """The target, soft-reset at the start of each test module."""
    target.fresh()
    return target


def pytest_report_header(config: pytest.Config) -> str:
    board = config.getoption("--board")
    port = config.getoption("--port")
    if not board and not port:
        return "microfed hil: " + NO_DEVICE
    return "microfed hil: board=%s port=%s pid=%d" % (board, port, os.getpid())
