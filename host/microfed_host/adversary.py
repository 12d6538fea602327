"""The Byzantine adversary: one host-side actor holding the REGISTERED keys of the compromised
nodes (their signatures verify: this is the insider threat robust aggregation is for).

It is omniscient, as in the literature: it reads every honest update of the round from the
broker before crafting its own (IPM and ALIE need their mean and spread). Model attacks
(the update is validly signed, its content is poison):

    none        behave honestly (train on the node's own shard)
    sign-flip   -delta of an honest local training step
    ipm         -tau * mean(honest deltas)               (Xie et al. 2020, tau = 10)
    alie        mean - z * std per coordinate            (Baruch et al. 2019, z from n and f)
    gaussian    N(0, sigma^2) per coordinate, sigma in model units (default 1.0)
    scaling     scale * delta of an honest step          (default x10)
    label-flip  honest training on labels 9 - y
    sleeper     honest for the first half of the rounds, then sign-flip
    min-max     mean + gamma * (-unit mean), gamma as large as the honest spread allows
                (Shejwalkar & Houmansadr, NDSS 2021; microfed_host.attacks)
    min-sum     the same, bounded by the honest updates' sums of squared distances (ibid.)
    fang-krum   -lambda * sign(honest mean), lambda the largest that Krum still selects
                (Fang et al., USENIX Security 2020: full knowledge, f = the attackers)
    mimic       a copy of the honest update furthest from the honest mean (Karimireddy et
                al., ICLR 2022)
    adaptive    knows the reputation rule: as far against the honest mean as the reward
                band allows, so it is rewarded, never banned (docs/reputation.md)

Wire attacks (each compromised node also sends an honest update, so the round still reaches
quorum; the injected frame must be rejected, with this reason):

    replay        re-send an honest node's accepted frame from two rounds ago  -> replay
    forged        an update claiming an honest node's id, signed by a random key -> bad_signature
    unregistered  a validly signed update from an id the registry does not know -> unregistered

Behind a broker that enforces the mesh's ACL (microfed provision's broker/acl: a node may
publish only on its own update/digest/hello topics) the adversary logs in with each
compromised node's own credentials, and a publish on a victim's or an intruder's topic is
dropped by the broker before any verifier sees it. So with `own_topics` set (mesh run does,
for its authenticating brokers) the injected frame goes out on the compromised node's OWN
update topic instead: the broker lets it through, and the coordinator still rejects it for
the same reason (signature, registry and replay checks come before the topic check).

In gossip mode a compromised node also lies about consensus: it publishes a digest that is
not the aggregate's (the coordinator flags it), except under `none`, where it tells the truth.

Everything is a function of (seed, round, node id) and the honest updates: the same inputs
give the same frames' contents, so runs are reproducible. `Adversary` is transport-agnostic
(returns what to publish); `AdversaryThread` drives it over MQTT.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from microfed import audit, gossip, model, noderound, q16, wire
from microfed_host import attacks, keys

MODEL_ATTACKS = ("none", "sign-flip", "ipm", "alie", "gaussian", "scaling", "label-flip",
                 "sleeper", "min-max", "min-sum", "fang-krum", "mimic", "adaptive")
WIRE_ATTACKS = ("replay", "forged", "unregistered")
ATTACKS = MODEL_ATTACKS + WIRE_ATTACKS
NEEDS_HONEST = ("ipm", "alie", "min-max", "min-sum", "fang-krum", "mimic", "adaptive")
EXPECTED_REASON = {"replay": "replay", "forged": "bad_signature", "unregistered": "unregistered"}
DEFAULTS = {"tau": 10.0, "sigma": 1.0, "scale": 10.0, "z": 0.0}  # z = 0: from n and f
ALIASES = {"signflip": "sign-flip", "sign_flip": "sign-flip", "label_flip": "label-flip",
           "labelflip": "label-flip", "gauss": "gaussian", "scale": "scaling",
           "forged-signature": "forged", "forged_signature": "forged", "forge": "forged",
           "unregistered-sender": "unregistered", "unregistered_sender": "unregistered",
           "alie": "alie", "ipm": "ipm", "honest": "none", "minmax": "min-max",
           "min_max": "min-max", "minsum": "min-sum", "min_sum": "min-sum",
           "fang": "fang-krum", "fang_krum": "fang-krum", "fangkrum": "fang-krum",
           "adaptive-reputation": "adaptive", "adaptive_reputation": "adaptive"}


class AdversaryError(ValueError):
    pass


def canonical_attack(name: str) -> str:
    n = name.strip().lower()
    n = ALIASES.get(n, n)
    if n not in ATTACKS:
        raise AdversaryError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return n


def alie_z(n: int, f: int) -> float:
    """Baruch et al. 2019: s = floor(n/2 + 1) - f supporters needed; z = Phi^-1((n - s)/n)."""
    s = n // 2 + 1 - f
    p = (n - s) / n
    p = min(max(p, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


@dataclass
class Compromised:
    node_id: str
    seed: bytes  # the node's registered Ed25519 seed
    attack: str
    xs: list[list[int]]
    ys: list[int]
    params: dict[str, float] = field(default_factory=dict)
    seq: int = 0

    def p(self, name: str) -> float:
        return float(self.params.get(name, DEFAULTS[name]))


def _digest(values: list[int]) -> bytes:
    return bytes.fromhex(audit.digest(values))


class Adversary:
    """Craft the compromised nodes' frames. Feed it every GLOBAL_MODEL and update frame seen;
    it returns [(topic, frame)] to publish."""

    def __init__(
        self,
        mesh: str,
        coordinator_pub: bytes,
        nodes: list[Compromised],
        honest: list[str],
        rounds: int,
        train: dict[str, int],
        mode: str = "coordinated",
        seed: int = 0,
        model_name: str = "softmax",
        n_features: int = 64,
        n_classes: int = 10,
        max_abs: int = 256 * 65536,
        clock: Callable[[], float] = time.time,
        reward_band: int = 4,
    ) -> None:
        self.mesh = mesh
        self.mesh_id = wire.mesh_id(mesh)
        self.coord_pub = coordinator_pub
        self.nodes = nodes
        for c in nodes:
            c.attack = canonical_attack(c.attack)
        self.honest = list(honest)
        self.rounds = rounds
        self.train = train
        self.mode = mode
        self.seed = seed
        self.model = model.get(model_name, n_features=n_features, n_classes=n_classes)
        self.max_abs = max_abs
        self.clock = clock
        self.reward_band = reward_band  # the mesh's reputation rule (the adaptive attack knows it)
        self.base = f"microfed/{mesh}/"
        # Wire attacks publish on the compromised node's own topic (see the module docstring).
        self.own_topics = False
        self.round = 0
        self.global_params: list[int] | None = None
        self.global_round_seen = 0
        self.global_seq = 0
        self.crafted_round = 0
        self.waiting_since = 0.0
        # frames seen on update topics: round -> {sender: (sha, values, samples, frame)}
        self.seen: dict[int, dict[str, tuple[bytes, list[int], int, bytes]]] = {}
        self.injected: list[dict[str, Any]] = []
        # our own valid updates: round, id -> (id, values, samples)
        self.own: dict[tuple[int, str], tuple[str, list[int], int]] = {}
        self.sent: dict[str, int] = {}
        self.needs_honest = any(c.attack in NEEDS_HONEST for c in nodes)
        n_total = len(honest) + len(nodes)
        self.z = alie_z(n_total, len(nodes))
        self._intruders = {c.node_id: hashlib.sha256(
            b"microfed/adversary/intruder" + struct.pack("<I", seed & 0xFFFFFFFF)
            + c.node_id.encode()).digest() for c in nodes}

    # -- helpers ------------------------------------------------------------------------
    def _frame(self, kind: int, sender: str, seed: bytes, round_: int, seq: int,
               payload: bytes) -> bytes:
        return wire.encode(kind, self.mesh_id, sender, round_, seq, int(self.clock()), payload,
                           keys.signer(seed))

    def _next_seq(self, c: Compromised) -> int:
        c.seq += 1
        return c.seq

    def _train(self, c: Compromised, g: list[int], r: int, flip: bool = False) -> list[int]:
        # An honest node's local update (microfed.noderound), on flipped labels if asked.
        ys = [self.model.k - 1 - y for y in c.ys] if flip else c.ys  # type: ignore[attr-defined]
        return noderound.local_update(self.model, (c.xs, ys), self.train, r, c.node_id, g)

    def _clip(self, v: np.ndarray) -> list[int]:
        m = self.max_abs
        return [int(x) for x in np.clip(v, -m, m).astype(np.int64)]

    def _honest_matrix(self, r: int) -> np.ndarray:
        seen = self.seen.get(r, {})
        rows = [seen[h][1] for h in self.honest if h in seen]
        return np.asarray(rows, dtype=np.float64)

    def hello_frames(self) -> list[tuple[str, bytes]]:
        """Compromised nodes announce themselves like any node (the coordinator starts round
        1 once every expected node said HELLO)."""
        out = []
        for c in self.nodes:
            payload = wire.encode_status(0, 0, 0, 0, "boot unix " + self.mode)
            out.append((self.base + "hello/" + c.node_id,
                        self._frame(wire.HELLO, c.node_id, c.seed, 0, self._next_seq(c), payload)))
        return out

    # -- input --------------------------------------------------------------------------
    def on_global(self, raw: bytes) -> list[tuple[str, bytes]]:
        try:
            fr = noderound.coordinator_frame(raw, self.mesh_id, self.coord_pub,
                                             wire.GLOBAL_MODEL, "global model",
                                             keys.check_signature)
        except wire.WireError:
            return []
        if fr.round <= self.global_round_seen:
            return []
        self.global_round_seen = fr.round
        out: list[tuple[str, bytes]] = []
        b = fr.body
        if self.mode == "gossip" and b["rule"] is not None and fr.round > 1:
            out += self._gossip_digests(fr.round - 1, b)
        if b["final"] or fr.round > self.rounds:
            return out
        self.round = fr.round
        self.global_params = list(b["values"])
        self.waiting_since = self.clock()
        for r in list(self.seen):
            if r < fr.round - 2:
                del self.seen[r]
        out += self.maybe_craft()
        return out

    def on_update(self, raw: bytes) -> list[tuple[str, bytes]]:
        try:
            fr = wire.decode(raw)
        except wire.WireError:
            return []
        if fr.kind != wire.MODEL_UPDATE or fr.mesh_id != self.mesh_id:
            return []
        if fr.sender not in self.honest:
            return []
        # Omniscient, not gullible: only updates that really come from the honest nodes.
        slot = self.seen.setdefault(fr.round, {})
        if fr.sender not in slot:
            slot[fr.sender] = (hashlib.sha256(raw).digest(), fr.body["values"],
                               fr.body["samples"], raw)
        return self.maybe_craft()

    def maybe_craft(self, force: bool = False) -> list[tuple[str, bytes]]:
        r = self.round
        if r == 0 or self.crafted_round >= r or self.global_params is None:
            return []
        if self.needs_honest and not force:
            have = self.seen.get(r, {})
            if not all(h in have for h in self.honest):
                return []
        self.crafted_round = r
        return self._craft(r, self.global_params)

    def poll(self, wait_s: float) -> list[tuple[str, bytes]]:
        """Give up waiting for missing honest updates after wait_s (a crashed node)."""
        if self.round and self.crafted_round < self.round and self.clock() - self.waiting_since > wait_s:
            return self.maybe_craft(force=True)
        return []

    # -- crafting -------------------------------------------------------------------------
    def _craft(self, r: int, g: list[int]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        hm = self._honest_matrix(r) if self.needs_honest else None
        for idx, c in enumerate(self.nodes):
            a = c.attack
            if a == "sleeper":
                a = "none" if r <= self.rounds // 2 else "sign-flip"
            if a in ("none",) + WIRE_ATTACKS:
                vec = self._train(c, g, r)
            elif a == "sign-flip":
                vec = [q16.sat(-v) for v in self._train(c, g, r)]
            elif a == "scaling":
                vec = self._clip(np.asarray(self._train(c, g, r), dtype=np.float64) * c.p("scale"))
            elif a == "label-flip":
                vec = self._train(c, g, r, flip=True)
            elif a == "gaussian":
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, r, idx])
                noise = rng.normal(0.0, c.p("sigma"), len(g)) * q16.ONE
                vec = self._clip(np.rint(noise))
            elif a in NEEDS_HONEST:
                if hm is None or len(hm) == 0:
                    vec = self._train(c, g, r)  # nothing to imitate: behave
                else:
                    vec = self._clip(np.rint(self._optimised(a, c, hm)))
            else:  # pragma: no cover - canonical_attack guards this
                raise AdversaryError(a)
            payload = wire.encode_model_update(len(c.ys), vec)
            frame = self._frame(wire.MODEL_UPDATE, c.node_id, c.seed, r, self._next_seq(c), payload)
            if c.attack in WIRE_ATTACKS:
                # Injected first: the round cannot close before our own valid update arrives
                # (same connection, same QoS: MQTT keeps the order), so it is judged in-round.
                bad = self._wire_attack(c, idx, r, payload)
                if bad is not None:
                    out.append(bad)
            out.append((self.base + "update/" + c.node_id, frame))
            self.sent[a] = self.sent.get(a, 0) + 1
        return out

    def _optimised(self, a: str, c: Compromised, hm: np.ndarray) -> np.ndarray:
        """The attacks that are functions of the round's honest updates (rows of hm)."""
        if a == "ipm":
            return -c.p("tau") * hm.mean(axis=0)
        if a == "alie":
            return hm.mean(axis=0) - (c.p("z") or self.z) * hm.std(axis=0)
        if a == "min-max":
            return attacks.min_max(hm)
        if a == "min-sum":
            return attacks.min_sum(hm)
        if a == "fang-krum":
            return attacks.fang_krum(hm, len(self.nodes), len(self.nodes))
        if a == "adaptive":
            return attacks.adaptive_reputation(hm, len(self.nodes), self.reward_band)
        return attacks.mimic(hm)

    def _wire_attack(self, c: Compromised, idx: int, r: int,
                     payload: bytes) -> tuple[str, bytes] | None:
        if not self.honest:
            return None
        victim = self.honest[(r + idx) % len(self.honest)]
        if c.attack == "replay":
            old = self.seen.get(r - 2, {})
            if victim not in old:
                return None  # nothing two rounds old yet (rounds 1 and 2)
            frame = old[victim][3]
            claims = victim
        elif c.attack == "forged":
            fake = hashlib.sha256(b"microfed/adversary/forger" + c.node_id.encode()
                                  + struct.pack("<I", r)).digest()
            frame = self._frame(wire.MODEL_UPDATE, victim, fake, r, (1 << 40) + r, payload)
            claims = victim
        else:  # unregistered
            claims = "intruder-" + c.node_id
            frame = self._frame(wire.MODEL_UPDATE, claims, self._intruders[c.node_id], r, r,
                                payload)
        topic = self.base + "update/" + (c.node_id if self.own_topics else claims)
        self.injected.append({"round": r, "attack": c.attack, "by": c.node_id,
                              "claims": claims, "topic": topic,
                              "sha256": hashlib.sha256(frame).hexdigest(),
                              "expect": EXPECTED_REASON[c.attack]})
        return topic, frame

    def _gossip_digests(self, rr: int, b: dict[str, Any]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        truth: bytes | None = None
        for c in self.nodes:
            if c.attack == "none":
                if truth is None:
                    truth = self._true_digest(rr, b)
                d = truth
            else:
                d = hashlib.sha256(b"microfed/adversary/lie" + c.node_id.encode()
                                   + struct.pack("<I", rr)).digest()
            if d is None:
                continue
            payload = wire.encode_gossip_digest(d, b["rule"], b["p1"], b["p2"],
                                                len(b["accepted"]))
            frame = self._frame(wire.GOSSIP_DIGEST, c.node_id, c.seed, rr, self._next_seq(c),
                                payload)
            out.append((self.base + "digest/" + c.node_id, frame))
        return out

    def _true_digest(self, rr: int, b: dict[str, Any]) -> bytes | None:
        byhash: dict[bytes, tuple[str, list[int], int]] = {}
        for sender, (sha, vals, samples, _raw) in self.seen.get(rr, {}).items():
            byhash[sha] = (sender, vals, samples)
        ids, vecs, weights = [], [], []
        for node_id, h in b["accepted"]:
            e = byhash.get(h) or self.own.get((rr, node_id))
            if e is None:
                return None
            ids.append(node_id)
            vecs.append(e[1])
            weights.append(e[2])
        return gossip.announced_digest(b, ids, gossip.list_reader(vecs), len(vecs[0]),
                                       weights)

    def remember_own(self, frames: list[tuple[str, bytes]]) -> None:
        """Keep our own valid updates (needed to tell the truth under `none` in gossip)."""
        for _topic, raw in frames:
            try:
                fr = wire.decode(raw)
            except wire.WireError:
                continue
            if fr.kind == wire.MODEL_UPDATE and any(c.node_id == fr.sender for c in self.nodes):
                self.own[(fr.round, fr.sender)] = (fr.sender, fr.body["values"], fr.body["samples"])

    def report(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for e in self.injected:
            counts[e["expect"]] = counts.get(e["expect"], 0) + 1
        return {"attackers": {c.node_id: c.attack for c in self.nodes}, "sent": dict(self.sent),
                "injected": self.injected, "injected_by_reason": counts,
                "alie_z": self.z}


class AdversaryThread(threading.Thread):
    """Run an Adversary over MQTT (its own paho client)."""

    def __init__(self, adv: Adversary, host: str, port: int, wait_s: float = 20.0,
                 logins: dict[str, dict[str, Any]] | None = None) -> None:
        """logins: node id -> HostMQTT keyword arguments (username, password[, tls_ca]) of
        each compromised node; then every node gets its own connection and publishes as
        itself, as the broker's ACL demands. Without: one anonymous connection."""
        super().__init__(name="microfed-adversary", daemon=True)
        import queue

        from microfed_host.mqtt import HostMQTT

        self.adv = adv
        self.wait_s = wait_s
        self.q: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.clients: dict[str, HostMQTT] = {}
        if logins:
            for c in adv.nodes:
                self.clients[c.node_id] = HostMQTT(host, port, f"microfed-adv-{adv.mesh}-{c.node_id}"[:64],
                                                   **logins[c.node_id])
            self.mqtt = next(iter(self.clients.values()))  # also reads update/+ and global
        else:
            self.mqtt = HostMQTT(host, port, f"microfed-adversary-{adv.mesh}"[:64])
        self.stop_event = threading.Event()
        self.error: str | None = None

    def start_client(self) -> None:
        for cl in self.clients.values():
            if cl is not self.mqtt:
                cl.connect(15)
        self.mqtt.connect(15)
        base = self.adv.base
        self.mqtt.subscribe(base + "update/+", lambda t, p: self.q.put((t, p)))
        self.mqtt.subscribe(base + "global", lambda t, p: self.q.put((t, p)))
        self._send(self.adv.hello_frames())

    def run(self) -> None:
        import queue

        try:
            while not self.stop_event.is_set():
                try:
                    topic, payload = self.q.get(timeout=0.2)
                except queue.Empty:
                    self._send(self.adv.poll(self.wait_s))
                    continue
                if topic.endswith("/global"):
                    out = self.adv.on_global(payload)
                else:
                    out = self.adv.on_update(payload)
                self._send(out)
        except Exception as e:  # reported by the runner, which then stops the mesh
            self.error = f"{type(e).__name__}: {e}"

    def _send(self, out: list[tuple[str, bytes]]) -> None:
        self.adv.remember_own(out)
        for topic, frame in out:
            # Each frame leaves on the connection of the node whose topic it is.
            cl = self.clients.get(topic.rsplit("/", 1)[-1], self.mqtt)
            self._publish_through_outages(cl, topic, frame)

    def _publish_through_outages(self, cl: Any, topic: str, frame: bytes,
                                 give_up_s: float = 600.0) -> None:
        """Like a node's outbox: a broker outage delays the frame, it does not end the attack."""
        from microfed_host.mqtt import MQTTError

        deadline = time.monotonic() + give_up_s
        while True:
            try:
                cl.publish(topic, frame, qos=1)
                return
            except MQTTError:
                if self.stop_event.is_set() or time.monotonic() > deadline:
                    raise
                cl.wait_connected(1.0)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(5)
        for cl in self.clients.values():
            if cl is not self.mqtt:
                cl.close()
        self.mqtt.close()
