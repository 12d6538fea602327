"""The MicroPython node application (firmware/) as real unix-port processes against a real
MQTT broker, with this test playing the coordinator through the shared wire module and
`cryptography` Ed25519 keys.

Checked: a node's MODEL_UPDATE is signed, verifies, and its delta equals what
microfed.model computes on CPython bit for bit; its sequence counter and last round
survive kill -9 (no old round re-published, next counter larger); forged, wrong-mesh and
replayed GLOBAL_MODELs are rejected by reason and reported in signed STATUS frames while
the node keeps working; in gossip mode every node publishes the audit.digest of the
reference aggregate of the announced accepted set; bad files stop the boot with a reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from microfed import audit, model, q16, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Verifier
from microfed_host import upy

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"

MESH = "nodetest"
N_NODES = 5
SAMPLES = 40  # per shard: enough to train, small enough to keep the test quick
TRAIN = {"lr": 16384, "epochs": 1, "batch": 10, "seed": 7}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def broker():
    from microfed_host.broker import BrokerError, amqtt_available, find_mosquitto, start_broker

    if find_mosquitto() is None and not amqtt_available():
        pytest.skip("no MQTT broker: apt-get install mosquitto (or pip install amqtt)")
    try:
        b = start_broker("auto")
    except BrokerError as e:
        pytest.fail(f"broker did not start: {e}")
    yield b
    b.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, broker: Any) -> dict[str, Any]:
    """A provisioned mesh (coordinator + 5 node keys) and one 40-sample digits shard each."""
    import numpy as np

    from microfed_host import data, keys
    from microfed_host import registry as regmod
    from microfed_tools import cmd_provision

    root = tmp_path_factory.mktemp("mesh")
    args = argparse.Namespace(out=str(root / "mesh"), nodes=N_NODES, mesh=MESH,
                              broker=f"{broker.host}:{broker.port}", force=False)
    assert cmd_provision.cmd_init(args) == 0
    md = root / "mesh"
    coord_seed = keys.read_private_key(md / "coordinator.key")
    reg, _ = regmod.load(md / "registry.json", keys.public_key(coord_seed))
    # Digits-shaped data (8x8 pixels 0..16, 10 classes) drawn from a seeded generator: the
    # checks here are bit-exactness and protocol, not accuracy, so scikit-learn is not needed.
    rng = np.random.default_rng(3)
    shards = {}
    for i in range(N_NODES):
        pixels = rng.integers(0, 17, size=(SAMPLES, 64))
        ds = data.Dataset(data.quantise(pixels), rng.integers(0, 10, size=SAMPLES), 10)
        shards[f"node-{i + 1:02d}"] = data.encode_shard(ds, i, N_NODES)
    node_seeds = {n: keys.read_private_key(md / "nodes" / f"{n}.key") for n in reg.nodes}
    return {"root": root, "dir": md, "coord_seed": coord_seed, "registry": reg,
            "shards": shards, "node_seeds": node_seeds}


def node_dir(mesh: dict[str, Any], node_id: str, name: str, **cfg: Any) -> Path:
    d = mesh["root"] / name / node_id
    d.mkdir(parents=True)
    (d / "bundle.json").write_text((mesh["dir"] / "bundles" / f"{node_id}.json").read_text())
    (d / "shard.bin").write_bytes(mesh["shards"][node_id])
    conf = {"train": TRAIN, "status_interval_ms": 0, "idle_exit_s": 60}
    conf.update(cfg)
    (d / "config.json").write_text(json.dumps(conf))
    return d


# ------------------------------------------------------------------ a node process
class NodeProc:
    """`micropython main.py DIR` exactly as firmware/README.md tells the mesh runner."""

    def __init__(self, exe: str, directory: Path) -> None:
        env = dict(os.environ)
        env["MICROPYPATH"] = os.pathsep.join(
            [str(ROOT / "shared"), str(FIRMWARE), str(FIRMWARE / "lib")])
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc = subprocess.Popen(
            [exe, "-X", "heapsize=4m", str(FIRMWARE / "main.py"), str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode(errors="replace").rstrip()
            self.raw.append(text)
            try:
                self.events.append(json.loads(text))
            except ValueError:
                pass

    def of(self, ev: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("ev") == ev]

    def wait_event(self, ev: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.of(ev)
            if found:
                return found[-1]
            if self.proc.poll() is not None:
                self._reader.join(2)
                found = self.of(ev)
                if found:
                    return found[-1]
                break
            time.sleep(0.02)
        raise AssertionError(f"no '{ev}' event; node output:\n" + "\n".join(self.raw[-30:]))

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------ the test's coordinator
class Driver:
    """Plays the coordinator: signs GLOBAL_MODELs with the provisioned coordinator key and
    verifies what nodes send with the host's Ed25519 (cryptography)."""

    def __init__(self, mesh: dict[str, Any], broker: Any, client_id: str) -> None:
        from microfed_host import keys
        from microfed_host.mqtt import HostMQTT

        self.keys = keys
        self.m = mesh
        self.mesh_id = wire.mesh_id(MESH)
        self.seq = 0
        self.node_seq: dict[str, int] = {}
        self.base = f"microfed/{MESH}/"
        self.mqtt = HostMQTT(broker.host, broker.port, client_id)
        self.mqtt.connect(10)
        # Each test starts clean: drop the retained model an earlier test left behind.
        self.mqtt.publish(self.base + "global", b"", qos=1, retain=True)
        for t in ("update/+", "digest/+", "hello/+"):
            self.mqtt.subscribe(self.base + t)
        self.verifier = Verifier(self.mesh_id, mesh["registry"].portable(),
                                 ReplayGuard(MemoryStore()), keys.check_signature)
        self.inbox: list[wire.Frame] = []
        self.raw: dict[int, bytes] = {}

    def close(self) -> None:
        self.mqtt.close()

    def global_frame(self, round_: int, values: list[int], *, seed: bytes | None = None,
                     mesh_id: bytes | None = None, **ann: Any) -> bytes:
        self.seq += 1
        payload = wire.encode_global_payload(values, **ann)
        return wire.encode(wire.GLOBAL_MODEL, mesh_id or self.mesh_id, wire.COORDINATOR, round_,
                           self.seq, int(time.time()), payload,
                           self.keys.signer(seed or self.m["coord_seed"]))

    def publish_global(self, frame: bytes, retain: bool = True) -> None:
        self.mqtt.publish(self.base + "global", frame, qos=1, retain=retain)

    def peer_update(self, node_id: str, round_: int, samples: int, values: list[int]) -> bytes:
        """A registered node's update made here (the test holds every provisioned key)."""
        self.node_seq[node_id] = self.node_seq.get(node_id, 0) + 1
        frame = wire.encode(wire.MODEL_UPDATE, self.mesh_id, node_id, round_,
                            self.node_seq[node_id], int(time.time()),
                            wire.encode_model_update(samples, values),
                            self.keys.signer(self.m["node_seeds"][node_id]))
        self.mqtt.publish(self.base + "update/" + node_id, frame, qos=1)
        return frame

    def collect(self, pred: Callable[[wire.Frame], bool], n: int = 1,
                timeout: float = 20.0) -> list[wire.Frame]:
        """Wait until n verified frames match pred; every frame nodes send must verify."""
        deadline = time.monotonic() + timeout
        while True:
            got = [f for f in self.inbox if pred(f)]
            if len(got) >= n:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"only {len(got)} of {n} expected frames arrived; have "
                                     + ", ".join(repr(f) for f in self.inbox))
            msg = self.mqtt.get(min(left, 0.2))
            if msg is None:
                continue
            fr = self.verifier.verify(msg.payload)  # raises Rejected: a node sent garbage
            assert msg.topic.rsplit("/", 1)[1] == fr.sender
            self.raw[id(fr)] = msg.payload
            self.inbox.append(fr)


