# Secure-aggregation payloads (wire kinds 7-13), byte for byte as docs/wire.md specifies
# them; microfed.secagg gives them meaning. A module of its own so that a node that never runs
# secure aggregation does not pay for it at import (wire.decode imports it on first use).
# Portable: CPython 3.11 and MicroPython.

import struct

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from microfed.wire import (
    COORDINATOR,
    SA_INBOX,
    SA_KEYS,
    SA_KEYSET,
    SA_MASKED,
    SA_REVEAL,
    SA_SHARES,
    SA_UNMASK,
    SEQ_LIMIT,
    WireError,
    _entry_id,
    _need,
    valid_id,
)

# Entry lists are sorted strictly ascending by node id bytes (so an id appears at most once),
# and every entry's start and length are checked against the payload before it is read.
#
#   7  sa_keys    c_pk(32) s_pk(32)                                         P = 64
#   8  sa_keyset  t(u16) count(u16) count x (id_len u8, id, seq u64, ts i64, c_pk 32,
#                 s_pk 32, sig 64): each node's SA_KEYS frame minus what the receiver knows
#   9  sa_shares  count(u16) count x (id_len u8, id = recipient, blob 96)
#  10  sa_inbox   count(u16) count x (id_len u8, id = sender, blob 96)
#  11  sa_masked  dim(u32) dim x u64 (the masked words, mod 2^64)            P = 4 + 8 dim
#  12  sa_unmask  n_alive(u16) ids (id_len u8, id)..., n_dropped(u16) ids...
#  13  sa_reveal  count(u16) count x (id_len u8, id, which u8: 0 self-mask seed share,
#                 1 pairwise key share, share 32)

SA_PUB = const(32)
SA_BLOB = const(96)        # 64 bytes of encrypted shares + a 32-byte HMAC-SHA256 tag
SA_SIG = const(64)
SA_KEYSET_TAIL = const(144)  # seq 8 + ts 8 + c_pk 32 + s_pk 32 + sig 64
SA_REVEAL_TAIL = const(33)   # which 1 + share 32
SA_SELF = const(0)
SA_PAIR = const(1)
U64_MOD = 1 << 64


def _sa_ids(rows, tail_len, what):
    """Entry heads (id_len u8 | id) of `rows` [(id, tail bytes)], sorted by id bytes, ids unique."""
    out = []
    for node_id, tail in rows:
        b = node_id.encode() if isinstance(node_id, str) else bytes(node_id)
        if not valid_id(b) or b == COORDINATOR.encode():
            raise WireError("bad_sender", "bad node id in " + what)
        if len(tail) != tail_len:
            raise WireError("bad_payload", what + " entry of the wrong size")
        out.append((b, tail))
    out.sort()
    for i in range(1, len(out)):
        if out[i][0] == out[i - 1][0]:
            raise WireError("bad_payload", "node id twice in " + what)
    if len(out) > 65535:
        raise WireError("out_of_range", "too many entries in " + what)
    parts = [struct.pack("<H", len(out))]
    for b, tail in out:
        parts.append(struct.pack("<B", len(b)) + b + tail)
    return b"".join(parts)


def _key32(k, what):
    if not isinstance(k, (bytes, bytearray)) or len(k) != 32:
        raise WireError("bad_payload", what + " must be 32 bytes")
    return bytes(k)


def encode_sa_keys(c_pk, s_pk):
    return _key32(c_pk, "c_pk") + _key32(s_pk, "s_pk")


def encode_sa_keyset(t, entries):
    """`entries`: (node id, seq, timestamp, c_pk, s_pk, signature) of each SA_KEYS frame."""
    rows = []
    for node_id, seq, ts, c_pk, s_pk, sig in entries:
        if type(seq) is not int or not 1 <= seq < SEQ_LIMIT:
            raise WireError("bad_seq", "sequence counter must be in 1 .. 2**63-1")
        if type(ts) is not int or not -(1 << 63) <= ts < (1 << 63):
            raise WireError("out_of_range", "timestamp must be a signed 64-bit int")
        if len(sig) != SA_SIG:
            raise WireError("bad_payload", "signature must be 64 bytes")
        rows.append((node_id, struct.pack("<Qq", seq, ts) + encode_sa_keys(c_pk, s_pk)
                     + bytes(sig)))
    if type(t) is not int or not 1 <= t <= len(rows):
        raise WireError("out_of_range", "threshold must be in 1..count")
    return struct.pack("<H", t) + _sa_ids(rows, SA_KEYSET_TAIL, "key set")


def encode_sa_blobs(entries):
    """SA_SHARES (ids = recipients) and SA_INBOX (ids = senders): (node id, blob96) rows."""
    return _sa_ids([(i, bytes(b)) for i, b in entries], SA_BLOB, "share list")


def encode_sa_masked(words):
    n = len(words)
    if n < 1:
        raise WireError("bad_payload", "empty vector")
    out = bytearray(4 + 8 * n)
    struct.pack_into("<I", out, 0, n)
    for i in range(n):
        w = words[i]
        if type(w) is not int or w < 0 or w >= U64_MOD:
            raise WireError("out_of_range", "word %d is not a u64" % i)
        struct.pack_into("<Q", out, 4 + 8 * i, w)
    return bytes(out)


