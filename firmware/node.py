# The microfed node: one state machine per device, driven by MQTT messages (mesh protocol,
# docs in firmware/README.md). Portable MicroPython (unix port, ESP32, Pico W); no f-strings.
#
# Per round r (GLOBAL_MODEL r from the coordinator, retained):
#   1. verify it: size, decode, mesh, kind/role, the PINNED coordinator key, replay (counter
#      above the last accepted one, round above the persisted last round, clock window),
#      dimension, the model's own digest;
#   2. gossip mode: aggregate exactly the announced accepted set of round r-1 from the peer
#      updates kept during r-1 (checked as config "peer_check" says) with the announced rule,
#      publish GOSSIP_DIGEST(r-1) = audit.digest of the result;
#   3. unless the run is over: train on the local shard from the global parameters (seed
#      derived from (base seed, r, node id)), delta = new - global (saturating), take the next
#      persisted sequence counter, sign MODEL_UPDATE(r), persist (last round, coordinator
#      counter, frame hash) atomically, THEN publish it. With config "privacy": "secagg" the
#      node sends SA_KEYS(r) instead and answers the coordinator's secure-aggregation frames
#      of round r (key set, inbox, unmask request) with microfed.secagg's Client
#      (docs/privacy.md); no plain update ever leaves the device.
# Nothing a peer or the network sends can crash the node: every rejection is counted by
# reason, logged, and reported in a signed STATUS frame; the loop goes on.
# The round's steps themselves are microfed.noderound's (shared with the host's engines);
# this module adds the transport, persistence, counters and reports around them.

import gc
import hashlib
import time

from microfed import ed25519, model, noderound, replay, wire
from microfed.replay import ReplayGuard, SequenceSource
from microfed.registry import Rejected, load_registry_frame
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
                 "out_of_memory", "refused", "bad_keyset", "bad_share", "wrong_phase")


def _failure(e, phase):
    """(reason, message) for an exception while doing `phase`. A MemoryError is reported
    as what it is, with the heap left after a collection and where it ran out, never as a
    protocol problem."""
    if isinstance(e, MemoryError):
        gc.collect()
        try:
            free = gc.mem_free()
        except Exception:
            free = -1
        return "out_of_memory", "%s: MemoryError, %d bytes free after gc%s" % (
            phase, free, _where(e))
    return None, repr(e)


def _where(e):
    """' at FILE:LINE in FUNCTION', the innermost frame of e's traceback; '' when it cannot
    be had (CPython, a port without tracebacks, or no memory even for that). The traceback is
    never held as one text: _last_file_stream's stream keeps the last line that names a file
    as the lines go by, so the report needs blocks of a line's size, not of the whole
    traceback's (~1 KB for a round's depth), which the split heap of an out-of-memory report
    often does not have (a unix32 gossip node at 48 KB reported no location:
    docs/results.md; tests/test_firmware.py splits a heap to check it)."""
    try:
        import sys

        w = _last_file_stream()
        sys.print_exception(e, w)  # pyright: ignore[reportAttributeAccessIssue]
        last = w.last
        if last is None:
            return ""
        # '  File "microfed/model.py", line 277, in train'
        parts = last.decode()[7:].split(", ")
        return " at %s:%s %s" % (parts[0].strip('"'), parts[1][5:], parts[2])
    except Exception:
        return ""


