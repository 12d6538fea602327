# A gossip node's round on recorded inputs, step by step through microfed.noderound (the very
# calls firmware/node.py makes), with the instructions and the live heap of every phase.
# Portable MicroPython 1.29 / CPython: this file is sent to a board as it is (raw REPL),
# frozen into every firmware `microfed firmware build` makes (imported as `roundprog` by
# roundcase.run_unix, in node.py's place: its code in flash, not on the heap), and exec'd under
# CPython for the answers the board must give (tools/microfed_tools/roundcase.py).
#
# Inputs arrive the way a board gets them: bytes put into one receive buffer (a frame at a
# time, like the MQTT client's: pushed as hex over a raw REPL, read from a file on unix32),
# the shard and the peers' vectors in flash when the board has a filesystem (`store` a
# directory), else in RAM (`store` = "").
# No time.ticks_us on CPython (counts are 0) and no gc.mem_free (heap figures are 0).

import gc
import hashlib
import time

from microfed import ed25519, model, noderound, wire
from microfed.registry import Rejected, load_registry_frame
from microfed.replay import MemoryStore, ReplayGuard

_tk = getattr(time, "ticks_us", None) or (lambda: 0)
_td = getattr(time, "ticks_diff", None) or (lambda a, b: a - b)
_free = getattr(gc, "mem_free", None) or (lambda: 0)


