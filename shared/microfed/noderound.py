# A mesh node's round, written once. firmware/node.py (the device), microfed_host.inproc (the
# in-process engine) and microfed_host.adversary (what its compromised nodes do honestly) all
# call these functions, so the three cannot drift apart (docs/protocol.md, 3 "Round flow"):
#
#   1 check the GLOBAL_MODEL      check_global: size, header, mesh, kind, role, the pinned
#                                 coordinator key, the payload, counter/round window,
#                                 dimension, digest
#   2 local update                local_update: train from the global on the node's data with
#                                 the per-round seed; the saturating delta; with local DP
#                                 (microfed.dp.NodeDP) clipped and noised before it is signed
#   3 sign                        update_frame (the caller gives the counter and the signer)
#   4 check peers' updates        gossip nodes: microfed.gossip's Peers.offer, as they arrive
#   5 rebuild the announced       gossip nodes: microfed.gossip's Peers.digest, exactly the
#     aggregate, digest           announced accepted set with the announced rule, chunk by
#                                 chunk (microfed.colagg)
# Steps 4 and 5 are a module of their own so that a coordinated node, which has no peers,
# does not hold their classes and functions on its heap (~1.6 KB on a 32-bit port).
#
# With privacy "secagg" (docs/privacy.md) step 3 sends no MODEL_UPDATE: secagg_begin starts
# the round's microfed.secagg.Client with the delta and returns its SA_KEYS payload, and
# secagg_reply answers each coordinator frame of the round (key set, inbox, unmask request)
# with the next payload. The caller frames, signs and publishes on Topics.secagg. With
# distributed DP (privacy secagg+dp) the node's NodeDP goes to secagg_begin, not to
# local_update: the noise share is added inside the Client, after its clip, before masking.
#
# Portable MicroPython 1.29 / CPython; no floats, no f-strings.

import hashlib

from microfed import model, wire
from microfed.q16 import MAX_RAW, MIN_RAW
from microfed.registry import Rejected
from microfed.wire import WireError


class Topics:
    """The MQTT topics of one node in mesh `mesh` (docs/protocol.md)."""

    def __init__(self, mesh, node_id):
        for c in "/+#":
            if c in mesh:
                raise ValueError("mesh name %r cannot be part of an MQTT topic (has %r)"
                                 % (mesh, c))
        base = "microfed/" + mesh + "/"
        self.global_ = base + "global"
        self.registry = base + "registry"
        self.update_prefix = base + "update/"
        self.updates = base + "update/+"
        self.update = base + "update/" + node_id
        self.digest = base + "digest/" + node_id
        self.hello = base + "hello/" + node_id
        self.notice = base + "notice/" + node_id
        self.secagg = base + "secagg/" + node_id
        self.secagg_round = base + "secagg-round"


# ---------------------------------------------------------------- 1: the global model

def coordinator_frame(msg, mesh_id, coordinator_key, kind, what, check_sig, view=False,
                      into=None, accepted=True):
    """Decode a frame that must be `kind` from the coordinator, signed with its PINNED key.
    Raises Rejected. `view`: the frame's payload stays a view into it (wire.decode with
    values=False) instead of a copy. `into`, `accepted`: wire.decode_payload's.
    The payload is decoded only once the signature holds: while Ed25519 runs, the heap holds
    the header's fields, not the decoded payload (a GLOBAL_MODEL's accepted set: an id, a hash
    and a tuple per announced node), and no unauthenticated payload is ever decoded. A forged
    frame is therefore "bad_signature" whatever its payload holds."""
    if not isinstance(msg, (bytes, bytearray, memoryview)):
        raise Rejected("bad_type", "frame must be bytes")
    if len(msg) > wire.MAX_FRAME:
        raise Rejected("oversize", "frame of %d bytes" % len(msg))
    try:
        fr = wire.decode(msg, values=not view, body=False)
    except WireError as e:
        raise Rejected(e.reason, e.message)
    if fr.mesh_id != mesh_id:
        raise Rejected("wrong_mesh", "%s for another mesh" % what)
    if fr.kind != kind:
        raise Rejected("wrong_kind", "%s where a %s belongs" % (fr.kind_name, what))
    if fr.sender != wire.COORDINATOR:
        raise Rejected("wrong_role", "%s not from the coordinator" % what)
    if not check_sig(coordinator_key, fr.signing_digest(), fr.signature):
        raise Rejected("bad_signature", "%s signature does not verify" % what)
    try:
        return wire.decode_body(fr, not view, into, accepted)
    except WireError as e:
        raise Rejected(e.reason, e.message)


