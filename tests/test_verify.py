"""The verification pipeline: every rejection the issue lists, each asserting the reason code
AND that stored state (SQLite counters on the coordinator, the counter file on a node) did not
change; replay across a coordinator restart and a node reboot (also as two real MicroPython
processes); the timestamp rules for clockless nodes; and a fuzz of decode+verify."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microfed import replay, verify, wire
from microfed.verify import Limits, Rejected
from microfed.wire import WireError
from microfed_host import keys, upy
from microfed_host.store import Store
from microfed_host.verifier import HostVerifier

MESH = wire.mesh_id("demo")
NOW = 1_750_000_000


def seed(label: str) -> bytes:
    return hashlib.sha256(b"microfed-test:" + label.encode()).digest()


PUB = {n: keys.public_key(seed(n)) for n in ("coordinator", "node-01", "node-02", "node-03", "node-99")}


def registry() -> verify.Registry:
    return verify.Registry(MESH, PUB["coordinator"], [
        ("node-01", PUB["node-01"], True),
        ("node-02", PUB["node-02"], True),
        ("node-03", PUB["node-03"], False),  # revoked
    ], version=2)


def frame(sender: str = "node-01", seq: int = 1, round_: int = 3, ts: int = 0,
          kind: int = wire.MODEL_UPDATE, payload: bytes | None = None, key: str | None = None,
          mesh: bytes = MESH) -> bytes:
    if payload is None:
        payload = (wire.encode_global_model([1, 2, 3]) if kind == wire.GLOBAL_MODEL
                   else wire.encode_model_update(10, [65536, -65536, 7]))
    return wire.encode(kind, mesh, sender, round_, seq, ts, payload, keys.signer(seed(key or sender)))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordinator.db"


@pytest.fixture
def hv(db: Path) -> Iterator[HostVerifier]:
    store = Store(db)
    yield HostVerifier(registry(), store, limits=Limits(dim=3, max_abs=4 * 65536))
    store.close()


def reject(v: HostVerifier, data: object, **kw: int) -> str:
    """Verify `data`, expecting a rejection; check that no counter moved and the rejection was
    logged with its reason; return the reason."""
    before = v.store.counters()
    events = len(v.store.events(10**6))
    counts = v.store.rejection_counts()
    with pytest.raises(Rejected) as ei:
        v.verify(data, now=kw.pop("now", NOW), **kw)  # type: ignore[arg-type]
    r = ei.value.reason
    assert r in verify.REASONS
    assert v.store.counters() == before, "a rejected frame changed the replay counters"
    assert len(v.store.events(10**6)) == events + 1
    assert v.store.events(1)[0]["reason"] == r
    assert v.store.rejection_counts().get(r, 0) == counts.get(r, 0) + 1
    return r


def test_accepts_and_commits(hv: HostVerifier) -> None:
    fr = hv.verify(frame(seq=5), now=NOW)
    assert fr.body["values"] == [65536, -65536, 7]
    assert hv.store.counters() == {("node-01", wire.MODEL_UPDATE): 5}
    assert hv.stats["accepted"] == 1


def test_forged_signature(hv: HostVerifier) -> None:
    raw = bytearray(frame())
    raw[-1] ^= 0x40
    assert reject(hv, bytes(raw)) == "bad_signature"
    raw = bytearray(frame())
    raw[60] ^= 1  # a payload bit: the signature covers SHA-256(payload)
    assert reject(hv, bytes(raw)) == "bad_signature"
    assert hv.stats["bad_signature"] == 2


def test_unregistered_sender(hv: HostVerifier) -> None:
    assert reject(hv, frame(sender="node-99")) == "unregistered"


def test_revoked_sender(hv: HostVerifier) -> None:
    assert reject(hv, frame(sender="node-03")) == "revoked"


def test_registered_sender_resigned_by_another_key(hv: HostVerifier) -> None:
    assert reject(hv, frame(sender="node-01", key="node-02")) == "bad_signature"
    assert reject(hv, frame(sender="node-01", key="node-99")) == "bad_signature"


def test_key_carried_in_message_is_never_used(hv: HostVerifier) -> None:
    # An attacker's registry frame, signed by the attacker and naming the attacker as
    # coordinator, does not verify against the pinned coordinator key.
    fake = verify.Registry(MESH, PUB["node-99"], [("node-99", PUB["node-99"], True)], 9)
    raw = wire.encode(wire.REGISTRY, MESH, "coordinator", 0, 9, 0, fake.payload(),
                      keys.signer(seed("node-99")))
    with pytest.raises(Rejected) as ei:
        verify.load_registry_frame(raw, MESH, PUB["coordinator"], keys.check_signature)
    assert ei.value.reason == "bad_signature"


def test_a_registry_loaded_for_one_node_holds_that_node_alone() -> None:
    # A node that checks no peer's frame keeps its own entry only (firmware/node.py).
    reg = verify.Registry(MESH, PUB["coordinator"],
                          [(n, PUB[n], n != "node-03") for n in ("node-01", "node-02", "node-03")], 4)
    raw = wire.encode(wire.REGISTRY, MESH, "coordinator", 0, 4, 0, reg.payload(),
                      keys.signer(seed("coordinator")))
    whole = verify.load_registry_frame(raw, MESH, PUB["coordinator"], keys.check_signature)
    mine = verify.load_registry_frame(raw, MESH, PUB["coordinator"], keys.check_signature, 0,
                                      "node-02")
    assert sorted(whole.nodes) == ["node-01", "node-02", "node-03"]
    assert mine.nodes == {"node-02": (PUB["node-02"], True)}
    assert mine.version == 4 and mine.lookup("node-01") is None
    assert mine.lookup("coordinator") == (PUB["coordinator"], True)


def test_replay_same_counter(hv: HostVerifier) -> None:
    raw = frame(seq=4)
    hv.verify(raw, now=NOW)
    assert reject(hv, raw) == "replay"


def test_replay_older_counter(hv: HostVerifier) -> None:
    hv.verify(frame(seq=9), now=NOW)
    assert reject(hv, frame(seq=8)) == "replay"
    assert hv.store.last("node-01", wire.MODEL_UPDATE) == 9


def test_counters_are_per_kind(hv: HostVerifier) -> None:
    # One sender counter for all kinds; receivers track kinds separately (docs/security.md).
    hv.verify(frame(seq=10), now=NOW)
    hello = frame(seq=7, kind=wire.HELLO, payload=wire.encode_status(label="x"))
    assert hv.verify(hello, now=NOW).kind == wire.HELLO


def test_replay_after_coordinator_restart(db: Path) -> None:
    s1 = Store(db)
    HostVerifier(registry(), s1).verify(frame(seq=12), now=NOW)
    s1.close()
    s2 = Store(db)  # a restarted coordinator: new objects, same file
    v2 = HostVerifier(registry(), s2)
    assert s2.last("node-01", wire.MODEL_UPDATE) == 12
    assert reject(v2, frame(seq=12)) == "replay"
    assert reject(v2, frame(seq=11)) == "replay"
    v2.verify(frame(seq=13), now=NOW)
    s2.close()
    s3 = Store(db)
    assert s3.counters() == {("node-01", wire.MODEL_UPDATE): 13}
    assert s3.rejection_counts() == {"replay": 2}
    s3.close()


def _node_verifier(path: Path) -> verify.Verifier:
    return verify.Verifier(MESH, registry(), replay.FileStore(str(path)), keys.check_signature,
                           kinds=(wire.GLOBAL_MODEL, wire.MODEL_UPDATE))


def test_replay_after_node_reboot(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    g = frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=3)
    _node_verifier(path).verify(g)
    saved = path.read_bytes()
    rebooted = _node_verifier(path)  # re-reads the counter file
    with pytest.raises(Rejected) as ei:
        rebooted.verify(g)
    assert ei.value.reason == "replay"
    assert path.read_bytes() == saved
    assert not (tmp_path / "counters.new").exists()
    with pytest.raises(Rejected) as ei:
        rebooted.verify(frame(sender="node-01", key="node-02", seq=50))
    assert ei.value.reason == "bad_signature"
    assert path.read_bytes() == saved
    assert rebooted.stats["replay"] == 1 and rebooted.stats["bad_signature"] == 1


def test_node_counter_file_torn_or_edited_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "counters"
    _node_verifier(path).verify(frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=3))
    text = path.read_bytes().replace(b" 3\n", b" 1\n")  # roll the counter back by hand
    path.write_bytes(text)
    with pytest.raises(replay.StoreError):
        _node_verifier(path)


def test_node_counter_file_rename_never_happened(tmp_path: Path) -> None:
    # Power cut after the old file was removed but before the rename: only .new remains.
    path = tmp_path / "counters"
    _node_verifier(path).verify(frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=3))
    path.rename(tmp_path / "counters.new")
    v = _node_verifier(path)
    with pytest.raises(Rejected) as ei:
        v.verify(frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=3))
    assert ei.value.reason == "replay"


def test_sequence_source_never_repeats_across_reboots(tmp_path: Path) -> None:
    path = str(tmp_path / "seq")
    a = replay.SequenceSource(path, block=4)
    first = [a.next() for _ in range(6)]
    b = replay.SequenceSource(path, block=4)  # reboot
    second = [b.next() for _ in range(3)]
    assert first == [1, 2, 3, 4, 5, 6]
    assert min(second) > max(first)
    assert second == sorted(set(second))


def test_wrong_mesh(hv: HostVerifier) -> None:
    assert reject(hv, frame(mesh=wire.mesh_id("other"))) == "wrong_mesh"


def test_wrong_round(hv: HostVerifier) -> None:
    assert reject(hv, frame(round_=2), min_round=3, max_round=3) == "stale_round"
    assert reject(hv, frame(round_=4), min_round=3, max_round=3) == "future_round"
    hv.verify(frame(round_=3), now=NOW, min_round=3, max_round=3)


def test_truncated_frames(hv: HostVerifier) -> None:
    raw = frame()
    for cut in (0, 1, 36, 37, 50, len(raw) - 64, len(raw) - 1):
        assert reject(hv, raw[:cut]) == "truncated"


def test_oversized_frame_rejected_before_anything(db: Path) -> None:
    calls: list[int] = []

    def spy(pub: bytes, msg: bytes, sig: bytes) -> bool:
        calls.append(1)
        return keys.check_signature(pub, msg, sig)

    store = Store(db)
    v = HostVerifier(registry(), store, max_frame=512, check_sig=spy)
    # A perfectly signed frame, just too big: rejected on size alone.
    big = frame(payload=wire.encode_model_update(1, list(range(200))))
    assert len(big) > 512
    assert reject(v, big) == "oversize"
    assert reject(v, b"\xff" * 10**6) == "oversize"  # garbage: "oversize", not "bad_magic"
    ev = store.events(1)[0]
    assert ev["size"] == 10**6 and ev["frame_sha256"] is None  # logged by size, never hashed
    assert calls == []
    store.close()


def test_lying_length_field(hv: HostVerifier) -> None:
    raw = frame()
    plen = struct.unpack_from("<I", raw, 32)[0]

    def lie(v: int) -> bytes:
        return raw[:32] + struct.pack("<I", v) + raw[36:]

    assert reject(hv, lie(plen + 8)) == "truncated"
    assert reject(hv, lie(plen - 4)) == "bad_length"
    assert reject(hv, lie(0xFFFFFFFF)) == "bad_length"
    dim_lie = raw[:48] + struct.pack("<I", 1000) + raw[52:]
    assert reject(hv, dim_lie) == "bad_payload"


def test_value_range(hv: HostVerifier) -> None:
    assert reject(hv, frame(payload=wire.encode_model_update(10, [5 * 65536, 0, 0]))) == "out_of_range"
    assert reject(hv, frame(payload=wire.encode_model_update(0, [0, 0, 0]))) == "out_of_range"
    assert reject(hv, frame(payload=wire.encode_model_update(1, [0, 0]))) == "bad_dim"


def test_global_model_digest_must_match(hv: HostVerifier) -> None:
    good = wire.encode_global_model([1, 2, 3])
    bad = wire.sha256(b"x") + good[32:]
    g = frame(sender="coordinator", kind=wire.GLOBAL_MODEL, payload=bad)
    assert reject(hv, g) == "bad_digest"


def test_roles(hv: HostVerifier) -> None:
    assert reject(hv, frame(kind=wire.GLOBAL_MODEL)) == "wrong_role"
    assert reject(hv, frame(sender="coordinator")) == "wrong_role"


def test_clock_rules(hv: HostVerifier) -> None:
    assert reject(hv, frame(ts=NOW - 301)) == "clock_skew"
    assert reject(hv, frame(ts=NOW + 61)) == "clock_skew"
    assert reject(hv, frame(ts=-(2**63))) == "clock_skew"  # signed extremes: no overflow
    hv.verify(frame(ts=NOW - 300, seq=1), now=NOW)
    hv.verify(frame(ts=0, seq=2), now=NOW)            # sender has no clock
    hv.verify(frame(ts=NOW - 10**6, seq=3), now=0)    # receiver has no clock
    assert reject(hv, frame(ts=0, seq=3)) == "replay"  # ... counters still hold


def test_wall_clock_reads_unix_time_or_zero() -> None:
    import time

    t = replay.wall_clock()
    assert abs(t - time.time()) < 5  # a host clock is set: Unix seconds, not 0


def test_store_write_failure_accepts_nothing(tmp_path: Path) -> None:
    # A node whose flash cannot take the counter must not accept the frame.
    path = tmp_path / "counters"
    v = _node_verifier(path)
    (tmp_path / "counters.new").mkdir()  # makes the atomic write fail
    g = frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=3)
    with pytest.raises(OSError):
        v.verify(g)
    assert v.guard.store.last("coordinator", wire.GLOBAL_MODEL) == 0
    assert v.stats["accepted"] == 0 and not path.exists()


def test_rejected_registry_change_does_not_alter_verifier(hv: HostVerifier) -> None:
    with pytest.raises(ValueError):
        hv.registry = verify.Registry(wire.mesh_id("other"), PUB["coordinator"], [])
    assert hv.registry.lookup("node-01") == (PUB["node-01"], True)


MP_NODE = r"""
import sys
from microfed import wire, verify, replay, ed25519
mesh = bytes.fromhex(sys.argv[1]); coord = bytes.fromhex(sys.argv[2])
f = open(sys.argv[3], "rb"); raw = f.read(); f.close()
path = sys.argv[4]
reg = verify.Registry(mesh, coord, [])
v = verify.Verifier(mesh, reg, replay.FileStore(path), ed25519.verify, kinds=(wire.GLOBAL_MODEL,))
try:
    fr = v.verify(raw)
    print("accepted", fr.seq, fr.body["values"])
