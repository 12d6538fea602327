"""One honest mesh node as something the runner starts, polls and stops, whatever runs it.

`microfed mesh run --boards unix32:8,mps2-an385:2` mixes board kinds (BOARD_KINDS):

- `unix`: today's node, the 64-bit MicroPython unix port (`.venv/bin/micropython`) running
  firmware/main.py from the repository's source directories.
- `unix32`: the 32-bit unix build with microfed frozen in (`microfed firmware build --board
  unix32`): `micropython -X heapsize=H -m main NODE_DIR`, MICROPYPATH=.frozen only, so the
  node runs the frozen bytecode, as on an MCU, with 31-bit small ints and real sockets.
- `mps2-an385`: the emulated Cortex-M3 (QEMU), its node directory on a RAM disk, its MQTT
  session over its serial line and `microfed_tools.bridge.Bridge`: a `BridgedNode`, whose
  device and bridge the tools layer supplies (host code never imports microfed_tools).

The runner asks a `NodeLauncher` per kind for a `NodeProcess` (start / poll / stop / logs);
the CLI layer (tools/microfed_tools/cmd_mesh.py) builds or locates the firmware images and
passes the launchers in.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

from microfed_host import upy

BOARD_KINDS = ("unix", "unix32", "mps2-an385")
SERIAL_KINDS = ("mps2-an385",)  # no network of their own: config "link": "serial" + a bridge
DEFAULT_UNIX32_HEAP = 512 * 1024
NODE_LOG = "node.log"


class NodeError(RuntimeError):
    """A node cannot be started (missing image, emulator, bridge): says which and why."""


class NodeProcess(Protocol):
    """One running node. poll(): None while it runs, else its exit code (main.py's codes)."""

    node_id: str
    board: str
    log_path: Path

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float) -> int | None: ...

    def stop(self, grace: float = 3.0) -> None: ...


# (node id, node directory, broker (host, port)) -> NodeProcess
NodeLauncher = Callable[[str, Path, tuple[str, int]], NodeProcess]


def stop_process(p: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds (0: at once)."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(10)


class _Node:
    """What every NodeProcess says about itself: its id, board kind, directory and log."""

    def __init__(self, node_id: str, node_dir: Path, board: str) -> None:
        self.node_id = node_id
        self.board = board
        self.node_dir = node_dir
        self.log_path = node_dir / NODE_LOG


class SubprocessNode(_Node):
    """A node that is one local process (the unix kinds): stdout and stderr go to node.log."""

    def __init__(self, node_id: str, node_dir: Path, board: str, argv: list[str],
                 env: dict[str, str], cwd: Path | None = None) -> None:
        super().__init__(node_id, node_dir, board)
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.stop(0.0)
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd)
        except OSError as e:
            self._log.close()
            raise NodeError(f"node {self.node_id} ({self.board}): cannot start "
                            f"{self.argv[0]}: {e.strerror}") from None

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(max(0.0, timeout))
        return self.proc.poll()

    def stop(self, grace: float = 3.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace)
        if self._log is not None:
            self._log.close()
            self._log = None


def unix_launcher(exe: str | None = None) -> NodeLauncher:
    """Today's node: the 64-bit unix port runs firmware/main.py from the source tree."""
    exe = exe or upy.find_micropython()
    if exe is None:
        raise NodeError(f"MicroPython unix port missing: {upy.INSTALL_HINT}")
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(upy.SHARED), str(upy.FIRMWARE)])
    program = exe

    def launch(node_id: str, node_dir: Path, _broker: tuple[str, int]) -> NodeProcess:
        return SubprocessNode(node_id, node_dir, "unix",
                              [program, "-X", "heapsize=4m", str(upy.FIRMWARE / "main.py"),
                               str(node_dir)], env)

    return launch


def unix32_argv(image: Path | str, heap_bytes: int) -> list[str]:
    """Started in the node's directory (cwd), main's directory argument is "." : a relative
    run directory (the default, runs/...) would otherwise be looked up inside itself."""
    return [str(image), "-X", f"heapsize={heap_bytes}", "-m", "main", "."]


def unix32_env() -> dict[str, str]:
    """Only the frozen modules on the path: none of the repository's source directories."""
    env = {k: v for k, v in os.environ.items() if k != "MICROPYPATH"}
    env["MICROPYPATH"] = ".frozen"
    return env


def unix32_launcher(image: Path | str, heap_bytes: int = DEFAULT_UNIX32_HEAP) -> NodeLauncher:
    """The 32-bit build with microfed frozen in (`microfed firmware build --board unix32`).
    The node runs in its own directory, so the '' entry MicroPython puts first on sys.path
    finds no source file there either."""
    if not Path(image).is_file():
        raise NodeError(f"unix32 image {image} missing: microfed firmware build --board unix32")
    env = unix32_env()

    def launch(node_id: str, node_dir: Path, _broker: tuple[str, int]) -> NodeProcess:
        return SubprocessNode(node_id, node_dir, "unix32",
                              unix32_argv(image, heap_bytes), env, cwd=node_dir)

    return launch