class RoundCase:
    def __init__(self, heap0):
        self.heap0 = heap0  # free heap (after collect) before anything of the node existed
        self.buf = None  # the receive buffer: boot_shard allocates it
        self.fill = 0
        self.cost = {}
        self.live = {}
        self.out = {}
        self.t = 0

    # -- receive buffer: hex chunks in, one message out
    def put(self, hexchunk):
        b = bytes.fromhex(hexchunk)
        self.buf[self.fill:self.fill + len(b)] = b
        self.fill += len(b)

    def recv(self, path, off, n):
        """One message read from a file straight into the receive buffer, as an MQTT client
        reads a payload from its socket (run_unix: no hex text, no statement per 512 bytes)."""
        f = open(path, "rb")
        f.seek(off)
        f.readinto(memoryview(self.buf)[:n])
        f.close()
        self.fill = n

    def take(self):
        n = self.fill
        self.fill = 0
        return memoryview(self.buf)[:n]

    # -- phase accounting
    def begin(self):
        gc.collect()
        self.t = _tk()

    def end(self, phase):
        self.cost[phase] = self.cost.get(phase, 0) + _td(_tk(), self.t)
        gc.collect()
        live = self.heap0 - _free()
        if live > self.live.get(phase, -1):
            self.live[phase] = live

    # -- the node
    def shard_buffer(self, n):
        """A board without a filesystem keeps its shard in RAM: room for it, filled by
        put_shard."""
        self.shard = bytearray(n)
        self.shard_fill = 0

    def put_shard(self, hexchunk):
        b = bytes.fromhex(hexchunk)
        self.shard[self.shard_fill:self.shard_fill + len(b)] = b
        self.shard_fill += len(b)

    def boot_shard(self, node_id, shard_path, buf_size):
        """Shard (the file `shard_path`, else the shard buffer), model, then the round's large
        blocks, allocated once: the receive buffer (room for the largest message, like the
        MQTT client's) and noderound.RoundBuffers, whose update frame is built in the receive
        buffer. In firmware/node.py's order: after the shard and the model, before the first
        message and the first Ed25519 operation."""
        self.begin()
        self.node_id = node_id
        self.data = model.Shard(open(shard_path, "rb") if shard_path else self.shard)
        self.model = model.get("softmax", n_features=self.data.d, n_classes=self.data.k)
        gc.collect()
        self.buf = bytearray(buf_size)
        self.rb = noderound.RoundBuffers(self.model, node_id, self.data.n, self.buf)
        self.end("boot_shard")

    def boot_registry(self, seed_hex, coord_hex, mesh, store, clock, gossip=True):
        """Identity, registry (one signature check; its frame is in the receive buffer), peer
        store (files in the directory `store`, else RAM)."""
        self.begin()
        self.seed = bytes.fromhex(seed_hex)
        # As a node's boot does (it checks its bundle's key against the seed): each signature
        # then takes the key instead of deriving it again.
        self.pub = ed25519.public_key(self.seed)
        self.coord = bytes.fromhex(coord_hex)
        self.mesh_id = wire.mesh_id(mesh)
        self.clock = clock
        self.seq = 0
        d = self.model.n_params
        reg = load_registry_frame(self.take(), self.mesh_id, self.coord, ed25519.verify)
        self.peers = None
        if gossip:
            # Imported here, as a node does: a coordinated one never loads microfed.gossip.
            from microfed.gossip import FileVectors, Peers, RamVectors

            vectors = FileVectors(store, d) if store else RamVectors(d)
            self.peers = Peers(self.mesh_id, reg, d, 256 * 65536, ed25519.verify, vectors,
                               len(reg.nodes) + 2, 2, "announce")
        reg = None
        self.guard = ReplayGuard(MemoryStore(), max_age=1 << 62)
        self.last_round = 0
        self.end("boot_registry")

    def _sign(self, kind, round_, payload):
        self.seq += 1
        return wire.encode(kind, self.mesh_id, self.node_id, round_, self.seq, self.clock,
                           payload, lambda m: ed25519.sign(self.seed, m, self.pub))

    def on_global(self, train):
        """Step 1 (and 5 when the global announces the last round), then 2 and 3."""
        t_round = _tk()
        self.begin()
        msg = self.take()
        h = hashlib.sha256(msg).digest()
        fr = noderound.check_global(msg, self.mesh_id, self.coord, ed25519.verify, self.guard,
                                    self.last_round, self.model.n_params, self.clock,
                                    self.rb.take(), self.peers is not None)
        fr.drop_payload()  # a view into the receive buffer
        msg = None
        self.end("check_global")
        r = fr.round
        b = fr.body
        if self.peers is not None and b["rule"] is not None and r > 1:
            self.begin()
            d, ids = self.peers.digest(r - 1, b)
            self.end("aggregate")
            self.out["agrees"] = d == b["agg_digest"]
            self.out["digest"] = _hex(d) if d is not None else None
            self.begin()
            df = self._sign(wire.GOSSIP_DIGEST, r - 1,
                            wire.encode_gossip_digest(d, b["rule"], b["p1"], b["p2"], len(ids)))
            self.out["digest_frame"] = _hex(hashlib.sha256(df).digest())
            df = None
            self.end("sign_digest")
        if self.peers is not None:
            self.peers.drop_before(r)
        self.last_round = r
        g = b["values"]
        fr.body = b = None
        fr = None
        self.begin()
        delta = noderound.local_update(self.model, self.data, train, r, self.node_id, g,
                                       None, self.rb)
        g = None
        self.end("train")
        self.begin()
        self.seq += 1
        frame = noderound.update_frame(self.mesh_id, self.node_id, r, self.seq, self.clock,
                                       self.data.n, delta, lambda m: ed25519.sign(self.seed, m, self.pub),
                                       self.rb.frame)
        delta = None
        fh = hashlib.sha256(frame).digest()
        if self.peers is not None:
            self.peers.keep(r, fh, self.node_id, self.data.n,
                            noderound.update_values(frame, self.node_id))
        self.out["update_%d" % r] = _hex(fh)
        frame = None
        self.end("sign_update")
        self.cost["round_%d" % r] = _td(_tk(), t_round)
        return h

    def on_update(self):
        """Step 4, for one peer frame."""
        self.begin()
        try:
            self.peers.offer(self.take(), self.clock, self.last_round)
        except Rejected as e:
            self.out["rejected"] = self.out.get("rejected", 0) + 1
            self.out["reason"] = e.reason
        self.end("peer_checks")

    def report(self):
        return {"cost": self.cost, "live": self.live, "out": self.out,
                "sig_checks": self.peers.sig_checks if self.peers is not None else 0}


def _hex(b):
    return "".join(["%02x" % x for x in b])
