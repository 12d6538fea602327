# The microfed wire format, byte for byte as docs/wire.md specifies it.
# Portable: CPython 3.11 and the MicroPython unix port / ESP32 (needs hashlib.sha256 and struct).
# Every frame is
#     fixed header (37 bytes) | sender id (1..64 bytes) | payload | Ed25519 signature (64 bytes)
# and the signature covers exactly what is sent: a kind-specific domain string, the header
# bytes (fixed part + sender id) and the SHA-256 of the payload, hashed once more with SHA-256
# so Ed25519's SHA-512 only ever runs over a 32-byte message (devices ship a slow pure-Python
# SHA-512). Decoding bounds every length before it reads or allocates anything and raises only
# WireError. A GLOBAL_MODEL payload may end in the accepted-set announcement (see
# "accepted-set announcement" below), which this module encodes and decodes too.

import hashlib
import struct
import sys

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

MAGIC = b"MF"
VERSION = const(1)

# Kinds. The numbers are on the wire: never renumber, only append.
MODEL_UPDATE = const(1)
GLOBAL_MODEL = const(2)
GOSSIP_DIGEST = const(3)
HELLO = const(4)
STATUS = const(5)
REGISTRY = const(6)
# Secure aggregation (microfed.secagg, docs/privacy.md): one round in four exchanges.
SA_KEYS = const(7)      # node -> coordinator: the node's two X25519 public keys of the round
SA_KEYSET = const(8)    # coordinator -> nodes: everyone's signed keys and the threshold t
SA_SHARES = const(9)    # node -> coordinator: encrypted Shamir shares, one per peer
SA_INBOX = const(10)    # coordinator -> one node: the shares addressed to it
SA_MASKED = const(11)   # node -> coordinator: the masked, weighted update
SA_UNMASK = const(12)   # coordinator -> nodes: who is alive, who dropped
SA_REVEAL = const(13)   # node -> coordinator: the shares the unmasking needs
SA_KINDS = (SA_KEYS, SA_KEYSET, SA_SHARES, SA_INBOX, SA_MASKED, SA_UNMASK, SA_REVEAL)

KIND_NAMES = {
    MODEL_UPDATE: "model_update",
    GLOBAL_MODEL: "global_model",
    GOSSIP_DIGEST: "gossip_digest",
    HELLO: "hello",
    STATUS: "status",
    REGISTRY: "registry",
    SA_KEYS: "sa_keys",
    SA_KEYSET: "sa_keyset",
    SA_SHARES: "sa_shares",
    SA_INBOX: "sa_inbox",
    SA_MASKED: "sa_masked",
    SA_UNMASK: "sa_unmask",
    SA_REVEAL: "sa_reveal",
}

# Domain separation: one string per kind, so a signature made for one kind can never be
# presented as another, nor as anything else the same key signs.
DOMAINS = {
    MODEL_UPDATE: b"microfed/v1/model_update",
    GLOBAL_MODEL: b"microfed/v1/global_model",
    GOSSIP_DIGEST: b"microfed/v1/gossip_digest",
    HELLO: b"microfed/v1/hello",
    STATUS: b"microfed/v1/status",
    REGISTRY: b"microfed/v1/registry",
    SA_KEYS: b"microfed/v1/sa_keys",
    SA_KEYSET: b"microfed/v1/sa_keyset",
    SA_SHARES: b"microfed/v1/sa_shares",
    SA_INBOX: b"microfed/v1/sa_inbox",
    SA_MASKED: b"microfed/v1/sa_masked",
    SA_UNMASK: b"microfed/v1/sa_unmask",
    SA_REVEAL: b"microfed/v1/sa_reveal",
}

# The coordinator's sender id; node ids may not use it.
COORDINATOR = "coordinator"

# Aggregation rules named in a gossip digest (same order as microfed.audit.RULES, 1-based).
RULES = ("krum", "multi_krum", "median", "trimmed_mean", "fedavg")

