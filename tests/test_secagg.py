"""Secure aggregation (microfed.secagg, microfed_host.secagg_server) without a transport:
the integer pieces (the exact L2 clip shared with microfed.dp, HMAC, Shamir, the PRG), a whole round of
Clients and the coordinator's SecAggRound whose unmasked result is plain FedAvg bit for bit
(with and without a node that drops after sharing), the honest node's refusals, rejected key
sets and blobs, and the same bytes from the same randomness on the MicroPython unix port."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from pathlib import Path
from typing import Any

import pytest

from microfed import aggregate, dp, secagg, verify, wire, wire_sa
from microfed.verify import Rejected
from microfed_host import keys, upy
from microfed_host.secagg_server import Result, SecAggRound

MESH = wire.mesh_id("sa-test")
COORD_SEED = hashlib.sha256(b"sa coordinator").digest()


def _seed(i: str) -> bytes:
    return hashlib.sha256(b"sa node " + i.encode()).digest()


def _rand(label: str) -> Any:
    """Deterministic 'urandom' for reproducible tests (the nodes use os.urandom)."""
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(label.encode() + state["n"].to_bytes(4, "little")).digest()
        return out[:n]
    return rand


class Mini:
    """n Clients and a SecAggRound wired together by direct calls (signed, decoded frames)."""

    def __init__(self, n: int, dim: int = 6, rnd: int = 3, seed: int = 1) -> None:
        self.ids = ["node-%02d" % (k + 1) for k in range(n)]
        self.reg = verify.Registry(MESH, keys.public_key(COORD_SEED),
                                   [(i, keys.public_key(_seed(i)), True) for i in self.ids])
        self.round = rnd
        self.seq = 0
        rng = random.Random(seed)
        self.delta = {i: [rng.randint(-70000, 70000) for _ in range(dim)] for i in self.ids}
        self.samples = {i: rng.randint(5, 120) for i in self.ids}
        self.clients = {i: secagg.Client(i, MESH, _rand("r" + i)) for i in self.ids}
        self.server = SecAggRound(rnd, self.ids, dim)

    def frame(self, kind: int, sender: str, payload: bytes) -> wire.Frame:
        self.seq += 1
        seed = COORD_SEED if sender == wire.COORDINATOR else _seed(sender)
        return wire.decode(wire.encode(kind, MESH, sender, self.round, self.seq, 0, payload,
                                       keys.signer(seed)))

    def send(self, kind: int, sender: str, payload: bytes) -> None:
        fr = self.frame(kind, sender, payload)
        assert self.server.add(fr, hashlib.sha256(payload).digest()) is None

    def run(self, clip: int = 1 << 40, drop_before_masked: tuple[str, ...] = ()) -> Result:
        for i in self.ids:
            self.send(wire.SA_KEYS, i, self.clients[i].begin(self.round, self.delta[i],
                                                             self.samples[i], clip))
        (_to, kind, pl), = self.server.close()
        ks = self.frame(kind, wire.COORDINATOR, pl)
        for i in self.ids:
            self.send(wire.SA_SHARES, i, self.clients[i].on_keyset(ks, self.reg,
                                                                   keys.check_signature))
        for to, kind, pl in self.server.close():
            assert to is not None
            if to in drop_before_masked:
                continue
            self.send(wire.SA_MASKED, to, self.clients[to].on_inbox(
                self.frame(kind, wire.COORDINATOR, pl)))
        (_to, kind, pl), = self.server.close()
        self.unmask = self.frame(kind, wire.COORDINATOR, pl)
        for i in self.server.wanted:
            self.send(wire.SA_REVEAL, i, self.clients[i].on_unmask(self.unmask))
        res = self.server.close()
        assert isinstance(res, Result)
        return res

    def plain(self, ids: list[str], clip: int = 1 << 40) -> list[int]:
        return aggregate.fedavg([dp.l2_clip(self.delta[i], clip) for i in ids],
                                [self.samples[i] for i in ids])


# ------------------------------------------------------------------ integer pieces

def test_clip_bounds_the_norm_and_leaves_small_vectors_alone() -> None:
    # Secure aggregation's clip is microfed.dp's (one clip): in place, with the flag the
    # node logs ("clipped").
    rng = random.Random(6)
    for _ in range(300):
        v = [rng.randint(-(1 << 31), (1 << 31) - 1) >> rng.randint(0, 30) for _ in range(7)]
        bound = rng.randint(1, 1 << 24)
        out = list(v)
        clipped = dp.l2_clip_flag(out, bound)
        assert sum(x * x for x in out) <= bound * bound
        assert clipped == (sum(x * x for x in v) > bound * bound)
        if not clipped:
            assert out == v
        else:  # toward zero, coordinate by coordinate, signs kept
            assert all(abs(a) <= abs(b) and (a == 0 or (a > 0) == (b > 0)) for a, b in zip(out, v, strict=True))
    v = [3 << 16, 4 << 16]
    assert not dp.l2_clip_flag(v, 5 << 16) and v == [3 << 16, 4 << 16]
    assert dp.l2_clip_flag(v, 1 << 16) and v == [39321, 52428]


def test_hmac_sha256_matches_the_standard_library() -> None:
    rng = random.Random(7)
    for klen in (0, 1, 32, 63, 64, 65, 200):
        key, msg = rng.randbytes(klen), rng.randbytes(rng.randint(0, 300))
        assert secagg.hmac_sha256(key, msg) == hmac.new(key, msg, "sha256").digest()


def test_shamir_any_t_shares_reconstruct_and_a_wrong_one_is_caught() -> None:
    rng = random.Random(8)
    rand = _rand("shamir")
    for n, t in ((3, 2), (5, 3), (10, 6), (20, 11)):
        s = secagg.rand_field(rand)
        ys = secagg.shamir_split(s, t, n, rand)
        for _ in range(5):
            xs = rng.sample(range(1, n + 1), rng.randint(t, n))
            assert secagg.shamir_join([(x, ys[x - 1]) for x in xs], t) == s
        with pytest.raises(secagg.SecAggError):
            secagg.shamir_join([(x, ys[x - 1]) for x in range(1, t)], t)
        pts = [(x, ys[x - 1]) for x in range(1, t + 2)]
        pts[-1] = (pts[-1][0], (pts[-1][1] + 1) % secagg.P)
        with pytest.raises(secagg.SecAggError, match="not on the polynomial"):
            secagg.shamir_join(pts, t)


def test_prg_masks_cancel_mod_2_64() -> None:
    acc = [5, (1 << 64) - 1, 0, 17, 99]
    seed = hashlib.sha256(b"s").digest()
    out = secagg.prg_add(secagg.prg_add(list(acc), seed, 1), seed, -1)
    assert out == acc
    assert secagg.prg_add([0] * 5, seed, 1) != [0] * 5


# ------------------------------------------------------------------ whole rounds

@pytest.mark.parametrize("n", [3, 5, 8])
def test_unmasked_sum_is_plain_fedavg(n: int) -> None:
    m = Mini(n)
    res = m.run()
    assert res.ids == m.ids
    assert res.vector == m.plain(m.ids)
    assert res.weight == sum(m.samples.values())


def test_clip_then_weight_equals_fedavg_of_the_clipped_updates() -> None:
    m = Mini(5, seed=2)
    res = m.run(clip=50000)
    assert any(m.clients[i].clipped for i in m.ids)
    assert res.vector == m.plain(m.ids, clip=50000)


def test_a_node_that_drops_after_sharing_is_recovered_from_the_shares() -> None:
    m = Mini(6, seed=3)
    res = m.run(drop_before_masked=("node-04",))
    survivors = [i for i in m.ids if i != "node-04"]
    assert res.ids == survivors
    assert m.unmask.body == {"alive": survivors, "dropped": ["node-04"]}
    assert res.vector == m.plain(survivors)


def test_masked_update_alone_reveals_nothing_recognisable() -> None:
    # Sanity, not a proof: the masked words do not contain the weighted values.
    m = Mini(3)
    c = m.clients["node-01"]
    ks = m.clients
    for i in m.ids:
        m.send(wire.SA_KEYS, i, ks[i].begin(3, m.delta[i], m.samples[i], 1 << 40))
    (_t, kind, pl), = m.server.close()
    fr = m.frame(kind, wire.COORDINATOR, pl)
    for i in m.ids:
        m.send(wire.SA_SHARES, i, ks[i].on_keyset(fr, m.reg, keys.check_signature))
    inbox = {to: m.frame(k, wire.COORDINATOR, p) for to, k, p in m.server.close()}
    words = wire.decode_payload(wire.SA_MASKED, c.on_inbox(inbox["node-01"]))["words"]
    plain = secagg.weigh(m.delta["node-01"], m.samples["node-01"])
    assert all(a != b for a, b in zip(words, plain, strict=True))


# ------------------------------------------------------------------ refusals

def _masked_round(n: int = 5) -> Mini:
    m = Mini(n, seed=4)
    m.run()
    return m


def test_honest_node_refuses_to_reveal_both_shares_of_one_peer() -> None:
    m = _masked_round()
    c = m.clients["node-02"]
    # A fresh node state at the unmask step: the coordinator names node-03 alive AND dropped.
    c.answered = None
    c.phase = 3
    both = m.frame(wire.SA_UNMASK, wire.COORDINATOR,
                   wire_sa.encode_sa_unmask(m.ids, ["node-03"]))
    with pytest.raises(Rejected) as ei:
        c.on_unmask(both)
    assert ei.value.reason == "refused" and "both shares of node-03" in ei.value.message
    assert c.answered is None  # nothing revealed, state unchanged


def test_honest_node_answers_one_unmask_request_per_round() -> None:
    m = _masked_round()
    c = m.clients["node-02"]
    again = c.on_unmask(m.unmask)  # the same request (a redelivery): the same answer
    assert again == c.answered[1]
    # The coordinator now claims node-03 dropped (to get its pairwise key after its self-mask
    # seed): refused, because the b-shares of node-03 were already revealed.
    alive = [i for i in m.ids if i != "node-03"]
    other = m.frame(wire.SA_UNMASK, wire.COORDINATOR, wire_sa.encode_sa_unmask(alive, ["node-03"]))
    with pytest.raises(Rejected) as ei:
        c.on_unmask(other)
    assert ei.value.reason == "refused" and "second, different" in ei.value.message


def test_honest_node_refuses_too_few_alive_or_a_wrong_set() -> None:
    m = _masked_round()
    for alive, dropped, why in ((m.ids[:2], m.ids[2:], "threshold"),
                                (m.ids[:4], [], "share set")):
        c = m.clients["node-01"]
        c.answered, c.phase = None, 3
        fr = m.frame(wire.SA_UNMASK, wire.COORDINATOR, wire_sa.encode_sa_unmask(alive, dropped))
        with pytest.raises(Rejected, match=why) as ei:
            c.on_unmask(fr)
        assert ei.value.reason == "refused"


def _keyset_round(m: Mini) -> list[tuple[str, int, int, bytes, bytes, bytes]]:
    entries = []
    for i in m.ids:
        fr = m.frame(wire.SA_KEYS, i, m.clients[i].begin(3, m.delta[i], m.samples[i], 1 << 40))
        entries.append((i, fr.seq, fr.timestamp, fr.body["c_pk"], fr.body["s_pk"],
                        bytes(fr.signature)))
    return entries


def test_bad_key_sets_are_rejected() -> None:
    m = Mini(5, seed=5)
    entries = _keyset_round(m)
    c = m.clients["node-01"]

    def reason(t: int, rows: list[Any]) -> str:
        fr = m.frame(wire.SA_KEYSET, wire.COORDINATOR, wire_sa.encode_sa_keyset(t, rows))
        with pytest.raises(Rejected) as ei:
            c.on_keyset(fr, m.reg, keys.check_signature)
        assert c.phase == 1  # unchanged
        return ei.value.reason + ": " + ei.value.message

    assert "threshold 2 for 5" in reason(2, entries)  # t must exceed n/2
    swapped = list(entries)
    e = swapped[2]
    swapped[2] = (e[0], e[1], e[2], e[4], e[3], e[5])  # c and s keys swapped: not what it signed
    assert "not signed by it" in reason(3, swapped)
    mine = list(entries)
    e = mine[0]
    mine[0] = (e[0], e[1], e[2], e[3], entries[1][4], e[5])  # a substituted key for us
    assert "our own keys" in reason(3, mine)
    assert "not in the key set" in reason(3, entries[1:])
    low = list(entries)
    e = low[3]
    low[3] = (e[0], e[1], e[2], bytes(32), e[4], e[5])
    assert reason(3, low).startswith("bad_keyset")  # unsigned and low order


def test_a_tampered_share_blob_is_rejected() -> None:
    m = Mini(4, seed=6)
    for i in m.ids:
        m.send(wire.SA_KEYS, i, m.clients[i].begin(3, m.delta[i], m.samples[i], 1 << 40))
    (_t, kind, pl), = m.server.close()
    ks = m.frame(kind, wire.COORDINATOR, pl)
    for i in m.ids:
        m.send(wire.SA_SHARES, i, m.clients[i].on_keyset(ks, m.reg, keys.check_signature))
    to, kind, pl = m.server.close()[0]
    body = wire.decode_payload(kind, pl)
    u, blob = body["entries"][0]
    bad = wire_sa.encode_sa_blobs([(u, blob[:5] + bytes([blob[5] ^ 1]) + blob[6:])]
                               + body["entries"][1:])
    with pytest.raises(Rejected) as ei:
        m.clients[to].on_inbox(m.frame(kind, wire.COORDINATOR, bad))
    assert ei.value.reason == "bad_share"


def test_server_refuses_frames_that_do_not_fit_the_phase() -> None:
    m = Mini(4, seed=7)
    fr = m.frame(wire.SA_MASKED, "node-01", wire_sa.encode_sa_masked([0] * 7))
    assert m.server.add(fr, b"x")[0] == "wrong_phase"
    keys_pl = m.clients["node-01"].begin(3, m.delta["node-01"], 9, 1 << 40)
    assert m.server.add(m.frame(wire.SA_KEYS, "node-01", keys_pl), b"a") is None
    assert m.server.add(m.frame(wire.SA_KEYS, "node-01", keys_pl), b"b")[0] == "equivocation"
    with pytest.raises(secagg.SecAggError):
        m.server.close()  # one node of the three needed


# ------------------------------------------------------------------ MicroPython

MP_SCRIPT = r"""
import sys, json, hashlib
from microfed import secagg, wire, verify, ed25519
doc = json.load(open(sys.argv[1]))
def mkrand(label):
    st = [0]
    def rand(n):
        out = b""
        while len(out) < n:
            st[0] += 1
            out += hashlib.sha256(label.encode() + st[0].to_bytes(4, "little")).digest()
        return out[:n]
    return rand
