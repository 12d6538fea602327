"""The in-process engine (`--transport inproc`): one CPython process, no broker, no
MicroPython; the same Coordinator, the same Adversary, and simulated nodes calling the same
portable code the firmware calls, so a run reaches the same final model digest as the real
mesh with the same seed."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed import dp, gossip, model, noderound, secagg, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Rejected
from microfed_host import coordinator as coordmod
from microfed_host import keys
from microfed_host.coordinator import Coordinator
from microfed_host.privacy import SECAGG_MODES
from microfed_host.report import Progress
from microfed_host.rounds_store import RoundsStore
from microfed_host.scenario import MeshError, Scenario, make_adversary


class Bus:
    """An in-memory broker: FIFO delivery, MQTT topic filters, retained messages."""

    def __init__(self) -> None:
        self.q: deque[tuple[str, bytes]] = deque()
        self.subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.retained: dict[str, bytes] = {}
        self.delivered = 0

    def subscribe(self, flt: str, handler: Callable[[str, bytes], None]) -> None:
        self.subs.append((flt, handler))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if retain:
            self.retained[topic] = payload
        self.q.append((topic, payload))

    def pump(self, stop: Callable[[], bool], limit: int = 10_000_000) -> None:
        while self.q and not stop():
            topic, payload = self.q.popleft()
            self.delivered += 1
            if self.delivered > limit:
                raise MeshError("in-process bus: message limit reached (a loop?)")
            for flt, h in self.subs:
                if _match(flt, topic):
                    h(topic, payload)


def _match(flt: str, topic: str) -> bool:
    fp, tp = flt.split("/"), topic.split("/")
    for i, f in enumerate(fp):
        if f == "#":
            return True
        if i >= len(tp) or (f != "+" and f != tp[i]):
            return False
    return len(fp) == len(tp)


class VirtualClock:
    """Wall time plus an offset the engine moves forward when only a deadline can make
    progress (a node that dropped out): deadlines pass at once instead of in real time."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class SimNode:
    """firmware/node.py's round without the device around it: the same microfed.noderound
    steps (check the global, local update, peers' updates, the announced aggregate's digest;
    with privacy secagg the same microfed.secagg.Client), signing with `cryptography` instead
    of the pure-Python Ed25519 for speed (and X25519 the same way)."""

    def __init__(self, bundle: dict[str, Any], shard: bytes, sc: Scenario, registry: Any,
                 bus: Bus, max_abs: int = coordmod.DEFAULT_MAX_ABS,
                 conf: dict[str, Any] | None = None, clock: Any = time.time,
                 drop_round: int = 0) -> None:
        self.id = bundle["node_id"]
        self.mesh = bundle["mesh"]
        self.mesh_id = wire.mesh_id(self.mesh)
        self.topics = noderound.Topics(self.mesh, self.id)
        self.seed = bytes.fromhex(bundle["seed"])
        self.sign = keys.signer(self.seed)
        self.coord_pub = bytes.fromhex(bundle["coordinator_public_key"])
        self.data = model.Shard(shard)
        self.m = model.get(sc.model, n_features=self.data.d, n_classes=self.data.k)
        self.train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
        self.gossip = sc.mode == "gossip"
        # The node's config.json "dp", read the way firmware/node.py reads it.
        self.dp = dp.node_dp((conf or {}).get("dp"), sc.seed, self.id, max_abs)
        self.bus = bus
        self.last_round = 0
        self.guard = ReplayGuard(MemoryStore(), max_age=1 << 62)  # the coordinator's counter
        self.seq = 0
        self.done = False
        per_sender = 2
        self.peers = gossip.Peers(self.mesh_id, registry, self.m.n_params, max_abs,
                                  keys.check_signature,
                                  gossip.RamVectors(self.m.n_params),
                                  2 * per_sender * len(registry.nodes), per_sender)
        self.digests: dict[int, str] = {}
        self.rejected: dict[str, int] = {}
        self.clock = clock
        self.registry = registry
        self.clip = sc.clip_l2
        self.sa = (secagg.Client(self.id, self.mesh_id, os.urandom, keys.x25519)
                   if sc.privacy in SECAGG_MODES else None)
        # Fault injection (tests): in this round the node goes silent for good after it sent
        # its shares, before its masked update: the dropout the shares recover from.
        self.drop_round = drop_round
        self.dead = False

    def hello(self) -> None:
        payload = wire.encode_status(0, 0, 0, 0, "boot inproc " + ("gossip" if self.gossip else "coordinated"))
        self.bus.publish(self.topics.hello, self._frame(wire.HELLO, 0, payload))

    def _frame(self, kind: int, r: int, payload: bytes) -> bytes:
        self.seq += 1
        return wire.encode(kind, self.mesh_id, self.id, r, self.seq, int(self.clock()), payload,
                           self.sign)

    def _reject(self, e: Rejected) -> None:
        self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1

    def on_global(self, topic: str, raw: bytes) -> None:
        if self.dead:
            return
        try:
            fr = noderound.check_global(raw, self.mesh_id, self.coord_pub, keys.check_signature,
                                        self.guard, self.last_round, self.m.n_params,
                                        int(self.clock()))
        except Rejected as e:
            self._reject(e)
            return
        r, b = fr.round, fr.body
        if self.gossip and b["rule"] is not None and r > 1:
            self._digest(r - 1, b)
        self.peers.drop_before(r)
        self.last_round = r
        if b["final"]:
            self.done = True
            return
        delta = noderound.local_update(self.m, self.data, self.train, r, self.id, b["values"],
                                       None if self.sa is not None else self.dp)
        if self.sa is not None:
            kind, payload = noderound.secagg_begin(self.sa, r, delta, self.data.n, self.clip,
                                                   self.dp)
            self.bus.publish(self.topics.secagg, self._frame(kind, r, payload))
            return
        self.seq += 1
        frame = bytes(noderound.update_frame(self.mesh_id, self.id, r, self.seq,
                                             int(self.clock()), self.data.n, delta, self.sign))
        if self.gossip:
            self.peers.keep(r, wire.sha256(frame), self.id, self.data.n,
                            noderound.update_values(frame, self.id))
        self.bus.publish(self.topics.update, frame)

    def on_secagg(self, topic: str, raw: bytes) -> None:
        """The coordinator's secure-aggregation frames (secagg-round, our notice topic)."""
        if self.dead or self.sa is None:
            return
        try:
            reply = noderound.secagg_reply(self.sa, raw, self.mesh_id, self.coord_pub,
                                           keys.check_signature, self.registry)
        except Rejected as e:
            self._reject(e)
            return
        if reply is None:
            return  # answered already, or an earlier round's
        kind, payload = reply
        if kind == wire.SA_MASKED and self.sa.round == self.drop_round:
            self.dead = True
            return
        self.bus.publish(self.topics.secagg, self._frame(kind, self.sa.round, payload))

    def on_update(self, topic: str, raw: bytes) -> None:
        try:
            self.peers.offer(raw, int(self.clock()), self.last_round)
        except Rejected as e:
            self._reject(e)

    def _digest(self, rr: int, b: dict[str, Any]) -> None:
        d, _ids = self.peers.digest(rr, b)
        if d is None:
            return  # a missing frame: no digest for this round (the firmware does the same)
        self.digests[rr] = d.hex()
        payload = wire.encode_gossip_digest(d, b["rule"], b["p1"], b["p2"], len(b["accepted"]))
        self.bus.publish(self.topics.digest, self._frame(wire.GOSSIP_DIGEST, rr, payload))