def encode_sa_unmask(alive, dropped):
    """Both lists sorted; they may overlap on the wire (an honest node refuses that)."""
    return (_sa_ids([(i, b"") for i in alive], 0, "alive list")
            + _sa_ids([(i, b"") for i in dropped], 0, "dropped list"))


def encode_sa_reveal(entries):
    """(node id, which, share32) rows; which is SA_SELF or SA_PAIR."""
    rows = []
    for node_id, which, share in entries:
        if which != SA_SELF and which != SA_PAIR:
            raise WireError("bad_payload", "share kind must be 0 or 1")
        rows.append((node_id, struct.pack("<B", which) + _key32(share, "share")))
    return _sa_ids(rows, SA_REVEAL_TAIL, "reveal")


def _sa_list(p, off, n, tail, what):
    """-> ([(id str, offset of the entry's tail)], end offset) of a count-prefixed list."""
    _need(off + 2 <= n, what + " count truncated")
    (count,) = struct.unpack_from("<H", p, off)
    off += 2
    # Smallest entry is 1 + 1 + tail bytes: bound count before looping.
    _need(count * (2 + tail) <= n - off, what + " count larger than the payload")
    out = []
    prev = None
    for _ in range(count):
        b = _entry_id(p, off, n, tail, what)
        _need(prev is None or b > prev, what + " ids not strictly ascending")
        prev = b
        out.append((b.decode(), off + 1 + len(b)))
        off += 1 + len(b) + tail
    return out, off


def decode_sa_payload(kind, p):
    n = len(p)
    if kind == SA_KEYS:
        _need(n == 64, "sa_keys must be 64 bytes")
        return {"c_pk": bytes(p[0:32]), "s_pk": bytes(p[32:64])}
    if kind == SA_KEYSET:
        _need(n >= 4, "key set shorter than 4 bytes")
        (t,) = struct.unpack_from("<H", p, 0)
        rows, off = _sa_list(p, 2, n, SA_KEYSET_TAIL, "key set")
        _need(off == n, "trailing bytes after the key set")
        _need(1 <= t <= len(rows), "threshold outside 1..count")
        entries = []
        for node_id, o in rows:
            seq, ts = struct.unpack_from("<Qq", p, o)
            _need(1 <= seq < SEQ_LIMIT, "key set counter outside 1 .. 2**63-1")
            entries.append((node_id, seq, ts, bytes(p[o + 16:o + 48]), bytes(p[o + 48:o + 80]),
                            bytes(p[o + 80:o + 144])))
        return {"t": t, "entries": entries}
    if kind == SA_SHARES or kind == SA_INBOX:
        rows, off = _sa_list(p, 0, n, SA_BLOB, "share list")
        _need(off == n, "trailing bytes after the share list")
        return {"entries": [(i, bytes(p[o:o + SA_BLOB])) for i, o in rows]}
    if kind == SA_MASKED:
        _need(n >= 4, "masked update shorter than 4 bytes")
        (dim,) = struct.unpack_from("<I", p, 0)
        _need(dim >= 1 and n == 4 + 8 * dim, "masked update length does not match dim")
        return {"words": list(struct.unpack_from("<%dQ" % dim, p, 4))}
    if kind == SA_UNMASK:
        alive, off = _sa_list(p, 0, n, 0, "alive list")
        dropped, off = _sa_list(p, off, n, 0, "dropped list")
        _need(off == n, "trailing bytes after the dropped list")
        return {"alive": [i for i, _o in alive], "dropped": [i for i, _o in dropped]}
    if kind == SA_REVEAL:
        rows, off = _sa_list(p, 0, n, SA_REVEAL_TAIL, "reveal")
        _need(off == n, "trailing bytes after the reveal")
        entries = []
        for node_id, o in rows:
            which = p[o]
            _need(which == SA_SELF or which == SA_PAIR, "share kind must be 0 or 1")
            entries.append((node_id, which, bytes(p[o + 1:o + 33])))
        return {"entries": entries}
    raise WireError("bad_kind", "unknown kind %r" % (kind,))


def encode_sa_body(kind, body):
    """The payload of a decoded secure-aggregation body (decode_sa_payload's inverse)."""
    if kind == SA_KEYS:
        return encode_sa_keys(body["c_pk"], body["s_pk"])
    if kind == SA_KEYSET:
        return encode_sa_keyset(body["t"], body["entries"])
    if kind == SA_SHARES or kind == SA_INBOX:
        return encode_sa_blobs(body["entries"])
    if kind == SA_MASKED:
        return encode_sa_masked(body["words"])
    if kind == SA_UNMASK:
        return encode_sa_unmask(body["alive"], body["dropped"])
    if kind == SA_REVEAL:
        return encode_sa_reveal(body["entries"])
    raise WireError("bad_kind", "unknown kind %r" % (kind,))