mesh = bytes.fromhex(doc["mesh"])
c = secagg.Client(doc["id"], mesh, mkrand("r" + doc["id"]))
out = [c.begin(3, doc["delta"], doc["samples"], doc["clip"]).hex()]
reg = verify.Registry(mesh, bytes(32), [(i, bytes.fromhex(p), True) for i, p in doc["reg"]])
fr = wire.decode(bytes.fromhex(doc["keyset"]))
out.append(c.on_keyset(fr, reg, ed25519.verify).hex())
out.append(c.on_inbox(wire.decode(bytes.fromhex(doc["inbox"]))).hex())
out.append(c.on_unmask(wire.decode(bytes.fromhex(doc["unmask"]))).hex())
print(json.dumps(out))
"""


def test_micropython_client_produces_the_same_bytes(micropython: str, tmp_path: Path) -> None:
    m = Mini(3, seed=9)
    frames: dict[str, bytes] = {}
    got = {}
    orig_frame = m.frame

    def recording(kind: int, sender: str, payload: bytes) -> wire.Frame:
        fr = orig_frame(kind, sender, payload)
        if sender == wire.COORDINATOR:
            raw = fr.header + fr.payload + fr.signature
            name = wire.KIND_NAMES[kind]
            if kind == wire.SA_INBOX:  # keep node-02's: the one without an entry of its own
                ids = [i for i, _b in wire.decode_payload(kind, payload)["entries"]]
                name = "sa_inbox" if "node-02" not in ids else "other_inbox"
            frames.setdefault(name, raw)
        else:
            got.setdefault((sender, kind), payload)
        return fr

    m.frame = recording  # type: ignore[method-assign]
    m.run(clip=60000)
    nid = "node-02"
    doc = {"mesh": MESH.hex(), "id": nid, "delta": m.delta[nid], "samples": m.samples[nid],
           "clip": 60000, "reg": [(i, keys.public_key(_seed(i)).hex()) for i in m.ids],
           "keyset": frames["sa_keyset"].hex(), "inbox": frames["sa_inbox"].hex(),
           "unmask": frames["sa_unmask"].hex()}
    (tmp_path / "in.json").write_text(json.dumps(doc))
    (tmp_path / "c.py").write_text(MP_SCRIPT)
    out = json.loads(upy.run([str(tmp_path / "c.py"), str(tmp_path / "in.json")]))
    want = [got[(nid, k)].hex() for k in (wire.SA_KEYS, wire.SA_SHARES, wire.SA_MASKED,
                                          wire.SA_REVEAL)]
    assert out == want
