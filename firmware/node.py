# The microfed node: one state machine per device, driven by MQTT messages (mesh protocol,
# docs in firmware/README.md). Portable MicroPython (unix port, ESP32, Pico W); no f-strings.
#
# Per round r (GLOBAL_MODEL r from the coordinator, retained):
#   1. verify it: size, decode, mesh, kind/role, the PINNED coordinator key, replay (counter
#      above the last accepted one, round above the persisted last round, clock window),
#      dimension, the model's own digest;
#   2. gossip mode: aggregate exactly the announced accepted set of round r-1 from the peer
#      updates buffered during r-1 (verified against the bundle's registry) with the announced
#      rule, publish GOSSIP_DIGEST(r-1) = audit.digest of the result;
#   3. unless the run is over: train on the local shard from the global parameters (seed
#      derived from (base seed, r, node id)), delta = new - global (saturating), take the next
#      persisted sequence counter, sign MODEL_UPDATE(r), persist (last round, coordinator
#      counter, frame hash) atomically, THEN publish it.
# Nothing a peer or the network sends can crash the node: every rejection is counted by
# reason, logged, and reported in a signed STATUS frame; the loop goes on.

import gc
import hashlib
import struct
import time

from microfed import audit, ed25519, model, replay, wire
from microfed.replay import MemoryStore, ReplayGuard, SequenceSource
from microfed.verify import Limits, Rejected, Verifier, load_registry_frame
from microfed.wire import WireError

# STATUS / HELLO state byte.
ST_BOOT = 0
ST_WAITING = 1
ST_ROUND = 2
ST_REJECTED = 3
ST_MISSING = 4
ST_FINAL = 5
ST_ERROR = 6
ST_IDLE_EXIT = 7

# Node-side reasons, beyond microfed.verify.REASONS.
EXTRA_REASONS = ("buffer_full", "bad_topic", "handler_error", "aggregate_error",
                 "out_of_memory")


def _failure(e, phase):
    """(reason, message) for an exception while doing `phase`. A MemoryError is reported
    as what it is, with the heap left after a collection, never as a protocol problem."""
    if isinstance(e, MemoryError):
        gc.collect()
        try:
            free = gc.mem_free()
        except Exception:
            free = -1
        return "out_of_memory", "%s: MemoryError, %d bytes free after gc" % (phase, free)
    return None, repr(e)

STATE_MAGIC = b"microfed-node 1"
_HEX = "0123456789abcdef"


def _hex(b):
    return "".join([_HEX[x >> 4] + _HEX[x & 15] for x in b])


def _sha(b):
    return hashlib.sha256(b).digest()


class StateError(Exception):
    pass


class NodeState:
    """What survives a reboot (besides the sequence counter lease): the last round this node
    acted on, the last accepted coordinator counter and the hash of that GLOBAL_MODEL frame.
    One checksummed text file, replaced atomically (microfed.replay.atomic_write)."""

    def __init__(self, path):
        self.path = path
        self.last_round = 0
        self.coord_seq = 0
        self.global_hash = b""
        lines = None
        for p in (path, path + ".new"):
            try:
                f = open(p, "rb")
            except OSError:
                continue
            try:
                raw = f.read()
            finally:
                f.close()
            lines = self._parse(p, raw)
            break
        if lines is not None:
            parts = lines.split(" ")
            if len(parts) != 3:
                raise StateError("%s: malformed state line" % path)
            try:
                self.last_round = int(parts[0])
                self.coord_seq = int(parts[1])
                self.global_hash = bytes.fromhex(parts[2]) if parts[2] != "-" else b""
            except ValueError:
                raise StateError("%s: malformed state values" % path)
            if (not 0 <= self.last_round <= wire.U32_MAX or not 0 <= self.coord_seq < wire.SEQ_LIMIT
                    or len(self.global_hash) not in (0, 32)):
                raise StateError("%s: state values out of range" % path)

    def _parse(self, p, raw):
        cut = raw.rfind(b"\n#sha256 ")
        if cut < 0 or not raw.startswith(STATE_MAGIC + b"\n"):
            raise StateError("%s: not a node state file" % p)
        body = raw[:cut + 1]
        if _hex(_sha(body)).encode() != raw[cut + 9:].strip():
            raise StateError("%s: checksum mismatch (torn or edited file)" % p)
        try:
            return body[len(STATE_MAGIC) + 1:-1].decode()
        except ValueError:  # UnicodeError
            raise StateError("%s: not UTF-8" % p)

    def save(self, last_round, coord_seq, global_hash):
        line = "%d %d %s" % (last_round, coord_seq, _hex(global_hash) if global_hash else "-")
        body = STATE_MAGIC + b"\n" + line.encode() + b"\n"
        replay.atomic_write(self.path, body + b"#sha256 " + _hex(_sha(body)).encode() + b"\n")
        # Memory follows only once the file is written: a failed write changes nothing.
        self.last_round = last_round
        self.coord_seq = coord_seq
        self.global_hash = global_hash