def reference_delta(shard: bytes, node_id: str, round_: int, g: list[int]) -> list[int]:
    """What the node must have computed, computed here on CPython with the same module."""
    xs, ys, info = model.decode_shard(shard)
    m = model.get("softmax", n_features=info["n_features"], n_classes=info["n_classes"])
    tc = model.TrainConfig(TRAIN["lr"], TRAIN["epochs"], TRAIN["batch"],
                           model.derive_seed(TRAIN["seed"], round_, node_id))
    return m.delta(g, m.train(g, (xs, ys), tc))


def is_update(node_id: str, round_: int) -> Callable[[wire.Frame], bool]:
    return lambda f: f.kind == wire.MODEL_UPDATE and f.sender == node_id and f.round == round_


def status_labels(drv: Driver, node_id: str) -> list[str]:
    return [f.body["label"] for f in drv.inbox if f.kind == wire.STATUS and f.sender == node_id]


def _late_status(drv: Driver, node_id: str, label: str) -> bool:
    try:
        drv.collect(lambda f: f.kind == wire.STATUS and f.sender == node_id
                    and f.body["label"] == label, timeout=5)
    except AssertionError:
        return False
    return True


# ------------------------------------------------------------------ tests
def test_announcement_codec_roundtrip_and_rejects_garbage() -> None:
    vals = [1, -2, 65536]
    h = bytes(range(32))
    p = wire.encode_global_payload(vals, rule="multi_krum", p1=1, p2=3, agg_digest=h,
                                   accepted=[("node-02", h), ("node-01", bytes(32))],
                                   final=True)
    b = wire.decode_global_payload(p)
    assert (b["values"], b["rule"], b["p1"], b["p2"], b["final"], b["agg_digest"]) == (
        vals, "multi_krum", 1, 3, True, h)
    assert b["accepted"] == [("node-02", h), ("node-01", bytes(32))]
    plain = wire.decode_global_payload(wire.encode_global_model(vals))
    assert plain["rule"] is None and plain["accepted"] == [] and not plain["final"]
    for bad in (p[:-1], p + b"\x00", p[:-40], wire.encode_global_model(vals) + b"XX" + p[-39:]):
        with pytest.raises(wire.WireError):
            wire.decode_global_payload(bad)
    with pytest.raises(wire.WireError):  # a rule with nothing accepted
        wire.encode_announce("krum", 1, 0, h, [])


