"""The I/O-free Coordinator driven directly: a fake clock, an in-memory bus (microfed_host.inproc.Bus),
and frames signed with the provisioned node keys. Every rejection reason, the deadline close,
the HELLO gate, resume after a restart, pause during a broker outage, live revocation and
re-enrolment, counters that move only on acceptance, and a junk flood that leaves no trace
in the update table — each in milliseconds, no broker, no subprocess.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from microfed import wire
from microfed_host import keys, provision
from microfed_host.coordinator import Coordinator, CoordinatorConfig
from microfed_host.inproc import Bus
from microfed_host.rounds_store import RoundsStore

N_NODES = 5
DIM = 650  # softmax, 64 features x 10 classes + 10 biases


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Mesh:
    """A provisioned mesh, a coordinator on a fake clock and per-node frame factories."""

    def __init__(self, root: Path, **cfg: Any) -> None:
        self.root = root
        self.mesh_dir = root / "mesh"
        provision.init_mesh(self.mesh_dir, "test-mesh", N_NODES)
        self.ids = provision.node_ids(N_NODES)
        self.mesh_id = wire.mesh_id("test-mesh")
        self.seq: dict[str, int] = {n: 0 for n in self.ids}
        self.clock = Clock()
        self.bus = Bus()
        self.published: list[tuple[str, bytes]] = []
        self.events: list[dict[str, Any]] = []
        base = dict(mesh_dir=str(self.mesh_dir), rule="fedavg", f=0, rounds=3,
                    deadline_s=30.0, digest_grace_s=0.0)
        base.update(cfg)
        self.cfg = CoordinatorConfig(**base)
        self.coord = self.new_coordinator()

    def new_coordinator(self) -> Coordinator:
        self.store = RoundsStore(self.root / "coordinator.sqlite")
        c = Coordinator(self.cfg, self.store, self._publish, log=self.events.append,
                        clock=self.clock)
        return c

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.published.append((topic, payload))

    def signer(self, node: str) -> Any:
        return keys.signer(keys.read_private_key(self.mesh_dir / "nodes" / f"{node}.key"))

    def update(self, node: str, round_: int | None = None, values: list[int] | None = None,
               seq: int | None = None, samples: int = 10, kind: int = wire.MODEL_UPDATE,
               signer: Any = None) -> bytes:
        if seq is None:
            self.seq[node] += 1
            seq = self.seq[node]
        vals = values if values is not None else [(self.ids.index(node) + 1) * 3] * DIM
        payload = (wire.encode_model_update(samples, vals) if kind == wire.MODEL_UPDATE
                   else wire.encode_status(0, 0, 0, 0, "x"))
        r = self.coord.round if round_ is None else round_
        return wire.encode(kind, self.mesh_id, node, r, seq, int(self.clock()), payload,
                           signer or self.signer(node))

    def send(self, node: str, frame: bytes, sub: str = "update") -> None:
        self.coord.handle(f"microfed/test-mesh/{sub}/{node}", frame)

    def rejections(self) -> list[str]:
        return [e["reason"] for e in self.events if e["ev"] == "rejected"]

    def last_rejection(self) -> str:
        return self.rejections()[-1]


@pytest.fixture
def m(tmp_path: Path) -> Mesh:
    mesh = Mesh(tmp_path)
    mesh.coord.start()
    return mesh


def test_start_publishes_registry_and_round_one_global(m: Mesh) -> None:
    topics = [t for t, _ in m.published]
    assert topics == ["microfed/test-mesh/registry", "microfed/test-mesh/global"]
    fr = wire.decode(m.published[-1][1])
    assert fr.kind == wire.GLOBAL_MODEL and fr.round == 1


def test_quorum_closes_the_round_and_publishes_the_next_global(m: Mesh) -> None:
    for n in m.ids:
        m.send(n, m.update(n))
    assert m.coord.round == 2
    fr = wire.decode(m.published[-1][1])
    assert fr.round == 2 and fr.body["rule"] == "fedavg"
    assert [a[0] for a in fr.body["accepted"]] == m.ids
    assert m.rejections() == []


@pytest.mark.parametrize("case", [
    "junk", "truncated", "unregistered", "bad_signature", "replay", "counter_behind",
    "stale_round",
    "future_round", "wrong_kind", "bad_dim", "out_of_range", "topic_sender_mismatch",
    "equivocation", "duplicate", "not_expected", "revoked", "banned", "internal_error",
    "wrong_mesh", "wrong_role", "clock_skew", "oversize", "bad_seq", "bad_sender",
])
def test_every_rejection_reason(m: Mesh, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    n = m.ids[0]
    good = m.update(n)
    want = case
    if case == "junk":
        frame, want = b"\x00" * 200, "bad_magic"
    elif case == "truncated":
        frame = good[:50]
    elif case == "unregistered":
        frame = wire.encode(wire.MODEL_UPDATE, m.mesh_id, "node-99", 1, 1, int(m.clock()),
                            wire.encode_model_update(1, [0] * DIM),
                            keys.signer(keys.generate_seed()))
        n = "node-99"
    elif case == "bad_signature":
        frame = m.update(n, signer=keys.signer(keys.generate_seed()))
    elif case == "replay":
        # The bytes of an update accepted two rounds ago.
        m.send(n, good)
        for r in (1, 2):
            for o in m.ids:
                if o != n or r == 2:
                    m.send(o, m.update(o))
        assert m.coord.round == 3
        frame = good
    elif case == "counter_behind":
        m.send(n, good)
        frame = m.update(n, seq=1, values=[1] * DIM)  # new bytes, an old counter
    elif case == "stale_round":
        frame = m.update(n, round_=0)
    elif case == "future_round":
        frame = m.update(n, round_=2)
    elif case == "wrong_kind":
        frame = m.update(n, kind=wire.STATUS)
    elif case == "bad_dim":
        frame = m.update(n, values=[1] * (DIM - 1))
    elif case == "out_of_range":
        frame = m.update(n, values=[300 * 65536] * DIM)
    elif case == "topic_sender_mismatch":
        m.send(m.ids[1], good)
        assert m.last_rejection() == "topic_sender_mismatch"
        # Item 6: the rejected copy did not move the counter; the genuine one is accepted.
        m.send(n, good)
        assert n in m.coord.pending
        return
    elif case == "equivocation":
        m.send(n, good)
        frame = m.update(n, values=[7] * DIM)
    elif case == "duplicate":
        m.send(n, good)
        frame = good
    elif case == "not_expected":
        # A registered node that this run does not include (expected = the first four).
        m = Mesh(m.root / "second", expected=provision.node_ids(N_NODES)[:4])
        m.coord.start()
        n = m.ids[4]
        frame = m.update(n)
    elif case == "revoked":
        provision.revoke_node(m.mesh_dir, n)
        m.clock.t += 2
        m.coord.tick()
        frame = good
    elif case == "banned":
        monkeypatch.setattr(m.coord.book, "is_banned", lambda node: node == n)
        frame = good
    elif case == "wrong_mesh":
        frame = wire.encode(wire.MODEL_UPDATE, wire.mesh_id("other"), n, 1, 1, int(m.clock()),
                            wire.encode_model_update(1, [0] * DIM), m.signer(n))
    elif case == "wrong_role":
        frame = wire.encode(wire.MODEL_UPDATE, m.mesh_id, wire.COORDINATOR, 1, 1,
                            int(m.clock()), wire.encode_model_update(1, [0] * DIM), m.signer(n))
    elif case == "clock_skew":
        frame = wire.encode(wire.MODEL_UPDATE, m.mesh_id, n, 1, 1, int(m.clock()) - 3600,
                            wire.encode_model_update(1, [0] * DIM), m.signer(n))
    elif case == "oversize":
        frame = good + bytes(wire.MAX_FRAME)
    elif case == "bad_seq":
        frame = good[:16] + bytes(8) + good[24:]  # seq field (offset 16, u64) = 0
    elif case == "bad_sender":
        i = wire.HDR_FIXED
        frame = good[:i] + b"/" + good[i + 1:]
    elif case == "internal_error":
        def boom(*a: Any) -> None:
            raise RuntimeError("disk on fire")
        monkeypatch.setattr(m.store, "accept_update", boom)
        frame = good
    before = m.store.counters()
    m.send(n, frame)
    assert m.last_rejection() == want
    assert m.coord.rejected.get(want, 0) >= 1
    if case not in ("replay", "counter_behind", "equivocation", "duplicate"):
        # A rejected frame never moves a counter (item 6), whatever the reason.
        assert m.store.counters() == before
    if case in ("banned", "internal_error", "revoked", "bad_signature"):
        assert n not in m.coord.pending


def test_rejected_copy_then_genuine_frame_is_accepted_for_every_post_signature_reason(
        m: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    n = m.ids[2]
    good = m.update(n)
    banned = {"on": True}
    monkeypatch.setattr(m.coord.book, "is_banned", lambda node: banned["on"] and node == n)
    m.send(n, good)
    assert m.last_rejection() == "banned"
    banned["on"] = False
    m.send(n, good)
    assert n in m.coord.pending


def test_digest_topic_mismatch_does_not_consume_the_counter(tmp_path: Path) -> None:
    m = Mesh(tmp_path, mode="gossip")
    m.coord.start()
    for n in m.ids:
        m.send(n, m.update(n))
    assert m.coord.round == 2
    agg = bytes.fromhex(m.store.round_row(1)["agg_digest"])  # type: ignore[index]
    n = m.ids[3]
    m.seq[n] += 1
    d = wire.encode(wire.GOSSIP_DIGEST, m.mesh_id, n, 1, m.seq[n], int(m.clock()),
                    wire.encode_gossip_digest(agg, "fedavg", 0, 0, 5), m.signer(n))
    m.send(m.ids[0], d, sub="digest")
    assert m.last_rejection() == "topic_sender_mismatch"
    m.send(n, d, sub="digest")
    assert [e for e in m.events if e["ev"] == "digest"][-1] == {
        "ev": "digest", "round": 1, "node": n, "agree": True, "t": m.clock.t}


def test_retained_publisher_keeps_what_the_broker_did_not_take() -> None:
    from microfed_host.coordinator import RetainedPublisher
    from microfed_host.mqtt import MQTTError

    class Info:
        def __init__(self, acked: bool) -> None:
            self.acked = acked

        def is_published(self) -> bool:
            return self.acked

    class FakeClient:
        connected = False
        acks = True
        sent: list[tuple[str, bytes]] = []

        def publish_nowait(self, topic: str, payload: bytes, qos: int,
                           retain: bool) -> Info:
            if not self.connected:
                raise MQTTError("not connected")
            assert qos == 1
            self.sent.append((topic, payload))
            return Info(self.acks)

    cli = FakeClient()
    logs: list[dict[str, Any]] = []
    pub = RetainedPublisher(cli, logs.append, resend_s=0.0)
    pub.publish("g", b"1", True)
    pub.publish("g", b"2", True)  # only the latest matters
    pub.publish("r", b"reg", True)
    assert cli.sent == [] and pub.pending == {"g", "r"}
    cli.connected = True
    pub.flush()  # sent, not yet known to be acknowledged
    assert cli.sent == [("g", b"2"), ("r", b"reg")]
    pub.flush()  # acknowledged: nothing pending
    assert pub.pending == set() and len(cli.sent) == 2
    pub.republish_all()  # a reconnect: the broker may have lost both
    cli.acks = False
    pub.flush()
    pub.flush()  # not acknowledged: sent again (resend_s = 0)
    assert cli.sent[2:] == [("g", b"2"), ("r", b"reg")] * 2
    assert pub.pending == {"g", "r"}
    assert any(e["ev"] == "publish_pending" for e in logs)


def test_deadline_closes_with_what_arrived_and_waits_below_the_minimum(tmp_path: Path) -> None:
    m = Mesh(tmp_path, rule="krum", f=1)  # needs 2f + 3 = 5 updates
    m.coord.start()
    for n in m.ids[:4]:
        m.send(n, m.update(n))
    m.clock.t += 31
    m.coord.tick()
    assert m.coord.round == 1
    assert m.events[-1]["ev"] == "waiting" and m.events[-1]["need"] == 5
    m.send(m.ids[4], m.update(m.ids[4]))
    assert m.coord.round == 2  # quorum: all five
    m2 = Mesh(tmp_path / "b", rule="fedavg")
    m2.coord.start()
    for n in m2.ids[:3]:
        m2.send(n, m2.update(n))
    m2.clock.t += 29
    m2.coord.tick()
    assert m2.coord.round == 1
    m2.clock.t += 2
    m2.coord.tick()
    assert m2.coord.round == 2
    closed = [e for e in m2.events if e["ev"] == "round"][0]
    assert closed["close_reason"] == "deadline" and closed["accepted"] == m2.ids[:3]


def test_hello_gate_opens_when_every_node_said_hello(tmp_path: Path) -> None:
    m = Mesh(tmp_path, wait_hello_s=60.0)
    m.coord.start()
    assert [t for t, _ in m.published] == ["microfed/test-mesh/registry"]
    for n in m.ids:
        m.send(n, m.update(n, kind=wire.HELLO, round_=0), sub="hello")
    assert m.published[-1][0] == "microfed/test-mesh/global"
    assert m.coord.gate_open


def test_pause_stops_the_deadline_and_resume_shifts_it(m: Mesh) -> None:
    m.send(m.ids[0], m.update(m.ids[0]))
    m.coord.pause()
    m.clock.t += 1000  # an outage far longer than the deadline
    m.coord.tick()
    assert m.coord.round == 1
    m.coord.resume()
    m.coord.tick()
    assert m.coord.round == 1  # the 30 s deadline still has 30 s to run
    for n in m.ids[1:]:
        m.send(n, m.update(n))
    assert m.coord.round == 2
    assert [e["close_reason"] for e in m.events if e["ev"] == "round"] == ["quorum"]


def test_restart_resumes_the_round_and_reaches_the_same_digest(tmp_path: Path) -> None:
    def run(root: Path, kill_after: int | None) -> str:
        m = Mesh(root)
        m.coord.start()
        frames = {}
        for r in (1, 2, 3):
            for i, n in enumerate(m.ids):
                frames[(r, n)] = m.update(n, round_=r, values=[r * 100 + i] * DIM)
        for r in (1, 2, 3):
            for i, n in enumerate(m.ids):
                if kill_after is not None and r == 2 and i == kill_after:
                    m.store.close()
                    m.coord = m.new_coordinator()  # same SQLite file: a restart
                    m.coord.start()
                    assert sorted(m.coord.pending) == m.ids[:kill_after]
                m.send(n, frames[(r, n)])
        done = [e for e in m.events if e["ev"] == "done"]
        assert done, m.events[-3:]
        return str(done[-1]["final_digest"])

    # Same keys are needed for the same digest: the digest covers values, not signatures,
    # and values depend only on (round, node index).
    assert run(tmp_path / "a", None) == run(tmp_path / "b", 2)


def test_live_revocation_takes_effect_within_a_second(m: Mesh) -> None:
    victim = m.ids[4]
    m.send(victim, m.update(victim))
    assert victim in m.coord.pending
    reg = provision.revoke_node(m.mesh_dir, victim)
    m.clock.t += 1.5
    m.coord.tick()
    ev = [e for e in m.events if e["ev"] == "registry"][-1]
    assert ev["version"] == reg.version and ev["revoked"] == [victim]
    assert ev["dropped_pending"] == [victim]
    # The new signed registry is re-published (retained) for the nodes.
    topic, frame = m.published[-1]
    assert topic == "microfed/test-mesh/registry"
    assert wire.decode(frame).body["version"] == reg.version
    m.send(victim, m.update(victim))
    assert m.last_rejection() == "revoked"
    # The round no longer waits for the revoked node.
    for n in m.ids[:4]:
        m.send(n, m.update(n))
    assert m.coord.round == 2
    # And a restart of the same run directory after the revocation works.
    m.store.close()
    m.coord = m.new_coordinator()
    m.coord.start()
    assert m.coord.round == 2 and victim not in m.coord.expected_now()


def test_reenrolled_node_rejoins_with_a_new_counter_epoch(m: Mesh) -> None:
    n = m.ids[1]
    for _ in range(40):  # its old counter is far ahead
        m.seq[n] += 1
    m.send(n, m.update(n))
    assert n in m.coord.pending
    for other in m.ids:
        if other != n:
            m.send(other, m.update(other))
    assert m.coord.round == 2
    # The device is wiped: its counter file is gone, it counts from 1 again. Without
    # re-enrolment its frames are rejected: new bytes with an old counter.
    m.seq[n] = 0
    m.send(n, m.update(n))
    assert m.last_rejection() == "counter_behind"
    provision.reenrol_node(m.mesh_dir, n)
    m.clock.t += 1.5
    m.coord.tick()
    ev = [e for e in m.events if e["ev"] == "registry"][-1]
    assert ev["reenrolled"] == [n]
    m.seq[n] = 0
    m.send(n, m.update(n))  # new key, counter 1
    assert n in m.coord.pending
    # The old key is dead: a frame signed with it is rejected.
    old = m.update(n, seq=10_000, signer=keys.signer(hashlib.sha256(b"x").digest()))
    m.send(n, old)
    assert m.last_rejection() == "bad_signature"


def test_a_junk_flood_is_counted_in_memory_and_leaves_no_update_rows(m: Mesh) -> None:
    for i in range(5000):
        m.send(m.ids[i % N_NODES], b"junk-%d" % i)
    assert m.coord.rejected["truncated"] == 5000
    assert m.store.pending_rejections == 5000 % m.store.flush_every
    m.store.flush()
    assert m.store.rejection_counts()["truncated"] == 5000
    assert m.store.db.execute("SELECT COUNT(*) FROM updates").fetchone()[0] == 0
    # An honest round still closes normally in the middle of it.
    for n in m.ids:
        m.send(n, m.update(n))
    assert m.coord.round == 2


def test_rejection_history_is_bounded(tmp_path: Path) -> None:
    st = RoundsStore(tmp_path / "s.sqlite", max_events=100, max_groups=10, flush_every=50)
    for i in range(1000):
        st.record_rejection("bad_signature", "m", 10, "%064x" % i, f"node-{i % 30}", 1, i % 7, i)
    st.flush()
    assert st.db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 100
    assert st.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 10
    assert st.rejection_counts() == {"bad_signature": 1000}


def test_a_node_that_lost_its_counter_is_told_to_skip_ahead(m: Mesh) -> None:
    n = m.ids[3]
    m.seq[n] = 500
    accepted = m.update(n)
    m.send(n, accepted)
    for other in m.ids:
        if other != n:
            m.send(other, m.update(other))
    assert m.coord.round == 2
    m.seq[n] = 0  # wiped: counts from 1 again, new bytes
    m.send(n, m.update(n))
    assert m.last_rejection() == "counter_behind"
    assert m.store.rejection_counts()["counter_behind"] == 1
    topic, frame = m.published[-1]
    assert topic == f"microfed/test-mesh/notice/{n}"
    fr = wire.decode(frame)
    assert fr.sender == wire.COORDINATOR and fr.kind == wire.STATUS
    assert keys.check_signature(keys.read_public_key(m.mesh_dir / "coordinator.pub"),
                                fr.signing_digest(), fr.signature)
    assert wire.counter_notice_seq(fr.body) == 501
    # One notice per node and round, however many stale frames arrive.
    m.send(n, m.update(n))
    assert sum(1 for t, _ in m.published if t.endswith("/notice/" + n)) == 1
    # The node skips past 501: its next frame is accepted.
    m.seq[n] = 501
    m.send(n, m.update(n))
    assert n in m.coord.pending
    # A byte copy of what the coordinator accepted is never taken for a lost counter.
    for other in m.ids:
        if other != n:
            m.send(other, m.update(other))
    assert m.coord.round == 3
    m.send(n, accepted)
    assert m.last_rejection() == "replay"


def test_counter_notice_codec() -> None:
    body = wire.decode_payload(wire.STATUS, wire.encode_counter_notice(3, 2**63 - 1))
    assert wire.counter_notice_seq(body) == 2**63 - 1
    assert wire.counter_notice_seq({"state": wire.NOTICE_BEHIND, "label": "behind 12x"}) is None
    assert wire.counter_notice_seq({"state": 0, "label": "behind 12"}) is None
    with pytest.raises(wire.WireError):
        wire.encode_counter_notice(1, 2**63)


def test_scheduled_revocation_applies_exactly_after_its_round(tmp_path: Path) -> None:
    m = Mesh(tmp_path, revoke_at={"node-05": 1})
    m.coord.start()
    for n in m.ids:
        m.send(n, m.update(n))
    assert m.coord.round == 2
    ev = [e for e in m.events if e["ev"] == "registry"][-1]
    assert ev["revoked"] == ["node-05"] and ev["version"] == 2
    # Published before any update of round 2 is handled: registry after global.
    assert [t.rsplit("/", 1)[-1] for t, _ in m.published[-2:]] == ["global", "registry"]
    m.send("node-05", m.update("node-05"))
    assert m.last_rejection() == "revoked"
    for n in m.ids[:4]:
        m.send(n, m.update(n))
    assert m.coord.round == 3
    # Idempotent across a restart: nothing is revoked twice.
    m.store.close()
    m.coord = m.new_coordinator()
    m.coord.start()
    assert [e for e in m.events if e["ev"] == "registry_error"] == []


def test_round_min_s_paces_rounds(tmp_path: Path) -> None:
    m = Mesh(tmp_path, round_min_s=5.0)
    m.coord.start()
    for n in m.ids:
        m.send(n, m.update(n))
    assert m.coord.round == 1  # every update is in, but the round is not 5 s old
    m.clock.t += 4.9
    m.coord.tick()
    assert m.coord.round == 1
    m.clock.t += 0.2
    m.coord.tick()
    assert m.coord.round == 2
    assert [e["close_reason"] for e in m.events if e["ev"] == "round"] == ["quorum"]
