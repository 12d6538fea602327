# The accepted-set announcement carried by a GLOBAL_MODEL frame (mesh protocol steps 1 and 4).
# Portable: CPython 3.11 and MicroPython (no f-strings, no typing, no floats).
#
# microfed.wire pins the GLOBAL_MODEL payload as digest(32) dim(u32) values(dim x i32) and
# rejects trailing bytes. The mesh protocol needs the same signed frame to announce which
# updates of round r-1 the coordinator aggregated, so this module defines an OPTIONAL trailer
# after that payload (docs: firmware/README.md, "GLOBAL_MODEL announcement"):
#
#   tag        2   b"AN"
#   version    u8  1
#   flags      u8  bit 0: final (the run is over; nodes publish their last digest and exit);
#                  other bits must be 0
#   rule       u8  0 = nothing aggregated (round 1), else 1-based index in wire.RULES
#   p1, p2     u8  rule parameters, as in GOSSIP_DIGEST: krum f,0; multi_krum f,m;
#                  trimmed_mean trim,0; median 0,0; fedavg 0,0 (weights = each update's
#                  `samples` field)
#   agg_digest 32  SHA-256 of the coordinator's aggregated DELTA of round r-1 as LE int32
#                  (= microfed.audit.digest); zeros when rule = 0
#   count      u16 number of accepted updates (0 iff rule = 0)
#   entries    count x ( id_len u8 (1..64) | node id | SHA-256 of the whole update frame )
#
# The payload is signed as a whole (wire signs SHA-256 of the payload), so the announcement is
# as authentic as the model. A payload without the trailer is a plain wire GLOBAL_MODEL (no
# announcement, not final). The frame's round is r; the announcement is about round r - 1.
#
# microfed.wire.decode parses this trailer (it calls decode_global_payload); decode_frame() is
# kept as the explicit name. Every length is bounded before use and only WireError is raised.

import struct

from microfed import wire
from microfed.wire import WireError

TAG = b"AN"
VERSION = 1
FINAL = 1
TRAILER_MIN = 41  # 2 + 1 + 1 + 3 + 32 + 2
_ZERO32 = bytes(32)


def rule_code(rule):
    """0 for None/'' (no aggregate), else the 1-based wire.RULES index."""
    if rule is None or rule == "" or rule == 0:
        return 0
    if isinstance(rule, str):
        if rule not in wire.RULES:
            raise WireError("bad_payload", "unknown rule")
        return wire.RULES.index(rule) + 1
    if type(rule) is int and 1 <= rule <= len(wire.RULES):
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
    out = [TAG, struct.pack("<BBBBB", VERSION, FINAL if final else 0, code, p1, p2),
           bytes(agg_digest), struct.pack("<H", len(rows))]
    seen = {}
    for node_id, h in rows:
        b = node_id.encode() if isinstance(node_id, str) else bytes(node_id)
        if not wire.valid_id(b) or b == wire.COORDINATOR.encode():
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
    """wire.encode_global_model(values) followed by the announcement trailer."""
    return wire.encode_global_model(values) + encode_announce(rule, p1, p2, agg_digest,
                                                              accepted, final)


def _need(cond, msg):
    if not cond:
        raise WireError("bad_payload", msg)


def decode_global_payload(p):
    """-> {"digest", "values", "final", "rule" (None or name), "p1", "p2", "agg_digest",
    "accepted": [(id, hash32)]}."""
    n = len(p)
    _need(n >= 36, "global model shorter than 36 bytes")
    (dim,) = struct.unpack_from("<I", p, 32)
    _need(dim >= 1 and dim <= (n - 36) // 4, "global model length does not match dim")
    end = 36 + 4 * dim
    body = {"digest": bytes(p[0:32]), "values": list(struct.unpack_from("<%di" % dim, p, 36)),
            "final": False, "rule": None, "p1": 0, "p2": 0, "agg_digest": _ZERO32,
            "accepted": []}
    if n == end:
        return body
    _need(n - end >= TRAILER_MIN, "announcement truncated")
    _need(bytes(p[end:end + 2]) == TAG, "trailing bytes are not an announcement")
    ver, flags, code, p1, p2 = struct.unpack_from("<BBBBB", p, end + 2)
    _need(ver == VERSION, "announcement version %d unknown" % ver)
    _need(flags & ~FINAL == 0, "reserved announcement flags set")
    _need(code <= len(wire.RULES), "unknown rule")
    agg = bytes(p[end + 7:end + 39])
    (count,) = struct.unpack_from("<H", p, end + 39)
    off = end + TRAILER_MIN
    _need((code == 0) == (count == 0), "rule and accepted set disagree")
    # Smallest entry is 1 + 1 + 32 bytes: bound count before looping.
    _need(count * 34 <= n - off, "accepted set count larger than the payload")
    acc = []
    seen = {}
    for _ in range(count):
        # The count bound assumes short entries; one long entry can use up the rest.
        _need(off < n, "accepted entry truncated")
        ln = p[off]
        _need(1 <= ln <= wire.MAX_ID and off + 1 + ln + 32 <= n, "accepted entry truncated")
        b = bytes(p[off + 1:off + 1 + ln])
        _need(wire.valid_id(b) and b != wire.COORDINATOR.encode(), "bad node id in accepted set")
        _need(b not in seen, "node id twice in accepted set")
        seen[b] = 1
        acc.append((b.decode(), bytes(p[off + 1 + ln:off + 33 + ln])))
        off += 33 + ln
    _need(off == n, "trailing bytes after the accepted set")
    body["final"] = bool(flags & FINAL)
    body["rule"] = wire.RULES[code - 1] if code else None
    body["p1"] = p1
    body["p2"] = p2
    body["agg_digest"] = agg
    body["accepted"] = acc
    return body


def decode_frame(data, max_frame=wire.MAX_FRAME):
    """wire.decode: a GLOBAL_MODEL's body always carries the announcement fields."""
    return wire.decode(data, max_frame)


def values_digest_ok(fr):
    """The GLOBAL_MODEL's own digest field matches its vector (the trailer excluded)."""
    return wire.vector_digest(fr.payload[36:36 + 4 * len(fr.body["values"])]) == fr.body["digest"]