# magic(2s) version(B) kind(B) mesh_id(8s) round(I) seq(Q) timestamp(q) payload_len(I) sender_len(B)
_HDR = "<2sBB8sIQqIB"
HDR_FIXED = const(37)
SIG_LEN = const(64)
MESH_ID_LEN = const(8)
DIGEST_LEN = const(32)
KEY_LEN = const(32)
MAX_ID = const(64)
MAX_LABEL = const(32)
MAX_FRAME = const(65536)
MIN_FRAME = const(102)  # HDR_FIXED + 1-byte sender + empty payload + SIG_LEN
# Sequence counters are u64 on the wire but must stay below 2**63 so every store that keeps
# them as a signed 64-bit integer (SQLite, most databases) holds them exactly.
SEQ_LIMIT = 1 << 63
INT32_MIN = const(-2147483648)
INT32_MAX = const(2147483647)
U32_MAX = const(0xFFFFFFFF)

# Registry entry status byte.
REVOKED = const(0)
ACTIVE = const(1)

_ID_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


class WireError(Exception):
    """The only exception decoding raises: WireError(reason_code, message).

    Exception attributes cannot be set on MicroPython, so the fields live in args."""

    @property
    def reason(self):
        return self.args[0]

    @property
    def message(self):
        return self.args[1] if len(self.args) > 1 else ""


def valid_id(b):
    """True if `b` (bytes) is a well-formed node id: 1..64 bytes of [A-Za-z0-9._-]."""
    if not 1 <= len(b) <= MAX_ID:
        return False
    for c in b:
        if c not in _ID_CHARS:
            return False
    return True


def mesh_id(name):
    """The 8-byte mesh id carried in every header: SHA-256("microfed/v1/mesh" 0x00 name)[:8]."""
    if isinstance(name, str):
        name = name.encode()
    return hashlib.sha256(b"microfed/v1/mesh\x00" + name).digest()[:MESH_ID_LEN]


def sha256(b):
    return hashlib.sha256(b).digest()


def vector_digest(values_bytes):
    """SHA-256 of a vector already packed as little-endian int32 (= microfed.audit.digest)."""
    return hashlib.sha256(values_bytes).digest()


def _pack_i32(values, head=b""):
    # head + the values as little-endian int32, built in one buffer: a board's heap holds
    # one copy of the vector here, not three.
    k = len(head)
    out = bytearray(k + 4 * len(values))
    out[:k] = head
    _pack_i32_into(out, k, values)
    return bytes(out)


def _pack_i32_into(out, off, values):
    for i in range(len(values)):
        v = values[i]
        if type(v) is not int or v < INT32_MIN or v > INT32_MAX:
            raise WireError("out_of_range", "value %d is not an int32" % i)
        struct.pack_into("<i", out, off + 4 * i, v)


def _u(v, bits, what):
    if type(v) is not int or v < 0 or v >= (1 << bits):
        raise WireError("out_of_range", "%s must be an unsigned %d-bit int" % (what, bits))
    return v


def _id_bytes(node_id):
    b = node_id.encode() if isinstance(node_id, str) else bytes(node_id)
    if not valid_id(b):
        raise WireError("bad_sender", "node id must be 1..64 bytes of [A-Za-z0-9._-]")
    return b


def _label_bytes(label):
    b = label.encode() if isinstance(label, str) else bytes(label)
    if len(b) > MAX_LABEL:
        raise WireError("bad_payload", "label longer than 32 bytes")
    for c in b:
        if c < 0x20 or c > 0x7E:
            raise WireError("bad_payload", "label must be printable ASCII")
    return b


# ---------------------------------------------------------------- payload encoders

def encode_model_update(samples, values):
    """samples(u32) dim(u32) values(dim x i32)."""
    _u(samples, 32, "samples")
    if len(values) < 1:
        raise WireError("bad_payload", "empty vector")
    return _pack_i32(values, struct.pack("<II", samples, len(values)))


def encode_global_model(values):
    """digest(32) dim(u32) values(dim x i32); digest = SHA-256 of the packed values."""
    if len(values) < 1:
        raise WireError("bad_payload", "empty vector")
    vb = _pack_i32(values)
    return vector_digest(vb) + struct.pack("<I", len(values)) + vb


