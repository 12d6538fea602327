"""The edge coordinator of a hierarchical mesh (docs/hierarchy.md): one per site, on the
site's own broker. It is the mesh coordinator (microfed_host.coordinator) with three changes:

1. it signs with the edge's own key, a member of the root's signed registry, and holds no
   root key: its directory (`microfed hier provision` writes it) has the root's public key,
   the root-signed registry, the edge's seed and the site broker's logins;
2. closing round r does not publish a global: the exact aggregate of the site's accepted
   updates goes up as one MODEL_UPDATE of round r from the edge (samples: the sum of its
   nodes' samples), on microfed/<mesh>/up/<edge>, which the site broker's bridge carries to
   the root as microfed/<mesh>/update/<edge>;
3. the global comes from the root, down the bridge, straight to the nodes, who check the
   root's signature against the key pinned in their bundle. The edge checks it too
   (microfed.noderound.check_global, the node's own step 1), logs it (`root_global`: round,
   model digest, whether the root aggregated this edge's update), and ends with the root's
   final global: its `done` event names the root's final model digest.

Run as a process (what `microfed hier run` does):

    python -m microfed_host.edge RUN_DIR --broker SITE_HOST:PORT

RUN_DIR holds coordinator.json (mesh_dir: the edge directory); its state goes to
RUN_DIR/coordinator.sqlite (the site's accepted node updates, per round: what the offline
check of `microfed hier audit` recomputes). Output: one JSON object per line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from microfed import model, noderound, verify, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Rejected
from microfed.wire import WireError
from microfed_host import brokerauth, keys
from microfed_host import coordinator as coordmod
from microfed_host import registry as regmod
from microfed_host.coordinator import Coordinator, CoordinatorConfig, CoordinatorError, Log
from microfed_host.rounds_store import RoundsStore

EDGE_FILE = "edge.json"  # {"edge": id, "site": name, "nodes": [ids]}
EDGE_KEY = "edge.key"
ROOT_PUB = "coordinator.pub"  # the root's public key: the mesh's pinned coordinator key


def read_edge(edge_dir: Path) -> dict[str, Any]:
    """The edge directory's edge.json, checked."""
    p = Path(edge_dir) / EDGE_FILE
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CoordinatorError(f"{p}: {e}") from None
    if (not isinstance(doc, dict) or not isinstance(doc.get("edge"), str)
            or not wire.valid_id(doc["edge"].encode()) or not isinstance(doc.get("nodes"), list)):
        raise CoordinatorError(f"{p}: must be {{\"edge\": id, \"site\": name, \"nodes\": [ids]}}")
    return doc


def load_edge_dir(edge_dir: str) -> tuple[dict[str, Any], bytes, Any, bytes, tuple[int, int], str]:
    """(mesh.json, the edge's seed, the root-signed registry (checked against the pinned root
    key), its frame, the registry file's stamp, the edge id). The edge's key must be the
    registry's key for its id, active."""
    from microfed_host.provision import MeshDir, ProvisionError

    root = Path(edge_dir)
    try:
        stamp = coordmod._registry_stamp(edge_dir)
        mesh = MeshDir(root).read_mesh()
        pinned = keys.read_public_key(root / ROOT_PUB)
        reg, frame = regmod.load(root / "registry.json", pinned)
        edge = read_edge(root)["edge"]
        seed = keys.read_private_key(root / EDGE_KEY)
    except (ProvisionError, regmod.RegistryError, keys.KeyFileError, OSError) as e:
        raise CoordinatorError(f"edge directory {edge_dir}: {e}") from None
    e = reg.nodes.get(edge)
    if e is None or not e.active or e.public_key != keys.public_key(seed):
        raise CoordinatorError(f"edge directory {edge_dir}: {edge} is not an active member of "
                               "the root's registry with the key in edge.key")
    return mesh, seed, reg, frame, stamp, edge


