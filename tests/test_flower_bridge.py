"""microfed_host.flowerbridge: a Flower run on real MicroPython nodes through the bridge.

A ServerApp with ExactKrum in Flower 1.42's simulation engine, four unix-port MicroPython nodes
running the unchanged firmware over a real mosquitto, real Ed25519. Flower pins libraries the
dev venv keeps newer, so these run in `.venv-flower` (`./dev flower` makes it and runs
this file there, beside tests/test_flower.py); in the dev venv, `test_in_flower_venv` runs
this file inside it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flower_venv import have, run_in_flower_venv

from microfed import noderound, wire
from microfed.replay import MemoryStore, ReplayGuard

HAVE_FLWR = have("flwr.clientapp")
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="flwr >= 1.42 not in this venv "
                                "(test_in_flower_venv runs these in .venv-flower)")
NODES, ROUNDS, F = 4, 3, 0
JUNK = b"MF" + bytes(range(40))  # no frame: what the verifier's decode step says of it below


def _junk_reason() -> str:
    try:
        wire.decode(JUNK)
    except wire.WireError as e:
        return e.reason
    raise AssertionError("JUNK decodes")


def _need_mesh_parts(micropython: bool = True) -> None:
    from microfed_host import upy
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto")
    if micropython and upy.find_micropython() is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")


def _login(mesh_dir: Path, user: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from microfed_host import brokerauth

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{user}")
    brokerauth.apply_paho(c, brokerauth.client_auth(mesh_dir, user))
    return c


def _hostile(out: Path, host: str, port: int, mesh: str) -> None:
    """Retained frames every round's subscription to these update topics gets first:
    node-01's topic a forgery (a key that is not node-01's), node-02's bytes that are no frame,
    node-03's a frame node-02 really signed (a high counter: were it checked, node-02's own
    updates would be replays), node-04's node-04's own frame of round 0 (late). Each
    published with that topic owner's login."""
    from microfed_host import keys
    from microfed_host.provision import MeshDir

    md = MeshDir(out / "mesh")
    mid = wire.mesh_id(mesh)
    zeros = [0] * 650

    def frame(sender: str, seed: bytes, round_: int, seq: int) -> bytes:
        return bytes(wire.encode_update(mid, sender, round_, seq, 1, 60, zeros,
                                        keys.signer(seed)))

    plan = {
        "node-01": frame("node-01", os.urandom(32), 1, 5),
        "node-02": JUNK,
        "node-03": frame("node-02", keys.read_private_key(md.node_key("node-02")), 1, 1 << 40),
        "node-04": frame("node-04", keys.read_private_key(md.node_key("node-04")), 0, 1 << 40),
    }
    for owner, data in plan.items():
        c = _login(out / "mesh", owner)
        c.connect(host, port)
        c.loop_start()
        info = c.publish(f"microfed/{mesh}/update/{owner}", data, qos=1, retain=True)
        info.wait_for_publish(5)
        assert info.is_published()
        c.loop_stop()
        c.disconnect()


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAVE_FLWR:
        pytest.skip("flwr >= 1.42 not in this venv (test_in_flower_venv runs it in .venv-flower)")
    if not HAVE_RAY:
        pytest.skip("Flower's simulation engine (ray) missing: pip install flwr[simulation]")
    _need_mesh_parts()
    from microfed_host import flowerbridge

    out = tmp_path_factory.mktemp("bridge") / "run"
    lines: list[str] = []
    summary = flowerbridge.run(out, nodes=NODES, rounds=ROUNDS, f=F, max_samples=60,
                               timeout_s=30.0, broker="mosquitto", say=lines.append,
                               on_ready=lambda h, p, m: _hostile(out, h, p, m))
    return {"out": out, "summary": summary, "lines": lines}