# The start of a MicroPython script that runs firmware/node.py's Node in-process on the node
# directory argv[1] (_one_node_dir), with a transport that is always up: it records what is
# published (topics in `sent`, frames as hex in `frames`) and hands the node a receive buffer
# when asked (`rx`).
NODE_PRELUDE = r"""
import json, sys
import config, node as nodemod
d = sys.argv[1]
bundle = config.read_bundle(d + "/bundle.json")
cfg = config.read_config(None, {"state_dir": d + "/state", "status_interval_ms": 0})
f = open(d + "/shard.bin", "rb"); shard = f.read(); f.close()

class T:
    connected = True
    def __init__(self):
        self.sent = []
        self.frames = []
        self.rx = None
    def use_rx_buffer(self, size):
        self.rx = bytearray(size)
    def subscribe(self, topic, qos):
        pass
    def publish(self, topic, frame, retain, qos):
        self.sent.append(topic)
        self.frames.append("".join(["%02x" % x for x in frame]))
        return True
    def poll(self, ms):
        pass
    def stats(self):
        return {}

class H:
    NAME = "test"
    def free_heap(self):
        return 0
"""

def _run_node_script(tmp_path: Path, script: str) -> dict[str, Any]:
    """Run `script` (NODE_PRELUDE + ...) on the unix port in tmp_path; its last JSON line."""
    (tmp_path / "t.py").write_text(script)
    out = upy.run([str(tmp_path / "t.py"), str(tmp_path)],
                  path=[ROOT / "shared", FIRMWARE, FIRMWARE / "lib"])
    return json.loads(out.strip().splitlines()[-1])


HANDLER_SCRIPT = NODE_PRELUDE + r"""
f = open(d + "/global.bin", "rb"); good = f.read(); f.close()

def log(ev):
    if ev["ev"] in ("reject", "update", "error"):
        print(json.dumps(ev))

t = T()
nd = nodemod.Node(bundle, cfg, shard, t, H(), log)

def boom_index(msg):
    raise IndexError("index out of range")

def boom_memory(msg):
    raise MemoryError()

nd.on_message(nd.t_global, b"MF garbage")          # a WireError: its own reason
nd.on_global = boom_index                           # any exception inside a handler ...
nd.on_message(nd.t_global, b"frame one")
nd.on_registry = boom_memory
nd.on_message(nd.t_registry, b"frame two")
nd.on_message(b"\xff\xfe", b"frame three")         # a topic that is not UTF-8
del nd.on_global
nd.on_message(nd.t_global, 12345)                   # not bytes at all
nd.on_message(nd.t_global, good)                    # ... and the node goes on working
nd.step()
print(json.dumps({"ev": "done", "counters": nd.counters()["rejected"], "sent": t.sent,
                  "errors": nd.errors, "last_round": nd.state.last_round}))
"""


def _line_of(script: str, text: str) -> int:
    """1-based line number of the only line of `script` that contains `text`."""
    hits = [i for i, line in enumerate(script.splitlines(), 1) if text in line]
    assert len(hits) == 1, hits
    return hits[0]


