# The verification pipeline, portable (host and device run the same steps in the same order):
#   1 size limit (before any hashing or copying)   oversize
#   2 decode                                       truncated bad_length bad_magic bad_version
#                                                  bad_kind bad_sender bad_seq bad_payload
#   3 mesh                                         wrong_mesh
#   4 expected kind / role                         wrong_kind wrong_role
#   5 registered sender (key from the registry,    unregistered revoked
#     never from the message)
#   6 signature                                    bad_signature
#   7 replay: counter, round binding, clock        replay stale_round future_round clock_skew
#   8 value range                                  bad_dim out_of_range bad_digest
#   9 commit the counter (the only state change)   replay (lost a race)
# Every rejection raises Rejected(reason, message), counts it in `stats`, and changes no
# stored state: the counter is written only in step 9, after everything else passed.
# The signature check is pluggable: `check_sig(pub32, msg32, sig64) -> bool` (the device passes
# microfed.ed25519.verify, the host a `cryptography` wrapper). check_sig=None skips step 6: only
# for a node that trusts peers' frames through the coordinator's announcement
# (microfed.noderound, PEER_CHECKS), never on the coordinator.

from microfed import wire
from microfed.registry import (  # noqa: F401  (re-exported: the pipeline's public names)
    Registry,
    Rejected,
    _sig_ok,
    load_registry_frame,
)
from microfed.replay import ReplayGuard
from microfed.wire import WireError

# Every reason code the pipeline can produce (docs/security.md explains each).
REASONS = (
    "oversize", "bad_type", "truncated", "bad_length", "bad_magic", "bad_version", "bad_kind",
    "bad_sender", "bad_seq", "bad_payload", "wrong_mesh", "wrong_kind", "wrong_role",
    "unregistered", "revoked", "bad_signature", "replay", "stale_round", "future_round",
    "clock_skew", "bad_dim", "out_of_range", "bad_digest",
)

# Kinds only the coordinator may send, and kinds only nodes may send.
COORDINATOR_KINDS = (wire.GLOBAL_MODEL, wire.REGISTRY, wire.SA_KEYSET, wire.SA_INBOX,
                     wire.SA_UNMASK)
NODE_KINDS = (wire.MODEL_UPDATE, wire.GOSSIP_DIGEST, wire.SA_KEYS, wire.SA_SHARES,
              wire.SA_MASKED, wire.SA_REVEAL)

DEFAULT_MAX_ABS = 256 * 65536     # |value| <= 256.0 in Q16.16
DEFAULT_MAX_SAMPLES = 1 << 24


_SAFE = [0, None]  # max_abs, and its table of safe top bytes (_safe_top_bytes)


def _safe_top_bytes(m):
    """256 flags: flag t is 1 when every int32 whose most significant byte is t lies within
    +-m (t's values are t*2**24 .. t*2**24 + 2**24 - 1, t read as signed). Built once per m."""
    if _SAFE[0] != m or _SAFE[1] is None:
        t = bytearray(256)
        for b in range(256):
            lo = (b - 256 if b > 127 else b) << 24
            if lo >= -m and lo + 0xFFFFFF <= m:
                t[b] = 1
        _SAFE[0] = m
        _SAFE[1] = bytes(t)
    return _SAFE[1]


def _packed_out_of_range(p, off, dim, m):
    # Step 8 over little-endian int32 values still packed in p: the same answer (reason and
    # message) as over the unpacked list. Allocation-free for values whose top byte alone
    # proves them in range (all of a sane update at the default +-256.0): unpacking them,
    # even 64 at a time, needed a 264-byte block a peer's update on a fragmented 64 KB heap
    # did not always find (docs/boards.md). Only a value that might be out of range is
    # assembled, and a 32-bit port may then make a long int of it.
    safe = _safe_top_bytes(m)
    i = off + 3
    for j in range(dim):
        if not safe[p[i]]:
            v = wire.i32_at(p, i - 3)
            if v > m or v < -m:
                return ("out_of_range", "value[%d] = %d outside +-%d" % (j, v, m))
        i += 4
    return None


class Limits:
    """Value-range policy for step 8. dim=None accepts any dimension."""

    def __init__(self, dim=None, max_abs=DEFAULT_MAX_ABS, max_samples=DEFAULT_MAX_SAMPLES):
        self.dim = dim
        self.max_abs = max_abs
        self.max_samples = max_samples


