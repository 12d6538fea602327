# Secure aggregation in the shape of Bonawitz et al. (CCS 2017), written once: the node's side
# (Client: firmware/node.py and microfed_host.inproc call it) and the coordinator's exact
# arithmetic (unmask, weighted_mean: microfed_host.secagg_server calls them). The protocol,
# threat model and formats: docs/privacy.md "Secure aggregation", docs/wire.md kinds 7-13.
#
# A node's round, one Client per round (each step checks everything first, then changes the
# Client's state in one place, at its end, and returns the payload to sign and publish):
#   1 begin       exact integer L2 clip of the delta (microfed.dp.l2_clip_flag), with
#                 distributed DP its noise share, weight it (w*x and w, mod 2^64),
#                 two fresh X25519 key pairs (c: shares' encryption, s: pairwise masks)
#                                                                          -> SA_KEYS
#   2 on_keyset   check the key set: t > n/2, our own keys, every peer registered and its
#                 advertisement's signature; Shamir-share the self-mask seed b and the
#                 pairwise secret key s_sk (threshold t, x = position in the key set); one
#                 encrypted + authenticated blob per peer                  -> SA_SHARES
#   3 on_inbox    open and authenticate the blobs addressed to us (the survivors U2); the
#                 masked vector y + PRG(b) + sum over v in U2 of +-PRG(s_uv), + when our id
#                 is the lower one (ids compared as bytes)                 -> SA_MASKED
#   4 on_unmask   REFUSE a request that names a peer both alive and dropped, that does not
#                 cover exactly U2, that has fewer than t alive, or that differs from the one
#                 already answered this round (revealing both shares of one peer unmasks its
#                 update); else the b-shares of the alive and the s-shares of the dropped
#                                                                          -> SA_REVEAL
# Masked words live in Z_2^64, not Z_2^32: the weighted sum of n updates (sample count times
# a Q16.16 value up to 2^24 each) needs up to ~2^55, and a sum that wraps cannot be unmasked to
# the right value (docs/privacy.md, "Why 64-bit words").
#
# Portable MicroPython 1.29 / CPython: integers only, hashlib.sha256 only, no f-strings.

import hashlib
import struct

from microfed import wire, wire_sa, x25519
from microfed.dp import l2_clip_flag
from microfed.ed25519_py import _inv
from microfed.q16 import rdiv
from microfed.verify import Rejected

P = (1 << 255) - 19        # the Shamir field (the X25519 field: secrets fit it)
MASK64 = (1 << 64) - 1
MIN_NODES = 3              # with two, the sum minus your own update is the other one
# Node-side rejection reasons of this module (firmware/node.py counts them).
REASONS = ("refused", "bad_keyset", "bad_share", "wrong_phase")

_NONE, _KEYS, _SHARES, _MASKED, _REVEALED = 0, 1, 2, 3, 4


class SecAggError(ValueError):
    """The coordinator's side: shares that do not reconstruct, too few shares."""


# ---------------------------------------------------------------- integer helpers

def weigh(values, weight):
    """The masked vector's plaintext: (weight * v mod 2^64 for each v) + [weight]."""
    out = [(weight * v) & MASK64 for v in values]
    out.append(weight & MASK64)
    return out


# ---------------------------------------------------------------- PRG and keys

def _kdf(label, secret):
    return hashlib.sha256(b"microfed/v1/secagg/" + label + b"\x00" + secret).digest()


def pair_seed(shared):
    """PRG seed of a pairwise mask from the X25519 shared secret of the two s keys."""
    return _kdf(b"pair", shared)


def self_seed(b):
    """PRG seed of a node's self-mask from its seed b (a field element)."""
    return _kdf(b"self", b.to_bytes(32, "little"))


def prg_add(acc, seed, sign):
    """acc[i] = acc[i] + sign * PRG(seed)[i] mod 2^64, in place. PRG(seed) is SHA-256 in
    counter mode: block j = SHA-256(seed || u32_le(j)), four little-endian u64 words each."""
    n = len(acc)
    j = 0
    i = 0
    while i < n:
        blk = hashlib.sha256(seed + struct.pack("<I", j)).digest()
        words = struct.unpack("<4Q", blk)
        for w in words:
            if i >= n:
                break
            if sign > 0:
                acc[i] = (acc[i] + w) & MASK64
            else:
                acc[i] = (acc[i] - w) & MASK64
            i += 1
        j += 1
    return acc


def _agree(dh, sk, pk, what):
    s = dh(sk, pk)
    if s == bytes(32):
        # A low-order public key (RFC 7748 6.1): the "secret" would be public.
        raise Rejected("bad_keyset", "%s key gives an all-zero shared secret" % what)
    return s