def _one_node_dir(tmp_path: Path) -> tuple[bytes, bytes, int]:
    """bundle.json, shard.bin (3 samples of 4 features, 3 classes) and state/ of node-01, the
    only node of a mesh: (mesh id, coordinator seed, model parameters)."""
    import hashlib
    import struct

    from microfed_host import keys

    coord, me = hashlib.sha256(b"c").digest(), hashlib.sha256(b"n").digest()
    mid = wire.mesh_id(MESH)
    reg = wire.encode(wire.REGISTRY, mid, wire.COORDINATOR, 0, 1, 0,
                      wire.encode_registry(mid, 1, keys.public_key(coord),
                                           [("node-01", keys.public_key(me), True)]),
                      keys.signer(coord))
    (tmp_path / "bundle.json").write_text(json.dumps({
        "format": "microfed-bundle/1", "mesh": MESH, "node_id": "node-01", "mesh_id": mid.hex(),
        "seed": me.hex(), "public_key": keys.public_key(me).hex(),
        "coordinator_public_key": keys.public_key(coord).hex(), "registry_frame": reg.hex(),
        "registry_version": 1}))
    (tmp_path / "state").mkdir()
    d, k, n = 4, 3, 3
    body = struct.pack(model.SHARD_HEADER, model.SHARD_MAGIC, 1, 12, d, k, n, 0, 1) + bytes(
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 1, 2])
    (tmp_path / "shard.bin").write_bytes(body + hashlib.sha256(body).digest())
    return mid, coord, k * d + k


def test_any_exception_in_a_handler_is_a_counted_rejection(micropython: str,
                                                           tmp_path: Path) -> None:
    import hashlib

    from microfed_host import keys

    mid, coord, n_params = _one_node_dir(tmp_path)
    good = wire.encode(wire.GLOBAL_MODEL, mid, wire.COORDINATOR, 1, 1, 0,
                       wire.encode_global_payload([0] * n_params), keys.signer(coord))
    (tmp_path / "global.bin").write_bytes(good)
    (tmp_path / "h.py").write_text(HANDLER_SCRIPT)
    out = upy.run([str(tmp_path / "h.py"), str(tmp_path)],
                  path=[ROOT / "shared", FIRMWARE, FIRMWARE / "lib"])
    evs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    rej = [e for e in evs if e["ev"] == "reject"]

    def sha(b: bytes) -> str:
        return hashlib.sha256(b).hexdigest()[:16]

    assert [(e["src"], e["reason"], e["sha"]) for e in rej] == [
        ("global", "truncated", sha(b"MF garbage")),
        ("global", "handler_error", sha(b"frame one")),
        ("registry", "out_of_memory", sha(b"frame two")),
        ("mqtt", "handler_error", sha(b"frame three")),
        ("global", "handler_error", "-"),
    ]
    assert "IndexError" in rej[1]["msg"]
    # A MemoryError is named as such, with what was being done, the heap left and the line
    # where it ran out (the innermost frame of its traceback).
    assert re.fullmatch(r"handling registry: MemoryError, \d+ bytes free after gc "
                        r"at \S*/h\.py:%d in boom_memory" % _line_of(HANDLER_SCRIPT, "raise MemoryError()"),
                        rej[2]["msg"]), rej[2]["msg"]
    done = evs[-1]
    assert done["counters"] == {"truncated": 1, "handler_error": 3, "out_of_memory": 1}
    assert done["errors"] == 4
    # The valid GLOBAL_MODEL that came after was still verified, trained on and answered.
    assert done["last_round"] == 1
    assert "microfed/%s/update/node-01" % MESH in done["sent"]


REGISTRY_COPY_SCRIPT = NODE_PRELUDE + r"""
from microfed import ed25519
checks = [0]
real_verify = ed25519.verify

def counting_verify(pub, msg, sig):
    checks[0] += 1
    return real_verify(pub, msg, sig)

ed25519.verify = counting_verify
booted_with = bundle.registry_frame  # the node drops it once checked
nd = nodemod.Node(bundle, cfg, shard, T(), H(), lambda ev: None)
at_boot = checks[0]
f = open(d + "/again.bin", "rb"); again = f.read(); f.close()
nd.on_message(nd.t_registry, booted_with)   # the retained copy, byte for byte
copy = [checks[0] - at_boot, nd.duplicates]
nd.on_message(nd.t_registry, again)                   # same version, other bytes: checked
print(json.dumps({"copy": copy, "again": [checks[0] - at_boot, nd.duplicates],
                  "rejected": nd.counters()["rejected"]}))
"""


def test_the_retained_registry_copy_costs_no_signature_check(micropython: str,
                                                             tmp_path: Path) -> None:
    # After every (re)connect the broker hands the node the registry it booted with; the
    # same bytes are a duplicate without an Ed25519 verification. Other bytes are checked.
    import hashlib

    from microfed_host import keys

    mid, coord, _n = _one_node_dir(tmp_path)
    me = hashlib.sha256(b"n").digest()
    again = wire.encode(wire.REGISTRY, mid, wire.COORDINATOR, 0, 2, 0,
                        wire.encode_registry(mid, 1, keys.public_key(coord),
                                             [("node-01", keys.public_key(me), True)]),
                        keys.signer(coord))
    (tmp_path / "again.bin").write_bytes(again)
    got = _run_node_script(tmp_path, REGISTRY_COPY_SCRIPT)
    assert got == {"copy": [0, 1], "again": [1, 2], "rejected": {}}