def encode_gossip_digest(digest, rule, p1=0, p2=0, count=0):
    """digest(32) rule(u8, 1-based index in RULES) p1(u8) p2(u8) count(u16)."""
    if len(digest) != DIGEST_LEN:
        raise WireError("bad_payload", "digest must be 32 bytes")
    if isinstance(rule, str):
        if rule not in RULES:
            raise WireError("bad_payload", "unknown rule")
        rule = RULES.index(rule) + 1
    if type(rule) is not int or not 1 <= rule <= len(RULES):
        raise WireError("bad_payload", "unknown rule")
    return bytes(digest) + struct.pack("<BBBH", rule, _u(p1, 8, "p1"), _u(p2, 8, "p2"),
                                       _u(count, 16, "count"))


def encode_status(state=0, free_heap=0, uptime=0, last_round=0, label=""):
    """HELLO and STATUS share this layout:
    state(u8) flags(u8, 0) free_heap(u32) uptime_s(u32) last_round(u32) label_len(u8) label."""
    lb = _label_bytes(label)
    return struct.pack("<BBIIIB", _u(state, 8, "state"), 0, _u(free_heap, 32, "free_heap"),
                       _u(uptime, 32, "uptime"), _u(last_round, 32, "last_round"),
                       len(lb)) + lb


# The coordinator's notice to a node whose counter is behind (a wiped counter file): a STATUS
# frame from the coordinator on microfed/<mesh>/notice/<node> whose state is NOTICE_BEHIND and
# whose label is "behind <last accepted counter>". Signed like every frame, so only the
# coordinator can make a node skip ahead (and skipping ahead is always safe).
NOTICE_BEHIND = const(16)


def encode_counter_notice(last_round, last_seq):
    if type(last_seq) is not int or not 0 <= last_seq < SEQ_LIMIT:
        raise WireError("out_of_range", "counter must be in 0 .. 2**63-1")
    return encode_status(NOTICE_BEHIND, 0, 0, last_round, "behind %d" % last_seq)


def counter_notice_seq(body):
    """The counter a decoded STATUS body tells the node to skip past, or None."""
    if body.get("state") != NOTICE_BEHIND:
        return None
    lb = body.get("label", "")
    if not lb.startswith("behind ") or not 1 <= len(lb) - 7 <= 19:
        return None
    digits = lb[7:]
    for c in digits:
        if c < "0" or c > "9":
            return None
    v = int(digits)
    return v if v < SEQ_LIMIT else None


def encode_registry(mesh, version, coordinator_pub, entries):
    """mesh_id(8) version(u32) coordinator_pub(32) count(u16) then per entry, sorted by id bytes:
    id_len(u8) id pub(32) status(u8: 1 active, 0 revoked).

    `entries`: iterable of (node_id, pub32, active_bool)."""
    if len(mesh) != MESH_ID_LEN or len(coordinator_pub) != KEY_LEN:
        raise WireError("bad_payload", "mesh id must be 8 bytes and coordinator key 32")
    rows = []
    for node_id, pub, active in entries:
        b = _id_bytes(node_id)
        if b == COORDINATOR.encode():
            raise WireError("bad_sender", "node id 'coordinator' is reserved")
        if len(pub) != KEY_LEN:
            raise WireError("bad_payload", "public key must be 32 bytes")
        rows.append((b, bytes(pub), ACTIVE if active else REVOKED))
    rows.sort()
    for i in range(1, len(rows)):
        if rows[i][0] == rows[i - 1][0]:
            raise WireError("bad_payload", "duplicate node id in registry")
    out = [bytes(mesh), struct.pack("<I", _u(version, 32, "version")), bytes(coordinator_pub),
           struct.pack("<H", _u(len(rows), 16, "count"))]
    for b, pub, st in rows:
        out.append(struct.pack("<B", len(b)) + b + pub + struct.pack("<B", st))
    return b"".join(out)


# ---------------------------------------------------------------- payload decoders

# A board's heap fragments; CPython's does not (and there one struct call is ~20 x faster
# than a Python loop over the values: the coordinator decodes every update).
_IN_PLACE = sys.implementation.name == "micropython"