except wire.WireError as e:
    print("rejected", e.reason)
"""


def test_node_reboot_under_micropython(micropython: str, tmp_path: Path) -> None:
    try:
        upy.run(["-c", "from microfed import ed25519"])
    except upy.MicroPythonError:
        pytest.skip("shared/microfed/ed25519.py not present: MicroPython node test skipped")
    script = tmp_path / "node.py"
    script.write_text(MP_NODE)
    counters = tmp_path / "counters"
    g = frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=21)
    # The frame goes through a file: this micropython build aborts on an argv of >= 256 bytes.
    fpath = tmp_path / "frame.bin"
    fpath.write_bytes(g)
    args = [str(script), MESH.hex(), PUB["coordinator"].hex(), str(fpath), str(counters)]
    assert upy.run(args).split() == ["accepted", "21", "[1,", "2,", "3]"]
    saved = counters.read_bytes()
    # Second process = the node after a reboot: it re-reads the counter file.
    assert upy.run(args).split() == ["rejected", "replay"]
    assert counters.read_bytes() == saved
    forged = bytearray(frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=22))
    forged[-5] ^= 1
    fpath.write_bytes(bytes(forged))
    assert upy.run(args).split() == ["rejected", "bad_signature"]
    assert counters.read_bytes() == saved
    # The file the device wrote is the one CPython reads: same format on both.
    assert replay.FileStore(str(counters)).last("coordinator", wire.GLOBAL_MODEL) == 21


# ------------------------------------------------------------------ fuzz

VALID = [frame(seq=s) for s in (1, 2)] + [
    frame(sender="coordinator", kind=wire.GLOBAL_MODEL, seq=1),
    frame(sender="node-02", kind=wire.GOSSIP_DIGEST, seq=1,
          payload=wire.encode_gossip_digest(bytes(32), "krum", 1, 0, 5)),
    frame(sender="node-02", kind=wire.STATUS, seq=2, payload=wire.encode_status(1, 2, 3, 4, "ok")),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    b = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        op = draw(st.integers(0, 3))
        if op == 0:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del b[i:i + draw(st.integers(1, 80))]
        elif op == 2:
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
        else:
            b[i] = draw(st.integers(0, 255))
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated(), st.binary(max_size=200)))
def test_fuzz_verify_raises_only_rejections(data: bytes) -> None:
    store = replay.MemoryStore()
    v = verify.Verifier(MESH, registry(), store, keys.check_signature)
    try:
        v.verify(data, now=NOW)
    except Rejected as e:
        assert e.reason in verify.REASONS
        assert store.counters == {}, "a rejected frame touched the store"
        assert v.stats[e.reason] == 1
        return
    except WireError as e:  # pragma: no cover - would be a pipeline bug
        raise AssertionError(f"raw WireError escaped the verifier: {e.reason}") from e
    # Anything that survives mutation must be byte-identical to a frame we signed.
    assert data in VALID
    assert len(store.counters) == 1


def test_json_reason_list_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    missing = [r for r in verify.REASONS if f"`{r}`" not in doc]
    assert not missing, missing
    assert json.dumps(verify.REASONS)


def _list_rule(vals: list[int], m: int) -> tuple[str, str] | None:
    for i, v in enumerate(vals):
        if v > m or v < -m:
            return ("out_of_range", "value[%d] = %d outside +-%d" % (i, v, m))
    return None


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(1, 2**31 - 1), st.just(2**24)),
       st.lists(st.one_of(st.integers(-(2**31), 2**31 - 1),
                          st.sampled_from([0, 1, -1, 2**24, -(2**24), 2**24 + 1, -(2**24) - 1,
                                           2**31 - 1, -(2**31)])), min_size=1, max_size=80))
def test_the_packed_range_check_is_the_list_rule(m: int, vals: list[int]) -> None:
    """Step 8 on a vector left packed (the device's path: the top byte first, a value
    assembled only when that byte leaves doubt) gives step 8's answer on the unpacked list,
    reason and message."""
    p = memoryview(b"xyz" + struct.pack("<%di" % len(vals), *vals))
    assert verify._packed_out_of_range(p, 3, len(vals), m) == _list_rule(vals, m)
