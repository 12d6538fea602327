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


def _start(mesh: Path, run: Path, *options: str) -> tuple[subprocess.Popen[str], queue.Queue[str]]:
    """`microfed coordinator` on `mesh` into `run` (default options: 5 rounds of fedavg)."""
    opts = list(options) or ["--rounds", "5", "--f", "0", "--rule", "fedavg"]
    proc = subprocess.Popen([sys.executable, "-m", "microfed_tools.cli", "coordinator",
                             "--mesh", str(mesh), *opts, "--out", str(run)],
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


def _broker() -> brokermod.Broker:
    try:
        return brokermod.start_broker()
    except brokermod.BrokerError as e:
        pytest.skip(f"no MQTT broker could start: {e}")


def _provision(tmp_path: Path, br: brokermod.Broker, name: str) -> Path:
    mesh = tmp_path / "mesh"
    r = run_microfed("provision", "init", "--mesh", name, "--nodes", "3", "--out", str(mesh),
                     "--broker", f"{br.host}:{br.port}")
    assert r.returncode == 0, r.stderr
    return mesh


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path: Path) -> None:
    br = _broker()
    procs: list[subprocess.Popen[str]] = []
    try:
        mesh = _provision(tmp_path, br, "svc")
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


def test_sighup_reloads_what_may_change_and_refuses_the_rest(tmp_path: Path) -> None:
    br = _broker()
    procs: list[subprocess.Popen[str]] = []
    try:
        mesh = _provision(tmp_path, br, "hup")
        conf = tmp_path / "coordinator.json"
        settings = {"rule": "fedavg", "f": 0, "rounds": "forever", "deadline": 120}
        conf.write_text(json.dumps(settings))
        run = tmp_path / "run"
        proc, lines = _start(mesh, run, "--config", str(conf))
        procs.append(proc)
        seen: list[str] = []
        _until(lines, "ready", seen)
        assert "rounds until stopped of fedavg" in "".join(seen)
        stored = json.loads((run / "coordinator.json").read_text())
        assert stored["rounds"] == (1 << 30) - 1 and stored["rule"] == "fedavg"
        # What may change: applied, recorded in the run directory and the store.
        conf.write_text(json.dumps(dict(settings, rounds=50, deadline=30,
                                        crosscheck="sampled:2")))
        proc.send_signal(signal.SIGHUP)
        _until(lines, "reloaded", seen)
        ev = json.loads(seen[-1])
        assert ev["changed"] == {"crosscheck": "sampled:2", "deadline_s": 30, "rounds": 50}
        stored = json.loads((run / "coordinator.json").read_text())
        assert (stored["rounds"], stored["deadline_s"], stored["crosscheck"]) == \
            (50, 30, "sampled:2")
        # What defines the rounds: refused, named, and nothing of it taken.
        conf.write_text(json.dumps(dict(settings, rule="krum", f=1, rounds=60)))
        proc.send_signal(signal.SIGHUP)
        _until(lines, "reload_refused", seen)
        assert "f, rule cannot change in a running run" in json.loads(seen[-1])["error"]
        conf.write_text(json.dumps(dict(settings, rounds=50, deadline="soon")))
        proc.send_signal(signal.SIGHUP)
        _until(lines, "reload_refused", seen)
        assert "deadline must be a number" in json.loads(seen[-1])["error"]
        assert json.loads((run / "coordinator.json").read_text())["rounds"] == 50
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        db = sqlite3.connect(run / "coordinator.sqlite")
        cfg = json.loads(db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()[0])
        db.close()
        assert (cfg["rounds"], cfg["deadline_s"], cfg["rule"]) == (50, 30, "fedavg")
        # The file as reloaded starts the same run again.
        conf.write_text(json.dumps(dict(settings, rounds=50, deadline=30,
                                        crosscheck="sampled:2")))
        proc, lines = _start(mesh, run, "--config", str(conf))
        procs.append(proc)
        seen = []
        _until(lines, "ready", seen)
        assert "resuming the run" in "".join(seen)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_processes(procs)
        br.stop()


def test_a_bad_config_file_is_one_clear_error(tmp_path: Path) -> None:
    conf = tmp_path / "c.json"
    for doc, msg in (({"rule": "krum", "colour": 1}, "unknown setting(s) colour"),
                     ({"f": "1"}, "f must be a number"), ({"rounds": "often"}, "rounds:"),
                     ([1], "must be a JSON object")):
        conf.write_text(json.dumps(doc))
        r = run_microfed("coordinator", "--mesh", str(tmp_path), "--config", str(conf))
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = run_microfed("coordinator", "--mesh", str(tmp_path), "--config", str(tmp_path / "no"))
    assert r.returncode == 2 and "No such file" in r.stderr
