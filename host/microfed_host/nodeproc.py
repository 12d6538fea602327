"""One honest mesh node as something the runner starts, polls and stops, whatever runs it.

`microfed mesh run --boards unix32:8,mps2-an385:2` mixes board kinds (BOARD_KINDS):

- `unix`: today's node, the 64-bit MicroPython unix port (`.venv/bin/micropython`) running
  firmware/main.py from the repository's source directories.
- `unix32`: the 32-bit unix build with microfed frozen in (`microfed firmware build --board
  unix32`): `micropython -X heapsize=H -m main NODE_DIR`, MICROPYPATH=.frozen only, so the
  node runs the frozen bytecode, as on an MCU, with 31-bit small ints and real sockets.
- `mps2-an385`: the emulated Cortex-M3 (QEMU), its node directory on a RAM disk, its MQTT
  traffic over a serial bridge: a `BridgedNode`, whose device and bridge the tools layer
  supplies (host code never imports microfed_tools).

The runner asks a `NodeLauncher` per kind for a `NodeProcess` (start / poll / stop / logs);
the CLI layer (tools/microfed_tools/cmd_mesh.py) builds or locates the firmware images and
passes the launchers in.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from microfed_host import upy

BOARD_KINDS = ("unix", "unix32", "mps2-an385")
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


NodeLauncher = Callable[[str, Path], NodeProcess]  # (node id, node directory) -> NodeProcess


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


class SubprocessNode:
    """A node that is one local process (the unix kinds): stdout and stderr go to node.log."""

    def __init__(self, node_id: str, node_dir: Path, board: str, argv: list[str],
                 env: dict[str, str], cwd: Path | None = None) -> None:
        self.node_id = node_id
        self.board = board
        self.node_dir = node_dir
        self.log_path = node_dir / NODE_LOG
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

    def launch(node_id: str, node_dir: Path) -> NodeProcess:
        return SubprocessNode(node_id, node_dir, "unix",
                              [program, "-X", "heapsize=4m", str(upy.FIRMWARE / "main.py"),
                               str(node_dir)], env)

    return launch


def unix32_argv(image: Path | str, node_dir: Path, heap_bytes: int) -> list[str]:
    return [str(image), "-X", f"heapsize={heap_bytes}", "-m", "main", str(node_dir)]


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

    def launch(node_id: str, node_dir: Path) -> NodeProcess:
        return SubprocessNode(node_id, node_dir, "unix32",
                              unix32_argv(image, node_dir, heap_bytes), env, cwd=node_dir)

    return launch


# ------------------------------------------------------------------ QEMU + serial bridge


class Device(Protocol):
    """An emulated board the tools layer drives (microfed_tools.emunode): QEMU with the
    node's directory on its filesystem."""

    def start(self) -> None: ...  # boot the emulator, mount its filesystem

    def install(self, node_dir: Path) -> None: ...  # write the node directory to it

    def boot(self) -> None: ...  # start the node's main; returns once it runs

    def poll(self) -> int | None: ...  # None while QEMU and the node run, else an exit code

    def stop(self) -> None: ...


class Bridge(Protocol):
    """What carries the node's MQTT bytes between its serial line and the broker (the
    `Bridge` of microfed_tools.bridge); error() names why it stopped, or None."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def error(self) -> str | None: ...


class BridgedNode:
    """A node on an emulated board: `device` (QEMU + RAM disk) plus `bridge` (its network).
    start(): boot, install the node directory, connect the bridge, run main."""

    def __init__(self, node_id: str, node_dir: Path, board: str, device: Device,
                 bridge: Callable[[Device, Path], Bridge]) -> None:
        self.node_id = node_id
        self.board = board
        self.node_dir = node_dir
        self.log_path = node_dir / NODE_LOG
        self.device = device
        self.make_bridge = bridge
        self.bridge: Bridge | None = None
        self.installed = False

    def start(self) -> None:
        self.stop(0.0)
        self.device.start()
        # The RAM disk keeps its files across a soft reset but not across a fresh QEMU: a
        # restarted node gets its directory (with the state it had saved) written again.
        self.device.install(self.node_dir)
        self.installed = True
        self.bridge = self.make_bridge(self.device, self.log_path)
        self.bridge.start()
        self.device.boot()

    def poll(self) -> int | None:
        rc = self.device.poll()
        if rc is None and self.bridge is not None and self.bridge.error():
            return 1
        return rc

    def wait(self, timeout: float) -> int | None:
        import time

        end = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None or time.monotonic() >= end:
                return rc
            time.sleep(0.05)

    def stop(self, grace: float = 3.0) -> None:
        if self.bridge is not None:
            self.bridge.stop()
            self.bridge = None
        self.device.stop()