def rand_field(rand):
    """A uniform field element below P from rand(32)."""
    while True:
        v = int.from_bytes(rand(32), "little") & ((1 << 255) - 1)
        if v < P:
            return v


def rand_scalar(rand):
    """A clamped X25519 private scalar that is also a field element (shared by Shamir)."""
    while True:
        b = bytearray(rand(32))
        b[0] &= 248
        b[31] &= 127
        b[31] |= 64
        v = int.from_bytes(bytes(b), "little")
        if v < P:
            return v


def scalar_bytes(v):
    return v.to_bytes(32, "little")


# ---------------------------------------------------------------- Shamir over GF(P)

def shamir_split(secret, t, n, rand):
    """Shares f(1)..f(n) of a degree t-1 polynomial with f(0) = secret."""
    coef = [secret]
    for _ in range(t - 1):
        coef.append(rand_field(rand))
    out = []
    for x in range(1, n + 1):
        y = 0
        for k in range(t - 1, -1, -1):
            y = (y * x + coef[k]) % P
        out.append(y)
    return out


def _lagrange_at(points, x0):
    """The polynomial through `points` [(x, y)] evaluated at x0."""
    s = 0
    for j in range(len(points)):
        xj, yj = points[j]
        num = 1
        den = 1
        for m in range(len(points)):
            if m != j:
                xm = points[m][0]
                num = num * (x0 - xm) % P
                den = den * (xj - xm) % P
        s = (s + yj * num * _inv(den)) % P
    return s


def shamir_join(points, t):
    """f(0) from >= t points (x, y); every point beyond the first t must lie on the same
    polynomial (a wrong share is detected, not averaged in). Raises SecAggError."""
    if len(points) < t:
        raise SecAggError("%d shares, threshold %d" % (len(points), t))
    pts = sorted(points)
    for k in range(1, len(pts)):
        if pts[k][0] == pts[k - 1][0]:
            raise SecAggError("two shares at x = %d" % pts[k][0])
    base = pts[:t]
    for x, y in pts[t:]:
        if _lagrange_at(base, x) != y % P:
            raise SecAggError("share at x = %d is not on the polynomial of the first %d"
                              % (x, t))
    return _lagrange_at(base, 0)


# ---------------------------------------------------------------- share encryption

def hmac_sha256(key, msg):
    """RFC 2104 HMAC with SHA-256 (MicroPython ports ship no hmac module)."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key + bytes(64 - len(key))
    inner = hashlib.sha256(bytes([k ^ 0x36 for k in key]) + msg).digest()
    return hashlib.sha256(bytes([k ^ 0x5C for k in key]) + inner).digest()


def share_ad(mesh_id, round_, frm, to):
    """What a blob is bound to: mesh, round, sender and recipient (so the two directions of
    one pair, which share a key, never share a keystream)."""
    fb = frm.encode()
    tb = to.encode()
    return (bytes(mesh_id) + struct.pack("<IB", round_, len(fb)) + fb
            + struct.pack("<B", len(tb)) + tb)


def _stream(shared, ad, n):
    ek = _kdf(b"enc", shared)
    nonce = hashlib.sha256(ad).digest()
    out = b""
    j = 0
    while len(out) < n:
        out += hashlib.sha256(ek + nonce + struct.pack("<I", j)).digest()
        j += 1
    return out[:n]


def seal(shared, ad, plain):
    """SHA-256-CTR encryption + HMAC-SHA256 over (ad || ciphertext): 64 + 32 bytes."""
    ks = _stream(shared, ad, len(plain))
    ct = bytes([plain[i] ^ ks[i] for i in range(len(plain))])
    return ct + hmac_sha256(_kdf(b"mac", shared), ad + ct)


def open_blob(shared, ad, blob):
    """seal's inverse; Rejected("bad_share") if the tag does not verify."""
    ct = blob[:len(blob) - 32]
    tag = hmac_sha256(_kdf(b"mac", shared), ad + ct)
    diff = 0
    for i in range(32):
        diff |= tag[i] ^ blob[len(blob) - 32 + i]
    if diff:
        raise Rejected("bad_share", "share blob does not authenticate")
    ks = _stream(shared, ad, len(ct))
    return bytes([ct[i] ^ ks[i] for i in range(len(ct))])


# ---------------------------------------------------------------- the node