def test_bad_files_stop_boot_with_a_reason(micropython: str, mesh: dict[str, Any]) -> None:
    d = node_dir(mesh, "node-01", "bad")
    (d / "config.json").write_text('{"mode": "sideways"}')
    p = NodeProc(micropython, d)
    assert p.wait() == 2
    assert "mode" in p.wait_event("boot_error")["error"]
    (d / "config.json").write_text("{}")
    (d / "shard.bin").write_bytes(mesh["shards"]["node-01"][:-5])  # truncated: checksum fails
    p = NodeProc(micropython, d)
    assert p.wait() == 2
    assert "SHA-256" in p.wait_event("boot_error")["error"]
    (d / "shard.bin").write_bytes(mesh["shards"]["node-01"])
    bundle = json.loads((d / "bundle.json").read_text())
    bundle["seed"] = mesh["node_seeds"]["node-02"].hex()  # someone else's key
    (d / "bundle.json").write_text(json.dumps(bundle))
    p = NodeProc(micropython, d)
    assert p.wait() == 2
    assert "public_key" in p.wait_event("boot_error")["error"]


def test_coordinated_node_trains_signs_persists_and_rejects(
        micropython: str, mesh: dict[str, Any], broker: Any) -> None:
    nid = "node-01"
    d = node_dir(mesh, nid, "coord")
    shard = mesh["shards"][nid]
    drv = Driver(mesh, broker, "driver-coord")
    procs: list[NodeProc] = []
    try:
        p = NodeProc(micropython, d)
        procs.append(p)
        drv.collect(lambda f: f.kind == wire.HELLO and f.sender == nid)
        m = model.get("softmax")
        g1 = m.init(11)
        g1_frame = drv.global_frame(1, g1)
        drv.publish_global(g1_frame)
        u1 = drv.collect(is_update(nid, 1))[0]
        assert u1.body["samples"] == SAMPLES
        assert u1.body["values"] == reference_delta(shard, nid, 1, g1)
        assert any(v != 0 for v in u1.body["values"])

        g2 = q16.vadd(g1, u1.body["values"])
        g2_frame = drv.global_frame(2, g2)
        drv.publish_global(g2_frame)
        u2 = drv.collect(is_update(nid, 2))[0]
        assert u2.body["values"] == reference_delta(shard, nid, 2, g2)
        assert u2.seq > u1.seq

        # kill -9 and restart: the retained round-2 model comes back and must not be redone.
        p.kill9()
        hellos = len([f for f in drv.inbox if f.kind == wire.HELLO])
        p = NodeProc(micropython, d)
        procs.append(p)
        drv.collect(lambda f: f.kind == wire.HELLO and f.sender == nid, n=hellos + 1)
        g3 = q16.vadd(g2, u2.body["values"])
        drv.publish_global(drv.global_frame(3, g3))
        u3 = drv.collect(is_update(nid, 3))[0]
        updates = [f for f in drv.inbox if f.kind == wire.MODEL_UPDATE]
        assert [f.round for f in updates] == [1, 2, 3]  # round 2 was not published again
        assert u3.seq > u2.seq
        assert u3.body["values"] == reference_delta(shard, nid, 3, g3)
        assert p.of("boot")[0]["last_round"] == 2

        # Hostile global models on the live topic (not retained): each rejected by reason.
        other = bytes(range(32))  # a key that is not the coordinator's
        drv.publish_global(drv.global_frame(4, g3, seed=other), retain=False)
        drv.publish_global(drv.global_frame(4, g3, mesh_id=wire.mesh_id("elsewhere")),
                           retain=False)
        drv.publish_global(g2_frame, retain=False)  # a valid, old frame replayed
        drv.publish_global(b"MF" + bytes(100), retain=False)  # garbage with the right magic
        drv.publish_global(b"x" * 20000, retain=False)  # over max_msg: skipped unread
        want = {"rej bad_signature 1", "rej wrong_mesh 1", "rej replay 1", "rej bad_version 1"}
        deadline = time.monotonic() + 20
        while not want <= set(status_labels(drv, nid)) and time.monotonic() < deadline:
            try:
                drv.collect(lambda f: False, timeout=0.2)
            except AssertionError:
                pass
        assert want <= set(status_labels(drv, nid)), status_labels(drv, nid)
        assert not [f for f in drv.inbox if f.kind == wire.MODEL_UPDATE and f.round == 4]

        # ...and it keeps working: the next valid round is trained and published.
        g4 = q16.vadd(g3, u3.body["values"])
        drv.publish_global(drv.global_frame(4, g4))
        u4 = drv.collect(is_update(nid, 4))[0]
        assert u4.body["values"] == reference_delta(shard, nid, 4, g4)

        drv.publish_global(drv.global_frame(5, g4, final=True))
        assert p.wait() == 0
        counters = p.wait_event("exit")["counters"]
        assert counters["rejected"] == {"bad_signature": 1, "wrong_mesh": 1, "replay": 1,
                                        "bad_version": 1}
        assert counters["mqtt"]["dropped_oversize"] == 1
        assert counters["last_round"] == 5
        assert counters["mqtt"]["nodelay"] is True
    finally:
        for q in procs:
            q.stop()
        drv.close()