def _aggregate(req: dict, tmp: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    from microfed_tools import cli as cli_mod

    path = tmp / "req.json"
    path.write_text(json.dumps(req))
    capsys.readouterr()
    assert cli_mod.main(["aggregate", "--engine", "reference", "--compact", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


@needs_flwr
def test_each_rounds_flower_digest_is_microfed_aggregate_over_the_recorded_updates(
        bridged: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from microfed_host.flowerbridge import audit_request

    s, out = bridged["summary"], bridged["out"]
    assert sorted(s["digests"]) == list(range(1, ROUNDS + 1))
    for r in range(1, ROUNDS + 1):
        # Rebuilt from the frames the bridge recorded, every signature checked again.
        req = audit_request(out / "bridge", r, "krum", {"f": F})
        assert len(req["updates"]) == NODES and s["n"][r] == NODES
        ref = _aggregate(req, tmp_path, capsys)
        assert ref["digest"] == s["digests"][r], r
        # ... and it is the request ExactKrum itself recorded.
        assert json.loads((out / "flower-audit" / ("round-%04d.json" % r)).read_text()) == req
        assert any(f"round {r}: ExactKrum over {NODES} node updates, digest "
                   f"{s['digests'][r]}" in ln for ln in bridged["lines"])


@needs_flwr
def test_the_model_trains_and_the_nodes_finish(bridged: dict[str, Any]) -> None:
    s, out = bridged["summary"], bridged["out"]
    digests = [s["initial_digest"]] + [s["digests"][r] for r in range(1, ROUNDS + 1)]
    assert len(set(digests)) == ROUNDS + 1  # every round moved the model
    assert s["accuracy"][ROUNDS] > s["accuracy"][0] + 0.2
    assert s["final_digest"] == s["digests"][ROUNDS]  # Krum's result is the new model
    # Every node got the final global (round R + 1) and exited by itself.
    assert s["node_exit_codes"] == {f"node-{i:02d}": 0 for i in range(1, NODES + 1)}
    for i in range(1, NODES + 1):
        state = (out / "nodes" / f"node-{i:02d}" / "state" / "node.state").read_text()
        assert state.splitlines()[1].startswith(f"{ROUNDS + 1} {ROUNDS + 1} ")
        for r in range(1, ROUNDS + 1):
            doc = json.loads((out / "bridge" / "rounds" / ("round-%04d" % r)
                              / f"node-{i:02d}.json").read_text())
            assert doc["samples"] == 60 and doc["round"] == r


@needs_flwr
def test_hostile_frames_are_rejected_with_their_reason_and_counted(
        bridged: dict[str, Any]) -> None:
    s, out = bridged["summary"], bridged["out"]
    # One of each per round; the honest update still arrived every round (n == NODES), and
    # node-02's counter was not used up by its frame on node-03's topic.
    junk = _junk_reason()
    assert s["rejected"] == {"bad_signature": ROUNDS, junk: ROUNDS,
                             "topic_sender_mismatch": ROUNDS, "stale_round": ROUNDS}
    expect = {"node-01": "bad_signature", "node-02": junk, "node-03": "topic_sender_mismatch",
              "node-04": "stale_round"}
    for r in range(1, ROUNDS + 1):
        for node, reason in expect.items():
            doc = json.loads((out / "bridge" / "rounds" / ("round-%04d" % r)
                              / f"{node}.json").read_text())
            assert doc["rejected"] == {reason: 1}, (r, node)
    assert any("rejected frames: {" in ln for ln in bridged["lines"])


# --- without nodes ---------------------------------------------------------------------------

@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    from microfed_host.provision import init_mesh

    init_mesh(tmp_path / "mesh", "bridge-test", 3, "127.0.0.1:1883")
    return tmp_path


def _config(run: Path, broker: str = "127.0.0.1:1", timeout_s: float = 1.0) -> Any:
    from microfed_host.flowerbridge import CONFIG_NAME, BridgeConfig

    cfg = BridgeConfig(mesh_dir=str(run / "mesh"), broker=broker,
                       nodes=["node-01", "node-02", "node-03"], epoch=1_700_000_000,
                       state_dir=str(run / "bridge"), timeout_s=timeout_s)
    cfg.save(run / CONFIG_NAME)
    return cfg


@needs_flwr
def test_every_process_signs_the_same_global_and_a_node_accepts_it(mesh: Path) -> None:
    from microfed import ed25519
    from microfed_host.flowerbridge import Bridge
    from microfed_host.provision import MeshDir

    cfg = _config(mesh)
    params = [(i * 7919) % 65536 - 32768 for i in range(650)]
    a, b = Bridge(cfg), Bridge(cfg)
    fa = a.global_frame(3, params)
    assert fa == b.global_frame(3, params)  # deterministic: any ClientApp, any process
    _m, _s, reg = MeshDir(mesh / "mesh").load()
    guard = ReplayGuard(MemoryStore(), max_age=1 << 62)
    fr = noderound.check_global(fa, wire.mesh_id("bridge-test"), reg.portable().coordinator,
                                ed25519.verify, guard, 2, 650, cfg.epoch + 5)
    assert fr.round == 3 and fr.seq == 3 and fr.body["values"] == params
    assert not fr.body["final"] and a.global_frame(4, params, final=True) != fa


@needs_flwr
def test_the_recorded_update_again_is_the_same_answer_and_a_new_one_a_replay(
        mesh: Path) -> None:
    """A node answers every copy of a global with the same signed update: once accepted and
    recorded, those bytes are the round's answer again (a round asked twice gets it), while
    another frame with that counter is a replay."""
    from microfed_host import keys
    from microfed_host.flowerbridge import Bridge
    from microfed_host.provision import MeshDir

    bridge = Bridge(_config(mesh))
    sign = keys.signer(keys.read_private_key(MeshDir(mesh / "mesh").node_key("node-02")))
    mid = wire.mesh_id("bridge-test")
    now = int(time.time())
    first = bytes(wire.encode_update(mid, "node-02", 1, 7, now, 60, [3] * 650, sign))
    got = bridge._check("node-02", 1, first, {})
    assert got is not None and got.delta == [3] * 650 and got.samples == 60
    bridge.record(got, bridge.global_frame(1, [0] * 650), 77)
    rejected: dict[str, int] = {}
    again = bridge._check("node-02", 1, first, rejected)
    assert again is not None and again.sha256 == got.sha256 and rejected == {}
    other = bytes(wire.encode_update(mid, "node-02", 1, 7, now, 60, [4] * 650, sign))
    assert bridge._check("node-02", 1, other, rejected) is None
    assert rejected == {"replay": 1}
    assert bridge._check("node-02", 2, first, rejected) is None  # a late copy in round 2
    assert rejected == {"replay": 2}


def _message(arrays: dict[str, np.ndarray], server_round: int = 1) -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

    md = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=77,
                  reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                  message_type="train")
    return Message(content=RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "config": ConfigRecord({"server-round": server_round})}), metadata=md)


@needs_flwr
@pytest.mark.parametrize("arrays, node_config, code, text", [
    ({"params": np.full(650, np.nan)}, {"partition-id": 0}, 4202, "NaN"),
    ({"params": np.full(650, 40000.0)}, {"partition-id": 0}, 4202, "out of Q16.16 range"),
    ({"params": np.zeros(649)}, {"partition-id": 0}, 4202, "649 values"),
    ({"params": np.zeros(650)}, {"partition-id": 3}, 4203, "partition-id 3"),
    ({"params": np.zeros(650)}, {"microfed-node": "node-09"}, 4203, "node-09"),
])
def test_what_cannot_be_relayed_is_an_error_reply(mesh: Path, arrays: dict, node_config: dict,
                                                  code: int, text: str) -> None:
    from flwr.app import Context, RecordDict

    from microfed_host import flowerbridge

    _config(mesh)
    os.environ[flowerbridge.CONFIG_ENV] = str(mesh / flowerbridge.CONFIG_NAME)
    try:
        ctx = Context(run_id=1, node_id=77, node_config=node_config, state=RecordDict(),
                      run_config={})
        reply = flowerbridge.train(_message(arrays), ctx)
    finally:
        del os.environ[flowerbridge.CONFIG_ENV]
    assert reply.has_error() and reply.error.code == code
    assert text in str(reply.error.reason), reply.error.reason


@needs_flwr
def test_a_silent_node_is_an_error_reply_not_a_hang(mesh: Path) -> None:
    _need_mesh_parts(micropython=False)
    from flwr.app import Context, RecordDict

    from microfed_host import brokerauth, flowerbridge
    from microfed_host.broker import broker_from_arg

    brk = broker_from_arg("mosquitto", workdir=mesh / "broker",
                          auth_dir=mesh / "mesh" / brokerauth.BROKER_DIR)
    brk.start()
    os.environ[flowerbridge.CONFIG_ENV] = str(mesh / flowerbridge.CONFIG_NAME)
    try:
        _config(mesh, brk.address, timeout_s=1.0)
        ctx = Context(run_id=1, node_id=77, node_config={"partition-id": 1},
                      state=RecordDict(), run_config={})
        reply = flowerbridge.train(_message({"params": np.zeros(650)}), ctx)
    finally:
        del os.environ[flowerbridge.CONFIG_ENV]
        brk.close()
    assert reply.has_error() and reply.error.code == flowerbridge.ERR_NO_UPDATE
    assert ("node node-02 sent no valid update for round 1 within 1 s (frames rejected: none)"
            in str(reply.error.reason)), reply.error.reason


@pytest.mark.parametrize("args, needle", [
    (["--nodes", "4", "--f", "1"], "needs --nodes >= 2f + 3 = 5, got 4"),
    (["--rounds", "0"], "--rounds must be in 1..10000, got 0"),
    (["--timeout", "0"], "--timeout must be in (0, 3600] seconds"),
    (["--max-samples", "-1"], "--max-samples must be >= 0"),
])
def test_the_command_refuses_bad_flags_in_one_line(args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from microfed_tools import cli as cli_mod

    assert cli_mod.main(["flower-bridge", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


# --- from the dev venv ----------------------------------------------------------------------

@pytest.mark.skipif(HAVE_FLWR, reason="flwr is in this venv: the tests above ran here")
def test_in_flower_venv() -> None:
    run_in_flower_venv(__file__, timeout=600)
