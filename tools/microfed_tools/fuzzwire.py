"""A structure-aware fuzzer for the wire decoder, deterministic from a seed.

Used by tests/test_fuzz_wire.py and benchmarks/fuzz_wire.py. It works in four steps:

1. Templates: valid frames of every kind (MODEL_UPDATE; GLOBAL_MODEL plain and with an
   accepted-set announcement of 0..MAX_ENTRIES entries, final flag on and off; GOSSIP_DIGEST;
   HELLO; STATUS; REGISTRY of 0..MAX_ENTRIES entries; the secure-aggregation kinds, their
   entry lists of 0..MAX_ENTRIES entries), each signed ONCE with a real Ed25519
   key (`cryptography`). Every template records where its fields are: the header's (kind,
   version, lengths, sender length, seq ...) and the payload's (dim, counts, id_len bytes,
   status bytes, flags, rule codes ...).
2. Mutations, 1..3 per case: a header field or a payload field set to a boundary value
   (0, 1, max, the original +-1, 33/34/35/64/65 for id lengths, a random value), the
   payload cut, extended or given bytes inserted (header payload length fixed up, or not),
   the frame cut or extended anywhere, bytes flipped, two frames spliced, the sender id
   rewritten. A mutation never leaves the signature valid for what it changed: a case equal
   to a template gets its last byte flipped.
3. Decode: every case must return a Frame or raise WireError. Anything else is a failure,
   reported with the exception and the hex of the input.
4. Count outcomes: "decoded", or the WireError reason.

Signature validity does not matter for decoding; it matters for the verifier (the tests also
run a sample through microfed.verify.Verifier, where every case must be Rejected).
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache

from microfed import wire, wire_sa
from microfed.wire import WireError
from microfed_host import keys

MESH_NAME = "fuzz"
MESH = wire.mesh_id(MESH_NAME)
MAX_ENTRIES = 8
NODE_IDS = ("n1", "node-02", "a" * 17, "b" * 35, "c" * 40, "Z" * 64, "x.y_z-9", "n8")

# Header fields: (offset, width). Payload length and sender length are at 32 and 36.
HEADER_FIELDS = (
    ("magic", 0, 2), ("version", 2, 1), ("kind", 3, 1), ("mesh", 4, 1), ("round", 12, 4),
    ("seq", 16, 8), ("timestamp", 24, 8), ("payload_len", 32, 4), ("sender_len", 36, 1),
)
# Values worth trying in a one-byte length field (id lengths 1..64, smallest entries 34/35).
U8_EDGES = (0, 1, 2, 32, 33, 34, 35, 36, 41, 63, 64, 65, 127, 128, 254, 255)
U16_EDGES = (0, 1, 2, 7, 8, 9, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
U32_EDGES = (0, 1, 2, 3, 4, 5, 8, 9, 255, 256, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFF,
             0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
U64_EDGES = (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"microfed-fuzz:" + label.encode()).digest()


class Template:
    """A signed frame and where its fields are (offsets into the payload)."""

    def __init__(self, name: str, kind: int, sender: str, frame: bytes,
                 fields: list[tuple[str, int, int]]) -> None:
        self.name = name
        self.kind = kind
        self.sender = sender.encode()
        self.frame = frame
        self.hend = wire.HDR_FIXED + len(self.sender)
        self.payload = frame[self.hend:-wire.SIG_LEN]
        self.signature = frame[-wire.SIG_LEN:]
        self.fields = fields


def _vector_fields(base: int, dim: int) -> list[tuple[str, int, int]]:
    return [("value", base + 4 * i, 4) for i in range(min(dim, 3))]


def _global(values: list[int], ann: dict | None) -> tuple[bytes, list[tuple[str, int, int]]]:
    dim = len(values)
    fields = [("digest", 0, 1), ("dim", 32, 4)] + _vector_fields(36, dim)
    if ann is None:
        return wire.encode_global_model(values), fields
    p = wire.encode_global_payload(values, **ann)
    end = 36 + 4 * dim
    fields += [("tag", end, 2), ("ann_version", end + 2, 1), ("flags", end + 3, 1),
               ("rule", end + 4, 1), ("p1", end + 5, 1), ("p2", end + 6, 1),
               ("agg_digest", end + 7, 1), ("count", end + 39, 2)]
    off = end + wire.TRAILER_MIN
    for node_id, _h in ann.get("accepted", ()):
        ln = len(node_id)
        fields += [("id_len", off, 1), ("id", off + 1, 1), ("id_last", off + ln, 1),
                   ("frame_hash", off + 1 + ln, 1)]
        off += 33 + ln
    return p, fields


def _registry(n: int) -> tuple[bytes, list[tuple[str, int, int]]]:
    ids = sorted(NODE_IDS[:n], key=lambda s: s.encode())
    entries = [(i, keys.public_key(_seed(i)), k % 3 != 2) for k, i in enumerate(ids)]
    p = wire.encode_registry(MESH, 3, keys.public_key(_seed(wire.COORDINATOR)), entries)
    fields = [("mesh", 0, 1), ("version", 8, 4), ("coordinator", 12, 1), ("count", 44, 2)]
    off = 46
    for i in ids:
        ln = len(i)
        fields += [("id_len", off, 1), ("id", off + 1, 1), ("pub", off + 1 + ln, 1),
                   ("status", off + 33 + ln, 1)]
        off += 34 + ln
    return p, fields


def _status(label: str) -> tuple[bytes, list[tuple[str, int, int]]]:
    p = wire.encode_status(2, 12345, 99, 4, label)
    fields = [("state", 0, 1), ("flags", 1, 1), ("free_heap", 2, 4), ("uptime", 6, 4),
              ("last_round", 10, 4), ("label_len", 14, 1)]
    if label:
        fields.append(("label", 15, 1))
    return p, fields


def _payloads() -> list[tuple[str, int, str, bytes, list[tuple[str, int, int]]]]:
    out: list[tuple[str, int, str, bytes, list[tuple[str, int, int]]]] = []
    for dim in (1, 3):
        vals = [65536 * (i + 1) * (-1) ** i for i in range(dim)]
        out.append(("model_update_d%d" % dim, wire.MODEL_UPDATE, "n1",
                    wire.encode_model_update(40, vals),
                    [("samples", 0, 4), ("dim", 4, 4)] + _vector_fields(8, dim)))
        p, f = _global(vals, None)
        out.append(("global_d%d" % dim, wire.GLOBAL_MODEL, wire.COORDINATOR, p, f))
        p, f = _global(vals, {"final": dim == 3})
        out.append(("global_d%d_ann0" % dim, wire.GLOBAL_MODEL, wire.COORDINATOR, p, f))
    for n in range(1, MAX_ENTRIES + 1):
        for ids in (NODE_IDS[:n], NODE_IDS[-n:]):
            acc = [(i, _seed("frame:" + i)) for i in ids]
            rule = wire.RULES[n % len(wire.RULES)]
            ann = {"rule": rule, "p1": n // 3, "p2": n % 4, "agg_digest": _seed("agg%d" % n),
                   "accepted": acc, "final": n % 2 == 0}
            p, f = _global([7, -7], ann)
            out.append(("global_ann%d_%s" % (n, ids[0][:2]), wire.GLOBAL_MODEL,
                        wire.COORDINATOR, p, f))
    for r in wire.RULES:
        out.append(("gossip_" + r, wire.GOSSIP_DIGEST, "node-02",
                    wire.encode_gossip_digest(_seed("d" + r), r, 1, 2, 5),
                    [("digest", 0, 1), ("rule", 32, 1), ("p1", 33, 1), ("p2", 34, 1),
                     ("count", 35, 2)]))
    for kind, label in ((wire.HELLO, "boot unix gossip"), (wire.STATUS, ""),
                        (wire.STATUS, "rej bad_signature 3")):
        p, f = _status(label)
        out.append(("%s_%d" % (wire.KIND_NAMES[kind], len(label)), kind, "x.y_z-9", p, f))
    for n in range(0, MAX_ENTRIES + 1):
        p, f = _registry(n)
        out.append(("registry_%d" % n, wire.REGISTRY, wire.COORDINATOR, p, f))
    return out + _secagg_payloads()


def _sa_list_fields(ids: list[str], base: int, tail: list[tuple[str, int, int]],
                    tail_len: int) -> tuple[list[tuple[str, int, int]], int]:
    """Fields of a count-prefixed secure-aggregation entry list at `base`; its end offset."""
    fields = [("count", base, 2)]
    off = base + 2
    for i in ids:
        ln = len(i)
        fields += [("id_len", off, 1), ("id", off + 1, 1), ("id_last", off + ln, 1)]
        fields += [(name, off + 1 + ln + o, w) for name, o, w in tail]
        off += 1 + ln + tail_len
    return fields, off


def _secagg_payloads() -> list[tuple[str, int, str, bytes, list[tuple[str, int, int]]]]:
    """Templates of the secure-aggregation kinds (wire.SA_KINDS), 0..MAX_ENTRIES entries."""
    out: list[tuple[str, int, str, bytes, list[tuple[str, int, int]]]] = []
    out.append(("sa_keys", wire.SA_KEYS, "n1", wire_sa.encode_sa_keys(_seed("c"), _seed("s")),
                [("c_pk", 0, 1), ("s_pk", 32, 1)]))
    for dim in (1, 4):
        out.append(("sa_masked_d%d" % dim, wire.SA_MASKED, "n1",
                    wire_sa.encode_sa_masked([(1 << 64) - 1 - k for k in range(dim)]),
                    [("dim", 0, 4)] + [("word", 4 + 8 * k, 8) for k in range(min(dim, 3))]))
    for n in range(0, MAX_ENTRIES + 1):
        ids = sorted(NODE_IDS[:n], key=lambda s: s.encode())
        if n:
            ks = [(i, 5 + k, -k, _seed("c" + i), _seed("s" + i), _seed("a" + i) + _seed("b" + i))
                  for k, i in enumerate(ids)]
            f, _ = _sa_list_fields(ids, 2, [("seq", 0, 8), ("ts", 8, 8), ("c_pk", 16, 1),
                                            ("sig", 80, 1)], wire_sa.SA_KEYSET_TAIL)
            out.append(("sa_keyset_%d" % n, wire.SA_KEYSET, wire.COORDINATOR,
                        wire_sa.encode_sa_keyset(max(1, n // 2), ks), [("t", 0, 2)] + f))
        blobs = [(i, _seed("x" + i) * 3) for i in ids]
        f, _ = _sa_list_fields(ids, 0, [("blob", 0, 1), ("tag", 64, 1)], wire_sa.SA_BLOB)
        out.append(("sa_shares_%d" % n, wire.SA_SHARES, "node-02", wire_sa.encode_sa_blobs(blobs), f))
        out.append(("sa_inbox_%d" % n, wire.SA_INBOX, wire.COORDINATOR,
                    wire_sa.encode_sa_blobs(blobs), f))
        rev = [(i, k % 2, _seed("r" + i)) for k, i in enumerate(ids)]
        f, _ = _sa_list_fields(ids, 0, [("which", 0, 1), ("share", 1, 1)], wire_sa.SA_REVEAL_TAIL)
        out.append(("sa_reveal_%d" % n, wire.SA_REVEAL, "x.y_z-9", wire_sa.encode_sa_reveal(rev), f))
        alive, dropped = ids[: (n + 1) // 2], ids[(n + 1) // 2:]
        f, end = _sa_list_fields(alive, 0, [], 0)
        f2, _ = _sa_list_fields(dropped, end, [], 0)
        out.append(("sa_unmask_%d" % n, wire.SA_UNMASK, wire.COORDINATOR,
                    wire_sa.encode_sa_unmask(alive, dropped), f + f2))
    return out


@lru_cache(maxsize=1)
def templates() -> tuple[Template, ...]:
    """Every template, signed once (deterministic: Ed25519 and the key seeds are)."""
    out = []
    for k, (name, kind, sender, payload, fields) in enumerate(_payloads()):
        frame = wire.encode(kind, MESH, sender, 5, 100 + k, 1_750_000_000, payload,
                            keys.signer(_seed(sender)))
        wire.decode(frame)  # a template must be valid
        out.append(Template(name, kind, sender, frame, fields))
    return tuple(out)


def senders() -> list[tuple[str, bytes]]:
    """(node id, public key) of every template sender, for a verifier's registry."""
    ids = sorted({t.sender.decode() for t in templates()} - {wire.COORDINATOR})
    return [(i, keys.public_key(_seed(i))) for i in ids]