def test_gossip_nodes_publish_the_reference_digest(
        micropython: str, mesh: dict[str, Any], broker: Any) -> None:
    live = ["node-01", "node-02", "node-03"]  # MicroPython processes
    scripted = ["node-04", "node-05"]  # registered peers whose updates this test signs
    dirs = {n: node_dir(mesh, n, "gossip", mode="gossip") for n in live}
    drv = Driver(mesh, broker, "driver-gossip")
    procs = {n: NodeProc(micropython, dirs[n]) for n in live}
    try:
        for n in live:
            drv.collect(lambda f, n=n: f.kind == wire.HELLO and f.sender == n)
        m = model.get("softmax")
        g = m.init(5)
        drv.publish_global(drv.global_frame(1, g))
        ups: dict[str, tuple[wire.Frame, bytes]] = {}
        for n in live:
            fr = drv.collect(is_update(n, 1))[0]
            assert fr.body["values"] == reference_delta(mesh["shards"][n], n, 1, g)
            ups[n] = (fr, drv.raw[id(fr)])
        honest = ups["node-01"][0].body["values"]
        fake = {"node-04": (23, [v + 3 for v in honest]),
                "node-05": (57, [v * -10 for v in honest])}  # a sign-flip-and-scale attacker
        for n in scripted:
            samples, vec = fake[n]
            raw = drv.peer_update(n, 1, samples, vec)
            ups[n] = (wire.decode(raw), raw)
        time.sleep(0.3)  # let every node's subscription deliver the scripted updates

        # Round 1 announced with Multi-Krum(f=1, m=3) over all five updates.
        ids = live + scripted
        vecs = [ups[n][0].body["values"] for n in ids]
        ref1 = audit.run("multi_krum", ids, vecs, {"f": 1, "m": 3})
        assert "node-05" not in ref1["selected"]
        acc1 = [(n, wire.sha256(ups[n][1])) for n in ids]
        g2 = q16.vadd(g, ref1["vector"])
        drv.publish_global(drv.global_frame(2, g2, rule="multi_krum", p1=1, p2=3,
                                            agg_digest=bytes.fromhex(ref1["digest"]),
                                            accepted=acc1))
        digests1 = drv.collect(lambda f: f.kind == wire.GOSSIP_DIGEST and f.round == 1, n=3)
        for f in digests1:
            assert f.body["digest"].hex() == ref1["digest"]
            assert (f.body["rule"], f.body["p1"], f.body["p2"], f.body["count"]) == (
                "multi_krum", 1, 3, 5)
        assert sorted(f.sender for f in digests1) == live

        # Round 2: FedAvg (weights = each update's sample count) over a subset that leaves
        # node-02's own update out.
        ups2 = {}
        for n in live:
            fr = drv.collect(is_update(n, 2))[0]
            assert fr.body["values"] == reference_delta(mesh["shards"][n], n, 2, g2)
            ups2[n] = (fr, drv.raw[id(fr)])
        raw = drv.peer_update("node-04", 2, 23, [v - 1 for v in ups2["node-01"][0].body["values"]])
        ups2["node-04"] = (wire.decode(raw), raw)
        time.sleep(0.3)
        ids2 = ["node-03", "node-01", "node-04"]
        ref2 = audit.run("fedavg", ids2, [ups2[n][0].body["values"] for n in ids2],
                         {"weights": [ups2[n][0].body["samples"] for n in ids2]})
        acc2 = [(n, wire.sha256(ups2[n][1])) for n in ids2]
        g3 = q16.vadd(g2, ref2["vector"])
        drv.publish_global(drv.global_frame(3, g3, rule="fedavg",
                                            agg_digest=bytes.fromhex(ref2["digest"]),
                                            accepted=acc2))
        digests2 = drv.collect(lambda f: f.kind == wire.GOSSIP_DIGEST and f.round == 2, n=3)
        assert {f.body["digest"].hex() for f in digests2} == {ref2["digest"]}

        # Round 3 ends the run, announcing an update no node ever saw: nobody can rebuild
        # the aggregate, so nobody publishes a digest; each says so in a STATUS instead.
        ups3 = {n: drv.collect(is_update(n, 3))[0] for n in live}
        acc3 = [(n, wire.sha256(drv.raw[id(ups3[n])])) for n in live] + [("node-05", bytes(32))]
        drv.publish_global(drv.global_frame(4, g3, rule="median", agg_digest=bytes(32),
                                            accepted=acc3, final=True))
        for n in live:
            assert procs[n].wait() == 0
            c = procs[n].wait_event("exit")["counters"]
            assert (c["digests"], c["digest_agree"], c["digest_disagree"]) == (2, 2, 0)
            assert c["missing_rounds"] == 1
            assert c["rejected"] == {}, procs[n].of("reject")
            assert "missing 3 1" in status_labels(drv, n) or _late_status(drv, n, "missing 3 1")
        assert not [f for f in drv.inbox if f.kind == wire.GOSSIP_DIGEST and f.round == 3]
        # No node trained past the final round.
        assert not [f for f in drv.inbox if f.kind == wire.MODEL_UPDATE and f.round > 3]
    finally:
        for q in procs.values():
            q.stop()
        drv.close()