class EdgeCoordinator(Coordinator):
    SUBSCRIBE = ("update/+", "digest/+", "hello/+", "global", "registry")
    CLIENT_PREFIX = "microfed-edge-"
    ROLE = "edge coordinator"

    def __init__(self, cfg: CoordinatorConfig, store: RoundsStore, publish: coordmod.Publish,
                 log: Log = coordmod._json_log, clock: Any = time.time) -> None:
        self.edge_id = ""  # _load (called by Coordinator.__init__) sets it
        super().__init__(cfg, store, publish, log, clock)
        if cfg.mode != "coordinated" or cfg.privacy != "none" or cfg.pre != "none":
            raise CoordinatorError("an edge coordinator runs coordinated mode, no privacy mode "
                                   "and no pre step (docs/hierarchy.md)")
        self.root_key: bytes = self.registry.coordinator
        self.up_topic = self.t["base"] + brokerauth.EDGE_UP + self.edge_id
        # The root's counter, in memory: a restarted edge takes the retained global again.
        self.root_guard = ReplayGuard(MemoryStore(), max_age=1 << 62)
        self.root_round = 0
        self.root_sha = b""
        self.root_final: str | None = None
        self.sent: dict[int, bytes] = {}  # round -> SHA-256 of the edge update sent for it

    # -- Coordinator's hooks ----------------------------------------------------------------
    def _load(self, mesh_dir: str) -> tuple[dict[str, Any], bytes, Any, bytes, tuple[int, int]]:
        mesh, seed, reg, frame, stamp, self.edge_id = load_edge_dir(mesh_dir)
        return mesh, seed, reg, frame, stamp

    def _initial_frame(self) -> tuple[bytes, int]:
        return b"", 0  # the root publishes round 1's global

    def _round_frame(self, r: int, new_params: list[int], agg: list[int],
                     ann: dict[str, Any]) -> tuple[bytes, int]:
        """The edge update of round r: the site's aggregate, signed by the edge."""
        samples = sum(u.samples for u in self.pending.values())
        seq = self.coord_seq + 1
        frame = bytes(wire.encode_update(self.mesh_id, self.edge_id, r, seq, int(self.clock()),
                                         min(samples, wire.U32_MAX), agg, self._sign))
        self.sent[r] = hashlib.sha256(frame).digest()
        return frame, seq

    def _emit(self, frame: bytes) -> None:
        if not frame:
            return
        # Retained at the site broker, so it is sent again until acknowledged and after a
        # reconnect; the bridge drops the retain flag on its way to the root.
        self.publish(self.up_topic, frame, True)
        # Header only: the values are the edge's own aggregate, built just now.
        self.log("edge_update", round=wire.decode(frame, values=False).round,
                 topic=self.up_topic, frame_sha256=hashlib.sha256(frame).hexdigest())

    def _notify_counter_behind(self, raw: bytes) -> None:
        # A node trusts notices signed by the root key only; the edge cannot sign one.
        self.log("notice_skipped", reason="counter_behind",
                 why="only the root signs notices; run `microfed provision reenrol` for it")

    def _begin_finish(self) -> None:
        """After the last round: wait (at most a deadline) for the root's final global."""
        self.finishing = True
        self.finish_deadline = self.clock() + self.cfg.deadline_s
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.finishing and not self.done and self.root_final is not None:
            self._finish("root final global")

    def start(self) -> None:
        super().start()
        if self.global_frame:  # resumed: the last edge update sent
            fr = wire.decode(self.global_frame)
            self.sent[fr.round] = hashlib.sha256(self.global_frame).digest()

    # -- the root's global -------------------------------------------------------------------
    def _dispatch(self, topic: str, payload: bytes) -> None:
        if topic in (self.t["global"], self.t["registry"]):
            if not isinstance(payload, bytes | bytearray):
                raise TypeError("payload is not bytes")
            if topic == self.t["global"]:
                self.on_root_global(bytes(payload))
            else:
                self.on_root_registry(bytes(payload))
        else:
            super()._dispatch(topic, payload)

    def on_root_registry(self, raw: bytes) -> None:
        """A registry the root signed, down the bridge (a revocation, an addition, a
        re-enrolment at the root): newer than ours, it replaces the edge directory's
        registry.json and is adopted at once, as the root adopts its own. Older or equal: an
        echo of the retained copy, nothing to do; not the root's: a rejection, counted."""
        try:
            reg = verify.load_registry_frame(raw, self.mesh_id, self.root_key,
                                             keys.check_signature)
        except WireError as e:
            self._reject(e.reason, "root registry: " + e.message, raw,
                         hashlib.sha256(raw).hexdigest())
            return
        if reg.version <= self.registry.version:
            return
        regmod.save(Path(self.cfg.mesh_dir) / "registry.json",
                    regmod.from_frame(self.mesh, raw, self.root_key), raw)
        self.check_registry(force=True)

    def on_root_global(self, raw: bytes) -> None:
        """The root's GLOBAL_MODEL, as the site's nodes get it: checked as a node checks it
        (the pinned root key, counter, round, dimension, digest). A bad one is a rejection,
        counted; the nodes reject it too."""
        sha = hashlib.sha256(raw).digest()
        if sha == self.root_sha:
            return  # the retained global again (a reconnect)
        try:
            fr = noderound.check_global(raw, self.mesh_id, self.root_key, keys.check_signature,
                                        self.root_guard, self.root_round, self.model.n_params,
                                        int(self.clock()))
        except Rejected as e:
            self._reject(e.reason, "root global: " + e.message, raw, sha.hex())
            return
        self.root_round, self.root_sha = fr.round, sha
        self.params = list(fr.body["values"])
        digest = model.params_digest(self.params).hex()
        mine = self.sent.get(fr.round - 1)
        accepted: list[tuple[str, bytes]] = list(fr.body["accepted"])
        included = None if mine is None else (self.edge_id, mine) in accepted
        if included is False:
            self.store.security_event(fr.round - 1, "edge_update_left_out", self.edge_id,
                                      "the root's global %d does not aggregate this edge's "
                                      "update" % fr.round)
        self.log("root_global", round=fr.round, model_digest=digest, final=fr.body["final"],
                 rule=fr.body["rule"], included=included, edges=[n for n, _h in accepted])
        if fr.body["final"]:
            self.root_final = digest
            if not self.finishing:
                self._begin_finish()
            self.maybe_finish()
        elif fr.round > self.round and not self.finishing:
            self._follow_root(fr.round)

    def _follow_root(self, g: int) -> None:
        """The root closed the edge's open round without it (the root's deadline came first):
        that round is over everywhere, and the site's nodes now train on global g and send
        updates of round g. The edge drops what it holds of the old round (the root would
        refuse its aggregate as a stale round) and opens round g, persisted first."""
        old, dropped = self.round, sorted(self.pending)
        self.store.security_event(old, "edge_round_skipped", self.edge_id,
                                  "the root's global %d came while round %d was open; %d "
                                  "update(s) of it dropped" % (g, old, len(dropped)))
        self.store.init_state(g, coordmod._pack(self.params), self.book.to_bytes(),
                              self.global_frame, self.coord_seq)
        self.round = g
        self.pending = {}
        self.deadline = self.clock() + self.cfg.deadline_s
        self.round_opened = self.clock()
        self.log("round_skipped", round=old, now=g, dropped=dropped)


def main(argv: list[str] | None = None) -> int:
    return coordmod.main(argv, role=EdgeCoordinator, prog="python -m microfed_host.edge")


if __name__ == "__main__":
    sys.exit(main())
