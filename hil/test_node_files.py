"""A node's files on the board: written over the raw REPL, still there after a soft reset (as
on flash), and the node's own boot path reading them.

mps2-an385 keeps them on a littlefs RAM disk outside the MicroPython heap
(boards/firmware/mps2-an385/ramdisk.py), mounted after every reset by the profile's
fs_mount; unix32 on the host's disk. Boards with microfed frozen in only (frozen_core): the
node's main.py comes from the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microfed_tools import deploy as dp
from microfed_tools import emunode, rawrepl


def _need_files(device: Any) -> None:
    if not device.cap("filesystem", True):
        pytest.skip("board %s has no filesystem" % device.name)
    if not device.cap("frozen_core", False):
        pytest.skip("board %s has no microfed frozen in: deploy it first (docs/hil.md)"
                    % device.name)


def _free(device: Any) -> int:
    return int(device.repl.exec("import gc\ngc.collect()\nprint(gc.mem_free())").strip())


def test_files_survive_a_soft_reset(device: Any, tmp_path: Path) -> None:
    _need_files(device)
    repl = device.repl
    files = {"mfnf/a.txt": b"microfed\n",
             "mfnf/state/blob.bin": bytes(range(256)) * 16 + b"\x00\x04\x03\x01",
             # Bigger than the littlefs caches by far: it must not land on the heap.
             "mfnf/big.bin": bytes((i * 7) & 0xFF for i in range(48 * 1024))}
    specs = []
    for name, data in files.items():
        p = tmp_path / name.replace("/", "_")
        p.write_bytes(data)
        specs.append(dp.FileSpec(p, device.root + name))
    before = _free(device)
    assert dp.deploy(repl, specs, log=lambda _m: None) == (3, 0)
    after = _free(device)
    device.fresh()  # soft reset: the interpreter starts over, the files stay
    for s in specs:
        assert repl.file_checksum(s.device) == rawrepl.checksum(s.local.read_bytes()), s.device
    assert dp.deploy(repl, specs, log=lambda _m: None) == (0, 3)
    if device.board.fs_mount:
        # A RAM disk outside the heap: 52 KB of files cost the heap only the helpers.
        assert before - after < 8 * 1024, (before, after)
    for s in specs:
        repl.remove_file(s.device)


def test_the_node_boots_from_its_files_up_to_the_network(device: Any, tmp_path: Path) -> None:
    _need_files(device)
    if device.cap("network", "none") != "none":
        pytest.skip("board %s has a network: its node would go on to join a mesh"
                    % device.name)
    from microfed_host.mesh import Scenario
    from microfed_host.scenario import prepare, write_node_config

    out = tmp_path / "run"
    sc = Scenario(name="hil", honest=5, f=1, rounds=1, max_samples=60)
    prepare(sc, out)
    node_dir = out / "nodes" / "node-01"
    # As the mesh runner configures a node without a network (MQTT over the serial line), but
    # quick to give up: nobody runs the bridge here, and the QEMU boards have no Ctrl-C
    # (their UART is only read by the program), so the node must end by itself.
    write_node_config(node_dir, sc, None, "serial")
    conf = json.loads((node_dir / "config.json").read_text())
    conf["idle_exit_s"] = 3
    (node_dir / "config.json").write_text(json.dumps(conf))
    copied, _skipped = emunode.install_node_dir(device.repl, node_dir)
    assert copied == 3
    device.fresh()
    rc, events = emunode.watch_node(device.repl, timeout=300)
    # bundle.json, config.json and shard.bin were read and checked, state/ is there, the node
    # is built (keys, model, counters); it asks for its MQTT session, nobody answers, it
    # waits, and leaves with the idle exit code.
    kinds = [e["ev"] for e in events]
    assert rc == 4, events
    assert kinds[0] == "boot" and "mqtt_waiting" in kinds and kinds[-1] == "exit", kinds
    boot = events[0]
    assert boot["node"] == "node-01" and boot["samples"] == 60 and boot["last_round"] == 0
    print("\n[hil node files] %s: node booted from its files, %d bytes free after boot; "
          "then: %s" % (device.name, boot["free_heap"], kinds[1:]))