def check_global(msg, mesh_id, coordinator_key, check_sig, guard, last_round, n_params, now,
                 into=None, accepted=True):
    """Step 1: the verified GLOBAL_MODEL frame, or Rejected. `guard`: a ReplayGuard over the
    coordinator's counter; the round must be above `last_round` (the last one acted on).
    The counter is committed last, when everything else passed. `into`: a list of n_params
    the values are decoded into (RoundBuffers.take()) instead of a new one. The frame's payload
    is a view into `msg`: drop it (fr.drop_payload()) before `msg`'s buffer is reused.
    `accepted`=False: the announced set is checked, not kept (a coordinated node)."""
    # The payload as a view into the frame: a copy would be 3.2 KB more on the heap while
    # the values are decoded (a GLOBAL_MODEL's values are decoded either way).
    fr = coordinator_frame(msg, mesh_id, coordinator_key, wire.GLOBAL_MODEL, "global model",
                           check_sig, True, into, accepted)
    bad = guard.check(wire.COORDINATOR, wire.GLOBAL_MODEL, fr.seq, fr.round, fr.timestamp, now,
                      last_round + 1, None)
    if bad is not None:
        raise Rejected(bad[0], bad[1])
    vals = fr.body["values"]
    if len(vals) != n_params:
        raise Rejected("bad_dim", "global model has %d values, model needs %d"
                       % (len(vals), n_params))
    if not wire.values_digest_ok(fr):
        raise Rejected("bad_digest", "global model digest does not match its vector")
    if not guard.commit(wire.COORDINATOR, wire.GLOBAL_MODEL, fr.seq):
        raise Rejected("replay", "coordinator counter already used")
    return fr


# ---------------------------------------------------------------- 2, 3: the local update

class RoundBuffers:
    """The round's large blocks, allocated once when a node boots and reused every round: `p`
    (the received global's values, trained in place, then the delta), `scratch` (training's
    sums) and `frame` (the update frame; while training it holds the global's values packed
    where the delta will go, for the subtraction). On a 32-bit board's heap of a few tens of
    KB the free space fragments as a run goes on (log lines, peers' bookkeeping, Ed25519's
    long-int temporaries): a 2.6 KB block found at boot is certain, one found mid-run is not
    (measured: docs/results.md). `holder`: the received global whose values p holds until
    it is trained on or dropped (a second global meanwhile gets a list of its own);
    `delta_round`: the round whose delta p holds, else None.
    `space`: None, or a buffer of at least update_frame_len bytes to use as `frame` instead
    of a block of its own: a node passes its MQTT receive buffer (2.7 KB less on the heap).
    Nothing is read into it while a round trains and signs; after that the frame is valid
    until the next message arrives, and the caller builds it again when it needs it later
    (firmware/node.py: the same bytes, Ed25519 being deterministic)."""

    def __init__(self, mdl, node_id, n_samples=0, space=None):
        n = mdl.n_params
        self.p = [0] * n
        self.scratch = [0] * mdl.scratch_len()
        # Training's sample order (model.sample_order), when the shard's size is known.
        self.order = model.sample_order(n_samples) if n_samples else None
        size = update_frame_len(node_id, n)
        self.shared = space is not None and len(space) >= size
        self.frame = memoryview(space)[:size] if self.shared else bytearray(size)
        # What the shared space has beyond the frame: training's scratch bytes (model.train's
        # `spare`), free while a round trains as the frame's space is.
        self.spare = memoryview(space)[size:] if self.shared and len(space) > size else None
        self.values_at = wire.HDR_FIXED + len(node_id) + 8  # as wire.encode_update puts them
        self.holder = None
        self.delta_round = None

    @property
    def busy(self):
        return self.holder is not None

    def take(self):
        """The list to decode the next global's values into, or None (in use)."""
        if self.holder is not None:
            return None
        self.delta_round = None  # the caller writes over it
        return self.p

    def hold(self, fr):
        """p now holds the values of `fr` (a frame decoded into take()'s list)."""
        self.holder = fr

    def release(self, fr):
        """`fr` is trained on or dropped: p is free again if it was fr's."""
        if self.holder is fr:
            self.holder = None


def update_frame_len(node_id, n_params):
    """The length of a node's MODEL_UPDATE frame (the same every round)."""
    return wire.HDR_FIXED + len(node_id) + 8 + 4 * n_params + wire.SIG_LEN


