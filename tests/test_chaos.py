"""The chaos run (issue 8, item 9), short: one real mesh (mosquitto, the coordinator process,
MicroPython unix-port nodes) that in one run gets malformed frames, a junk flood, a broker
restart with an outage, a SIGKILLed coordinator, a revocation, a node that lost its counter
file and a wiped node that is re-enrolled — and must end with the final digest of the same scenario run with the
membership changes only. scenarios/chaos.toml is the full version (`microfed mesh run
--scenario scenarios/chaos.toml`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from microfed_host.chaos import Chaos, ChaosError, malformed_frames, parse_chaos


def _need_tools() -> None:
    from microfed_host import upy
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto")
    if upy.find_micropython() is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _need_tools()
    from microfed_host import mesh
    from microfed_host.scenario import load_scenario

    sc = load_scenario(Path(__file__).resolve().parents[1] / "scenarios" / "chaos.toml")
    sc.honest, sc.rounds, sc.max_samples = 6, 5, 60
    assert sc.chaos is not None
    sc.chaos.flood_frames = 1000
    sc.chaos.outage_s = 2.0
    out = tmp_path_factory.mktemp("chaos") / "run"
    s = mesh.run(sc, out, say=None, broker="mosquitto")
    return {"out": out, "summary": s, "chaos": sc.chaos}


def test_chaos_run_ends_with_the_reference_runs_digest(chaos_run: dict[str, Any]) -> None:
    res = json.loads((chaos_run["out"] / "chaos.json").read_text())
    assert res["same_final_digest"] is True
    assert res["final_digest"] == res["reference_final_digest"]
    assert chaos_run["summary"]["final_digest"] == res["reference_final_digest"]


def test_every_fault_happened(chaos_run: dict[str, Any]) -> None:
    actions = [a["action"] for a in chaos_run["summary"]["chaos"]["actions"]]
    assert sorted(actions) == sorted(["malformed", "flood", "broker_restart", "kill_coordinator",
                                      "revoke", "reenrol", "wipe"])
    s = chaos_run["summary"]
    assert s["coordinator_restarts"] == 1
    flood = [a for a in s["chaos"]["actions"] if a["action"] == "flood"][0]
    assert flood["acknowledged"] == chaos_run["chaos"].flood_frames
    # The malformed frames and the flood were rejected and counted, nothing crashed.
    junk = sum(n for r, n in s["rejected"].items()
               if r not in ("duplicate", "banned", "counter_behind"))
    assert junk >= len(malformed_frames("x")) + 1000
    # The wiped node's first frame had a stale counter: it was told so, and caught up.
    assert s["rejected"]["counter_behind"] >= 1


def test_membership_changes_take_effect_in_the_next_round(chaos_run: dict[str, Any]) -> None:
    from microfed_host.rounds_store import RoundsStore

    c: Chaos = chaos_run["chaos"]
    store = RoundsStore(chaos_run["out"] / "chaos" / "coordinator.sqlite")
    try:
        accepted: dict[int, set[str]] = {}
        for row in store.update_verdicts():
            accepted.setdefault(int(row["round"]), set()).add(str(row["sender"]))
    finally:
        store.close()
    assert c.revoke_node in accepted[c.revoke_round]
    # The revoked node learnt it from the re-published registry and stopped (exit code 5);
    # every other honest node ran to the end.
    codes = chaos_run["summary"]["node_exit_codes"]
    assert codes.pop(c.revoke_node) == 5
    assert set(codes.values()) == {0}
    # Revoked when round c.revoke_round closed: absent from every later round.
    for rnd in range(c.revoke_round + 1, 6):
        assert c.revoke_node not in accepted[rnd], (rnd, accepted[rnd])
    # Wiped and re-enrolled when round c.reenrol_round closed: back in the next round.
    assert c.reenrol_node in accepted[c.reenrol_round + 1]
    # Wiped (counter file lost, same key): back in the next round through the notice.
    assert c.wipe_node in accepted[c.wipe_round + 1]


def test_chaos_table_errors_name_the_key() -> None:
    with pytest.raises(ChaosError, match="unknown key chaos.bogus"):
        parse_chaos({"bogus": 1})
    with pytest.raises(ChaosError, match="chaos.outage_s must be float"):
        parse_chaos({"outage_s": "3"})
    c = parse_chaos({"revoke_node": "node-09", "revoke_round": 2})
    assert c is not None
    with pytest.raises(ChaosError, match="not an honest node"):
        c.check(["node-01"], 5)
    with pytest.raises(ChaosError, match="not a round of this run"):
        Chaos(flood_round=9).check(["node-01"], 5)


def test_a_broker_outage_longer_than_any_timeout_costs_nothing(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """35 s without a broker (the coordinator used to exit after 30 s): it pauses, the nodes
    keep retrying, the broker comes back empty, the coordinator re-publishes its retained
    registry and global, and the run ends with the reference run's digest."""
    _need_tools()
    from microfed_host import mesh

    sc = mesh.Scenario(name="outage", honest=5, rule="krum", f=1, rounds=4, seed=11,
                       max_samples=60, deadline_s=30.0, round_min_s=1.0,
                       chaos=Chaos(broker_restart_round=2, outage_s=35.0))
    out = tmp_path_factory.mktemp("outage") / "run"
    s = mesh.run(sc, out, say=None, broker="mosquitto")
    res = json.loads((out / "chaos.json").read_text())
    assert res["same_final_digest"] is True
    assert [a["action"] for a in s["chaos"]["actions"]] == ["broker_restart"]
    log = [json.loads(x) for x in (out / "chaos" / "coordinator.log").read_text().splitlines()]
    paused = [e for e in log if e["ev"] == "resumed"]
    assert paused and paused[0]["paused_s"] >= 30.0
    assert [e["round"] for e in log if e["ev"] == "round"] == [1, 2, 3, 4]