def i32_at(b, o):
    """The little-endian int32 at b[o:o + 4], with no allocation for |value| < 2**30 (a small
    int on a 32-bit port; struct.unpack_from makes a tuple, and 64 values at a time a 264-byte
    block that a fragmented 64 KB heap did not always have, docs/boards.md)."""
    t = b[o + 3]
    return ((t - 256 if t > 127 else t) << 24) | (b[o + 2] << 16) | (b[o + 1] << 8) | b[o]


def _unpack_i32(payload, off, n, into=None):
    # On MicroPython the list is allocated once at its length and filled value by value (i32_at): unpacking
    # all n at once would first build an n-tuple as large as the list (two 2.6 KB blocks for
    # 650 values, which a fragmented 64 KB heap may not have), and list(tuple) would double as
    # it appends on MicroPython (a 4 KB block). `into`: a list the caller keeps for this (a
    # node's noderound.RoundBuffers), used when it has exactly n items.
    if not _IN_PLACE:
        vals = struct.unpack_from("<%di" % n, payload, off)
        if into is not None and len(into) == n:
            into[:] = vals
            return into
        return list(vals)
    if into is not None and len(into) == n:
        out = into
    else:
        out = [0] * n
    for i in range(n):
        out[i] = i32_at(payload, off + 4 * i)
    return out


def _need(cond, msg):
    if not cond:
        raise WireError("bad_payload", msg)


def _entry_id(p, off, n, tail, what):
    """The node id of a length-prefixed entry at p[off] that `tail` more bytes follow
    (registry and accepted-set entries). Each entry's start is checked, not only the count:
    the count bound assumes short entries, and one long entry can use up the rest."""
    _need(off < n, what + " entry truncated")
    ln = p[off]
    _need(1 <= ln <= MAX_ID and off + 1 + ln + tail <= n, what + " entry truncated")
    b = bytes(p[off + 1:off + 1 + ln])
    _need(valid_id(b) and b != COORDINATOR.encode(), "bad node id in " + what)
    return b


def decode_payload(kind, p, values=True, into=None, accepted=True):
    """Parse a payload of `kind` into a dict; every length is checked against len(p) first.
    values=False: a MODEL_UPDATE's vector is not unpacked ("values" is None, "dim" says how
    many): for a receiver that only checks the values' range and keeps them packed.
    into: a list a GLOBAL_MODEL's values are unpacked into when it has their number (else a
    new list holds them). accepted=False: a GLOBAL_MODEL's accepted set is checked entry by
    entry as always but not kept ("accepted" is None)."""
    if not isinstance(p, (bytes, bytearray, memoryview)):
        raise WireError("bad_type", "payload must be bytes")
    n = len(p)
    if kind == MODEL_UPDATE:
        _need(n >= 8, "model update shorter than 8 bytes")
        samples, dim = struct.unpack_from("<II", p, 0)
        _need(dim >= 1 and n == 8 + 4 * dim, "model update length does not match dim")
        if not values:
            return {"samples": samples, "dim": dim, "values": None}
        return {"samples": samples, "values": _unpack_i32(p, 8, dim)}
    if kind == GLOBAL_MODEL:
        # digest, values, then optionally the accepted-set announcement, signed with the rest
        # of the payload.
        return decode_global_payload(p, into, accepted)
    if kind == GOSSIP_DIGEST:
        _need(n == 37, "gossip digest must be 37 bytes")
        rule, p1, p2, count = struct.unpack_from("<BBBH", p, 32)
        _need(1 <= rule <= len(RULES), "unknown rule")
        return {"digest": bytes(p[0:32]), "rule": RULES[rule - 1], "p1": p1, "p2": p2,
                "count": count}
    if kind == HELLO or kind == STATUS:
        _need(n >= 15, "status shorter than 15 bytes")
        state, flags, heap, up, last, ll = struct.unpack_from("<BBIIIB", p, 0)
        _need(flags == 0, "reserved flags must be 0")
        _need(ll <= MAX_LABEL and n == 15 + ll, "status label length does not match")
        lb = bytes(p[15:15 + ll])
        for c in lb:
            _need(0x20 <= c <= 0x7E, "label must be printable ASCII")
        return {"state": state, "free_heap": heap, "uptime": up, "last_round": last,
                "label": lb.decode()}
    if kind == REGISTRY:
        _need(n >= 46, "registry shorter than 46 bytes")
        mesh = bytes(p[0:8])
        (version,) = struct.unpack_from("<I", p, 8)
        coord = bytes(p[12:44])
        (count,) = struct.unpack_from("<H", p, 44)
        # Smallest entry is 1 + 1 + 32 + 1 bytes: bound count before looping.
        _need(count * 35 <= n - 46, "registry count larger than the payload")
        off = 46
        entries = []
        prev = None
        for _ in range(count):
            b = _entry_id(p, off, n, 33, "registry")
            ln = len(b)
            _need(prev is None or b > prev, "registry ids not strictly ascending")
            prev = b
            pub = bytes(p[off + 1 + ln:off + 33 + ln])
            st = p[off + 33 + ln]
            _need(st == ACTIVE or st == REVOKED, "bad registry entry status")
            entries.append((b.decode(), pub, st == ACTIVE))
            off += 34 + ln
        _need(off == n, "trailing bytes after registry entries")
        return {"mesh_id": mesh, "version": version, "coordinator": coord, "entries": entries}
    if kind in SA_KINDS:
        # Its own module: a node that never runs secure aggregation never imports it.
        from microfed import wire_sa
        return wire_sa.decode_sa_payload(kind, p)
    raise WireError("bad_kind", "unknown kind %r" % (kind,))


