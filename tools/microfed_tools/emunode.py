"""A mesh node on an emulated board with a filesystem (mps2-an385: its RAM disk, see
boards/firmware/mps2-an385/ramdisk.py): write the node directory to the board over the raw
REPL, and run the node's frozen main.py on it.

    repl = rawrepl.connect(emu.pty, board)             # mounts the RAM disk (fs_mount)
    install_node_dir(repl, Path("run/nodes/node-01"))  # bundle, config, shard, state/
    code, events = watch_node(repl, until=("mqtt_waiting",))  # main.main() on /node

and, for `microfed mesh run --boards ...,mps2-an385:N`, `launcher()`: each node an
`EmulatedDevice` (a QEMU of its own) whose serial line a `microfed_tools.bridge.Bridge`
connects to the broker (host/microfed_host/nodeproc.py, BridgedNode).

Files go through deploy.py (verified blocks, re-checked as stored, unchanged files skipped),
so a restarted node on the same board gets only what changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from microfed.gossip import FileVectors
from microfed_tools import deploy as dp
from microfed_tools import rawrepl

NODE_DIR = "node"  # on the board: /node (bundle.json, config.json, shard.bin, state/)
# What the node reads; node.log, if there is one, is the host's.
NODE_FILES = ("bundle.json", "config.json", "shard.bin")


def node_specs(node_dir: Path, dest: str = NODE_DIR) -> list[dp.FileSpec]:
    """The node directory as deploy specs: its files and whatever state/ holds."""
    specs = [dp.FileSpec(node_dir / f, f"{dest}/{f}") for f in NODE_FILES
             if (node_dir / f).is_file()]
    state = node_dir / "state"
    if state.is_dir():
        specs += [dp.FileSpec(p, f"{dest}/state/{p.relative_to(state).as_posix()}")
                  for p in sorted(state.rglob("*")) if p.is_file()]
    return specs


def install_node_dir(repl: rawrepl.RawRepl, node_dir: Path, dest: str = NODE_DIR,
                     fresh: bool = False, log: Any = None) -> tuple[int, int]:
    """Write `node_dir` to the board's `dest` (formatting the RAM disk first if `fresh`);
    (files copied, files skipped as unchanged). DeployError names a file that failed."""
    if not (node_dir / "bundle.json").is_file():
        raise dp.DeployError(f"{node_dir}: no bundle.json (not a node directory)")
    if fresh:
        repl.exec("import ramdisk\nramdisk.mount(fresh=True)")
    # state/ must exist even when empty: the node creates nothing but its files in it.
    repl.exec("import os\nfor d in (%r, %r):\n try:\n  os.mkdir(d)\n except OSError:\n  pass"
              % (dest, dest + "/state"))
    return dp.deploy(repl, node_specs(node_dir, dest), log=log or (lambda _m: None))


def main_program(dest: str = NODE_DIR) -> str:
    """What the board runs: the frozen main.py on node directory /dest. Its JSON events go to
    the serial line (as L frames with config "link": "serial"); MFEXIT reports the code."""
    return ("import sys, main\nsys.argv[:] = ['main', %r]\nprint('MFEXIT', main.main())"
            % ("/" + dest.strip("/")))


def watch_node(repl: rawrepl.RawRepl, dest: str = NODE_DIR, until: tuple[str, ...] = (),
               timeout: float = 120.0) -> tuple[int | None, list[dict[str, Any]]]:
    """Run the node on `dest` with nothing on the other end of its serial line until it
    returns or logs an event named in `until`, then interrupt it (Ctrl-C) and get the raw
    REPL back: (exit code, or None if interrupted; its JSON events). Its log may come plain
    or framed (config "link": "serial"; then its session requests go unanswered). Only a
    "serial" node can be interrupted on the QEMU boards: the UART is read only by it."""
    from microfed import serialframe as sf

    repl.start(main_program(dest), what="node main")
    dec = sf.Decoder(max_text=4096)
    events: list[dict[str, Any]] = []
    rc: int | None = None
    deadline = time.monotonic() + timeout
    try:
        while rc is None and time.monotonic() < deadline:
            for ch, _sess, _seq, payload in dec.feed(repl.transport.read(0.2)):
                if ch not in (sf.LOG, sf.TEXT):
                    continue
                line = bytes(payload).decode("utf-8", "replace").strip()
                if line.startswith("MFEXIT "):
                    rc = int(line.split()[1])
                elif line.startswith("{"):
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        continue
                    if events[-1].get("ev") in until:
                        return None, events
        if rc is None:
            raise rawrepl.ReplTimeout(f"{repl.name}: the node neither returned nor logged "
                                      f"{until} within {timeout:.0f} s; events: {events[-5:]}")
        return rc, events
    finally:
        repl.resume()


def read_file(repl: rawrepl.RawRepl, path: str) -> bytes:
    """A file's bytes (in 256-byte hex lines, so a fragmented heap needs no big buffer),
    checked against the device's own checksum of the file."""
    out = repl.exec("f=open(%r,'rb')\nwhile 1:\n d=f.read(256)\n if not d:\n  break\n"
                    " print(d.hex())\nf.close()\ndel f,d" % path)
    data = bytes.fromhex("".join(out.split()))
    if repl.file_checksum(path) != rawrepl.checksum(data):
        raise rawrepl.TransferError(f"{repl.name}: {path} read back differently")
    return data