FAKE_NETWORK = """
STA_IF = 0
class WLAN:
    polls = 0
    def __init__(self, i): pass
    def active(self, on): pass
    def config(self, **kw): self.pm = kw
    def isconnected(self):
        WLAN.polls += 1
        return WLAN.polls > %d
    def connect(self, ssid, pw): self.ssid = ssid
    def disconnect(self): pass
    def status(self): return -1
    def ifconfig(self): return ("10.0.0.2", "", "", "")
"""


@pytest.mark.parametrize("polls, expect", [(3, "True"), (10 ** 6, "False")])
def test_wifi_hal_connects_or_gives_up_in_time(micropython: str, tmp_path: Path, polls: int,
                                              expect: str) -> None:
    """hal/esp32 on the unix port with a stand-in `network` module: joins when the link comes
    up, and returns False (no hang) when it never does."""
    (tmp_path / "network.py").write_text(FAKE_NETWORK % polls)
    code = ("import time\nfrom hal import esp32\nlog = []\nt = time.ticks_ms()\n"
            "ok = esp32.connect({'ssid': 's', 'password': 'p'}, 400, log.append)\n"
            "print(ok, time.ticks_diff(time.ticks_ms(), t), len(log))\n"
            "print(esp32.connect(None, 400, log.append))\n")
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(tmp_path), str(ROOT / "shared"), str(FIRMWARE)])
    out = subprocess.run([micropython, "-c", code], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    first, second = out.stdout.split("\n")[:2]
    ok, ms, logged = first.split()
    assert ok == expect
    if expect == "False":
        assert 400 <= int(ms) < 3000 and logged == "1"  # gave up after the timeout, said why
    else:
        assert int(ms) < 1000
    assert second == "False"  # no Wi-Fi settings: refuses instead of hanging


TWO_GLOBALS_SCRIPT = NODE_PRELUDE + r"""
globals_ = []
for name in ("g1.bin", "g2.bin"):
    f = open(d + "/" + name, "rb"); globals_.append(f.read()); f.close()

t = T()
nd = nodemod.Node(bundle, cfg, shard, t, H(), lambda ev: None)
# Both globals arrive before step() runs, each read into the transport's receive buffer,
# which the next message overwrites: the first is decoded into the round buffers, the
# second into a list of its own (the buffers are taken), and neither depends on rx after.
took = []
for g in globals_:
    n = len(g)
    t.rx[:n] = g
    nd.on_message(nd.t_global, memoryview(t.rx)[:n])
    took.append([q[0].body["values"] is nd.rb.p for q in nd.globals])
t.rx[:] = bytes(len(t.rx))
nd.step()
updates = [t.frames[i] for i in range(len(t.sent)) if "/update/" in t.sent[i]]
print(json.dumps({"rx": len(t.rx), "took": took, "sent": updates, "train": nd.cfg.train,
                  "busy": nd.rb.busy, "rejected": nd.counters()["rejected"]}))
"""


def _two_globals(tmp_path: Path) -> tuple[list[int], list[int]]:
    """node-01's directory (_one_node_dir) and g1.bin, g2.bin: GLOBAL_MODELs of rounds 1 and 2
    signed by its coordinator; returns their values."""
    from microfed_host import keys

    mid, coord, n_params = _one_node_dir(tmp_path)
    g1 = [(i * 7919) % 4001 - 2000 for i in range(n_params)]
    g2 = [v + 300 for v in g1]
    for r, g in ((1, g1), (2, g2)):
        (tmp_path / f"g{r}.bin").write_bytes(
            wire.encode(wire.GLOBAL_MODEL, mid, wire.COORDINATOR, r, r, 0,
                        wire.encode_global_payload(g), keys.signer(coord)))
    return g1, g2


SHARED_RX_SCRIPT = NODE_PRELUDE + r"""
globals_ = []
for name in ("g1.bin", "g2.bin"):
    f = open(d + "/" + name, "rb"); globals_.append(f.read()); f.close()

class S(T):
    # A transport that shares its receive buffer, like mqtt.Transport: the node builds its
    # update frame in it, and rx_writes() says when a message has been read into it since.
    def use_rx_buffer(self, size):
        self.rx = bytearray(size)
        return self.rx
    def rx_writes(self):
        return self.writes
    def arrive(self, topic, msg):  # a message read into the buffer, as mqttc does
        self.writes += 1
        self.rx[:len(msg)] = msg
        nd.on_message(topic, memoryview(self.rx)[:len(msg)])
    def clobber(self):
        self.writes += 1
        self.rx[:] = bytes([0xA5]) * len(self.rx)

def hexof(b):
    return "".join(["%02x" % x for x in b])

t = S()
t.writes = 0
nd = nodemod.Node(bundle, cfg, shard, t, H(), lambda ev: None)
t.arrive(nd.t_global, globals_[0])
t.connected = False                       # the broker is away: the update waits in the outbox
nd.step()
built = hexof(nd.rb.frame)
queued = [type(it[1]).__name__ for it in nd.outbox]
t.clobber()                               # messages read into the buffer meanwhile
t.connected = True
nd.step()                                 # sent: built again
t.clobber()
nd.resend("test")                         # and again after a reconnect
rec = nd.last_update
t.arrive(nd.t_global, globals_[1])        # the next global takes the round buffers
outdated = nd.update_bytes(rec) is None
print(json.dumps({"shared": nd.rb.shared, "built": built, "queued": queued,
                  "sent": [t.frames[i] for i in range(len(t.sent)) if "/update/" in t.sent[i]],
                  "outdated": outdated, "rejected": nd.counters()["rejected"],
                  "train": nd.cfg.train}))
"""


def test_the_update_built_in_the_receive_buffer_is_sent_byte_for_byte(micropython: str,
                                                                       tmp_path: Path) -> None:
    # A node builds its update frame in the MQTT receive buffer (no 2.7 KB block of its
    # own). A message read into the buffer before the frame is sent, or before a resend,
    # makes the node build it again: the same bytes, the reference delta, a valid signature.
    # Once the next global is decoded into the round buffers, the old update is outdated.
    from microfed import noderound
    from microfed_host import keys

    g1, _g2 = _two_globals(tmp_path)
    res = _run_node_script(tmp_path, SHARED_RX_SCRIPT)
    assert res["shared"] is True and res["queued"] == ["tuple"]
    assert res["rejected"] == {} and res["outdated"] is True
    assert res["sent"] == [res["built"], res["built"]]
    fr = wire.decode(bytes.fromhex(res["built"]))
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert (fr.sender, fr.round) == ("node-01", 1)
    assert keys.check_signature(bytes.fromhex(bundle["public_key"]), fr.signing_digest(),
                                fr.signature)
    shard = model.Shard((tmp_path / "shard.bin").read_bytes())
    m = model.get("softmax", n_features=shard.d, n_classes=shard.k)
    assert fr.body["values"] == noderound.local_update(m, shard, res["train"], 1, "node-01",
                                                       list(g1))


def test_two_globals_before_a_step_train_from_their_own_values(micropython: str,
                                                               tmp_path: Path) -> None:
    from microfed import noderound
    from microfed_host import keys

    g1, g2 = _two_globals(tmp_path)
    res = _run_node_script(tmp_path, TWO_GLOBALS_SCRIPT)
    assert res["took"] == [[True], [True, False]] and res["busy"] is False
    assert res["rejected"] == {}
    bundle = json.loads((tmp_path / "bundle.json").read_text())
    assert res["rx"] >= len((tmp_path / "g2.bin").read_bytes())
    shard = model.Shard((tmp_path / "shard.bin").read_bytes())
    m = model.get("softmax", n_features=shard.d, n_classes=shard.k)
    assert len(res["sent"]) == 2
    for r, (g, sent) in enumerate(zip((g1, g2), res["sent"], strict=True), 1):
        fr = wire.decode(bytes.fromhex(sent))
        assert (fr.sender, fr.round) == ("node-01", r)
        assert keys.check_signature(bytes.fromhex(bundle["public_key"]), fr.signing_digest(),
                                    fr.signature)
        want = noderound.local_update(m, shard, res["train"], r, "node-01", list(g))
        assert fr.body["values"] == want, r
