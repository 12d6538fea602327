"""The whole mesh for real: mosquitto, the coordinator process, MicroPython unix-port node
processes (firmware/main.py) and the adversary, in coordinated and gossip mode; a coordinator
SIGKILLed mid-round that resumes from SQLite; and the in-process engine, which must reach the
same final model digest as the real mesh with the same seed.

Small on purpose (5 honest nodes, 60-sample shards, 4 rounds): the point is the protocol and
bit-exactness, the accuracy of the full experiment is in docs/results.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _need_tools() -> None:
    from microfed_host import upy
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto")
    if upy.find_micropython() is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")


def _scenario(**kw: Any) -> Any:
    from microfed_host import mesh

    sc = mesh.Scenario(name="test", honest=5, rule="krum", f=1, rounds=4, seed=11,
                       max_samples=60, deadline_s=30.0)
    for k, v in kw.items():
        setattr(sc, k, v)
    return sc


def _wire_attackers() -> list[Any]:
    from microfed_host.mesh import AttackGroup

    return [AttackGroup("replay", 1), AttackGroup("forged", 1), AttackGroup("unregistered", 1)]


def _run(sc: Any, out: Path, **kw: Any) -> dict[str, Any]:
    from microfed_host import mesh

    return mesh.run(sc, out, say=None, **kw)


def _no_children_left(out: Path) -> list[str]:
    """Processes whose command line names the run directory (nodes, coordinator)."""
    left = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(out) in cmd and int(pid) != os.getpid():
            left.append(f"{pid}: {cmd}")
    return left


def _check_common(s: dict[str, Any], rounds: int) -> None:
    assert s["rounds"] == rounds
    assert len(s["accuracy"]) == rounds
    # Learning happens: the last round beats the first by a clear margin.
    assert s["final_accuracy"] > s["accuracy"][0] + 0.1, s["accuracy"]
    assert s["honest_banned"] == []
    assert s["crosscheck"] == {"checked": rounds, "mismatches": 0}


@pytest.fixture(scope="module")
def coordinated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _need_tools()
    out = tmp_path_factory.mktemp("mesh") / "coordinated"
    s = _run(_scenario(attackers=_wire_attackers()), out, broker="mosquitto")
    return {"out": out, "summary": s}


def test_coordinated_mesh_learns_and_rejects_every_injected_frame(coordinated: dict[str, Any]) -> None:
    s, out = coordinated["summary"], coordinated["out"]
    _check_common(s, 4)
    assert s["broker"]["kind"] == "mosquitto"
    inj = s["injected"]
    # Rounds 1..4: a forged and an unregistered frame each round, replays from round 3 on.
    assert inj["by_reason"] == {"bad_signature": 4, "unregistered": 4, "replay": 2}
    assert inj["rejected_with_expected_reason"] == inj["total"] == 10
    # Nothing else was rejected (no false positives on honest traffic).
    assert s["rejected"] == {"bad_signature": 4, "replay": 2, "unregistered": 4}
    # Every honest node ran the real firmware to the end and exited cleanly.
    for nid in ("node-01", "node-05"):
        log = (out / "nodes" / nid / "node.log").read_text().splitlines()
        exits = [json.loads(x) for x in log if '"ev": "exit"' in x]
        assert exits and exits[-1]["code"] == 0
        assert exits[-1]["counters"]["rounds"] == 4
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "reputation.png").stat().st_size > 1000
    rows = (out / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,accuracy") and len(rows) == 5
    assert _no_children_left(out) == []


def test_inproc_engine_reaches_the_real_meshs_digest(coordinated: dict[str, Any],
                                                     tmp_path: Path) -> None:
    s = _run(_scenario(attackers=_wire_attackers()), tmp_path / "inproc", transport="inproc")
    assert s["final_digest"] == coordinated["summary"]["final_digest"]
    assert s["accuracy"] == coordinated["summary"]["accuracy"]
    assert s["rejected"] == coordinated["summary"]["rejected"]


def test_secagg_mqtt_mesh_matches_plain_fedavg(tmp_path: Path) -> None:
    """Secure aggregation over mosquitto with MicroPython nodes (firmware/node.py with
    config "privacy": "secagg"): the coordinator sees only masked updates, and the final
    digest is the plain FedAvg run's (in-process, same seed; tests/test_secagg_mesh.py ties
    that one to an independent FedAvg loop)."""
    _need_tools()
    kw = {"rule": "fedavg", "f": 0, "rounds": 2, "privacy": "secagg"}
    s = _run(_scenario(**kw), tmp_path / "secagg", broker="mosquitto")
    plain = _run(_scenario(**{**kw, "privacy": "none"}), tmp_path / "plain", transport="inproc")
    assert s["privacy"] == {"mode": "secagg"} and s["rounds"] == 2
    assert s["final_digest"] == plain["final_digest"]
    assert s["rejected"] == {}
    for nid in ("node-01", "node-05"):
        log = [json.loads(x) for x in
               (tmp_path / "secagg" / "nodes" / nid / "node.log").read_text().splitlines()]
        sent = [e["sent"] for e in log if e.get("ev") == "secagg"]
        assert sent == ["sa_shares", "sa_masked", "sa_reveal"] * 2
        assert not [e for e in log if e.get("ev") == "reject"]
        assert [e for e in log if e.get("ev") == "exit"][-1]["code"] == 0
    assert _no_children_left(tmp_path / "secagg") == []


def test_secagg_dp_mqtt_mesh_matches_the_inproc_digest(tmp_path: Path) -> None:
    """Distributed DP over mosquitto with MicroPython nodes (config "privacy": "secagg" with a
    "dp" share): each node clips, adds its seeded noise share and masks; the final digest is
    the in-process engine's, bit for bit, and both report the same epsilon."""
    _need_tools()
    kw = {"rule": "fedavg", "f": 0, "rounds": 2, "privacy": "secagg+dp", "dp_epsilon": 20.0,
          "dp_noise": "seeded"}
    s = _run(_scenario(**kw), tmp_path / "mqtt", broker="mosquitto")
    inproc = _run(_scenario(**kw), tmp_path / "inproc", transport="inproc")
    assert s["rounds"] == 2 and s["rejected"] == {}
    assert s["final_digest"] == inproc["final_digest"]
    assert s["privacy"] == inproc["privacy"] and s["privacy"]["epsilon"] > 0
    log = [json.loads(x) for x in
           (tmp_path / "mqtt" / "nodes" / "node-02" / "node.log").read_text().splitlines()]
    assert [e["sent"] for e in log if e.get("ev") == "secagg"] == [
        "sa_shares", "sa_masked", "sa_reveal"] * 2
    assert _no_children_left(tmp_path / "mqtt") == []


