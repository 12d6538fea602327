"""The user's path from provisioning to a running mesh of boards (docs/hil.md §1), with the
MicroPython unix port standing in for the boards: `microfed provision init`, `microfed deploy`
to each "board" (a directory the unix-port process treats as its root), the boards booting
the deployed main.py, and `microfed coordinator` over a real broker. Flashing needs an ESP32
(tests/test_flash.py covers it against a fake ROM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import stop_processes

from microfed_host import broker as brokermod

NODES = 5
ROUNDS = 3


def microfed(*args: str, cwd: Path | None = None, timeout: float = 300) -> str:
    p = subprocess.run([sys.executable, "-m", "microfed_tools.cli", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"microfed {' '.join(args)}: {p.stderr}"
    return p.stdout + p.stderr


def test_provision_deploy_coordinate_on_unix_port_boards(tmp_path: Path, micropython: str) -> None:
    try:
        br = brokermod.start_broker()
    except brokermod.BrokerError as e:
        pytest.skip(f"no MQTT broker could start: {e}")
    procs: list[subprocess.Popen] = []
    try:
        mesh = tmp_path / "mesh"
        microfed("provision", "init", "--mesh", "lab", "--nodes", str(NODES), "--out", str(mesh),
                 "--broker", f"{br.host}:{br.port}")
        boards = []
        for i in range(1, NODES + 1):
            dev = tmp_path / f"board{i}"
            dev.mkdir()
            out = microfed("deploy", "--board", "unix", "--port", str(dev),
                           "--bundle", str(mesh / "bundles" / f"node-{i:02d}.json"))
            assert "shard.bin" in out
            for f in ("main.py", "node.py", "bundle.json", "shard.bin", "lib/microfed/q16.py",
                      "lib/microfed/ed25519.py", "mqttc.py"):
                assert (dev / f).is_file(), f
            boards.append(dev)
        # A re-run copies nothing: every file's checksum already matches on the device.
        again = microfed("deploy", "--board", "unix", "--port", str(boards[0]),
                         "--bundle", str(mesh / "bundles" / "node-01.json"))
        assert "copied 0 file(s)" in again and "skip  shard.bin (unchanged)" in again, again
        run = tmp_path / "run"
        coord = subprocess.Popen(
            [sys.executable, "-m", "microfed_tools.cli", "coordinator", "--mesh", str(mesh),
             "--rounds", str(ROUNDS), "--f", "1", "--deadline", "90", "--out", str(run)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(coord)
        env = dict(os.environ, MICROPYPATH="lib")
        for dev in boards:
            procs.append(subprocess.Popen([micropython, "-X", "heapsize=4m", "main.py"], cwd=dev,
                                          env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        out, err = coord.communicate(timeout=300)
        assert coord.returncode == 0, err[-2000:]
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        rounds = [e for e in events if e.get("ev") == "round"]
        assert [e["round"] for e in rounds] == list(range(1, ROUNDS + 1))
        assert all(len(e["accepted"]) == NODES for e in rounds)
        acc = [e["accuracy"] for e in rounds]
        assert acc[-1] > acc[0] and acc[-1] > 0.5, acc
        for p in procs[1:]:
            log, _ = p.communicate(timeout=120)
            assert p.returncode == 0, log[-2000:]  # every board saw the final model and exited
        assert (run / "coordinator.json").is_file() and (run / "coordinator.sqlite").is_file()
    finally:
        stop_processes(procs)
        br.stop()


def test_coordinator_refuses_bad_input(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "coordinator", "--mesh",
                        str(tmp_path / "none")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a provisioned mesh" in p.stderr
    assert "Traceback" not in p.stderr
