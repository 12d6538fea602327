"""Every decoder of untrusted or persisted bytes is total: whatever the input, it returns or
raises its own module's error type (WireError, Rejected, StoreError, ValueError for
reputation, ModelError, ConfigError, StateError), never IndexError, struct.error, KeyError,
TypeError, UnicodeDecodeError, RecursionError or a plain ValueError from int().
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import struct
from pathlib import Path
from types import ModuleType

import pytest

from microfed import model, replay, reputation, verify, wire
from microfed.verify import Rejected
from microfed_host import keys
from microfed_tools import fuzzwire

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fw_" + name, ROOT / "firmware" / (name + ".py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mutants(rng: random.Random, good: bytes, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            i = rng.randrange(len(b) + 1)
            if op < 0.4 and b:
                b[min(i, len(b) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            elif op < 0.6:
                del b[i:i + rng.randint(1, 40)]
            elif op < 0.8:
                b[i:i] = rng.randbytes(rng.randint(1, 40))
            else:
                b = b[:i]
        out.append(bytes(b))
    return out


# ------------------------------------------------------------------------------- wire

NOT_BYTES = (None, "MF", 7, 1.5, [1, 2], {"a": 1}, object())


@pytest.mark.parametrize("data", NOT_BYTES)
def test_wire_decode_of_non_bytes_is_wire_error(data: object) -> None:
    with pytest.raises(wire.WireError) as ei:
        wire.decode(data)
    assert ei.value.reason == "bad_type"


def test_decode_payload_every_kind_any_bytes() -> None:
    rng = random.Random(1)
    kinds = list(wire.KIND_NAMES) + [0, 7, 255, -1, "model_update", None]
    for t in fuzzwire.templates():
        for p in [t.payload] + _mutants(rng, t.payload, 150):
            for kind in (t.kind, rng.choice(kinds)):
                try:
                    wire.decode_payload(kind, p)
                except wire.WireError:
                    pass
    for bad in NOT_BYTES:
        with pytest.raises(wire.WireError):
            wire.decode_payload(wire.GLOBAL_MODEL, bad)
    for n in range(0, 120):
        for kind in wire.KIND_NAMES:
            try:
                wire.decode_payload(kind, rng.randbytes(n))
            except wire.WireError:
                pass


def test_load_registry_frame_only_rejects() -> None:
    coord = fuzzwire.coordinator_key()
    for _label, data in fuzzwire.Fuzzer(11).cases(3000):
        with pytest.raises(Rejected):
            verify.load_registry_frame(data, fuzzwire.MESH, coord, keys.check_signature)
    for bad in NOT_BYTES:
        with pytest.raises(Rejected):
            verify.load_registry_frame(bad, fuzzwire.MESH, coord, keys.check_signature)
    good = next(t.frame for t in fuzzwire.templates() if t.name == "registry_3")
    assert len(verify.load_registry_frame(good, fuzzwire.MESH, coord, keys.check_signature)
               .nodes) == 3


# ------------------------------------------------------------------------------- replay files

def _write(path: Path, magic: bytes, body_lines: list[bytes]) -> None:
    body = magic + b"\n" + b"".join(ln + b"\n" for ln in body_lines)
    path.write_bytes(body + b"#sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n")


BAD_COUNTER_LINES = (
    [b"n1 1"], [b"n1 1 2 3"], [b"n1 x 5"], [b"n1 1 x"], [b"n1 1 -5"], [b"n1 -1 5"],
    [b"n1 1 9223372036854775808"], [b"n1 256 1"], [b"n1 1 5", b"n1 1 6"], [b" 1 5"],
    [b"n1 1 \xff\xfe"], [b"\xc3\x28 1 1"], [b""], [b"n1 1 1e3"], [b"n1 1 5" * 1000],
)


@pytest.mark.parametrize("lines", BAD_COUNTER_LINES)
def test_corrupt_counter_file_is_store_error(tmp_path: Path, lines: list[bytes]) -> None:
    p = tmp_path / "counters"
    _write(p, replay.FileStore.MAGIC, lines)
    with pytest.raises(replay.StoreError):
        replay.FileStore(str(p))


@pytest.mark.parametrize("lines", ([b"x"], [b"-3"], [b"1", b"2"], [b"\xff"], [b""],
                                   [b"99999999999999999999"]))
def test_corrupt_sequence_lease_is_store_error(tmp_path: Path, lines: list[bytes]) -> None:
    p = tmp_path / "seq"
    _write(p, replay.SequenceSource.MAGIC, lines)
    with pytest.raises(replay.StoreError):
        replay.SequenceSource(str(p))


def test_counter_files_any_bytes(tmp_path: Path) -> None:
    rng = random.Random(2)
    p = tmp_path / "c"
    good = replay.FileStore(str(p))
    good.advance("n1", 1, 5)
    good.advance("node-2", 3, 17)
    raw = p.read_bytes()
    body = raw[:raw.rfind(b"#sha256 ")]
    for m in _mutants(rng, raw, 300) + _mutants(rng, body, 300):
        for data in (m, m + b"#sha256 " + hashlib.sha256(m).hexdigest().encode() + b"\n"):
            p.write_bytes(data)
            try:
                replay.FileStore(str(p))
            except replay.StoreError:
                pass
            try:
                replay.SequenceSource(str(p))
            except replay.StoreError:
                pass


# ------------------------------------------------------------------------------- reputation

def _book() -> bytes:
    book = reputation.ReputationBook()
    ids = ["a", "bb", "node-3", "n4", "z5"]
    vecs = [[65536 * (i + 1), -65536, 3] for i in range(4)] + [[-(1 << 24), 1 << 24, 0]]
    for _ in range(3):
        book.observe(ids, vecs)
    return book.to_bytes()


def test_reputation_from_bytes_any_bytes() -> None:
    rng = random.Random(3)
    good = _book()
    assert reputation.from_bytes(good).to_bytes() == good
    for m in _mutants(rng, good, 5000) + [rng.randbytes(rng.randint(0, 200)) for _ in range(500)]:
        try:
            reputation.from_bytes(m)
        except ValueError as e:
            assert type(e) is ValueError, repr(e)
    for bad in NOT_BYTES:
        with pytest.raises(ValueError):
            reputation.from_bytes(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- shards

def _shard(shift: int, d: int, k: int, n: int, body: bytes) -> bytes:
    b = struct.pack(model.SHARD_HEADER, model.SHARD_MAGIC, 1, shift, d, k, n, 0, 1) + body
    return b + hashlib.sha256(b).digest()


def test_decode_shard_any_bytes() -> None:
    rng = random.Random(4)
    good = _shard(12, 4, 3, 2, bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 2]))
    xs, ys, info = model.decode_shard(good)
    assert ys == [0, 2] and xs[0][0] == 1 << 12
    inner = good[:-32]
    for m in _mutants(rng, inner, 3000):
        for data in (m, m + hashlib.sha256(m).digest()):
            try:
                model.decode_shard(data)
            except model.ModelError:
                pass
    for shift, d, k, n in ((255, 4, 3, 2), (24, 4, 3, 2), (12, 0, 3, 2), (12, 4, 0, 2),
                           (12, 0xFFFF, 0xFFFF, 0xFFFFFFFF)):
        with pytest.raises(model.ModelError):
            model.decode_shard(_shard(shift, d, k, n, inner[18:]))
    for bad in NOT_BYTES:
        with pytest.raises(model.ModelError):
            model.decode_shard(bad)


# ------------------------------------------------------------------------------- firmware files

JSON_VALUES = (None, True, False, 0, -1, 1.5, 1 << 70, "", "x", "zz" * 40, [], [1], {},
               {"host": "h"}, {"host": 1}, {"ssid": "s", "password": 1})


def test_firmware_config_any_json(tmp_path: Path) -> None:
    cfg = _load("config")
    rng = random.Random(5)
    p = tmp_path / "f.json"
    good_bundle = {"format": cfg.BUNDLE_FORMAT, "mesh": "m", "node_id": "n1",
                   "mesh_id": "00" * 8, "seed": "11" * 32, "public_key": "22" * 32,
                   "coordinator_public_key": "33" * 32, "registry_frame": "44" * 200,
                   "registry_version": 1, "broker": {"host": "h", "port": 1883}}
    p.write_text(json.dumps(good_bundle))
    cfg.read_bundle(str(p))
    raws = [b"", b"\xff\xfe\x00", b"[" * 100000, b"{" * 5000 + b"}" * 5000, b"{\"a\":" * 50000,
            b"null", b"[1,2]", b"\"str\"", b"1e999999", b"9" * 5000]
    for raw in raws:
        p.write_bytes(raw)
        with pytest.raises(cfg.ConfigError):
            cfg.read_bundle(str(p))
        with pytest.raises(cfg.ConfigError):
            cfg.read_config(str(p))
    keys_ = list(good_bundle)
    for _ in range(600):
        doc = dict(good_bundle)
        for _ in range(rng.randint(1, 3)):
            k = rng.choice(keys_)
            if rng.random() < 0.2:
                doc.pop(k, None)
            else:
                doc[k] = rng.choice(JSON_VALUES)
        p.write_text(json.dumps(doc))
        try:
            cfg.read_bundle(str(p))
        except cfg.ConfigError:
            pass
        cdoc: dict = {}
        for _ in range(rng.randint(1, 3)):
            cdoc[rng.choice(list(cfg.DEFAULTS) + ["nope"])] = rng.choice(
                JSON_VALUES + ({"lr": 1, "epochs": 0}, {"seed": -1}, {"x": 1}))
        try:
            cfg.read_config(None, cdoc)
        except cfg.ConfigError:
            pass


def test_node_state_keeps_its_next_file_open_and_loads_as_before(tmp_path: Path) -> None:
    node = _load("node")
    p = tmp_path / "node.state"
    st = node.NodeState(str(p))
    # The next write's file is opened at boot, empty: a fresh node has no state yet.
    assert (tmp_path / "node.state.new").read_bytes() == b"" and not p.exists()
    assert node.NodeState(str(p)).last_round == 0
    for r in (1, 2, 3):
        st.save(r, 10 + r, bytes([r]) * 32)
        assert (tmp_path / "node.state.new").read_bytes() == b""  # prepared again
        again = node.NodeState(str(p))
        assert (again.last_round, again.coord_seq, again.global_hash) == (r, 10 + r,
                                                                          bytes([r]) * 32)
    # A replace cut after its remove (FAT): only node.state.new, complete. It is loaded, and
    # the next boot's prepared file does not truncate it away: it becomes node.state.
    good = p.read_bytes()
    p.unlink()
    (tmp_path / "node.state.new").write_bytes(good)
    assert node.NodeState(str(p)).last_round == 3
    assert p.read_bytes() == good and (tmp_path / "node.state.new").read_bytes() == b""
    assert node.NodeState(str(p)).last_round == 3


def test_the_sequence_lease_keeps_its_next_file_open_and_never_repeats(tmp_path: Path) -> None:
    """SequenceSource leases through an AtomicFile: seq.new is opened at boot and after each
    lease, empty; a reboot with only that empty file (before the first lease) starts at 1,
    and a reboot after any lease continues above everything handed out."""
    p = tmp_path / "seq"
    new = tmp_path / "seq.new"
    replay.SequenceSource(str(p), block=4).file.f.close()  # a boot, then a power cut
    assert new.read_bytes() == b"" and not p.exists()
    a = replay.SequenceSource(str(p), block=4)  # the reboot
    handed = [a.next() for _ in range(9)]  # three leases
    assert handed == list(range(1, 10)) and new.read_bytes() == b""
    a.file.f.close()
    b = replay.SequenceSource(str(p), block=4)
    assert b.next() == 13  # the third lease went up to 12
    b.file.f.close()
    # A replace cut after its remove (FAT): only seq.new, complete, is there. It is read, and
    # the prepared file of this boot does not truncate it away: it becomes seq.
    good = p.read_bytes()
    p.unlink()
    new.write_bytes(good)
    c = replay.SequenceSource(str(p), block=4)
    assert p.read_bytes() == good and new.read_bytes() == b""
    assert c.next() == 17


def test_node_state_file_any_bytes(tmp_path: Path) -> None:
    node = _load("node")
    p = tmp_path / "state"
    st = node.NodeState(str(p))
    st.save(4, 9, bytes(range(32)))
    assert node.NodeState(str(p)).coord_seq == 9
    raw = p.read_bytes()
    body = raw[:raw.rfind(b"#sha256 ")]
    rng = random.Random(6)
    lines = [b"1 2", b"1 2 3 4", b"x 2 -", b"1 2 zz", b"-1 2 -", b"1 -2 -", b"1 2 " + b"ab" * 31,
             b"\xff 1 -", b"4294967296 1 -", b"1 9223372036854775808 -"]
    bodies = [node.STATE_MAGIC + b"\n" + ln + b"\n" for ln in lines] + _mutants(rng, body, 400)
    for b in bodies:
        p.write_bytes(b + b"#sha256 " + hashlib.sha256(b).hexdigest().encode() + b"\n")
        try:
            node.NodeState(str(p))
        except node.StateError:
            continue
        if b in bodies[:len(lines)]:
            raise AssertionError("accepted %r" % b)