def test_coordinator_sigkill_mid_round_resumes_with_the_same_digest(
        coordinated: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "killed"
    s = _run(_scenario(attackers=_wire_attackers()), out, broker="mosquitto",
             kill_coordinator_at=3)
    assert s["coordinator_restarts"] == 1
    log = [json.loads(x) for x in (out / "coordinator.log").read_text().splitlines()
           if x.startswith("{")]
    resumes = [e for e in log if e["ev"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["round"] == 3
    # Killed with some round-3 updates accepted and others still to come: none lost, none
    # counted twice (one accepted update per node and round, all rounds complete).
    assert 1 <= len(resumes[0]["accepted"]) < 8
    rounds = [e for e in log if e["ev"] == "round"]
    assert [e["round"] for e in rounds] == [1, 2, 3, 4]
    assert all(len(e["accepted"]) == 8 for e in rounds)
    assert s["final_digest"] == coordinated["summary"]["final_digest"]
    assert s["accuracy"] == coordinated["summary"]["accuracy"]
    assert s["injected"]["rejected_with_expected_reason"] == s["injected"]["total"]
    assert _no_children_left(out) == []


def test_gossip_mesh_every_honest_node_reaches_the_same_bits(tmp_path: Path) -> None:
    _need_tools()
    from microfed_host.mesh import AttackGroup

    # Two liars against Krum f=1, past the rule's guarantee on purpose: the point here is
    # digest agreement among the honest nodes and flagging both liars.
    sc = _scenario(mode="gossip", attackers=[AttackGroup("sign-flip", 2)],
                   allow_more_byzantine=True)
    s = _run(sc, tmp_path / "gossip", broker="mosquitto")
    _check_common(s, 4)
    da = s["digest_agreement"]
    assert da["rounds_agreed"] == da["rounds"] == 4
    assert da["honest_mismatches"] == 0
    # The compromised nodes lie about the aggregate and are flagged; nobody else is.
    assert da["flagged"] == ["node-06", "node-07"]
    s2 = _run(_scenario(mode="gossip", attackers=[AttackGroup("sign-flip", 2)],
                        allow_more_byzantine=True),
              tmp_path / "gossip-inproc", transport="inproc")
    assert s2["final_digest"] == s["final_digest"]
    assert s2["digest_agreement"] == da


def test_ctrl_c_stops_every_mesh_process(tmp_path: Path) -> None:
    _need_tools()
    out = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "microfed_tools.cli", "mesh", "run", "--honest", "5",
         "--byzantine", "1", "--f", "1", "--rounds", "200", "--max-samples", "60",
         "--broker", "mosquitto", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in p.stdout:
        seen.append(line)
        if "round  2/200" in line or time.monotonic() > deadline:
            break
    assert any("round  2/200" in x for x in seen), "".join(seen)
    assert _no_children_left(out), "the mesh should be running"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "interrupted" in err
    time.sleep(0.5)
    assert _no_children_left(out) == []


@pytest.mark.parametrize("args, message", [
    (["--attack", "teleport"], "unknown attack 'teleport'"),
    (["--honest", "4", "--f", "1"], "needs at least 5 honest nodes"),
    (["--crosscheck", "sometimes"], "bad cross-check policy"),
    (["--scenario", "/nonexistent.toml"], "cannot read scenario"),
    (["--privacy", "secagg+dp"], "privacy secagg+dp works with rule fedavg only"),
    (["--privacy", "secagg+dp", "--rule", "fedavg", "--byzantine", "0", "--f", "0",
      "--mode", "coordinated", "--dp-epsilon", "8", "--clip-l2", "65536"], "the one clip of both; drop clip_l2"),
    (["--privacy", "dp"], "exactly one of"),
    (["--dp-epsilon", "3"], "privacy is 'none'"),
])
def test_bad_flags_exit_2_with_a_reason(tmp_path: Path, args: list[str], message: str) -> None:
    p = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "mesh", "run",
                        "--transport", "inproc", "--out", str(tmp_path / "x"), *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr


def test_scenario_files_load_and_validate() -> None:
    from microfed_host import mesh

    files = sorted((ROOT / "scenarios").glob("*.toml"))
    assert len(files) >= 4
    for f in files:
        sc = mesh.load_scenario(f)
        sc.check()
    d = mesh.load_scenario(mesh.DEFAULT_SCENARIO)
    assert (d.honest, d.byzantine, d.rule, d.f) == (10, 3, "krum", 3)
    assert [g.attack for g in d.attackers] == ["sign-flip"]


def test_refuses_a_non_empty_run_directory(tmp_path: Path) -> None:
    from microfed_host import mesh

    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(mesh.MeshError, match="not empty"):
        mesh.run(_scenario(), tmp_path, transport="inproc", say=None)
    assert (tmp_path / "old.txt").exists()


def test_a_coordinator_process_that_exits_is_named_with_its_code_and_log(tmp_path: Path) -> None:
    # mesh._Coord, the one place that runs a coordinator child (mesh and hier): an exit
    # is a MeshError with the exit code and its log's tail, after a restart too.
    import queue

    from microfed_host.mesh import MeshError, _Coord

    events: queue.Queue[dict[str, Any]] = queue.Queue()
    coord = _Coord(tmp_path, "127.0.0.1:1", events, module="microfed_host._no_such_module",
                   what="the test coordinator")
    for restarts in (0, 1):
        coord.proc.wait(60)
        with pytest.raises(MeshError) as e:
            coord.check_alive()
        assert str(e.value).startswith("the test coordinator exited with code 1:\n")
        assert "No module named microfed_host._no_such_module" in str(e.value)
        assert (tmp_path / "coordinator.log").read_text().count("No module named") == restarts + 1
        if not restarts:
            coord.restart()
    coord.stop()
