"""The in-process engine (`--transport inproc`): one CPython process, no broker, no
MicroPython; the same Coordinator, the same Adversary, and simulated nodes calling the same
portable code the firmware calls, so a run reaches the same final model digest as the real
mesh with the same seed."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed import audit, model, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Limits, Rejected, Verifier
from microfed_host import coordinator as coordmod
from microfed_host import keys
from microfed_host.coordinator import Coordinator
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


class SimNode:
    """What firmware/node.py does on a GLOBAL_MODEL, with the same portable calls (model.train
    with derive_seed, wire frames, microfed.verify for peers, microfed.audit for the gossip
    aggregate), signing with `cryptography` instead of the pure-Python Ed25519 for speed."""

    def __init__(self, bundle: dict[str, Any], xs: list[list[int]], ys: list[int], sc: Scenario,
                 registry: Any, bus: Bus, max_abs: int = coordmod.DEFAULT_MAX_ABS) -> None:
        self.id = bundle["node_id"]
        self.mesh = bundle["mesh"]
        self.mesh_id = wire.mesh_id(self.mesh)
        self.seed = bytes.fromhex(bundle["seed"])
        self.sign = keys.signer(self.seed)
        self.coord_pub = bytes.fromhex(bundle["coordinator_public_key"])
        self.data = (xs, ys)
        self.m = model.get("softmax")
        self.train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
        self.gossip = sc.mode == "gossip"
        self.bus = bus
        self.last_round = 0
        self.seq = 0
        self.done = False
        self.buffers: dict[int, dict[bytes, tuple[str, int, list[int]]]] = {}
        self.peers = Verifier(self.mesh_id, registry, ReplayGuard(MemoryStore()),
                              keys.check_signature, limits=Limits(self.m.n_params, max_abs),
                              kinds=(wire.MODEL_UPDATE,))
        self.base = f"microfed/{self.mesh}/"
        self.digests: dict[int, str] = {}
        self.rejected: dict[str, int] = {}

    def hello(self) -> None:
        payload = wire.encode_status(0, 0, 0, 0, "boot inproc " + ("gossip" if self.gossip else "coordinated"))
        self.bus.publish(self.base + "hello/" + self.id, self._frame(wire.HELLO, 0, payload))

    def _frame(self, kind: int, r: int, payload: bytes) -> bytes:
        self.seq += 1
        return wire.encode(kind, self.mesh_id, self.id, r, self.seq, int(time.time()), payload,
                           self.sign)

    def on_global(self, topic: str, raw: bytes) -> None:
        try:
            fr = wire.decode(raw)
        except wire.WireError:
            return
        if (fr.kind != wire.GLOBAL_MODEL or fr.sender != wire.COORDINATOR
                or fr.round <= self.last_round
                or not keys.check_signature(self.coord_pub, fr.signing_digest(), fr.signature)):
            return
        r, b = fr.round, fr.body
        if self.gossip and b["rule"] is not None and r > 1:
            self._digest(r - 1, b)
        for k in [k for k in self.buffers if k < r]:
            del self.buffers[k]
        self.last_round = r
        if b["final"] or r > 0xFFFFFFFE:
            self.done = True
            return
        g = b["values"]
        tr = self.train
        cfg = model.TrainConfig(tr["lr"], tr["epochs"], tr["batch"],
                                model.derive_seed(tr["seed"], r, self.id))
        delta = self.m.delta(g, self.m.train(g, self.data, cfg))
        frame = self._frame(wire.MODEL_UPDATE, r, wire.encode_model_update(len(self.data[1]), delta))
        if self.gossip:
            self.buffers.setdefault(r, {})[wire.sha256(frame)] = (self.id, len(self.data[1]), delta)
        self.bus.publish(self.base + "update/" + self.id, frame)

    def on_update(self, topic: str, raw: bytes) -> None:
        h = wire.sha256(raw)
        if any(h in b for b in self.buffers.values()):
            return
        cur = self.last_round
        try:
            fr = self.peers.verify(raw, int(time.time()), cur if cur > 0 else 1, cur + 1)
        except Rejected as e:
            self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            return
        self.buffers.setdefault(fr.round, {})[h] = (fr.sender, fr.body["samples"], fr.body["values"])

    def _digest(self, rr: int, b: dict[str, Any]) -> None:
        buf = self.buffers.get(rr, {})
        ids, vecs, weights = [], [], []
        for node_id, fh in b["accepted"]:
            e = buf.get(fh)
            if e is None or e[0] != node_id:
                return  # a missing frame: no digest for this round (the firmware does the same)
            ids.append(node_id)
            vecs.append(e[2])
            weights.append(e[1])
        res = audit.run(b["rule"], ids, vecs, wire.rule_params(b["rule"], b["p1"], b["p2"],
                                                               weights))
        self.digests[rr] = res["digest"]
        payload = wire.encode_gossip_digest(bytes.fromhex(res["digest"]), b["rule"], b["p1"],
                                            b["p2"], len(ids))
        self.bus.publish(self.base + "digest/" + self.id, self._frame(wire.GOSSIP_DIGEST, rr, payload))


def run_inproc(sc: Scenario, out: Path, doc: dict[str, Any],
               progress: Progress | None = None) -> dict[str, Any]:
    prog = progress or Progress(sc, None)
    cfg = coordmod.load_config(out)
    bus = Bus()
    store = RoundsStore(out / coordmod.STORE_NAME)
    try:
        coord = Coordinator(cfg, store, bus.publish, log=prog.event)
        reg = coord.registry
        sims: list[SimNode] = []
        for nid in sc.honest_ids():
            nd = out / "nodes" / nid
            bundle = json.loads((nd / "bundle.json").read_text())
            xs, ys, _info = model.decode_shard((nd / "shard.bin").read_bytes())
            sims.append(SimNode(bundle, xs, ys, sc, reg, bus))
        base = f"microfed/{doc['mesh']}/"
        for s in sims:
            bus.subscribe(base + "global", s.on_global)
            if s.gossip:
                bus.subscribe(base + "update/+", s.on_update)
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
        for sub in ("update/+", "digest/+", "hello/+"):
            bus.subscribe(base + sub, coord.handle)
        coord.start()
        for s in sims:
            s.hello()
        if adv is not None:
            for tp, fr in adv.hello_frames():
                bus.publish(tp, fr)
        bus.pump(lambda: coord.done)
        if not coord.done:
            # Only a deadline can move things on now (e.g. a rule minimum not met).
            raise MeshError("in-process run stalled: no messages left and the run is not over")
        if adv is not None:
            (out / "adversary.json").write_text(json.dumps(adv.report(), indent=2) + "\n")
        return {"transport": "inproc", "coordinator_restarts": 0,
                "node_rejections": {s.id: s.rejected for s in sims if s.rejected}}
    finally:
        store.close()


# ------------------------------------------------------------------ report