class Verifier:
    def __init__(self, mesh_id, registry, guard, check_sig, max_frame=wire.MAX_FRAME,
                 limits=None, kinds=None, values=True):
        """values=False: MODEL_UPDATE vectors stay packed (wire.decode); step 8 reads them in
        chunks. For a device that keeps what it accepts packed (microfed.gossip.Peers)."""
        if isinstance(mesh_id, str):
            mesh_id = wire.mesh_id(mesh_id)
        self.mesh_id = mesh_id
        self.registry = registry
        self.guard = guard if isinstance(guard, ReplayGuard) else ReplayGuard(guard)
        self.check_sig = check_sig
        self.max_frame = max_frame
        self.limits = limits or Limits()
        self.kinds = kinds
        self.values = values
        if not values:
            _safe_top_bytes(self.limits.max_abs)  # now, at boot, not on a peer's update
        self.stats = {"accepted": 0}
        # (sender, kind, round, seq) of the last frame verify() decoded, or None: callers that
        # log a rejection need not decode it again (a tuple, not the frame: no vector is kept).
        self.last_header = None
        for r in REASONS:
            self.stats[r] = 0

    def _reject(self, reason, message):
        self.stats[reason] = self.stats.get(reason, 0) + 1
        return Rejected(reason, message)

    def verify(self, data, now=0, min_round=None, max_round=None):
        """Return the accepted Frame or raise Rejected. `now` is the receiver's Unix time
        (0 = no clock); [min_round, max_round] the rounds it currently accepts."""
        self.last_header = None
        # 1: before decode, before hashing, before copying.
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise self._reject("bad_type", "frame must be bytes")
        if len(data) > self.max_frame:
            raise self._reject("oversize", "frame of %d bytes exceeds %d"
                               % (len(data), self.max_frame))
        # 2
        try:
            fr = wire.decode(data, self.max_frame, self.values)
        except WireError as e:
            raise self._reject(e.reason, e.message)
        self.last_header = (fr.sender, fr.kind, fr.round, fr.seq)
        # 3
        if fr.mesh_id != self.mesh_id:
            raise self._reject("wrong_mesh", "frame for another mesh")
        # 4
        if self.kinds is not None and fr.kind not in self.kinds:
            raise self._reject("wrong_kind", "%s not accepted here" % fr.kind_name)
        if fr.kind in COORDINATOR_KINDS and fr.sender != wire.COORDINATOR:
            raise self._reject("wrong_role", "%s may only come from the coordinator"
                               % fr.kind_name)
        if fr.kind in NODE_KINDS and fr.sender == wire.COORDINATOR:
            raise self._reject("wrong_role", "%s may only come from a node" % fr.kind_name)
        # 5
        entry = self.registry.lookup(fr.sender)
        if entry is None:
            raise self._reject("unregistered", "sender %s is not in the registry" % fr.sender)
        if not entry[1]:
            raise self._reject("revoked", "sender %s has been revoked" % fr.sender)
        # 6
        if self.check_sig is not None and not _sig_ok(self.check_sig, entry[0], fr.signing_digest(),
                                                            fr.signature):
            raise self._reject("bad_signature", "signature of %s does not verify" % fr.sender)
        # 7
        bad = self.guard.check(fr.sender, fr.kind, fr.seq, fr.round, fr.timestamp, now,
                               min_round, max_round)
        if bad is not None:
            raise self._reject(bad[0], bad[1])
        # 8
        bad = self.check_values(fr)
        if bad is not None:
            raise self._reject(bad[0], bad[1])
        # 9
        if not self.guard.commit(fr.sender, fr.kind, fr.seq):
            raise self._reject("replay", "counter %d already used (concurrent frame)" % fr.seq)
        self.stats["accepted"] += 1
        return fr

    def check_values(self, fr):
        lim = self.limits
        b = fr.body
        if fr.kind == wire.MODEL_UPDATE or fr.kind == wire.GLOBAL_MODEL:
            vals = b["values"]
            dim = len(vals) if vals is not None else b["dim"]
            if lim.dim is not None and dim != lim.dim:
                return ("bad_dim", "dimension %d, expected %d" % (dim, lim.dim))
            m = lim.max_abs
            if vals is None:
                bad = _packed_out_of_range(fr.payload, 8, dim, m)
                if bad is not None:
                    return bad
            for i in range(len(vals) if vals is not None else 0):
                v = vals[i]
                if v > m or v < -m:
                    return ("out_of_range", "value[%d] = %d outside +-%d" % (i, v, m))
            if fr.kind == wire.MODEL_UPDATE:
                s = b["samples"]
                if s < 1 or s > lim.max_samples:
                    return ("out_of_range", "sample count %d outside 1..%d"
                            % (s, lim.max_samples))
            elif not wire.values_digest_ok(fr):
                return ("bad_digest", "global model digest does not match its vector")
        elif fr.kind == wire.SA_MASKED and lim.dim is not None:
            # The weighted update's dim words and the weight (microfed.secagg).
            n = len(b["words"])
            if n != lim.dim + 1:
                return ("bad_dim", "masked update has %d words, expected %d" % (n, lim.dim + 1))
        return None
