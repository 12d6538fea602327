# A gossip node's steps 4 and 5 of the round (microfed.noderound has steps 1-3, and the order
# of the whole): peers' MODEL_UPDATEs checked and kept as they arrive (Peers.offer), and the
# digest of exactly the aggregate the next GLOBAL_MODEL announces (Peers.digest, through
# microfed.colagg). firmware/node.py, microfed_host.inproc and microfed_host.adversary call
# these. A coordinated node never imports this module.
#
# Portable MicroPython 1.29 / CPython; no floats, no f-strings.

import hashlib
from array import array

from microfed import wire
from microfed.noderound import update_values
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Limits, Rejected, Verifier

# How a node trusts a peer's MODEL_UPDATE (docs/security.md, "Trusting peers' updates"):
#   "announce"   the coordinator's signed GLOBAL_MODEL lists the SHA-256 of every frame it
#                accepted (it checked their signatures); a node keeps a peer's frame after the
#                checks that cost nothing (structure, mesh, registered sender, round window,
#                dimension, range), uses it only if its hash is announced, and verifies a
#                signature only when a sender holds more than one frame for a round (so a
#                forged copy cannot push the real one out). One signature check per round
#                instead of one per peer.
#   "signature"  every peer frame's Ed25519 signature and counter are checked on arrival, as
#                the coordinator does: a node then also catches a coordinator that announces
#                a frame the named peer never signed.
PEER_CHECKS = ("announce", "signature")

SIG_REC = 96  # an unchecked update's signing digest (32) and signature (64), kept with it
_NO_SIG = bytes(SIG_REC)


class RamVectors:
    """Update vectors in RAM: one array("i") of d values per slot (for boards with the heap
    for it, and the host's engines), and the signature records of unchecked ones."""

    def __init__(self, d):
        self.d = d
        self.slots = {}
        self.sigs = {}

    def reserve(self, slots):
        pass  # a dict: RAM for the vectors themselves is what this store spends

    def put(self, slot, packed, round_, sig=None):
        self.slots[slot] = array("i", bytes(packed))
        self.sigs[slot] = None if sig is None else bytes(sig[0]) + bytes(sig[1])

    def read_into(self, slot, start, count, out):
        memoryview(out)[:count] = memoryview(self.slots[slot])[start:start + count]

    def read_sig(self, slot):
        """(signing digest, signature) stored with slot's vector."""
        r = self.sigs[slot]
        return r[:32], r[32:]

    def drop(self, round_):
        pass  # slots are reused as they are freed


class FileVectors:
    """Update vectors in a board's flash; RAM holds one chunk while aggregating. A round's
    vectors go into one file, appended in arrival order. The files are opened at boot and
    reused: a node holds at most two rounds (the one it collects and early updates of the
    next; Peers.drop_before), and opening a file mid-run needs a block of the heap (on
    littlefs the file object and its cache, ~380 bytes on the emulated Cortex-M3) that a
    fragmented 64 KB heap did not always have (the emulated Cortex-M3 lost peers' updates
    to it, docs/boards.md). A third round at once gets a file opened then, and removed when
    dropped. Each round starts writing at the beginning of its file: littlefs rewrites a file
    from the written point to its end, so writes go in order, never into the middle. Each
    vector is followed by its signature record (SIG_REC bytes; zeros when the signature was
    checked on arrival): an unchecked peer update's signature waits in flash, not in RAM,
    until contention needs it."""

    PREFIX = "peers-"
    OPEN_AT_BOOT = 2

    def __init__(self, directory, d):
        self.d = d
        self.rec = 4 * d + SIG_REC
        self.dir = directory
        self.files = {}  # round -> [open file, vectors written, pool file or None]
        self.where = []  # slot -> (round, index in that round's file), or None (reserve)
        for name in _listdir(directory):
            if name.startswith(self.PREFIX):  # scratch left by an earlier boot
                _remove(directory + "/" + name)
        self.pool = [open(self._path(i), "w+b") for i in range(self.OPEN_AT_BOOT)]

    def _path(self, name):
        return "%s/%s%s.bin" % (self.dir, self.PREFIX, name)

    def reserve(self, slots):
        """Room for `slots` slots' locations, made now (at boot): a dict grown as updates
        arrived needed a block of a few hundred bytes mid-run, which a 64 KB Cortex-M3's
        heap did not always have (docs/boards.md)."""
        if len(self.where) < slots:
            self.where = self.where + [None] * (slots - len(self.where))

    def put(self, slot, packed, round_, sig=None):
        """Store `packed` in `slot`; `sig`: (signing digest, signature) of an unchecked one."""
        e = self.files.get(round_)
        if e is None:
            if self.pool:
                f = self.pool.pop()
                e = [f, 0, f]
            else:
                e = [open(self._path("r%d" % round_), "w+b"), 0, None]
            self.files[round_] = e
        f = e[0]
        f.seek(e[1] * self.rec)
        f.write(packed)  # no flush: scratch for this boot, not state
        if sig is None:
            f.write(_NO_SIG)
        else:
            f.write(sig[0])
            f.write(sig[1])
        if slot >= len(self.where):
            self.reserve(slot + 1)
        self.where[slot] = (round_, e[1])
        e[1] += 1

    def _seek(self, slot, at):
        r, i = self.where[slot]
        f = self.files[r][0]
        f.seek(i * self.rec + at)
        return f, r

    def read_into(self, slot, start, count, out):
        f, r = self._seek(slot, start * 4)
        if f.readinto(memoryview(out)[:count]) != 4 * count:
            raise OSError("vector file of round %d is short" % r)

    def read_sig(self, slot):
        f, r = self._seek(slot, 4 * self.d)
        b = f.read(SIG_REC)
        if len(b) != SIG_REC:
            raise OSError("vector file of round %d is short" % r)
        return b[:32], b[32:]

    def drop(self, round_):
        e = self.files.pop(round_, None)
        if e is None:
            return
        if e[2] is not None:
            self.pool.append(e[2])  # kept open: the next round writes over it
        else:
            e[0].close()
            _remove(self._path("r%d" % round_))
        where = self.where
        for slot in range(len(where)):
            if where[slot] is not None and where[slot][0] == round_:
                where[slot] = None