def save_state(repl: rawrepl.RawRepl, node_dir: Path, dest: str = NODE_DIR) -> list[str]:
    """Copy the board's /dest/state/* into node_dir/state (what survives a power cycle on a
    board with flash); the names copied."""
    # Absolute: the node's main.py changed the working directory into its directory.
    state = "/" + dest.strip("/") + "/state"
    names = repl.exec("import os\nfor n in os.listdir(%r):\n print(n)" % state)
    saved = []
    for name in names.split():
        if name.startswith(FileVectors.PREFIX):
            continue  # the round's scratch (peers' vectors), removed at every boot
        (node_dir / "state").mkdir(exist_ok=True)
        (node_dir / "state" / name).write_bytes(read_file(repl, f"{state}/{name}"))
        saved.append(name)
    return saved


class EmulatedDevice:
    """microfed_host.nodeproc.Device for a QEMU board with a RAM disk (mps2-an385): a fresh
    QEMU per start(), the node directory written to /node, the frozen main.py started with
    the raw REPL's start() so the serial line is free for the bridge. `image`: another firmware
    file than the profile's (a build with a smaller heap: `microfed firmware build --heap`)."""

    def __init__(self, board: Any, dest: str = NODE_DIR, image: str | None = None) -> None:
        self.board = board
        self.dest = dest
        self.image = image
        self.emu: Any = None
        self.repl: rawrepl.RawRepl | None = None
        self.booted = False

    def start(self) -> None:
        from microfed_tools.emulator import Emulator

        self.stop(None)
        self.emu = Emulator(self.board, image=self.image)
        pty = self.emu.start()
        self.repl = rawrepl.connect(pty, self.board, timeout=30, soft_reset=True)

    def install(self, node_dir: Path) -> None:
        assert self.repl is not None, "start() first"
        install_node_dir(self.repl, node_dir, self.dest)

    def boot(self) -> rawrepl.Transport:
        assert self.repl is not None, "start() first"
        # A soft reset first, as a board boots from flash: the installer's helpers and buffers
        # stay on the heap otherwise (measured on the 64 KB Cortex-M3 build: 51 296 B free
        # before the node's first import without it, 60 528 B with it). The RAM disk and its
        # files survive the reset (the profile's fs_mount mounts it again).
        self.repl.soft_reset()
        self.repl.start(main_program(self.dest), what="node main")
        self.booted = True
        return self.repl.transport

    def alive(self) -> bool:
        return self.emu is not None and self.emu.alive()

    def stop(self, node_dir: Path | None) -> None:
        """Save the board's state/ into node_dir (unless None), then end QEMU. A node still
        running cannot be interrupted (the QEMU ports have no Ctrl-C): its state is lost,
        and NodeError says so (the node directory keeps what was saved before)."""
        from microfed_host.nodeproc import NodeError

        try:
            if self.repl is not None and node_dir is not None and self.alive():
                if self.booted:
                    self.repl.resume()  # the raw REPL back, once main.py has returned
                    # What the node allocated is still on the heap (a 64 KB build then has
                    # too little left to list and read its files): a soft reset frees it,
                    # and the RAM disk survives one (docs/boards.md).
                    self.repl.soft_reset()
                save_state(self.repl, node_dir, self.dest)
        except rawrepl.ReplError as e:
            raise NodeError(f"state/ not saved from the board: {e}") from None
        finally:
            if self.repl is not None:
                self.repl.close()
            if self.emu is not None:
                self.emu.stop()
            self.repl = self.emu = None
            self.booted = False


def bridge_factory(line: Any, broker: tuple[str, int], on_log: Any) -> Any:
    """A microfed_tools.bridge.Bridge on `line` to `broker`; its own messages go to on_log."""
    from microfed_tools.bridge import Bridge

    return Bridge(line, broker[0], broker[1], on_log=on_log,
                  say=lambda m: on_log("bridge: " + m))


def launcher(board_name: str = "mps2-an385", image: str | None = None) -> Any:
    """A microfed_host.nodeproc.NodeLauncher for emulated nodes of `board_name` (the CLI
    builds the firmware first; Emulator builds it too if it is missing). `image`: the
    firmware to boot instead of the profile's (e.g. a build with a 64 KB heap)."""
    from microfed_host import nodeproc
    from microfed_tools.boards import load_board
    from microfed_tools.emulator import missing_requirements

    board = load_board(board_name)
    why = missing_requirements(board)
    if why:
        raise nodeproc.NodeError(why)

    def launch(node_id: str, node_dir: Path, broker: tuple[str, int]) -> Any:
        return nodeproc.BridgedNode(node_id, node_dir, board_name,
                                    EmulatedDevice(board, image=image), bridge_factory, broker)

    return launch
