"""microfed.noderound, the round every engine runs: how peers' updates are trusted ("announce"
vs "signature"), what contention does to a forged copy, slot accounting, the announced
aggregate's digest (RAM and file vector stores) against microfed.audit, and the global
model's checks."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from microfed import audit, gossip, noderound, verify, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Rejected
from microfed_host import keys

MESH = wire.mesh_id("demo")
IDS = ["node-%02d" % i for i in range(1, 8)]
D = 70


def seed(label: str) -> bytes:
    return hashlib.sha256(b"microfed-test:" + label.encode()).digest()


def registry() -> verify.Registry:
    return verify.Registry(MESH, keys.public_key(seed("coordinator")),
                           [(n, keys.public_key(seed(n)), True) for n in IDS], version=1)


def vec(i: int, salt: int = 0) -> list[int]:
    rng = random.Random(i * 1000 + salt)
    return [rng.randint(-90000, 90000) for _ in range(D)]


def update(sender: str, round_: int = 3, seq: int = 1, values: list[int] | None = None,
           key: str | None = None, samples: int = 10) -> bytes:
    payload = wire.encode_model_update(samples, values if values is not None else vec(IDS.index(sender)))
    return wire.encode(wire.MODEL_UPDATE, MESH, sender, round_, seq, 0, payload,
                       keys.signer(seed(key or sender)))


def peers(tmp_path: Path | None = None, check: str = "announce", slots: int = 16,
          per_sender: int = 1) -> gossip.Peers:
    store = (gossip.FileVectors(str(tmp_path), D) if tmp_path is not None
             else gossip.RamVectors(D))
    return gossip.Peers(MESH, registry(), D, 1 << 24, keys.check_signature, store, slots,
                        per_sender, check)


def announce(frames: list[bytes], rule: str = "krum", p1: int = 1, p2: int = 0) -> dict:
    acc = [(wire.decode(f).sender, hashlib.sha256(f).digest()) for f in frames]
    return {"rule": rule, "p1": p1, "p2": p2, "accepted": acc}


def reference(frames: list[bytes], body: dict) -> bytes:
    decoded = [wire.decode(f) for f in frames]
    res = audit.run(body["rule"], [f.sender for f in decoded], [f.body["values"] for f in decoded],
                    wire.rule_params(body["rule"], body["p1"], body["p2"],
                                     [f.body["samples"] for f in decoded]))
    return bytes.fromhex(res["digest"])


@pytest.mark.parametrize("store", ["ram", "file"])
@pytest.mark.parametrize("rule,p1,p2", [("krum", 1, 0), ("multi_krum", 1, 3), ("median", 0, 0),
                                        ("trimmed_mean", 2, 0), ("fedavg", 0, 0)])
def test_digest_of_the_announced_set_equals_the_reference(store: str, rule: str, p1: int, p2: int,
                                                          tmp_path: Path) -> None:
    p = peers(tmp_path if store == "file" else None)
    frames = [update(n, samples=3 + i) for i, n in enumerate(IDS)]
    for f in frames:
        assert p.offer(f, 0, 3) == hashlib.sha256(f).digest()
    assert p.sig_checks == 0  # "announce": no signature checked without contention
    body = announce(frames[1:], rule, p1, p2)  # the coordinator left node-01 out
    digest, ids = p.digest(3, body)
    assert ids == IDS[1:]
    assert digest == reference(frames[1:], body)


@pytest.mark.parametrize("store", ["ram", "file"])
def test_a_forged_copy_held_first_is_evicted_when_the_signed_one_arrives(
        store: str, tmp_path: Path) -> None:
    # The forgery's signature waits with its vector (in the round's file for "file") until
    # the contention reads it back.
    p = peers(tmp_path if store == "file" else None)
    forged = update("node-02", values=vec(9), key="node-99")
    real = update("node-02", seq=2)
    p.offer(forged, 0, 3)  # kept: no signature checked yet
    assert p.offer(real, 0, 3) is not None  # contention: both checked, the forgery goes
    assert p.sig_checks == 2 and p.evicted == 1
    assert not p.has(hashlib.sha256(forged).digest())
    frames = [real] + [update(n) for n in IDS[2:]]
    for f in frames[1:]:
        p.offer(f, 0, 3)
    body = announce(frames)
    assert p.digest(3, body) == (reference(frames, body), [f"node-{i:02d}" for i in range(2, 8)])


def test_a_forged_copy_arriving_second_is_rejected_and_changes_nothing() -> None:
    p = peers()
    real = update("node-02")
    p.offer(real, 0, 3)
    with pytest.raises(Rejected) as e:
        p.offer(update("node-02", seq=5, values=vec(9), key="node-99"), 0, 3)
    assert e.value.reason == "bad_signature"
    assert p.has(hashlib.sha256(real).digest()) and p.held() == 1


def test_a_second_signed_update_over_the_quota_is_buffer_full() -> None:
    p = peers()
    p.offer(update("node-02"), 0, 3)
    with pytest.raises(Rejected) as e:
        p.offer(update("node-02", seq=2, values=vec(5)), 0, 3)
    assert e.value.reason == "buffer_full"


def test_signature_mode_checks_every_frame_and_its_counter() -> None:
    p = peers(check="signature")
    with pytest.raises(Rejected) as e:
        p.offer(update("node-02", key="node-99"), 0, 3)
    assert e.value.reason == "bad_signature"
    p.offer(update("node-02", seq=4), 0, 3)
    p.offer(update("node-03", seq=4, round_=4), 0, 3)
    with pytest.raises(Rejected) as e:
        p.offer(update("node-03", seq=3, round_=4, values=vec(1)), 0, 3)
    assert e.value.reason == "replay"
    assert p.sig_checks == 0  # the Verifier checked them, not the contention path


def test_cheap_checks_apply_in_announce_mode() -> None:
    p = peers()
    for bad, reason in ((update("node-02", round_=9), "future_round"),
                        (update("node-02", values=[1] * (D - 1)), "bad_dim"),
                        (update("node-02", values=[1 << 25] * D), "out_of_range"),
                        (wire.encode(wire.MODEL_UPDATE, MESH, "node-42", 3, 1, 0,
                                     wire.encode_model_update(1, vec(1)),
                                     keys.signer(seed("node-42"))), "unregistered")):
        with pytest.raises(Rejected) as e:
            p.offer(bad, 0, 3)
        assert e.value.reason == reason
    assert p.held() == 0


def test_slots_run_out_and_come_back_when_a_round_settles() -> None:
    p = peers(slots=3)
    for n in IDS[:3]:
        p.offer(update(n), 0, 3)
    with pytest.raises(Rejected) as e:
        p.offer(update(IDS[3]), 0, 3)
    assert e.value.reason == "buffer_full"
    p.drop_before(4)
    assert p.held() == 0
    p.offer(update(IDS[3], round_=4), 0, 3)
    assert p.held() == 1


def test_a_missing_frame_gives_no_digest() -> None:
    p = peers()
    frames = [update(n) for n in IDS]
    for f in frames[:-1]:
        p.offer(f, 0, 3)
    assert p.digest(3, announce(frames)) == (None, 1)


def test_check_global_refuses_another_mesh_an_old_round_and_a_reused_counter() -> None:
    coord = keys.signer(seed("coordinator"))
    pub = keys.public_key(seed("coordinator"))
    guard = ReplayGuard(MemoryStore(), max_age=1 << 62)

    def glob(mesh: bytes = MESH, round_: int = 5, seq: int = 10) -> bytes:
        return wire.encode(wire.GLOBAL_MODEL, mesh, wire.COORDINATOR, round_, seq, 0,
                           wire.encode_global_payload(vec(0)), coord)

    def check(msg: bytes, last_round: int = 4) -> str:
        try:
            noderound.check_global(msg, MESH, pub, keys.check_signature, guard, last_round, D, 0)
        except Rejected as e:
            return e.reason
        return "ok"

    assert check(glob(mesh=wire.mesh_id("other"))) == "wrong_mesh"
    assert check(glob(round_=4)) == "stale_round"
    assert check(glob()) == "ok"
    assert check(glob(round_=6, seq=10), last_round=5) == "replay"
    assert check(glob(round_=6, seq=11), last_round=5) == "ok"


def test_a_global_payload_is_decoded_only_once_its_signature_holds() -> None:
    # Ed25519 runs before the payload is decoded (a small heap then holds no accepted set
    # under its temporaries): a forged frame is bad_signature whatever its payload holds;
    # a signed frame with a malformed payload is still refused for what is wrong with it.
    coord = keys.signer(seed("coordinator"))
    pub = keys.public_key(seed("coordinator"))
    bad_payload = wire.encode_global_payload(vec(0))[:-1]  # dim no longer matches

    def check(msg: bytes) -> str:
        guard = ReplayGuard(MemoryStore(), max_age=1 << 62)
        try:
            noderound.check_global(msg, MESH, pub, keys.check_signature, guard, 4, D, 0)
        except Rejected as e:
            return e.reason
        return "ok"

    signed = wire.encode(wire.GLOBAL_MODEL, MESH, wire.COORDINATOR, 5, 10, 0, bad_payload, coord)
    forged = wire.encode(wire.GLOBAL_MODEL, MESH, wire.COORDINATOR, 5, 10, 0, bad_payload,
                         keys.signer(seed("node-01")))
    assert check(signed) == "bad_payload"
    assert check(forged) == "bad_signature"
    fr = wire.decode(signed, body=False)
    assert fr.body is None and fr.kind == wire.GLOBAL_MODEL
    with pytest.raises(wire.WireError) as e:
        wire.decode_body(fr)
    assert e.value.reason == "bad_payload"


def test_our_own_update_kept_twice_takes_one_slot() -> None:
    p = peers()
    own = update("node-01")
    h = hashlib.sha256(own).digest()
    p.offer(own, 0, 3)  # our echo came first
    p.keep(3, h, "node-01", 10, noderound.update_values(own, "node-01"))
    assert p.held() == 1 and len(p.free) == p.n_slots - 1


def test_no_slot_for_our_own_update_is_buffer_full_not_a_crash() -> None:
    p = peers(slots=1)
    p.offer(update("node-02"), 0, 3)
    own = update("node-01")
    with pytest.raises(Rejected) as e:
        p.keep(3, hashlib.sha256(own).digest(), "node-01", 10,
               noderound.update_values(own, "node-01"))
    assert e.value.reason == "buffer_full"


def test_file_vectors_reuse_the_files_opened_at_boot(tmp_path: Path) -> None:
    (tmp_path / "peers-7.bin").write_bytes(b"left by an earlier boot")
    p = peers(tmp_path, slots=40)
    # Opened at boot (no file object to allocate mid-run); scratch of earlier boots removed.
    assert sorted(x.name for x in tmp_path.iterdir()) == ["peers-0.bin", "peers-1.bin"]
    frames = {r: [update(n, round_=r, seq=r, values=vec(i, salt=r)) for i, n in enumerate(IDS)]
              for r in (3, 4, 5)}
    for r in (3, 4):
        for f in frames[r]:
            p.offer(f, 0, 3)
    body = announce(frames[4], "median")
    p.drop_before(4)
    assert p.digest(4, body)[0] == reference(frames[4], body)
    # Round 5 writes over round 3's file, from its start: nothing of round 3 shows through,
    # and a third round at once (3 is gone, so this is 4 and 5) needs no extra file.
    for f in frames[5][:3]:
        p.offer(f, 0, 4)
    body5 = announce(frames[5][:3], "fedavg")
    assert p.digest(5, body5)[0] == reference(frames[5][:3], body5)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["peers-0.bin", "peers-1.bin"]


def test_a_third_round_at_once_gets_a_file_of_its_own_until_dropped(tmp_path: Path) -> None:
    store = gossip.FileVectors(str(tmp_path), D)
    packed = bytes(4 * D)
    for r in (3, 4, 5):
        store.put(r, packed, r)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["peers-0.bin", "peers-1.bin",
                                                          "peers-r5.bin"]
    store.drop(5)
    store.drop(3)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["peers-0.bin", "peers-1.bin"]
    assert len(store.pool) == 1


@pytest.mark.parametrize("bad_at", [0, 63, 64, 69])
def test_packed_range_check_names_the_same_value_as_the_list_check(bad_at: int) -> None:
    values = vec(1)
    values[bad_at] = -(1 << 24) - 1
    msg = update("node-02", values=values)
    got = []
    for packed in (False, True):
        v = verify.Verifier(MESH, registry(), ReplayGuard(MemoryStore()), keys.check_signature,
                            limits=verify.Limits(D, 1 << 24), values=not packed)
        with pytest.raises(Rejected) as e:
            v.verify(msg, 0, 3, 3)
        got.append((e.value.reason, e.value.message))
    assert got[0] == got[1] == ("out_of_range", "value[%d] = %d outside +-%d"
                                % (bad_at, -(1 << 24) - 1, 1 << 24))


# ------------------------------------------------------------------ the round's buffers

def _shard(n: int = 37) -> bytes:
    from microfed_host import data
    split = data.train_test_split(3)
    return data.encode_shard(split.train.subset(list(range(n))))


# extra: None, no shared space; else the space is the update frame plus this many bytes, which
# training uses for its index buffers when a batch's fit (7 x 64 = 448 bytes).
@pytest.mark.parametrize("extra", [None, 0, 447, 448, 1000])
def test_training_in_the_round_buffers_gives_the_same_update_every_round(extra: int | None,
                                                                         ) -> None:
    """RoundBuffers are reused round after round, dirty from the round before (and from a
    training that failed half-way): the delta and the signed frame equal a fresh-list round's
    bit for bit, and they are the buffers' own lists."""
    from microfed import model

    shard = model.Shard(_shard())
    mdl = model.get("softmax")
    train = {"lr": 32768, "epochs": 2, "batch": 7, "seed": 5}
    sign = keys.signer(seed("node-01"))
    size = noderound.update_frame_len("node-01", mdl.n_params)
    space = None if extra is None else bytearray(b"\xa5" * (size + extra))
    rb = noderound.RoundBuffers(mdl, "node-01", 0, space)
    if extra:
        assert rb.spare is not None and len(rb.spare) == extra
    else:
        assert rb.spare is None
    rb.scratch[:] = [123] * len(rb.scratch)  # sums left behind by a failed training
    rb.frame[:] = b"\x5a" * len(rb.frame)
    g = mdl.init(9)
    for r in range(1, 4):
        want = noderound.local_update(mdl, shard, train, r, "node-01", list(g))
        want_frame = noderound.update_frame(MESH, "node-01", r, r, 0, shard.n, want, sign)
        into = rb.take()
        assert into is rb.p
        into[:] = g  # as check_global(..., into) leaves it
        got = noderound.local_update(mdl, shard, train, r, "node-01", into, None, rb)
        assert got is rb.p and got == want
        frame = noderound.update_frame(MESH, "node-01", r, r, 0, shard.n, got, sign, rb.frame)
        assert frame is rb.frame and bytes(frame) == bytes(want_frame)
        g = mdl.apply(g, want)
    if space is not None:  # the index buffers went into the spare bytes exactly when they fit
        assert (bytes(space[size:]) != b"\xa5" * extra) is (extra >= 7 * 64)
    # A global in a list of its own (the buffers were busy) trains the same in them too.
    fresh = list(g)
    assert noderound.local_update(mdl, shard, train, 9, "node-01", fresh, None, rb) == \
        noderound.local_update(mdl, shard, train, 9, "node-01", list(g))
    assert fresh == g  # the caller's list is not touched
    rb.hold(object())
    assert rb.take() is None