def _last_file_stream():
    # A stream for sys.print_exception (io.IOBase: MicroPython calls write() with each piece
    # it prints) that keeps only the traceback's last '  File ...' line. Made when a failure
    # is reported, not at import: a class costs every node heap for good.
    import io

    class LastFile(io.IOBase):
        def __init__(self):
            self.line = b""
            self.last = None

        def write(self, buf):
            b = self.line + bytes(buf)
            i = b.find(b"\n")
            while i >= 0:
                if b.startswith(b"  File "):
                    self.last = b[:i]
                b = b[i + 1:]
                i = b.find(b"\n")
            self.line = b
            return len(buf)

    return LastFile()


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
    One checksummed text file, replaced atomically (microfed.replay.AtomicFile: its next
    file opened in advance, so a round's write needs no block of a fragmented heap)."""

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
            if not raw and p != path:
                continue  # the next write's file, opened in advance: nothing written yet
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
        self.file = replay.AtomicFile(path)

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
        self.file.write(body + b"#sha256 " + _hex(_sha(body)).encode() + b"\n")
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


class Node:
    def __init__(self, bundle, cfg, shard, transport, hal, log, clock=replay.wall_clock,
                 release=None):
        """bundle: config.Bundle; cfg: config.Config; shard: the MFDS shard file opened "rb"
        (read a row at a time) or its bytes; transport: mqtt.Transport (or anything with
        publish/subscribe/poll/connected); hal: a hal module; log(dict): one event per call;
        release: None, or what frees the block main.py held for the large buffers."""
        # Every attribute first, in one place: the instance's attribute table reaches its
        # full size (about 60 entries) while the heap is still whole. Added one by one as
        # the boot went on, its last resize needed a 376-byte block that a 64 KB Cortex-M3,
        # after the Ed25519 work below, did not always have (docs/boards.md).
        self.data = self.n_samples = self.model = self.rb = self.gossip = None
        self.started = self.registry_sha = self.dp = self.state = self.seqs = None
        self.gguard = self.registry = self.peers = self.sa = self.own_entry = None
        self.built = None  # (update, rx_writes) whose frame the shared buffer holds
        self.sa_msgs = []  # the coordinator's secure-aggregation frames waiting for step()
        topics = noderound.Topics(bundle.mesh, bundle.node_id)
        self.t_global = topics.global_
        self.t_registry = topics.registry
        self.t_update = topics.update
        self.t_hello = topics.hello
        self.t_notice = topics.notice
        # Only the topics this node's mode uses are kept (a coordinated node: 352 B less,
        # benchmarks/node_boot_heap.py).
        self.gossip = gossip = cfg.mode == "gossip"
        self.t_updates = topics.updates if gossip else None
        self.t_update_prefix = topics.update_prefix if gossip else None
        self.t_digest = topics.digest if gossip else None
        secagg = cfg.privacy == "secagg"
        self.t_secagg = topics.secagg if secagg else None
        self.t_secagg_round = topics.secagg_round if secagg else None
        topics = None
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
        self.open_round = 0  # the newest verified GLOBAL_MODEL's round (state's at boot)
        # This round's update until the next global arrives: its frame, or, when it is built in
        # the receive buffer (RoundBuffers(space=...)), (round, seq, timestamp) to build it
        # again from (update_bytes).
        self.last_update = None
        self.reconnects_seen = 0
        self.resend_why = None
        self.resign_why = None
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

        # Data and model: the shard stays where it is (flash), read a row at a time.
        self.data = model.Shard(shard)
        self.n_samples = self.data.n
        self.model = model.get(cfg.model, n_features=self.data.d, n_classes=self.data.k)
        self.model.check_data(self.data)
        # The round's large blocks next, reused every round (noderound.RoundBuffers), and
        # the transport's receive buffer, sized for the largest message the mesh sends us (a
        # GLOBAL_MODEL announcing every registered node's update; a larger one still arrives,
        # in a block of its own). Now, before the first Ed25519 operation below: its long-int
        # temporaries spread over the whole heap, and what outlives them lands anywhere, so
        # afterwards a 64 KB heap may have no 2.7 KB block left (measured: docs/results.md).
        n = self.model.n_params
        if release is not None:
            release()
        gc.collect()
        use_rx = getattr(transport, "use_rx_buffer", None)
        rx = None
        if use_rx is not None:
            rx = use_rx(_global_len(n, bundle.registry_frame))
        # The update frame is built in the receive buffer (2.7 KB less on the heap): nothing
        # is read into it while a round trains and signs, and transport.rx_writes() says when
        # it has been since (update_bytes builds the frame again then).
        self.rb = noderound.RoundBuffers(self.model, self.node_id, self.n_samples,
                                         rx if hasattr(transport, "rx_writes") else None)
        if ed25519.public_key(bundle.seed) != bundle.public_key:
            raise ValueError("bundle: seed does not match public_key")
        self.started = time.ticks_ms()
        # Peers' keys are for a node that checks peers' frames (gossip) or exchanges keys
        # with them (secure aggregation); any other keeps its own entry alone.
        self.own_entry = None if self.gossip or cfg.privacy == "secagg" else self.node_id

        # Registry of peers, verified against the pinned coordinator key.
        try:
            reg = load_registry_frame(bundle.registry_frame, self.mesh_id,
                                      bundle.coordinator_key, ed25519.verify, 0, self.own_entry)
        except WireError as e:
            raise ValueError("bundle: registry frame rejected: %s: %s" % (e.reason, e.message))
        me = reg.lookup(self.node_id)
        if me is None or me[0] != bundle.public_key or not me[1]:
            raise ValueError("bundle: this node is not an active registry member with its key")
        # The registry's retained copy arrives after every (re)connect, byte for byte the frame
        # checked here: recognised by its hash, it costs no second Ed25519 verification (whose
        # long-int temporaries, right after boot, strew the heap: docs/boards.md).
        self.registry_sha = _sha(bundle.registry_frame)
        bundle.registry_frame = None  # ~0.7 KB for 13 nodes (node_boot_heap.py), needed no more

        # DP (config "dp"): local DP clips and noises every delta before it is signed; with
        # privacy secagg (distributed DP) the Client adds the noise share before masking.
        # Imported only when used: a node without it pays no heap for the sampler.
        self.dp = None
        if cfg.dp is not None:
            from microfed import dp

            self.dp = dp.node_dp(cfg.dp, cfg.train["seed"], self.node_id, cfg.max_abs)

        # Persistent state.
        sd = cfg.state_dir
        self.state = NodeState(sd + "/node.state")
        self.seqs = SequenceSource(sd + "/seq", cfg.seq_block)
        # No maximum age for GLOBAL_MODEL: it is retained, so a node that (re)boots late in a
        # long round legitimately receives a frame minutes old. Freshness comes from the
        # persisted counter and "round above the last one done"; the future bound stays.
        self.open_round = self.state.last_round
        self.gguard = ReplayGuard(_CoordStore(self.state.coord_seq), max_age=1 << 62)
        self.registry = reg
        self.peers = None
        if self.gossip:
            # Peers' updates of the open rounds (two): per_sender per registered node each.
            # Imported only here: a coordinated node never holds microfed.gossip's code.
            from microfed.gossip import FileVectors, Peers, RamVectors

            d = self.model.n_params
            vectors = FileVectors(sd, d) if cfg.vectors == "flash" else RamVectors(d)
            self.peers = Peers(
                self.mesh_id, reg, d, cfg.max_abs, ed25519.verify, vectors,
                cfg.gossip_buffer or (2 * cfg.per_sender * len(reg.nodes)), cfg.per_sender,
                cfg.peer_check)

        if cfg.privacy == "secagg":
            import os

            from microfed import secagg

            self.sa = secagg.Client(self.node_id, self.mesh_id, os.urandom)


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
        # The key checked against the seed at boot: no scalar multiplication to derive it.
        return ed25519.sign(self.b.seed, msg, self.b.public_key)

    def frame(self, kind, round_, payload):
        return wire.encode(kind, self.mesh_id, self.node_id, round_, self.seqs.next(),
                           self.clock(), payload, self.sign)

    def subscribe(self):
        self.t.subscribe(self.t_global, 1)
        self.t.subscribe(self.t_registry, 1)
        self.t.subscribe(self.t_notice, 1)
        if self.gossip:
            self.t.subscribe(self.t_updates, 1)
        if self.sa is not None:
            self.t.subscribe(self.t_secagg_round, 1)

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
            elif self.sa is not None and (topic == self.t_secagg_round or (
                    topic == self.t_notice and len(msg) > 3 and msg[3] == wire.SA_INBOX)):
                # Heavy (X25519, signatures): answered by step(), not in the handler. A copy:
                # msg may be the transport's receive buffer.
                self.sa_msgs.append(bytes(msg))
                if len(self.sa_msgs) > 4:
                    self.sa_msgs.pop(0)
                    self.log("secagg_dropped")
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
        return noderound.coordinator_frame(msg, self.mesh_id, self.b.coordinator_key, kind,
                                           what, ed25519.verify)

    def verify_global(self, msg, into=None):
        return noderound.check_global(msg, self.mesh_id, self.b.coordinator_key,
                                      ed25519.verify, self.gguard, self.state.last_round,
                                      self.model.n_params, self.clock(), into, self.gossip)

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
        rb = self.rb
        fr = self.verify_global(msg, rb.take())
        # The payload is a view into msg, which may be the transport's receive buffer: gone.
        fr.drop_payload()
        if fr.body["values"] is rb.p:
            rb.hold(fr)  # until step() has trained on it (or dropped it)
        self.last_global_at = time.ticks_ms()
        if fr.round > self.open_round:
            # Its round is open from now on, for peers' updates too, even before step() has
            # trained on it, or if training fails (a round lost to out_of_memory must not
            # make the next round's peer updates "future" ones: their digest goes with it).
            self.open_round = fr.round
        # Processed by step(), after the transport has handed over every message that came
        # in before this one: peer updates of the round just closed must be buffered first,
        # and a handler that publishes would let later packets overtake queued ones.
        self.globals.append((fr, h))
        if len(self.globals) > 4:
            old = self.globals.pop(0)[0]
            self.rb.release(old)
            self.log("global_dropped", round=old.round)

    def on_update(self, msg):
        # Checked and kept as it arrives: hash, the cheap checks, values into a slot.
        if self.peers.offer(msg, self.clock(), self.state.last_round, self.open_round) is None:
            self.duplicates += 1  # our own echo, or a redelivery

    def on_registry(self, msg):
        h = _sha(msg)
        if h == self.registry_sha:
            self.duplicates += 1
            return
        reg = load_registry_frame(msg, self.mesh_id, self.b.coordinator_key, ed25519.verify, 0,
                                  self.own_entry)
        if reg.version <= self.registry.version:
            self.duplicates += 1
            return
        old = self.registry
        self.registry = reg
        self.registry_sha = h
        # A peer re-enrolled with a new key starts a new counter epoch: forget its counters
        # (frames signed with its old key can never verify again).
        rekeyed = []
        for nid in reg.nodes:
            prev = old.nodes.get(nid)
            if prev is not None and prev[0] != reg.nodes[nid][0]:
                rekeyed.append(nid)
        if self.peers is not None:
            self.peers.set_registry(reg, rekeyed)
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
        if type(fr) is tuple:
            if self.rb.delta_round != fr[0]:
                self.last_update = None  # outdated: the buffers hold another round's values
                return
            frame = (fr[0], self.seqs.next(), self.clock())
            self.update_bytes(frame)
        else:
            old = wire.decode(fr)
            frame = self.frame(wire.MODEL_UPDATE, old.round, old.payload)
        self.last_update = frame
        self.outbox = [it for it in self.outbox if it[1] is not fr]
        self.log("resend", what="update", why="counter_behind", seq=self.seqs.last)
        self.queue(self.t_update, frame, "update")

    def update_bytes(self, upd):
        """The frame of the update upd = (round, seq, timestamp), in the round buffers' frame
        (the receive buffer): as built, if no message has been read into it since; else built
        again, the same bytes (the same fields and delta; an Ed25519 signature is
        deterministic). None when the buffers hold that round's delta no more (a newer global
        was decoded into them: the update is outdated)."""
        rb = self.rb
        if rb.delta_round != upd[0]:
            return None
        b = self.built
        if b is None or b[0] != upd or b[1] != self.t.rx_writes():
            noderound.update_frame(self.mesh_id, self.node_id, upd[0], upd[1], upd[2],
                                   self.n_samples, rb.p, self.sign, rb.frame)
            self.built = (upd, self.t.rx_writes())
        return rb.frame

    # ---------------------------------------------------------------- the round
    def begin_round(self, fr, h):
        """The global's announcement (gossip: the digest of round r-1), then its values to
        train on; None when the run is over. The decoded payload (the accepted set: an id,
        a hash and a tuple per announced node) is dropped here, in a function of its own: a
        MicroPython frame's value stack keeps what it popped, and the collector scans it, so
        in the caller's frame it stayed on the heap through training (measured:
        benchmarks/node_feed_heap.py)."""
        r = fr.round
        b = fr.body
        self.log("global", round=r, seq=fr.seq, final=b["final"], rule=b["rule"],
                 accepted=None if b["accepted"] is None else len(b["accepted"]))
        if self.gossip and b["rule"] is not None and r > 1:
            self.gossip_digest(r - 1, b)
        if self.peers is not None:
            self.peers.drop_before(r)  # keep r (collecting now) and r+1 (early peers)
        self.last_update = None
        mr = self.cfg.max_rounds
        if b["final"] or (mr and r > mr):
            self.state.save(r, fr.seq, h)
            self.notes.append((ST_FINAL, "final %d" % r))
            self.log("final", round=r)
            self.done = True
            return None
        fr.body = None
        return b["values"]

    def process_global(self, fr, h):
        r = fr.round
        seq = fr.seq
        g = self.begin_round(fr, h)
        if g is None:
            return
        t0 = time.ticks_ms()
        # The round buffers (noderound.RoundBuffers), unless another global waiting in
        # self.globals holds them; and under secure aggregation, whose client keeps the delta
        # past this round, the delta gets lists of its own. The node's DP (distributed) then
        # goes in at secagg_begin.
        rb = self.rb
        if self.sa is not None or (rb.busy and g is not rb.p):
            rb = None
        else:
            # Their frame buffer is about to change: the previous round's update, still
            # queued when the broker was away, is outdated now (its round is closed).
            self.outbox = [it for it in self.outbox
                           if it[1] is not rb.frame and type(it[1]) is not tuple]
        delta = noderound.local_update(self.model, self.data, self.cfg.train, r, self.node_id,
                                       g, None if self.sa is not None else self.dp, rb)
        g = None
        self.rb.release(fr)
        gc.collect()
        t1 = time.ticks_ms()
        if self.sa is not None:
            kind, payload = noderound.secagg_begin(self.sa, r, delta, self.n_samples,
                                                   self.cfg.clip_l2, self.dp)
            delta = None
            frame = self.frame(kind, r, payload)
            self.state.save(r, seq, h)  # persisted before publishing, as for an update
            self.queue(self.t_secagg, frame, "sa_keys")
            self.rounds_done += 1
            self.log("sa_keys", round=r, seq=self.seqs.last, clipped=self.sa.clipped,
                     train_ms=time.ticks_diff(t1, t0))
            gc.collect()
            return
        useq = self.seqs.next()
        now = self.clock()
        frame = noderound.update_frame(self.mesh_id, self.node_id, r, useq, now,
                                       self.n_samples, delta, self.sign,
                                       None if rb is None else rb.frame)
        upd = frame
        if rb is not None and rb.shared:
            # The frame is in the receive buffer: what the outbox and last_update keep is how
            # to build it again (update_bytes), if a message arrives before it is sent.
            upd = (r, useq, now)
            self.built = (upd, self.t.rx_writes())
        t2 = time.ticks_ms()
        # The delta goes before the publish: while the PUBACK is awaited, peers' updates
        # arrive (2.7 KB each), and a small heap needs the room. Its digest (for the log) is
        # the hash of its packed values in the frame: nothing to pack again (model.params_digest
        # packs 64 at a time, a 264-byte block a fragmented 64 KB heap once lacked here).
        delta_digest = _hex(wire.vector_digest(noderound.update_values(frame, self.node_id)))
        delta = None
        gc.collect()
        # Persist BEFORE publishing: after a crash from here on, this round is never redone.
        self.state.save(r, seq, h)
        fh = _sha(frame)
        if self.peers is not None:
            # Kept before it is published: our own echo is then a duplicate, not a peer frame.
            try:
                self.peers.keep(r, fh, self.node_id, self.n_samples,
                                noderound.update_values(frame, self.node_id))
            except Rejected as e:
                # No slot left for our own values: this round's digest will be missing, our
                # update is not.
                self.reject("update", e.reason, e.message)
        frame = None
        self.queue(self.t_update, upd, "update")
        # Kept until the next global: re-sent after a reconnect, because a broker that
        # restarted may have lost it (the same signed bytes: at worst a harmless duplicate).
        self.last_update = upd
        self.rounds_done += 1
        self.log("update", round=r, seq=self.seqs.last, hash=_hex(fh),
                 delta_digest=delta_digest, train_ms=time.ticks_diff(t1, t0),
                 sign_ms=time.ticks_diff(t2, t1))
        gc.collect()

    def secagg_step(self, msg):
        """Answer one coordinator frame of the secure-aggregation round (a refusal is a
        rejection with reason "refused": counted, reported, nothing revealed)."""
        t0 = time.ticks_ms()
        reply = noderound.secagg_reply(self.sa, msg, self.mesh_id, self.b.coordinator_key,
                                       ed25519.verify, self.registry)
        if reply is None:
            self.duplicates += 1
            return
        kind, payload = reply
        frame = self.frame(kind, self.sa.round, payload)
        self.queue(self.t_secagg, frame, wire.KIND_NAMES[kind])
        self.log("secagg", round=self.sa.round, sent=wire.KIND_NAMES[kind],
                 ms=time.ticks_diff(time.ticks_ms(), t0))
        gc.collect()

    def gossip_digest(self, rr, b):
        rule = b["rule"]
        try:
            d, ids = self.peers.digest(rr, b)
        except Exception as e:
            reason, message = _failure(e, "aggregating round %d" % rr)
            self.reject("announce", reason or "aggregate_error", message)
            return
        if d is None:
            self.missing_rounds += 1
            self.notes.append((ST_MISSING, "missing %d %d" % (rr, ids)))
            self.log("digest_skipped", round=rr, missing=ids, announced=len(b["accepted"]))
            return
        agree = d == b["agg_digest"]
        if agree:
            self.digest_agree += 1
        else:
            self.digest_disagree += 1
        count = len(ids)
        # The announced set (an id, a hash and a tuple per node, ~1.3 KB for 13 on a 32-bit
        # port) is done with: off the heap before the digest frame is signed, whose long
        # ints need the room (a 48 KB unix32 gossip node ran out there: docs/results.md).
        b["accepted"] = ids = None
        frame = self.frame(wire.GOSSIP_DIGEST, rr,
                           wire.encode_gossip_digest(d, rule, b["p1"], b["p2"], count))
        self.queue(self.t_digest, frame, "digest")
        self.digests_sent += 1
        self.log("digest", round=rr, digest=_hex(d), rule=rule, count=count,
                 agrees_with_coordinator=agree)
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
            if type(frame) is tuple:
                frame = self.update_bytes(frame)
                if frame is None:
                    self.outbox.pop(0)
                    self.log("outbox_dropped", what=what, why="outdated")
                    continue
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
            self.rb.release(fr)
        while self.sa_msgs and not self.done:
            msg = self.sa_msgs.pop(0)
            try:
                self.secagg_step(msg)
            except WireError as e:  # Rejected: a bad frame, another phase, a refusal
                self._failed(self.t_secagg_round, msg, e.reason, e.message)
            except Exception as e:
                self.errors += 1
                reason, message = _failure(e, "secure aggregation")
                self._failed(self.t_secagg_round, msg, reason or "handler_error", message)
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


def _global_len(n_params, registry_frame):
    """An upper bound on the bytes of a GLOBAL_MODEL frame of n_params values announcing one
    update of every registered node: an announcement entry (id length, id, SHA-256) is one
    byte shorter than the same node's registry entry (id length, id, key, status)."""
    return (wire.HDR_FIXED + len(wire.COORDINATOR) + 36 + 4 * n_params + wire.TRAILER_MIN
            + len(registry_frame) + wire.SIG_LEN)


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
        if node.gossip and topic.startswith(node.t_update_prefix):
            return "update"
    except Exception:
        pass
    return "mqtt"