def _listdir(directory):
    import os
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _remove(path):
    import os
    try:
        os.remove(path)
    except OSError:
        pass


class _NoCounters:
    """A ReplayGuard store that remembers nothing: in "announce" mode a peer's counter is not
    checked (an unverified frame must not move it; the coordinator checked it)."""

    def last(self, sender, kind):
        return 0

    def advance(self, sender, kind, seq):
        return True


class Peers:
    """Step 4 and 5: the peers' MODEL_UPDATEs of the open rounds, kept as what the aggregate
    needs (sender, sample count, values in a vector slot), found again by frame SHA-256."""

    def __init__(self, mesh_id, registry, n_params, max_abs, check_sig, vectors, slots,
                 per_sender=2, check="announce"):
        if check not in PEER_CHECKS:
            raise ValueError("peer check %r is not one of %s" % (check, ", ".join(PEER_CHECKS)))
        # The aggregation modules now, at boot, rather than mid-run on a fragmented heap; a
        # coordinated node, which has no Peers, never imports them (~0.8 KB on a 32-bit port).
        # So are the aggregation's column buffers, one per registered node (colagg.buffers).
        from microfed import colagg
        self.cols = colagg.buffers(len(registry.nodes))
        self.check = check
        self.check_sig = check_sig
        self.per_sender = per_sender
        self.vectors = vectors
        vectors.reserve(slots)
        self.n_slots = slots
        self.free = list(range(slots - 1, -1, -1))
        # round -> {sha256: [sender, samples, slot, signature unchecked]}: ~120 bytes an
        # update on a 32-bit port (an unchecked signature waits with the vector, in flash
        # with FileVectors: in RAM it cost 176 bytes more, 4.6 KB for two rounds of 13).
        self.rounds = {}
        self.sig_checks = 0
        self.evicted = 0
        store = MemoryStore() if check == "signature" else _NoCounters()
        # values=False: a peer's vector stays packed in its message until it goes to a slot.
        self.verifier = Verifier(mesh_id, registry, ReplayGuard(store),
                                 check_sig if check == "signature" else None,
                                 limits=Limits(n_params, max_abs), kinds=(wire.MODEL_UPDATE,),
                                 values=False)

    @property
    def registry(self):
        return self.verifier.registry

    def set_registry(self, reg, rekeyed=()):
        self.verifier.registry = reg
        if len(reg.nodes) > len(self.cols):
            # Now, with the registry, rather than in the round's aggregation.
            from microfed import colagg

            self.cols = colagg.buffers(len(reg.nodes))
        store = self.verifier.guard.store
        if isinstance(store, MemoryStore):
            for k in list(store.counters.keys()):
                if k[0] in rekeyed:
                    del store.counters[k]

    def held(self):
        n = 0
        for buf in self.rounds.values():
            n += len(buf)
        return n

    def has(self, h):
        for buf in self.rounds.values():
            if h in buf:
                return True
        return False

    def offer(self, msg, now, cur_round, open_round=0):
        """A peer frame as it arrives: keep it (returns its SHA-256), or raise Rejected. A frame
        already held returns None (our own echo, a redelivery). Rounds cur_round (the last
        one this node acted on) up to the one after open_round (the newest verified global,
        when the node has not acted on it yet, or could not) are taken."""
        h = hashlib.sha256(msg).digest()
        if self.has(h):
            return None
        top = open_round if open_round > cur_round else cur_round
        fr = self.verifier.verify(msg, now, cur_round if cur_round > 0 else 1, top + 1)
        checked = self.check == "signature"
        buf = self.rounds.get(fr.round)
        mine = []
        if buf is not None:
            for k in buf:
                if buf[k][0] == fr.sender:
                    mine.append(k)
        if len(mine) >= self.per_sender and not checked:
            # Contention: only now do signatures matter. A forged frame goes; so does a
            # forged copy already held (it must not push the signed one out).
            self._check(fr.sender, fr.signing_digest(), fr.signature)
            checked = True
            for k in mine:
                e = buf[k]
                if e[3]:
                    digest, signature = self.vectors.read_sig(e[2])
                    try:
                        self._check(e[0], digest, signature)
                        e[3] = False
                    except Rejected:
                        self._release(fr.round, k)
                        self.evicted += 1
            mine = [k for k in mine if k in buf]
        if len(mine) >= self.per_sender:
            raise Rejected("buffer_full", "%d updates of %s for round %d already held"
                           % (len(mine), fr.sender, fr.round))
        # Unchecked: keep what a later signature check needs (96 bytes, not the frame), with
        # the vector. The sender's id as the registry holds it: no string of our own.
        sig = None if checked else (fr.signing_digest(), fr.signature)
        self.keep(fr.round, h, _registered(self.verifier.registry, fr.sender),
                  fr.body["samples"], update_values(msg, fr.sender), sig)
        return h

    def _check(self, sender, signing_digest, signature):
        self.sig_checks += 1
        entry = self.verifier.registry.lookup(sender)
        if entry is None or not self.check_sig(entry[0], signing_digest, signature):
            raise Rejected("bad_signature", "signature of %s does not verify" % sender)

    def keep(self, round_, h, sender, samples, packed, sig=None):
        """Hold one update: ours, or a peer's (`sig`: (signing digest, signature) while its
        signature is unchecked). Raises Rejected("buffer_full")."""
        buf = self.rounds.get(round_)
        if buf is not None and h in buf:
            return  # held already (a copy offered first)
        if not self.free:
            raise Rejected("buffer_full", "all %d update slots are in use" % self.n_slots)
        slot = self.free.pop()
        self.vectors.put(slot, packed, round_, sig)
        if buf is None:
            buf = {}
            self.rounds[round_] = buf
        buf[h] = [sender, samples, slot, sig is not None]

    def _release(self, round_, h):
        e = self.rounds[round_].pop(h)
        self.free.append(e[2])

    def drop_before(self, r):
        """Forget rounds below r (settled)."""
        for k in list(self.rounds.keys()):
            if k < r:
                for e in self.rounds[k].values():
                    self.free.append(e[2])
                del self.rounds[k]
                self.vectors.drop(k)

    def gather(self, rr, accepted):
        """(ids, slots, weights, missing) for the announced accepted set of round rr."""
        buf = self.rounds.get(rr, {})
        ids = []
        slots = []
        weights = []
        missing = 0
        for node_id, fh in accepted:
            e = buf.get(fh)
            if e is None or e[0] != node_id:
                missing += 1
                continue
            ids.append(node_id)
            slots.append(e[2])
            weights.append(e[1])
        return ids, slots, weights, missing

    def digest(self, rr, body):
        """Step 5: (digest of the announced aggregate, ids) or (None, missing count). Raises
        AggregationError where microfed.aggregate would (and MemoryError as itself)."""
        ids, slots, weights, missing = self.gather(rr, body["accepted"])
        if missing:
            return None, missing
        vec = self.vectors

        def read_into(i, start, count, out):
            vec.read_into(slots[i], start, count, out)

        lim = self.verifier.limits
        return announced_digest(body, ids, read_into, lim.dim, weights, self.cols,
                                lim.max_abs), ids


def _registered(registry, node_id):
    """The registry's own string for node_id (equal to it), so that what a round keeps per
    peer shares it instead of holding a copy decoded from each frame."""
    for k in registry.nodes:
        if k == node_id:
            return k
    return node_id


def announced_digest(body, ids, read_into, d, weights, cols=None, max_abs=None):
    """The digest of the aggregate a GLOBAL_MODEL announces (`body`: its decoded payload),
    over the updates `ids` in announced order, update i read by read_into (microfed.colagg;
    `cols`: its column buffers, allocated once by the caller; `max_abs`: a bound on every
    |value| read, when the caller's range check gives one)."""
    from microfed import colagg  # gossip only: Peers imported it at boot

    rule = body["rule"]
    return colagg.run(rule, ids, read_into, d,
                      wire.rule_params(rule, body["p1"], body["p2"], weights), cols=cols,
                      max_abs=max_abs)[0]


def list_reader(vecs):
    """microfed.colagg's read_into over in-memory int32 vectors (host engines, tests)."""
    def read_into(i, start, count, out):
        v = vecs[i]
        for x in range(count):
            out[x] = v[start + x]
    return read_into