def test_train_refuses_buffers_of_the_wrong_size() -> None:
    from microfed import model

    mdl = model.get("softmax")
    cfg = model.TrainConfig(32768, 1, 10, 1)
    g = mdl.init(1)
    shard = model.Shard(_shard(12))
    with pytest.raises(model.ModelError, match="out must be a list of 650"):
        mdl.train(g, shard, cfg, [0] * 649)
    with pytest.raises(model.ModelError, match="scratch must be a list of 64 items"):
        mdl.train(g, shard, cfg, None, [0] * 640)


def test_the_window_of_rounds_follows_the_newest_verified_global() -> None:
    """offer(msg, now, cur_round, open_round): rounds cur_round .. max(cur_round,
    open_round) + 1. A node that lost round 2 (e.g. out of heap while training) acts on round
    1 still, yet global 3 is verified: round 3's peer updates are kept, not "future"."""
    p = peers()
    with pytest.raises(Rejected) as e:
        p.offer(update("node-02", round_=3), 0, 1)
    assert (e.value.reason, e.value.message) == ("future_round", "round 3 > 2")
    assert p.offer(update("node-02", round_=3), 0, 1, 3) is not None
    assert p.offer(update("node-03", round_=4), 0, 1, 3) is not None
    with pytest.raises(Rejected) as e:
        p.offer(update("node-04", round_=5), 0, 1, 3)
    assert e.value.reason == "future_round"
    with pytest.raises(Rejected) as e:  # below the round the node acted on: stale
        p.offer(update("node-05", round_=1), 0, 2, 3)
    assert (e.value.reason, e.value.message) == ("stale_round", "round 1 < 2") and p.held() == 2