# ------------------------------------------------------------------ QEMU + serial bridge


class Device(Protocol):
    """An emulated board the tools layer drives (microfed_tools.emunode.EmulatedDevice): QEMU
    with the node's directory on its filesystem and the node's main run from the image."""

    def start(self) -> None: ...  # boot the emulator, mount its filesystem

    def install(self, node_dir: Path) -> None: ...  # write the node directory to it

    def boot(self) -> Any: ...  # start the node's main; returns its serial line

    def alive(self) -> bool: ...  # the emulator still runs

    def stop(self, node_dir: Path) -> None: ...  # save state/ back to node_dir, end QEMU


class Bridge(Protocol):
    """What carries the node's MQTT session between its serial line and the broker
    (microfed_tools.bridge.Bridge)."""

    def start(self) -> Any: ...

    def stop(self) -> None: ...

    def running(self) -> bool: ...


# (serial line, broker (host, port), on_log for every line the node logs) -> Bridge
BridgeFactory = Callable[[Any, tuple[str, int], Callable[[str], None]], Bridge]
# main.py's exit codes by its last event (firmware/README.md, "Exit codes")
_EXIT_BY_EVENT = {"boot_error": 2, "fatal": 1}


class BridgedNode(_Node):
    """A node on an emulated board with no network of its own: `device` (QEMU + RAM disk)
    runs it, a bridge carries its MQTT session (config "link": "serial"). Its log lines (the
    node's JSON events, L frames on the serial line) go to node.log as a unix node's do, and
    its exit code is read from them: the `exit` event's code, 2 after `boot_error`, 1 after
    `fatal`; 1 if QEMU or the bridge dies.

    stop() saves the board's state/ into the node directory before QEMU ends (flash survives
    a power cycle; QEMU's RAM does not), and start() writes the directory back: a node
    started again resumes with its counters, like a board. Only once it has returned,
    though: a node still running cannot be interrupted on the QEMU boards (their UART has no
    Ctrl-C), so stopping it mid-run loses its state (hence no [chaos] with these nodes)."""

    def __init__(self, node_id: str, node_dir: Path, board: str, device: Device,
                 bridge: BridgeFactory, broker: tuple[str, int]) -> None:
        super().__init__(node_id, node_dir, board)
        self.device = device
        self.make_bridge = bridge
        self.broker = broker
        self.bridge: Bridge | None = None
        self.code: int | None = None
        self.started = False
        self._log: IO[str] | None = None

    def _on_log(self, line: str) -> None:
        if self._log is not None:
            self._log.write(line.rstrip("\n") + "\n")
            self._log.flush()
        if line.startswith("MFEXIT ") and self.code is None:
            # main.main() returned (emunode.main_program prints its code): the node is done
            # even if its "exit" event was lost (a 64 KB board out of heap for the line).
            with contextlib.suppress(ValueError, IndexError):
                self.code = int(line.split()[1])
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                return
            if isinstance(ev, dict):
                k = ev.get("ev")
                if k == "exit" and isinstance(ev.get("code"), int):
                    self.code = ev["code"]
                elif k in _EXIT_BY_EVENT:
                    self.code = _EXIT_BY_EVENT[k]

    def start(self) -> None:
        self.stop(0.0)
        self.code = None
        self._log = open(self.log_path, "a")
        self.started = True
        try:
            self.device.start()
            self.device.install(self.node_dir)
            line = self.device.boot()
            self.bridge = self.make_bridge(line, self.broker, self._on_log)
            self.bridge.start()
        except Exception as e:
            self.stop(0.0)
            raise NodeError(f"node {self.node_id} ({self.board}): {e}") from e

    def poll(self) -> int | None:
        if self.code is not None or not self.started:
            return self.code
        if not self.device.alive():
            self._on_log('{"ev": "fatal", "error": "the emulator exited"}')
        elif self.bridge is not None and not self.bridge.running():
            self._on_log('{"ev": "fatal", "error": "the serial bridge stopped"}')
        return self.code

    def wait(self, timeout: float) -> int | None:
        end = time.monotonic() + max(0.0, timeout)
        while True:
            rc = self.poll()
            if rc is not None or time.monotonic() >= end:
                return rc
            time.sleep(0.05)

    def stop(self, grace: float = 3.0) -> None:
        if grace > 0 and self.started and self.code is None:
            self.wait(grace)
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        if self.started:
            self.started = False
            # A node that has not returned cannot be interrupted (QEMU's UART has no Ctrl-C):
            # its RAM disk goes with QEMU, unsaved.
            done = self.code is not None
            if not done:
                self._on_log(json.dumps({"ev": "host", "node": self.node_id, "error":
                                         "stopped while running: state/ not saved"}))
            try:
                self.device.stop(self.node_dir if done else None)
            except NodeError as e:
                self._on_log(json.dumps({"ev": "host", "node": self.node_id, "error": str(e)}))
        if self._log is not None:
            self._log.close()
            self._log = None