# ---------------------------------------------------------------- accepted-set announcement
# The GLOBAL_MODEL payload is digest(32) dim(u32) values(dim x i32). The mesh protocol (steps 1
# and 4) needs the same signed frame to announce which updates of round r-1 the coordinator
# aggregated, so an OPTIONAL trailer may follow the values (docs/wire.md, firmware/README.md):
#
#   tag        2   b"AN"
#   version    u8  1
#   flags      u8  bit 0: final (the run is over; nodes publish their last digest and exit);
#                  other bits must be 0
#   rule       u8  0 = nothing aggregated (round 1), else 1-based index in RULES
#   p1, p2     u8  rule parameters, as in GOSSIP_DIGEST: krum f,0; multi_krum f,m;
#                  trimmed_mean trim,0; median 0,0; fedavg 0,0 (weights = each update's
#                  `samples` field)
#   agg_digest 32  SHA-256 of the coordinator's aggregated DELTA of round r-1 as LE int32
#                  (= microfed.audit.digest); zeros when rule = 0
#   count      u16 number of accepted updates (0 iff rule = 0)
#   entries    count x ( id_len u8 (1..64) | node id | SHA-256 of the whole update frame )
#
# The payload is signed as a whole, so the announcement is as authentic as the model. A payload
# without the trailer is a plain GLOBAL_MODEL (no announcement, not final). The frame's round is
# r; the announcement is about round r - 1. decode() always fills the announcement fields of a
# GLOBAL_MODEL's body.

TAG = b"AN"
ANNOUNCE_VERSION = const(1)
FINAL = const(1)
TRAILER_MIN = const(41)  # 2 + 1 + 1 + 3 + 32 + 2
_ZERO32 = bytes(32)


def rule_code(rule):
    """0 for None/'' (no aggregate), else the 1-based RULES index."""
    if rule is None or rule == "" or rule == 0:
        return 0
    if isinstance(rule, str):
        if rule not in RULES:
            raise WireError("bad_payload", "unknown rule")
        return RULES.index(rule) + 1
    if type(rule) is int and 1 <= rule <= len(RULES):
        return rule
    raise WireError("bad_payload", "unknown rule")


def rule_params(rule, p1, p2, weights=None):
    """The params dict microfed.audit.run expects for an announced rule."""
    if rule == "krum":
        return {"f": p1}
    if rule == "multi_krum":
        return {"f": p1, "m": p2}
    if rule == "trimmed_mean":
        return {"trim": p1}
    if rule == "fedavg":
        return {"weights": list(weights or ())}
    return {}


