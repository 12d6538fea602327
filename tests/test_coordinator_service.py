"""`microfed coordinator` as a service (docs/service.md): SIGTERM (what systemd sends) stops it
cleanly — exit 0, a "stopped" event, the open round left in the store — and running it again
on the same run directory resumes that round; the unit file names the command that works."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_microfed, stop_processes

from microfed_host import broker as brokermod


def _start(mesh: Path, run: Path) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "microfed_tools.cli", "coordinator",
                             "--mesh", str(mesh), "--rounds", "5", "--f", "0", "--rule", "fedavg",
                             "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _until(lines: queue.Queue[str], event: str, seen: list[str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("{") and json.loads(line).get("ev") == event:
            return
    raise AssertionError(f"no {event!r} event within {timeout} s:\n" + "".join(seen))


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path: Path) -> None:
    try:
        br = brokermod.start_broker()
    except brokermod.BrokerError as e:
        pytest.skip(f"no MQTT broker could start: {e}")
    procs: list[subprocess.Popen[str]] = []
    try:
        mesh = tmp_path / "mesh"
        r = run_microfed("provision", "init", "--mesh", "svc", "--nodes", "3", "--out", str(mesh),
                         "--broker", f"{br.host}:{br.port}")
        assert r.returncode == 0, r.stderr
        run = tmp_path / "run"
        for attempt in ("coordinator", "resuming the run"):
            proc, lines = _start(mesh, run)
            procs.append(proc)
            seen: list[str] = []
            _until(lines, "ready", seen)
            assert attempt in "".join(seen)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert time.monotonic() - t0 < 10
            time.sleep(0.2)
            while not lines.empty():
                seen.append(lines.get())
            events = [json.loads(x) for x in seen if x.startswith("{")]
            assert events[-1]["ev"] == "stopped" and events[-1]["round"] == 1, seen[-3:]
            # The open round is in the store, and nothing was closed by stopping.
            db = sqlite3.connect(run / "coordinator.sqlite")
            assert db.execute("SELECT round, done FROM state").fetchone() == (1, 0)
            assert db.execute("SELECT count(*) FROM rounds").fetchone() == (0,)
            db.close()
    finally:
        stop_processes(procs)
        br.stop()


def test_the_unit_file_runs_the_documented_command() -> None:
    unit = (ROOT / "deploy" / "microfed-coordinator@.service").read_text()
    exec_line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    args = exec_line.split("=", 1)[1].split()
    assert args[1:3] == ["coordinator", "--mesh"]
    # Every option the unit passes is one `microfed coordinator` knows.
    r = run_microfed("coordinator", "--help")
    assert r.returncode == 0
    for a in args:
        if a.startswith("--"):
            assert a in r.stdout, a
    assert "KillSignal=SIGTERM" in unit and "Restart=on-failure" in unit