def local_update(mdl, data, train, round_, node_id, g, dp=None, buffers=None):
    """Step 2: delta = train(g) - g (saturating), trained with seed derive_seed(train["seed"],
    round, node id). `train`: {"lr", "epochs", "batch", "seed"}; `data`: (xs, ys) or a
    microfed.model.Shard. `dp`: None, or a microfed.dp.NodeDP: the delta is then L2-clipped
    and carries its discrete Gaussian noise (local DP) before anything else sees it.
    `buffers`: a RoundBuffers; g is then trained in its list p, which becomes the delta (valid
    until the next round), and its frame buffer holds g packed meanwhile."""
    cfg = model.TrainConfig(train["lr"], train["epochs"], train["batch"],
                            model.derive_seed(train["seed"], round_, node_id))
    if buffers is None:
        new = mdl.train(g, data, cfg)
        # mdl.delta(g, new), computed in place: no third 650-value list on a small heap.
        for i in range(len(new)):
            v = new[i] - g[i]
            new[i] = MAX_RAW if v > MAX_RAW else (MIN_RAW if v < MIN_RAW else v)
    else:
        new = buffers.p
        buffers.delta_round = None
        if g is not new:
            new[:] = g
        at = buffers.values_at
        wire._pack_i32_into(buffers.frame, at, new)
        g = None
        mdl.train(new, data, cfg, new, buffers.scratch, buffers.order, buffers.spare)
        _sub_packed(new, buffers.frame, at)
    if dp is not None:
        dp.apply(new, round_)
    if buffers is not None:
        buffers.delta_round = round_
    return new


def _sub_packed(new, packed, at):
    # new[i] = sat(new[i] - g[i]), g packed as int32 at packed[at:] (read in place: no tuple).
    i32_at = wire.i32_at
    for i in range(len(new)):
        v = new[i] - i32_at(packed, at + 4 * i)
        new[i] = MAX_RAW if v > MAX_RAW else (MIN_RAW if v < MIN_RAW else v)


def update_frame(mesh_id, node_id, round_, seq, now, n_samples, delta, sign, out=None):
    """Step 3: the signed MODEL_UPDATE frame, as a bytearray built in place
    (wire.encode_update; in `out`, RoundBuffers.frame, when given); the caller owns the
    counter `seq` and the key in `sign`."""
    return wire.encode_update(mesh_id, node_id, round_, seq, now, n_samples, delta, sign, out)


# Secure aggregation: the coordinator's frames of a round and the node's answer to each.
SECAGG_REPLY = {wire.SA_KEYSET: wire.SA_SHARES, wire.SA_INBOX: wire.SA_MASKED,
                wire.SA_UNMASK: wire.SA_REVEAL}


def secagg_begin(client, round_, delta, n_samples, clip, dp=None):
    """Step 3 under secure aggregation: (SA_KEYS, its payload); the client keeps the clipped,
    weighted delta for the masked update. `dp`: None, or distributed DP (privacy secagg+dp): a
    microfed.dp.NodeDP holding this node's share of the noise variance; its clip is then THE
    clip (`clip` is not used), its noise goes in after the clip and before weighting, and every
    node weighs 1, so the unmasked sum is the sum of the nodes' noised, clipped deltas: the
    setting of the distributed-DP bound (docs/privacy.md, "Distributed DP"). The delta of
    local_update must then come without local DP (dp=None there)."""
    if dp is None:
        return wire.SA_KEYS, client.begin(round_, delta, n_samples, clip)
    return wire.SA_KEYS, client.begin(round_, delta, 1, dp.clip, dp.noise_into)


def secagg_reply(client, msg, mesh_id, coordinator_key, check_sig, registry):
    """A coordinator frame of the round (SA_KEYSET on secagg-round, SA_INBOX on our notice
    topic, SA_UNMASK on secagg-round), signed with the PINNED key -> (reply kind, payload),
    or None for a frame already answered or of an earlier round (a QoS 1 redelivery, the
    retained secagg-round frame after a reconnect). Raises Rejected: a bad frame, a frame of
    another phase, or a refusal."""
    kind = msg[3] if isinstance(msg, (bytes, bytearray)) and len(msg) > 3 else 0
    if kind not in SECAGG_REPLY:
        raise Rejected("wrong_kind", "not a secure-aggregation request")
    fr = coordinator_frame(msg, mesh_id, coordinator_key, kind, wire.KIND_NAMES[kind],
                           check_sig)
    h = hashlib.sha256(msg).digest()
    if fr.round < client.round or h in client.seen:
        return None
    client.seen.append(h)
    if kind == wire.SA_KEYSET:
        return wire.SA_SHARES, client.on_keyset(fr, registry, check_sig)
    if kind == wire.SA_INBOX:
        return wire.SA_MASKED, client.on_inbox(fr)
    return wire.SA_REVEAL, client.on_unmask(fr)


def update_values(frame, sender):
    """The packed int32 values inside an encoded MODEL_UPDATE frame of `sender` (no copy of
    the rest, no decode)."""
    start = wire.HDR_FIXED + len(sender) + 8
    return memoryview(frame)[start:len(frame) - wire.SIG_LEN]