def encode_announce(rule=None, p1=0, p2=0, agg_digest=None, accepted=(), final=False):
    """The trailer. `accepted`: ordered (node_id, frame_sha256) pairs."""
    code = rule_code(rule)
    for name, v in (("p1", p1), ("p2", p2)):
        if type(v) is not int or not 0 <= v <= 255:
            raise WireError("out_of_range", "%s must be 0..255" % name)
    if agg_digest is None:
        agg_digest = _ZERO32
    if len(agg_digest) != 32:
        raise WireError("bad_payload", "aggregate digest must be 32 bytes")
    rows = list(accepted)
    if (code == 0) != (len(rows) == 0):
        raise WireError("bad_payload", "a rule needs accepted updates and vice versa")
    if len(rows) > 65535:
        raise WireError("out_of_range", "too many accepted updates")
    out = [TAG, struct.pack("<BBBBB", ANNOUNCE_VERSION, FINAL if final else 0, code, p1, p2),
           bytes(agg_digest), struct.pack("<H", len(rows))]
    seen = {}
    for node_id, h in rows:
        b = node_id.encode() if isinstance(node_id, str) else bytes(node_id)
        if not valid_id(b) or b == COORDINATOR.encode():
            raise WireError("bad_sender", "bad node id in accepted set")
        if b in seen:
            raise WireError("bad_payload", "node id twice in accepted set")
        seen[b] = 1
        if len(h) != 32:
            raise WireError("bad_payload", "frame hash must be 32 bytes")
        out.append(struct.pack("<B", len(b)) + b + bytes(h))
    return b"".join(out)


def encode_global_payload(values, rule=None, p1=0, p2=0, agg_digest=None, accepted=(),
                          final=False):
    """encode_global_model(values) followed by the announcement trailer."""
    return encode_global_model(values) + encode_announce(rule, p1, p2, agg_digest, accepted,
                                                         final)


