"""A mesh node on an emulated board with a filesystem (mps2-an385: its RAM disk, see
boards/firmware/mps2-an385/ramdisk.py): write the node directory to the board over the raw
REPL, and run the node's frozen main.py on it.

    repl = rawrepl.connect(emu.pty, board)             # mounts the RAM disk (fs_mount)
    install_node_dir(repl, Path("run/nodes/node-01"))  # bundle, config, shard, state/
    code, events = run_node(repl)                       # main.main() with /node; its events

Files go through deploy.py (verified blocks, re-checked as stored, unchanged files skipped),
so a restarted node on the same board gets only what changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def run_node(repl: rawrepl.RawRepl, dest: str = NODE_DIR,
             timeout: float = 120.0) -> tuple[int, list[dict[str, Any]]]:
    """Run the frozen main.py on node directory `dest` until it returns: (exit code, the
    JSON events it printed). main.py's exit codes: 2 boot refused, 0 run finished, ..."""
    code = ("import sys, main\nsys.argv[:] = ['main', %r]\nprint('MFEXIT', main.main())"
            % ("/" + dest.strip("/")))
    out = repl.exec(code, timeout=timeout)
    events: list[dict[str, Any]] = []
    rc = None
    for line in out.splitlines():
        if line.startswith("MFEXIT "):
            rc = int(line.split()[1])
        elif line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    if rc is None:
        raise rawrepl.ReplError(f"{repl.name}: the node ran but reported no exit code: "
                                f"{out[-300:]!r}")
    return rc, events