def coordinator_key() -> bytes:
    return keys.public_key(_seed(wire.COORDINATOR))


def _edge(rng: random.Random, width: int, orig: int) -> int:
    r = rng.random()
    mask = (1 << (8 * width)) - 1
    if r < 0.25:
        return (orig + rng.choice((1, -1, 2, -2))) & mask
    if r < 0.35:
        return rng.getrandbits(8 * width)
    edges = {1: U8_EDGES, 2: U16_EDGES, 4: U32_EDGES, 8: U64_EDGES}.get(width, (0, mask))
    return rng.choice(edges) & mask


def _set(buf: bytearray, off: int, width: int, rng: random.Random) -> None:
    if off + width > len(buf):
        return
    orig = int.from_bytes(buf[off:off + width], "little")
    buf[off:off + width] = _edge(rng, width, orig).to_bytes(width, "little")


class Fuzzer:
    """Deterministic case generator: Fuzzer(seed).case() -> (mutation label, bytes)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.templates = templates()
        self.originals = {t.frame for t in self.templates}

    def case(self) -> tuple[str, bytes]:
        rng = self.rng
        t = rng.choice(self.templates)
        hdr = bytearray(t.frame[:t.hend])
        payload = bytearray(t.payload)
        sig = bytearray(t.signature)
        fix_len = rng.random() < 0.85  # keep the header's payload length honest
        ops = []
        for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
            op = rng.random()
            if op < 0.40:
                name, off, width = rng.choice(t.fields)
                _set(payload, off, width, rng)
                ops.append("p." + name)
            elif op < 0.55:
                name, off, width = rng.choice(HEADER_FIELDS)
                _set(hdr, off, width, rng)
                if name == "payload_len":
                    fix_len = False
                ops.append("h." + name)
            elif op < 0.65:
                i = rng.randint(0, len(payload))
                if rng.random() < 0.5:
                    del payload[i:i + rng.choice((1, 2, 4, 33, 34, rng.randint(1, 200)))]
                    ops.append("p.cut")
                else:
                    payload[i:i] = rng.randbytes(rng.choice((1, 2, 4, 33, 34, 35, 41)))
                    ops.append("p.insert")
            elif op < 0.70:
                # Replace the sender id (length byte kept in step unless the op says not).
                sid = rng.choice((b"", b"n", b"coordinator", b"bad id", b"\xff", b"z" * 64,
                                  b"z" * 65, rng.randbytes(rng.randint(1, 8))))
                hdr = hdr[:wire.HDR_FIXED] + bytearray(sid)
                if rng.random() < 0.8:
                    hdr[36] = len(sid) & 0xFF
                ops.append("h.sender")
            else:
                ops.append("frame")
                break
        if fix_len:
            hdr[32:36] = struct.pack("<I", len(payload))
        data = bytearray(hdr + payload + sig)
        if ops[-1] == "frame":
            ops[-1], data = self._frame_op(data)
        out = bytes(data)
        if out in self.originals:
            out = out[:-1] + bytes([out[-1] ^ 1])
        return "+".join(ops), out

    def _frame_op(self, data: bytearray) -> tuple[str, bytearray]:
        rng = self.rng
        op = rng.random()
        if op < 0.25:
            return "f.truncate", data[:rng.randint(0, len(data))]
        if op < 0.40:
            return "f.extend", data + rng.randbytes(rng.choice((1, 2, 34, rng.randint(1, 300))))
        if op < 0.75:
            for _ in range(rng.randint(1, 4)):
                if data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            return "f.flip", data
        if op < 0.95:
            other = rng.choice(self.templates).frame
            return "f.splice", data[:rng.randint(0, len(data))] + other[rng.randint(0, len(other)):]
        return "f.random", bytearray(rng.randbytes(rng.randint(0, 400)))

    def cases(self, n: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(n):
            yield self.case()


def long_last_entry(data: bytes) -> bool:
    """True if `data` is a GLOBAL_MODEL whose announcement passes the count bound but whose
    complete entries use up the payload before the count is reached, so the next entry would
    start exactly at the payload's end: the shape of the IndexError bug fixed in
    decode_global_payload (ids are not checked, so some such cases stop earlier)."""
    if len(data) < wire.HDR_FIXED or data[:2] != wire.MAGIC or data[3] != wire.GLOBAL_MODEL:
        return False
    plen, slen = struct.unpack_from("<IB", data, 32)
    hend = wire.HDR_FIXED + slen
    if len(data) != hend + plen + wire.SIG_LEN or plen < 36:
        return False
    p = data[hend:hend + plen]
    n = len(p)
    (dim,) = struct.unpack_from("<I", p, 32)
    if not 1 <= dim <= (n - 36) // 4:
        return False
    end = 36 + 4 * dim
    if n - end < wire.TRAILER_MIN or p[end:end + 2] != wire.TAG:
        return False
    (count,) = struct.unpack_from("<H", p, end + 39)
    off = end + wire.TRAILER_MIN
    if count == 0 or count * 34 > n - off:
        return False
    for _ in range(count):
        if off == n:
            return True
        ln = p[off]
        if not 1 <= ln <= wire.MAX_ID or off + 33 + ln > n:
            return False
        off += 33 + ln
    return False


class Result:
    def __init__(self) -> None:
        self.n = 0
        self.seconds = 0.0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[tuple[str, str, str]] = []  # (exception, mutation, input hex)


def run(n: int, seed: int = 0, decode: Callable[[bytes], object] = wire.decode,
        max_failures: int = 20) -> Result:
    """Decode n cases; count "decoded" / each WireError reason; collect anything else."""
    res = Result()
    fz = Fuzzer(seed)
    t0 = time.perf_counter()
    for label, data in fz.cases(n):
        try:
            decode(data)
            res.outcomes["decoded"] += 1
        except WireError as e:
            res.outcomes[e.reason] += 1
        except Exception as e:  # the thing being hunted
            res.outcomes["ESCAPED " + type(e).__name__] += 1
            if len(res.failures) < max_failures:
                res.failures.append(("%s: %s" % (type(e).__name__, e), label, data.hex()))
    res.seconds = time.perf_counter() - t0
    res.n = n
    return res