class Client:
    """One node's secure-aggregation state for one round. `rand(n)`: n random bytes
    (os.urandom); `dh(scalar32, pub32)`: X25519 (the portable one by default)."""

    def __init__(self, node_id, mesh_id, rand, dh=None):
        self.id = node_id
        self.mesh_id = mesh_id
        self.rand = rand
        self.dh = dh or x25519.x25519
        self.round = 0
        self.phase = _NONE
        self.clipped = False
        self.seen = []  # hashes of the coordinator frames answered this round

    def _expect(self, fr, phases, what):
        if fr.round != self.round or self.phase not in phases:
            raise Rejected("wrong_phase", "%s for round %d, this node is in round %d phase %d"
                           % (what, fr.round, self.round, self.phase))

    # 1 ------------------------------------------------------------------------------
    def begin(self, round_, delta, samples, clip, noise=None):
        """The round's SA_KEYS payload; keeps clip(delta) (+ noise) weighted by `samples`.
        Clips `delta` in place. `noise(values, round_)`: distributed DP (microfed.dp.NodeDP
        .noise_into with this node's share of the variance), added after the clip and before
        weighting and masking (docs/privacy.md, "Distributed DP")."""
        if samples < 1 or clip < 1:
            raise ValueError("samples and clip must be >= 1")
        clipped = l2_clip_flag(delta, clip)
        if noise is not None:
            noise(delta, round_)
        y = weigh(delta, samples)
        c_sk = self.rand(32)
        s_sk = rand_scalar(self.rand)
        c_pk = x25519.public_key(c_sk)
        s_pk = x25519.public_key(scalar_bytes(s_sk))
        payload = wire_sa.encode_sa_keys(c_pk, s_pk)
        # State: a fresh round.
        self.round = round_
        self.y = y
        self.clipped = clipped
        self.c_sk, self.s_sk, self.c_pk, self.s_pk = c_sk, s_sk, c_pk, s_pk
        self.peers = {}
        self.held = {}
        self.answered = None
        self.seen = []
        self.phase = _KEYS
        return payload

    # 2 ------------------------------------------------------------------------------
    def on_keyset(self, fr, registry, check_sig):
        """A verified SA_KEYSET frame from the coordinator -> our SA_SHARES payload."""
        self._expect(fr, (_KEYS,), "key set")
        t = fr.body["t"]
        entries = fr.body["entries"]
        n = len(entries)
        if n < MIN_NODES or t <= n // 2 or t > n:
            raise Rejected("bad_keyset", "threshold %d for %d nodes: needs %d <= n and "
                           "n/2 < t <= n" % (t, n, MIN_NODES))
        peers = {}
        me = None
        for k in range(n):
            node_id, seq, ts, c_pk, s_pk, sig = entries[k]
            if node_id == self.id:
                if c_pk != self.c_pk or s_pk != self.s_pk:
                    raise Rejected("bad_keyset", "our own keys are not the ones we sent")
                me = k + 1
                continue
            reg = registry.lookup(node_id)
            if reg is None or not reg[1]:
                raise Rejected("bad_keyset", "%s is not an active registry member" % node_id)
            pl = wire_sa.encode_sa_keys(c_pk, s_pk)
            hdr = wire.encode_header(wire.SA_KEYS, self.mesh_id, node_id, fr.round, seq, ts,
                                     len(pl))
            if not check_sig(reg[0], wire.signing_digest(wire.SA_KEYS, hdr, wire.sha256(pl)),
                             sig):
                raise Rejected("bad_keyset", "keys of %s are not signed by it" % node_id)
            peers[node_id] = [k + 1, _agree(self.dh, self.c_sk, c_pk, node_id), s_pk]
        if me is None:
            raise Rejected("bad_keyset", "this node is not in the key set")
        b = rand_field(self.rand)
        b_sh = shamir_split(b, t, n, self.rand)
        s_sh = shamir_split(self.s_sk, t, n, self.rand)
        blobs = []
        for v in peers:
            x, shared, _s_pk = peers[v]
            plain = b_sh[x - 1].to_bytes(32, "little") + s_sh[x - 1].to_bytes(32, "little")
            blobs.append((v, seal(shared, share_ad(self.mesh_id, fr.round, self.id, v), plain)))
        payload = wire_sa.encode_sa_blobs(blobs)
        # State.
        self.t = t
        self.x = me
        self.peers = peers
        self.b = b
        self.held = {self.id: (b_sh[me - 1], s_sh[me - 1])}
        self.c_sk = None
        self.phase = _SHARES
        return payload

    # 3 ------------------------------------------------------------------------------
    def on_inbox(self, fr):
        """A verified SA_INBOX frame (the blobs addressed to us) -> our SA_MASKED payload."""
        self._expect(fr, (_SHARES,), "share inbox")
        got = {}
        for u, blob in fr.body["entries"]:
            e = self.peers.get(u)
            if e is None:
                raise Rejected("bad_share", "share from %s, who is not in the key set" % u)
            plain = open_blob(e[1], share_ad(self.mesh_id, fr.round, u, self.id), blob)
            bs = int.from_bytes(plain[:32], "little")
            ss = int.from_bytes(plain[32:], "little")
            if bs >= P or ss >= P:
                raise Rejected("bad_share", "share from %s is not a field element" % u)
            got[u] = (bs, ss)
        if len(got) + 1 < self.t:
            raise Rejected("refused", "%d nodes shared, threshold %d" % (len(got) + 1, self.t))
        acc = prg_add(list(self.y), self_seed(self.b), 1)
        me = self.id.encode()
        for v in got:
            seed = pair_seed(_agree(self.dh, scalar_bytes(self.s_sk), self.peers[v][2], v))
            prg_add(acc, seed, 1 if me < v.encode() else -1)
        payload = wire_sa.encode_sa_masked(acc)
        # State.
        for u in got:
            self.held[u] = got[u]
        self.u2 = sorted(self.held)
        self.y = None
        self.phase = _MASKED
        return payload

    # 4 ------------------------------------------------------------------------------
    def on_unmask(self, fr):
        """A verified SA_UNMASK frame -> our SA_REVEAL payload, or Rejected("refused")."""
        self._expect(fr, (_MASKED, _REVEALED), "unmask request")
        alive = fr.body["alive"]
        dropped = fr.body["dropped"]
        req = (tuple(alive), tuple(dropped))
        if self.answered is not None:
            if req != self.answered[0]:
                raise Rejected("refused", "a second, different unmask request in round %d"
                               % self.round)
            return self.answered[1]
        for v in alive:
            if v in dropped:
                raise Rejected("refused", "asked for both shares of %s (alive and dropped): "
                               "that would unmask its update" % v)
        named = sorted(list(alive) + list(dropped))
        if named != self.u2:
            raise Rejected("refused", "the request names %d nodes, the share set has %d"
                           % (len(named), len(self.u2)))
        if len(alive) < self.t:
            raise Rejected("refused", "%d alive, threshold %d" % (len(alive), self.t))
        rows = [(v, wire_sa.SA_SELF, self.held[v][0].to_bytes(32, "little")) for v in alive]
        rows += [(v, wire_sa.SA_PAIR, self.held[v][1].to_bytes(32, "little")) for v in dropped]
        payload = wire_sa.encode_sa_reveal(rows)
        # State: this round's one answer.
        self.answered = (req, payload)
        self.phase = _REVEALED
        return payload