class _CoordStore:
    """ReplayGuard store for the coordinator's counter: starts at the persisted value and
    advances in memory; NodeState.save() makes it durable together with the round, so a
    crash before that write lets the same (retained) GLOBAL_MODEL be processed again."""

    def __init__(self, seq):
        self.seq = seq

    def last(self, sender, kind):
        return self.seq

    def advance(self, sender, kind, seq):
        if seq <= self.seq:
            return False
        self.seq = seq
        return True


def check_mesh_name(name):
    for c in "/+#":
        if c in name:
            raise ValueError("mesh name %r cannot be part of an MQTT topic (has %r)" % (name, c))


class Node:
    def __init__(self, bundle, cfg, shard, transport, hal, log, clock=replay.wall_clock):
        """bundle: config.Bundle; cfg: config.Config; shard: bytes of the MFDS shard file;
        transport: mqtt.Transport (or anything with publish/subscribe/poll/connected);
        hal: a hal module; log(dict): one event per call."""
        check_mesh_name(bundle.mesh)
        self.b = bundle
        self.cfg = cfg
        self.t = transport
        self.hal = hal
        self._log = log
        self.clock = clock
        self.node_id = bundle.node_id
        self.mesh_id = bundle.mesh_id
        if wire.mesh_id(bundle.mesh) != self.mesh_id:
            raise ValueError("bundle: mesh_id does not match the mesh name")
        if ed25519.public_key(bundle.seed) != bundle.public_key:
            raise ValueError("bundle: seed does not match public_key")
        self.gossip = cfg.mode == "gossip"
        self.started = time.ticks_ms()

        # Registry of peers, verified against the pinned coordinator key.
        try:
            reg = load_registry_frame(bundle.registry_frame, self.mesh_id,
                                      bundle.coordinator_key, ed25519.verify)
        except WireError as e:
            raise ValueError("bundle: registry frame rejected: %s: %s" % (e.reason, e.message))
        me = reg.lookup(self.node_id)
        if me is None or me[0] != bundle.public_key or not me[1]:
            raise ValueError("bundle: this node is not an active registry member with its key")

        # Data and model.
        xs, ys, info = model.decode_shard(shard)
        self.data = (xs, ys)
        self.n_samples = len(ys)
        self.model = model.get(cfg.model, n_features=info["n_features"],
                               n_classes=info["n_classes"])
        self.model.check_data(self.data)
        tr = cfg.train
        self.train_base = tr["seed"]

        # Persistent state.
        sd = cfg.state_dir
        self.state = NodeState(sd + "/node.state")
        self.seqs = SequenceSource(sd + "/seq", cfg.seq_block)
        # No maximum age for GLOBAL_MODEL: it is retained, so a node that (re)boots late in a
        # long round legitimately receives a frame minutes old. Freshness comes from the
        # persisted counter and "round above the last one done"; the future bound stays.
        self.gguard = ReplayGuard(_CoordStore(self.state.coord_seq), max_age=1 << 62)
        n_nodes = len(reg.nodes)
        self.buffer_cap = cfg.gossip_buffer or (2 * cfg.per_sender * n_nodes)
        self.peers = Verifier(self.mesh_id, reg, ReplayGuard(MemoryStore()), ed25519.verify,
                              limits=Limits(self.model.n_params, cfg.max_abs),
                              kinds=(wire.MODEL_UPDATE,))
        self.registry = reg

        base = "microfed/" + bundle.mesh + "/"
        self.t_global = base + "global"
        self.t_registry = base + "registry"
        self.t_update = base + "update/" + self.node_id
        self.t_updates = base + "update/+"
        self.t_update_prefix = base + "update/"
        self.t_digest = base + "digest/" + self.node_id
        self.t_hello = base + "hello/" + self.node_id
        self.t_notice = base + "notice/" + self.node_id

        self.buffers = {}  # round -> {frame hash: (sender, samples, packed values)}
        self.buffered = 0
        self.outbox = []  # [topic, frame, what] awaiting a successful QoS 1 publish
        self.rejected = {}
        self.dirty = []  # reasons whose counter changed since the last STATUS about them
        self.notes = []  # other STATUS labels waiting to be sent: (state, label)
        self.last_status = None
        self.duplicates = 0
        self.errors = 0
        self.rounds_done = 0
        self.digests_sent = 0
        self.digest_agree = 0
        self.digest_disagree = 0
        self.missing_rounds = 0
        self.last_global_at = time.ticks_ms()
        self.done = False
        self.exit_code = 0
        self.hello_sent = False
        self.globals = []  # verified GLOBAL_MODELs waiting for step(), in arrival order
        self.last_update = None  # this round's update frame until the next global arrives
        self.reconnects_seen = 0
        self.resend_why = None
        self.resign_why = None

    # ---------------------------------------------------------------- plumbing
    def log(self, ev, **kw):
        kw["ev"] = ev
        kw["node"] = self.node_id
        kw["ms"] = time.ticks_diff(time.ticks_ms(), self.started)
        try:
            self._log(kw)
        except Exception:
            pass

    def sign(self, msg):
        return ed25519.sign(self.b.seed, msg)

    def frame(self, kind, round_, payload):
        return wire.encode(kind, self.mesh_id, self.node_id, round_, self.seqs.next(),
                           self.clock(), payload, self.sign)

    def subscribe(self):
        self.t.subscribe(self.t_global, 1)
        self.t.subscribe(self.t_registry, 1)
        self.t.subscribe(self.t_notice, 1)
        if self.gossip:
            self.t.subscribe(self.t_updates, 1)

    def counters(self):
        d = {"rejected": dict(self.rejected), "duplicates": self.duplicates,
             "errors": self.errors, "rounds": self.rounds_done, "digests": self.digests_sent,
             "digest_agree": self.digest_agree, "digest_disagree": self.digest_disagree,
             "missing_rounds": self.missing_rounds, "last_round": self.state.last_round,
             "last_seq": self.seqs.last, "free_heap": self.hal.free_heap()}
        try:
            d["mqtt"] = self.t.stats()
        except Exception:
            pass
        return d

    def reject(self, src, reason, message, sha=None):
        """Count a rejection by reason and log it; `sha`: the message's SHA-256 (16 hex)."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if reason not in self.dirty:
            self.dirty.append(reason)
        if sha is None:
            self.log("reject", src=src, reason=reason, msg=message, count=self.rejected[reason])
        else:
            self.log("reject", src=src, reason=reason, msg=message, count=self.rejected[reason],
                     sha=sha)

    def error(self, where, e):
        self.errors += 1
        self.log("error", where=where, error=repr(e))

    # ---------------------------------------------------------------- input
    def on_message(self, topic, msg):
        """The transport's handler. Never raises: whatever goes wrong while handling one
        message is a rejection counted by reason (the WireError's own, else handler_error)
        and logged with the first 16 hex digits of the message's SHA-256."""
        try:
            if isinstance(topic, (bytes, bytearray)):
                topic = bytes(topic).decode()
            if not msg and (topic == self.t_global or topic == self.t_registry):
                return  # an empty retained message deletes the retained one: not a frame
            if topic == self.t_global:
                self.on_global(msg)
            elif self.gossip and topic.startswith(self.t_update_prefix):
                self.on_update(msg)
            elif topic == self.t_registry:
                self.on_registry(msg)
            elif topic == self.t_notice:
                self.on_notice(msg)
            else:
                self.reject("mqtt", "bad_topic", "message on unexpected topic")
        except WireError as e:  # Rejected is a WireError
            self._failed(topic, msg, e.reason, e.message)
        except Exception as e:
            self.errors += 1
            reason, message = _failure(e, "handling %s" % _src(topic, self))
            self._failed(topic, msg, reason or "handler_error", message)

    def _failed(self, topic, msg, reason, message):
        # Never raises either: if even logging fails (out of memory), the count still moves.
        try:
            self.reject(_src(topic, self), reason, message, _short_sha(msg))
        except Exception:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def coordinator_frame(self, msg, kind, what):
        """Decode a frame that must be `kind` from the coordinator, signed with the key
        pinned in the bundle. Raises Rejected."""
        if not isinstance(msg, (bytes, bytearray)):
            raise Rejected("bad_type", "frame must be bytes")
        if len(msg) > wire.MAX_FRAME:
            raise Rejected("oversize", "frame of %d bytes" % len(msg))
        try:
            fr = wire.decode(msg)
        except WireError as e:
            raise Rejected(e.reason, e.message)
        if fr.mesh_id != self.mesh_id:
            raise Rejected("wrong_mesh", "%s for another mesh" % what)
        if fr.kind != kind:
            raise Rejected("wrong_kind", "%s where a %s belongs" % (fr.kind_name, what))
        if fr.sender != wire.COORDINATOR:
            raise Rejected("wrong_role", "%s not from the coordinator" % what)
        if not ed25519.verify(self.b.coordinator_key, fr.signing_digest(), fr.signature):
            raise Rejected("bad_signature", "%s signature does not verify" % what)
        return fr

    def verify_global(self, msg):
        fr = self.coordinator_frame(msg, wire.GLOBAL_MODEL, "global model")
        bad = self.gguard.check(wire.COORDINATOR, wire.GLOBAL_MODEL, fr.seq, fr.round,
                                fr.timestamp, self.clock(), self.state.last_round + 1, None)
        if bad is not None:
            raise Rejected(bad[0], bad[1])
        vals = fr.body["values"]
        if len(vals) != self.model.n_params:
            raise Rejected("bad_dim", "global model has %d values, model needs %d"
                           % (len(vals), self.model.n_params))
        if not wire.values_digest_ok(fr):
            raise Rejected("bad_digest", "global model digest does not match its vector")
        if not self.gguard.commit(wire.COORDINATOR, wire.GLOBAL_MODEL, fr.seq):
            raise Rejected("replay", "coordinator counter already used")
        return fr

    def on_global(self, msg):
        h = _sha(msg)
        if h == self.state.global_hash or [1 for q in self.globals if q[1] == h]:
            # The retained copy after a reconnect or reboot, a QoS 1 redelivery, or the
            # coordinator re-publishing after ITS reconnect: a broker that restarted may have
            # lost our update before the coordinator re-subscribed, so send it again (the
            # same signed bytes; the coordinator counts a copy it has as a duplicate).
            self.duplicates += 1
            if self.last_update is not None and h == self.state.global_hash:
                self.resend_why = "global_again"  # step() sends it: no publish in a handler
            return
        fr = self.verify_global(msg)
        self.last_global_at = time.ticks_ms()
        # Processed by step(), after the transport has handed over every message that came
        # in before this one: peer updates of the round just closed must be buffered first,
        # and a handler that publishes would let later packets overtake queued ones.
        self.globals.append((fr, h))
        if len(self.globals) > 4:
            old = self.globals.pop(0)[0]
            self.log("global_dropped", round=old.round)

    def on_update(self, msg):
        h = _sha(msg)
        for buf in self.buffers.values():
            if h in buf:
                self.duplicates += 1  # our own echo, or a redelivery
                return
        cur = self.state.last_round
        fr = self.peers.verify(msg, self.clock(), cur if cur > 0 else 1, cur + 1)
        buf = self.buffers.get(fr.round)
        if buf is None:
            buf = {}
            self.buffers[fr.round] = buf
        same = 0
        for e in buf.values():
            if e[0] == fr.sender:
                same += 1
        if same >= self.cfg.per_sender:
            raise Rejected("buffer_full", "%d updates of %s for round %d already buffered"
                           % (same, fr.sender, fr.round))
        if self.buffered >= self.buffer_cap:
            raise Rejected("buffer_full", "gossip buffer holds %d updates" % self.buffered)
        buf[h] = (fr.sender, fr.body["samples"], bytes(fr.payload[8:]))
        self.buffered += 1

    def on_registry(self, msg):
        reg = load_registry_frame(msg, self.mesh_id, self.b.coordinator_key, ed25519.verify)
        if reg.version <= self.registry.version:
            self.duplicates += 1
            return
        old = self.registry
        self.registry = reg
        self.peers.registry = reg
        # A peer re-enrolled with a new key starts a new counter epoch: forget its counters
        # (frames signed with its old key can never verify again).
        rekeyed = []
        store = self.peers.guard.store
        for nid in reg.nodes:
            prev = old.nodes.get(nid)
            if prev is not None and prev[0] != reg.nodes[nid][0]:
                rekeyed.append(nid)
                for k in list(store.counters.keys()):
                    if k[0] == nid:
                        del store.counters[k]
        self.log("registry", version=reg.version, nodes=len(reg.nodes), reenrolled=rekeyed)
        me = reg.lookup(self.node_id)
        if me is None or not me[1] or me[0] != self.b.public_key:
            # Revoked, or this id now belongs to a re-enrolled device with another key.
            why = "revoked" if me is None or not me[1] else "reenrolled_elsewhere"
            self.log("stop", reason=why, version=reg.version)
            self.notes.append((ST_IDLE_EXIT, why))
            self.done = True
            self.exit_code = 5

    def on_notice(self, msg):
        """The coordinator says our counter is behind what it accepted before (this device
        lost its counter file): skip past it, and re-sign the current update so this round
        still counts. Only the coordinator's signature makes us move; moving up is safe."""
        fr = self.coordinator_frame(msg, wire.STATUS, "notice")
        seq = wire.counter_notice_seq(fr.body)
        if seq is None:
            raise Rejected("bad_payload", "not a counter notice")
        if seq < self.seqs.last:
            self.duplicates += 1  # old news (or a replayed notice): nothing to do
            return
        self.log("counter_behind", coordinator_last=seq, mine=self.seqs.last)
        self.seqs.skip_past(seq)
        self.notes.append((ST_REJECTED, "counter_behind %d" % seq))
        self.resign_why = "counter_behind"  # step() re-signs: no publish in a handler

    def resign_current_update(self):
        """The current round's update again, with a fresh counter (same payload)."""
        fr = self.last_update
        if fr is None:
            return
        old = wire.decode(fr)
        frame = self.frame(wire.MODEL_UPDATE, old.round, old.payload)
        self.last_update = frame
        self.outbox = [it for it in self.outbox if it[1] is not fr]
        self.log("resend", what="update", why="counter_behind", seq=self.seqs.last)
        self.queue(self.t_update, frame, "update")

    # ---------------------------------------------------------------- the round
    def process_global(self, fr, h):
        r = fr.round
        b = fr.body
        self.log("global", round=r, seq=fr.seq, final=b["final"], rule=b["rule"],
                 accepted=len(b["accepted"]))
        if self.gossip and b["rule"] is not None and r > 1:
            self.gossip_digest(r - 1, b)
        self.drop_buffers(r)
        self.last_update = None
        mr = self.cfg.max_rounds
        if b["final"] or (mr and r > mr):
            self.state.save(r, fr.seq, h)
            self.notes.append((ST_FINAL, "final %d" % r))
            self.log("final", round=r)
            self.done = True
            return
        g = b["values"]
        tr = self.cfg.train
        tc = model.TrainConfig(tr["lr"], tr["epochs"], tr["batch"],
                               model.derive_seed(self.train_base, r, self.node_id))
        t0 = time.ticks_ms()
        new = self.model.train(g, self.data, tc)
        delta = self.model.delta(g, new)
        new = None
        t1 = time.ticks_ms()
        frame = self.frame(wire.MODEL_UPDATE, r, wire.encode_model_update(self.n_samples, delta))
        # Persist BEFORE publishing: after a crash from here on, this round is never redone.
        self.state.save(r, fr.seq, h)
        fh = _sha(frame)
        if self.gossip:
            self.buffers.setdefault(r, {})[fh] = (self.node_id, self.n_samples,
                                                  bytes(frame[wire.HDR_FIXED + len(self.node_id)
                                                              + 8:-wire.SIG_LEN]))
            self.buffered += 1
        self.queue(self.t_update, frame, "update")
        # Kept until the next global: re-sent after a reconnect, because a broker that
        # restarted may have lost it (the same signed bytes: at worst a harmless duplicate).
        self.last_update = frame
        self.rounds_done += 1
        self.log("update", round=r, seq=self.seqs.last, hash=_hex(fh),
                 delta_digest=_hex(model.params_digest(delta)), train_ms=time.ticks_diff(t1, t0),
                 sign_ms=time.ticks_diff(time.ticks_ms(), t1))
        delta = None
        gc.collect()

    def drop_buffers(self, r):
        # Keep round r (collecting now) and r+1 (early peers); older rounds are settled.
        for k in list(self.buffers.keys()):
            if k < r:
                self.buffered -= len(self.buffers[k])
                del self.buffers[k]

    def gossip_digest(self, rr, b):
        rule = b["rule"]
        buf = self.buffers.get(rr, {})
        ids = []
        vecs = []
        weights = []
        missing = 0
        for node_id, fh in b["accepted"]:
            e = buf.get(fh)
            if e is None or e[0] != node_id:
                missing += 1
                continue
            ids.append(node_id)
            vecs.append(list(struct.unpack("<%di" % (len(e[2]) // 4), e[2])))
            weights.append(e[1])
        if missing:
            self.missing_rounds += 1
            self.notes.append((ST_MISSING, "missing %d %d" % (rr, missing)))
            self.log("digest_skipped", round=rr, missing=missing, announced=len(b["accepted"]))
            return
        try:
            res = audit.run(rule, ids, vecs,
                            wire.rule_params(rule, b["p1"], b["p2"], weights))
        except Exception as e:
            vecs = None
            reason, message = _failure(e, "aggregating round %d" % rr)
            self.reject("announce", reason or "aggregate_error", message)
            return
        vecs = None
        d = bytes.fromhex(res["digest"])
        agree = d == b["agg_digest"]
        if agree:
            self.digest_agree += 1
        else:
            self.digest_disagree += 1
        frame = self.frame(wire.GOSSIP_DIGEST, rr,
                           wire.encode_gossip_digest(d, rule, b["p1"], b["p2"], len(ids)))
        self.queue(self.t_digest, frame, "digest")
        self.digests_sent += 1
        self.log("digest", round=rr, digest=res["digest"], rule=rule, count=len(ids),
                 agrees_with_coordinator=agree)
        res = None
        gc.collect()

    # ---------------------------------------------------------------- output
    def queue(self, topic, frame, what):
        self.outbox.append([topic, frame, what])
        while len(self.outbox) > 4:
            dropped = self.outbox.pop(0)
            self.log("outbox_dropped", what=dropped[2])
        self.flush()

    def flush(self):
        while self.outbox and self.t.connected:
            topic, frame, what = self.outbox[0]
            if not self.t.publish(topic, frame, False, 1):
                self.log("publish_failed", what=what)
                return
            self.outbox.pop(0)

    def resend_after_reconnect(self):
        try:
            n = self.t.stats().get("reconnects", 0)
        except Exception:
            n = self.reconnects_seen  # a transport without stats (tests) never reconnects
        if n != self.reconnects_seen:
            self.reconnects_seen = n
            self.resend_why = "reconnect"
        if self.resign_why:
            self.resign_why = None
            self.resend_why = None
            self.resign_current_update()
        if self.resend_why:
            why, self.resend_why = self.resend_why, None
            self.resend(why)

    def resend(self, why):
        if self.last_update is None:
            return
        for item in self.outbox:
            if item[1] is self.last_update:
                return
        self.log("resend", what="update", why=why)
        self.queue(self.t_update, self.last_update, "update")

    def status(self, state, label):
        if not self.t.connected:
            return False
        heap = self.hal.free_heap()
        up = time.ticks_diff(time.ticks_ms(), self.started) // 1000
        kind = wire.HELLO if state == ST_BOOT else wire.STATUS
        payload = wire.encode_status(state, min(max(heap, 0), 0xFFFFFFFF), max(up, 0),
                                     self.state.last_round, label[:wire.MAX_LABEL])
        fr = wire.encode(kind, self.mesh_id, self.node_id, self.state.last_round,
                         self.seqs.next(), self.clock(), payload, self.sign)
        self.last_status = time.ticks_ms()
        return self.t.publish(self.t_hello, fr, False, 0)

    def hello(self):
        return self.status(ST_BOOT, "boot %s %s" % (self.hal.NAME, self.cfg.mode))

    def step(self):
        """Between polls: run the rounds that arrived, retry the outbox, send one STATUS."""
        while self.globals and not self.done:
            fr, h = self.globals.pop(0)
            try:
                self.process_global(fr, h)
            except Exception as e:
                # e.g. MemoryError while training: this round is lost, the node is not.
                reason, message = _failure(e, "round %d" % fr.round)
                self.reject("global", reason or "handler_error", message, _hex(h[:8]))
                self.errors += 1
                gc.collect()
        if not self.hello_sent and self.t.connected:
            self.hello_sent = self.hello()
        self.resend_after_reconnect()
        self.flush()
        if (self.dirty or self.notes) and self.t.connected:
            ls = self.last_status
            if ls is None or time.ticks_diff(time.ticks_ms(), ls) >= self.cfg.status_interval_ms:
                if self.notes:
                    st, label = self.notes.pop(0)
                else:
                    reason = self.dirty.pop(0)
                    st, label = ST_REJECTED, "rej %s %d" % (reason, self.rejected[reason])
                self.status(st, label)
        if self.cfg.idle_exit_s and not self.done:
            if time.ticks_diff(time.ticks_ms(), self.last_global_at) > self.cfg.idle_exit_s * 1000:
                self.log("idle_exit", seconds=self.cfg.idle_exit_s)
                self.notes.append((ST_IDLE_EXIT, "idle exit"))
                self.done = True
                self.exit_code = 4

    def drain(self, ms=2000):
        """After done: deliver what is queued (outbox, STATUS notes) for at most ms."""
        end = time.ticks_add(time.ticks_ms(), ms)
        while time.ticks_diff(end, time.ticks_ms()) > 0:
            self.t.poll(20)
            self.flush()
            if self.notes or self.dirty:
                self.last_status = None
                self.step()
            if not self.outbox and not self.notes and not self.dirty:
                return True
        return not self.outbox


def _short_sha(msg):
    """First 16 hex digits of SHA-256(msg), or "-" if msg is not bytes-like."""
    try:
        return _hex(_sha(msg)[:8])
    except Exception:
        return "-"


def _src(topic, node):
    try:
        if topic == node.t_global:
            return "global"
        if topic == node.t_registry:
            return "registry"
        if topic.startswith(node.t_update_prefix):
            return "update"
    except Exception:
        pass
    return "mqtt"
