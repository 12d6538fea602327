"""Emulated boards: start QEMU from a board profile's [emulator] table, find its pty, wait
for the MicroPython REPL, stop it reliably.

    with Emulator(load_board("microbit-qemu")) as emu:
        repl = rawrepl.connect(emu.pty, board)

QEMU runs in its own process group so stopping it (or Ctrl-C on `microfed emulate`) never
leaves an orphan holding the pty; an atexit hook covers a crashed caller.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import shutil
import signal
import subprocess
import time
from typing import Any

_PTY_RE = re.compile(rb"char device redirected to (/dev/pts/\d+)")
_live: set[subprocess.Popen[bytes]] = set()


class EmulatorError(RuntimeError):
    """The emulator could not be started, or its MicroPython did not come up."""


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
    _live.discard(proc)


@atexit.register
def _kill_all() -> None:
    for proc in list(_live):
        _kill(proc)


def missing_requirements(board: Any) -> str | None:
    """Why `board` cannot be emulated here (naming what to install), or None."""
    emu = getattr(board, "emulator", None) or {}
    if not emu:
        return "board %s has no [emulator] table" % getattr(board, "name", board)
    program = emu.get("program", "qemu-system-arm")
    package = emu.get("package", program)
    if not shutil.which(program):
        return "%s not installed: apt-get install -y %s" % (program, package)
    from microfed_tools import firmware

    target = firmware.built_target(board)
    if target is not None:
        t = firmware.TARGETS.get(target)
        if t is None:
            return "board %s names an unknown firmware target %r" % (board.name, target)
        return firmware.missing_tools(t)  # the image itself is built on first use
    image = getattr(board, "image", "")
    if image and not os.path.exists(image):
        return "MicroPython image %s missing: apt-get install -y %s" % (image, package)
    return None


class Emulator:
    """One emulated board. `start()` returns the pty path once the REPL answered."""

    def __init__(self, board: Any, *, boot_timeout: float = 30.0,
                 extra_args: tuple[str, ...] = (), image: str | None = None) -> None:
        """extra_args go to QEMU after the profile's, e.g. ("-icount", "shift=0"): virtual
        time, one instruction = 1 ns, so the guest's ticks_us() counts instructions. `image`:
        another firmware file than the profile's (e.g. a build with a smaller heap)."""
        self.board = board
        self.image = image
        self.boot_timeout = boot_timeout
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pty: str | None = None
        self.banner = ""

    def command(self) -> list[str]:
        emu = getattr(self.board, "emulator", None) or {}
        from microfed_tools import firmware

        program = emu.get("program", "qemu-system-arm")
        # The profile's image is built on first use (firmware: images).
        image = self.image or firmware.image_path(self.board)
        return ([program] + [str(a).replace("{image}", image) for a in emu.get("args", [])]
                + list(self.extra_args))

    def start(self) -> str:
        why = missing_requirements(self.board)
        if why:
            raise EmulatorError(why)
        from microfed_tools.firmware import FirmwareError

        try:
            argv = self.command()
        except FirmwareError as e:
            raise EmulatorError(str(e)) from e
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            raise EmulatorError("cannot start %s: %s" % (argv[0], e)) from e
        _live.add(self.proc)
        try:
            self.pty = self._find_pty()
            self.banner = self._wait_repl()
        except BaseException:
            self.stop()
            raise
        return self.pty

    def _find_pty(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + 10
        seen = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                seen += chunk
                m = _PTY_RE.search(seen)
                if m:
                    return m.group(1).decode()
            if self.proc.poll() is not None:
                break
        raise EmulatorError("QEMU did not report a pty (exit code %s): %s"
                            % (self.proc.poll(), seen.decode("utf-8", "replace").strip()[-300:]))

    def _wait_repl(self) -> str:
        """Poke the REPL until it prints a prompt: the banner may have gone out before we
        opened the pty, so Ctrl-C (interrupt) + Ctrl-B (friendly REPL) ask for a fresh one."""
        import serial

        assert self.pty is not None
        try:
            s = serial.Serial(self.pty, 115200, timeout=0.2)
        except (serial.SerialException, OSError) as e:
            raise EmulatorError("cannot open %s: %s" % (self.pty, e)) from e
        try:
            deadline = time.monotonic() + self.boot_timeout
            got = b""
            while time.monotonic() < deadline:
                s.write(b"\r\x03\x02")
                end = time.monotonic() + 1.0
                while time.monotonic() < end:
                    got += s.read(256)
                    if b">>> " in got:
                        text = got.decode("utf-8", "replace")
                        m = re.search(r"MicroPython [^\r\n]*", text)
                        return m.group(0) if m else "MicroPython REPL"
                if self.proc is not None and self.proc.poll() is not None:
                    break
            raise EmulatorError("no MicroPython prompt on %s after %.0f s (got %r)"
                                % (self.pty, self.boot_timeout, got[-200:]))
        finally:
            s.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
        self.proc = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def resolve_board(name: str) -> Any:
    """`microbit` and `microbit-qemu` both name the emulated micro:bit profile."""
    from microfed_tools.boards import BoardError, board_names, load_board

    names = board_names()
    for cand in (name, name + "-qemu"):
        if cand in names:
            board = load_board(cand)
            if not board.emulator:
                raise EmulatorError("board %s is real hardware, not an emulator; emulated "
                                    "boards: %s" % (cand, ", ".join(emulated_boards())))
            return board
    raise BoardError("no emulated board named %r; emulated boards: %s"
                     % (name, ", ".join(emulated_boards())))


def emulated_boards() -> list[str]:
    from microfed_tools.boards import list_boards

    return [b.name for b in list_boards() if b.emulator]