# ---------------------------------------------------------------- the coordinator's arithmetic

def add_words(acc, words):
    """acc += words mod 2^64, in place (the coordinator's running sum of masked updates)."""
    for i in range(len(acc)):
        acc[i] = (acc[i] + words[i]) & MASK64
    return acc


def unmask(total, keyset, alive, dropped, reveals, t, dh=None):
    """The plain weighted sum from the sum of the alive nodes' masked vectors.
    keyset: {id: (x, s_pk)}; reveals: {revealer id: [(id, which, share32)]}. Removes each alive
    node's self-mask (b reconstructed from >= t shares) and every pairwise mask between an
    alive and a dropped node (the dropped node's s_sk reconstructed, checked against its
    advertised s_pk). Raises SecAggError."""
    dh = dh or x25519.x25519
    pts = {}
    for r in reveals:
        xr = keyset[r][0]
        for v, which, share in reveals[r]:
            pts.setdefault((v, which), []).append((xr, int.from_bytes(share, "little")))
    acc = list(total)
    for a in alive:
        b = shamir_join(pts.get((a, wire_sa.SA_SELF), []), t)
        prg_add(acc, self_seed(b), -1)
    for d in dropped:
        s_sk = shamir_join(pts.get((d, wire_sa.SA_PAIR), []), t)
        skb = scalar_bytes(s_sk)
        if x25519.public_key(skb) != keyset[d][1]:
            raise SecAggError("the key reconstructed for %s is not the one it advertised" % d)
        db = d.encode()
        for a in alive:
            seed = pair_seed(dh(skb, keyset[a][1]))
            # a added +PRG when a < d; remove what it added.
            prg_add(acc, seed, -1 if a.encode() < db else 1)
    return acc


def weighted_mean(words):
    """(FedAvg aggregate, total weight) from the unmasked sum: words[:-1] are sum(w*x) and
    words[-1] sum(w), as two's-complement 64-bit values; mean = rdiv(sum(w*x), sum(w)), the
    rounding rule of microfed.aggregate.fedavg, so the result is the plain FedAvg bit for bit."""
    def signed(w):
        return w - (1 << 64) if w >> 63 else w

    total = signed(words[-1])
    if total <= 0:
        raise SecAggError("total weight %d is not positive" % total)
    return [rdiv(signed(w), total) for w in words[:-1]], total