def decode_global_payload(p, into=None, accepted=True):
    """-> {"digest", "values", "final", "rule" (None or name), "p1", "p2", "agg_digest",
    "accepted": [(id, hash32)]}. accepted=False: the same checks, and
    "accepted" is None: a coordinated node, which never uses the set, does not hold an id,
    a hash and a tuple per announced node while it decodes (docs/results.md)."""
    n = len(p)
    _need(n >= 36, "global model shorter than 36 bytes")
    (dim,) = struct.unpack_from("<I", p, 32)
    _need(dim >= 1 and dim <= (n - 36) // 4, "global model length does not match dim")
    end = 36 + 4 * dim
    body = {"digest": bytes(p[0:32]), "values": _unpack_i32(p, 36, dim, into),
            "final": False, "rule": None, "p1": 0, "p2": 0, "agg_digest": _ZERO32,
            "accepted": [] if accepted else None}
    if n == end:
        return body
    _need(n - end >= TRAILER_MIN, "announcement truncated")
    _need(bytes(p[end:end + 2]) == TAG, "trailing bytes are not an announcement")
    ver, flags, code, p1, p2 = struct.unpack_from("<BBBBB", p, end + 2)
    _need(ver == ANNOUNCE_VERSION, "announcement version %d unknown" % ver)
    _need(flags & ~FINAL == 0, "reserved announcement flags set")
    _need(code <= len(RULES), "unknown rule")
    agg = bytes(p[end + 7:end + 39])
    (count,) = struct.unpack_from("<H", p, end + 39)
    off = end + TRAILER_MIN
    _need((code == 0) == (count == 0), "rule and accepted set disagree")
    # Smallest entry is 1 + 1 + 32 bytes: bound count before looping.
    _need(count * 34 <= n - off, "accepted set count larger than the payload")
    acc = [] if accepted else None
    seen = {}
    for _ in range(count):
        b = _entry_id(p, off, n, 32, "accepted set")
        ln = len(b)
        _need(b not in seen, "node id twice in accepted set")
        seen[b] = 1
        if accepted:
            acc.append((b.decode(), bytes(p[off + 1 + ln:off + 33 + ln])))
        off += 33 + ln
    _need(off == n, "trailing bytes after the accepted set")
    body["final"] = bool(flags & FINAL)
    body["rule"] = RULES[code - 1] if code else None
    body["p1"] = p1
    body["p2"] = p2
    body["agg_digest"] = agg
    body["accepted"] = acc
    return body



def values_digest_ok(fr):
    """The GLOBAL_MODEL's own digest field matches its vector (the trailer excluded)."""
    # A view, not a slice: no 2.6 KB copy of the vector just to hash it.
    return vector_digest(memoryview(fr.payload)[36:36 + 4 * len(fr.body["values"])]) == fr.body["digest"]


# ---------------------------------------------------------------- frames

def encode_header(kind, mesh, sender, round_, seq, timestamp, payload_len):
    if kind not in DOMAINS:
        raise WireError("bad_kind", "unknown kind")
    if len(mesh) != MESH_ID_LEN:
        raise WireError("wrong_mesh", "mesh id must be 8 bytes")
    sb = _id_bytes(sender)
    _u(round_, 32, "round")
    if type(seq) is not int or not 1 <= seq < SEQ_LIMIT:
        raise WireError("bad_seq", "sequence counter must be in 1 .. 2**63-1")
    if type(timestamp) is not int or not -(1 << 63) <= timestamp < (1 << 63):
        raise WireError("out_of_range", "timestamp must be a signed 64-bit int")
    _u(payload_len, 32, "payload length")
    return struct.pack(_HDR, MAGIC, VERSION, kind, bytes(mesh), round_, seq, timestamp,
                       payload_len, len(sb)) + sb


def signing_digest(kind, header, payload_hash):
    """The 32 bytes Ed25519 signs: SHA-256(domain(kind) 0x00 header SHA-256(payload))."""
    h = hashlib.sha256(DOMAINS[kind])
    h.update(b"\x00")
    h.update(header)
    h.update(payload_hash)
    return h.digest()


def encode(kind, mesh, sender, round_, seq, timestamp, payload, sign):
    """Build a signed frame. `sign(msg32) -> sig64` holds the sender's key (portable ed25519
    on devices, `cryptography` on the host)."""
    payload = bytes(payload)
    hdr = encode_header(kind, mesh, sender, round_, seq, timestamp, len(payload))
    sig = _signature(kind, hdr, payload, sign)
    frame = b"".join((hdr, payload, bytes(sig)))  # one allocation, not two
    _frame_fits(len(frame))
    return frame


def _signature(kind, hdr, payload, sign):
    sig = sign(signing_digest(kind, hdr, sha256(payload)))
    if len(sig) != SIG_LEN:
        raise WireError("bad_signature", "signer returned %d bytes" % len(sig))
    return sig


def _frame_fits(n):
    if n > MAX_FRAME:
        raise WireError("oversize", "frame of %d bytes exceeds %d" % (n, MAX_FRAME))


def encode_update(mesh, sender, round_, seq, timestamp, samples, values, sign, out=None):
    """encode(MODEL_UPDATE, mesh, sender, round_, seq, timestamp,
    encode_model_update(samples, values), sign), byte for byte and with the same errors, but
    built in one bytearray (returned): a 32-bit board's heap holds the 2.7 KB frame once,
    instead of the packed vector, its bytes copy and the joined frame in turn. `out`: a
    bytearray (or a writable memoryview) of the frame's length to build it in and return (a
    node's, reused every round); of any other length it is not used."""
    _u(samples, 32, "samples")
    n = len(values)
    if n < 1:
        raise WireError("bad_payload", "empty vector")
    plen = 8 + 4 * n
    hdr = encode_header(MODEL_UPDATE, mesh, sender, round_, seq, timestamp, plen)
    h = len(hdr)
    if not isinstance(out, (bytearray, memoryview)) or len(out) != h + plen + SIG_LEN:
        out = bytearray(h + plen + SIG_LEN)
    out[:h] = hdr
    struct.pack_into("<II", out, h, samples, n)
    _pack_i32_into(out, h + 8, values)
    sig = _signature(MODEL_UPDATE, hdr, memoryview(out)[h:h + plen], sign)
    _frame_fits(len(out))
    out[h + plen:] = sig
    return out


class Frame:
    """A structurally valid, NOT yet authenticated frame. `body` is the decoded payload."""

    def __init__(self, kind, mesh_id, sender, round_, seq, timestamp, header, payload,
                 signature, body):
        self.version = VERSION
        self.kind = kind
        self.mesh_id = mesh_id
        self.sender = sender
        self.round = round_
        self.seq = seq
        self.timestamp = timestamp
        self.header = header
        self.payload = payload
        self.signature = signature
        self.body = body

    @property
    def kind_name(self):
        return KIND_NAMES[self.kind]

    def drop_payload(self):
        """Forget the payload: after decode(values=False) it is a view into the caller's
        buffer, which the caller may be about to reuse (an MQTT receive buffer)."""
        self.payload = None

    def signing_digest(self):
        return signing_digest(self.kind, self.header, sha256(self.payload))

    def __repr__(self):
        return "Frame(%s from %s round=%d seq=%d ts=%d %d payload bytes)" % (
            KIND_NAMES[self.kind], self.sender, self.round, self.seq, self.timestamp,
            len(self.payload))


def decode(data, max_frame=MAX_FRAME, values=True, into=None, body=True):
    """Parse one frame. Checks, in this order: size limit (before anything else), fixed header
    present, magic, version, kind, sender length, payload length bound, declared total vs. actual
    size, sender id, sequence counter, payload structure. Raises only WireError.
    values=False (decode_payload): the payload is a view into `data`, a MODEL_UPDATE's vector
    stays packed: a small heap holds the frame once, not four times (a caller that passes a
    buffer it reuses, like the MQTT client's receive buffer, must drop the view before then).
    Otherwise the Frame's parts are copies. `into`: see decode_payload. body=False: every check
    but the payload's; the Frame's body is None until the caller decodes it (decode_body)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("bad_type", "frame must be bytes")
    n = len(data)
    if n > max_frame:
        raise WireError("oversize", "frame of %d bytes exceeds %d" % (n, max_frame))
    if n < HDR_FIXED:
        raise WireError("truncated", "frame of %d bytes is shorter than the header" % n)
    if not isinstance(data, bytes):
        # Sliced below as a view, and only the parts a Frame keeps are copied: bytes(data)
        # would copy a 3 KB frame whole into a block a small heap may not have.
        data = memoryview(data)
    magic, version, kind, mesh, round_, seq, ts, plen, slen = struct.unpack_from(_HDR, data, 0)
    if magic != MAGIC:
        raise WireError("bad_magic", "not a microfed frame")
    if version != VERSION:
        raise WireError("bad_version", "frame version %d, expected %d" % (version, VERSION))
    if kind not in DOMAINS:
        raise WireError("bad_kind", "unknown kind %d" % kind)
    if not 1 <= slen <= MAX_ID:
        raise WireError("bad_length", "sender length %d outside 1..%d" % (slen, MAX_ID))
    # Bound the payload length by the limit before adding it to anything.
    if plen > max_frame - MIN_FRAME + 1:
        raise WireError("bad_length", "payload length %d exceeds the frame limit" % plen)
    total = HDR_FIXED + slen + plen + SIG_LEN
    if n < total:
        raise WireError("truncated", "frame has %d bytes, header declares %d" % (n, total))
    if n > total:
        raise WireError("bad_length", "frame has %d bytes, header declares %d" % (n, total))
    sb = bytes(data[HDR_FIXED:HDR_FIXED + slen])
    if not valid_id(sb):
        raise WireError("bad_sender", "sender id is not [A-Za-z0-9._-]")
    if not 1 <= seq < SEQ_LIMIT:
        raise WireError("bad_seq", "sequence counter outside 1 .. 2**63-1")
    hend = HDR_FIXED + slen
    payload = bytes(data[hend:hend + plen]) if values else memoryview(data)[hend:hend + plen]
    fr = Frame(kind, mesh, sb.decode(), round_, seq, ts, bytes(data[:hend]), payload,
               bytes(data[hend + plen:]), None)
    if body:
        decode_body(fr, values, into)
    return fr


def decode_body(fr, values=True, into=None, accepted=True):
    """Decode the payload of a Frame from decode(..., body=False) into fr.body (the last of
    decode's checks); returns fr. Raises only WireError. into, accepted: decode_payload's."""
    b = decode_payload(fr.kind, fr.payload, values, into, accepted)
    if fr.kind == REGISTRY and b["mesh_id"] != fr.mesh_id:
        raise WireError("bad_payload", "registry mesh id differs from the header's")
    fr.body = b
    return fr