def run_inproc(sc: Scenario, out: Path, doc: dict[str, Any],
               progress: Progress | None = None,
               drop: tuple[str, int] | None = None) -> dict[str, Any]:
    """drop=(node id, round): that node goes silent for good in that round after sending its
    shares (privacy secagg; a fault for tests)."""
    prog = progress or Progress(sc, None)
    cfg = coordmod.load_config(out)
    bus = Bus()
    store = RoundsStore(out / coordmod.STORE_NAME)
    clock = VirtualClock()
    # The coordinator's events go to coordinator.log as in a real mesh (one JSON line each).
    evlog = open(out / "coordinator.log", "a")

    def log(ev: dict[str, Any]) -> None:
        evlog.write(json.dumps(ev) + "\n")
        prog.event(ev)

    try:
        coord = Coordinator(cfg, store, bus.publish, log=log, clock=clock)
        reg = coord.registry
        sims: list[SimNode] = []
        for nid in sc.honest_ids():
            nd = out / "nodes" / nid
            bundle = json.loads((nd / "bundle.json").read_text())
            conf = json.loads((nd / "config.json").read_text())
            sims.append(SimNode(bundle, (nd / "shard.bin").read_bytes(), sc, reg, bus,
                                conf=conf, clock=clock,
                                drop_round=drop[1] if drop is not None and drop[0] == nid else 0))
        base = f"microfed/{doc['mesh']}/"
        for s in sims:
            bus.subscribe(base + "global", s.on_global)
            if s.gossip:
                bus.subscribe(base + "update/+", s.on_update)
            if s.sa is not None:
                bus.subscribe(base + "secagg-round", s.on_secagg)
                bus.subscribe(base + "notice/" + s.id, s.on_secagg)
        adv = make_adversary(sc, out, doc["mesh"])
        if adv is not None:
            def adv_global(t: str, p: bytes) -> None:
                outp = adv.on_global(p)
                adv.remember_own(outp)
                for tp, fr in outp:
                    bus.publish(tp, fr)

            def adv_update(t: str, p: bytes) -> None:
                outp = adv.on_update(p)
                adv.remember_own(outp)
                for tp, fr in outp:
                    bus.publish(tp, fr)

            bus.subscribe(base + "global", adv_global)
            bus.subscribe(base + "update/+", adv_update)
        for sub in ("update/+", "digest/+", "hello/+", "secagg/+"):
            bus.subscribe(base + sub, coord.handle)
        coord.start()
        for s in sims:
            s.hello()
        if adv is not None:
            for tp, fr in adv.hello_frames():
                bus.publish(tp, fr)
        bus.pump(lambda: coord.done)
        idle = 0
        while not coord.done and idle < 3:
            # Only a deadline can move things on now (a node dropped out, or a rule minimum
            # not met): let virtual time reach it.
            clock.offset += max(0.0, coord.deadline - clock()) + 0.001
            coord.tick()
            idle = 0 if bus.q else idle + 1
            bus.pump(lambda: coord.done)
        if not coord.done:
            raise MeshError("in-process run stalled: no messages left and the run is not over")
        if adv is not None:
            (out / "adversary.json").write_text(json.dumps(adv.report(), indent=2) + "\n")
        return {"transport": "inproc", "coordinator_restarts": 0,
                "node_rejections": {s.id: s.rejected for s in sims if s.rejected}}
    finally:
        store.close()
        evlog.close()


# ------------------------------------------------------------------ report
