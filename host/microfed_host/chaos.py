"""Chaos for a real mesh run: the faults and operator actions of a scenario's [chaos] table,
applied by `microfed mesh run` (mqtt transport) at fixed points of the run.

    [chaos]
    broker_restart_round = 2    # once round 2 has accepted an update: stop the broker,
    outage_s = 3.0              #   keep it down this long, start it again (empty)
    kill_coordinator_round = 3  # SIGKILL the coordinator mid-round 3 and restart it
    flood_round = 2             # junk QoS 1 frames on the coordinator's topics
    flood_frames = 2000
    malformed_round = 1         # hand-made malformed frames (the issue-8 crash frames)
    revoke_node = "node-05"     # revoked by the coordinator when round `revoke_round` closes
    revoke_round = 2            #   (coordinator.json revoke_at: exact in both runs)
    reenrol_node = "node-02"    # wiped (state deleted) and re-enrolled with a new key when
    reenrol_round = 3           #   round `reenrol_round` closes, then restarted
    wipe_node = "node-03"       # its counter file and state deleted (the bundle kept) when
    wipe_round = 2              #   round `wipe_round` closes, then restarted: the coordinator
                                #   answers its stale counter with a notice and it catches up

Faults (broker restart, coordinator kill, flood, malformed frames, the wipe) must not change
the result; membership changes (revocation) do. So `microfed mesh run` runs the scenario
twice: first with membership changes only (the reference), then with everything, and
compares final digests: equal means the faults cost nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from microfed import wire

Say = Callable[[str], None]


class ChaosError(ValueError):
    """A bad [chaos] table: the message names the key."""


@dataclass
class Chaos:
    broker_restart_round: int = 0
    outage_s: float = 3.0
    kill_coordinator_round: int = 0
    flood_round: int = 0
    flood_frames: int = 2000
    malformed_round: int = 0
    revoke_node: str = ""
    revoke_round: int = 0
    reenrol_node: str = ""
    reenrol_round: int = 0
    wipe_node: str = ""
    wipe_round: int = 0
    faults: bool = True  # False: the reference run (membership changes only)

    def reference(self) -> Chaos:
        return replace(self, faults=False)

    def check(self, node_ids: list[str], rounds: int) -> None:
        for name in ("broker_restart_round", "kill_coordinator_round", "flood_round",
                     "malformed_round", "revoke_round", "reenrol_round", "wipe_round"):
            v = getattr(self, name)
            if not 0 <= v <= rounds:
                raise ChaosError(f"chaos.{name} = {v} is not a round of this run (0..{rounds})")
        if not 0 < self.outage_s <= 600:
            raise ChaosError(f"chaos.outage_s must be in (0, 600] seconds, got {self.outage_s}")
        if not 0 <= self.flood_frames <= 1_000_000:
            raise ChaosError("chaos.flood_frames must be in 0..1000000")
        for name in ("revoke_node", "reenrol_node", "wipe_node"):
            node = getattr(self, name)
            if node and node not in node_ids:
                raise ChaosError(f"chaos.{name} = {node!r} is not an honest node of this run")
            if bool(node) != bool(getattr(self, name.replace("node", "round"))):
                raise ChaosError(f"chaos.{name} and its round must be given together")
        named = [n for n in (self.revoke_node, self.reenrol_node, self.wipe_node) if n]
        if len(set(named)) != len(named):
            raise ChaosError("chaos: revoke_node, reenrol_node and wipe_node must differ")

    def summary(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_chaos(doc: Any) -> Chaos | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise ChaosError("[chaos] must be a table")
    known = {f.name for f in fields(Chaos)}
    out = Chaos()
    for k, v in doc.items():
        if k not in known or k == "faults":
            raise ChaosError(f"unknown key chaos.{k}")
        want = type(getattr(out, k))
        if want is float and type(v) is int:
            v = float(v)
        if type(v) is not want:
            raise ChaosError(f"chaos.{k} must be {want.__name__}, got {v!r}")
        setattr(out, k, v)
    return out


def malformed_frames(mesh: str, node: str = "node-01") -> list[tuple[str, bytes]]:
    """(topic suffix, frame) pairs that crashed or could crash a decoder before issue 8:
    an announced GLOBAL_MODEL whose last accepted-set entry runs past the payload, lengths
    that lie, counts that overflow, a frame of only a header, an empty payload."""
    mid = wire.mesh_id(mesh)
    out: list[tuple[str, bytes]] = []
    # GLOBAL_MODEL, dim 1, announcement with one entry whose id length points past the end.
    vals = wire.encode_global_model([1])
    trailer = (b"AN" + bytes([1, 0, 1, 1, 0]) + bytes(32) + (1).to_bytes(2, "little")
               + bytes([60]) + b"node-01")
    payload = vals + trailer
    hdr = wire.encode_header(wire.GLOBAL_MODEL, mid, "node-01", 1, 1, 0, len(payload))
    long_entry = hdr + payload + bytes(64)
    for sub in ("update", "digest", "hello"):
        out.append((f"{sub}/{node}", long_entry))
    # A REGISTRY whose count claims more entries than there are bytes.
    reg = mid + (1).to_bytes(4, "little") + bytes(32) + (0xFFFF).to_bytes(2, "little")
    hdr = wire.encode_header(wire.REGISTRY, mid, "node-01", 1, 2, 0, len(reg))
    out.append((f"update/{node}", hdr + reg + bytes(64)))
    # Header only; a payload length that lies; an empty message; zeros after the magic.
    out.append((f"update/{node}", long_entry[:wire.HDR_FIXED]))
    lie = bytearray(long_entry)
    lie[31:35] = (0xFFFFFFF0).to_bytes(4, "little")
    out.append((f"digest/{node}", bytes(lie)))
    out.append((f"hello/{node}", b""))
    out.append((f"update/{node}", b"MF" + bytes(200)))
    return out


class ChaosDriver:
    """Fed every coordinator event by the mesh runner; does each action once, at its point.
    The runner gives it the levers: the broker, a coordinator restart, node stop/start."""

    def __init__(self, chaos: Chaos, out: Path, mesh: str, broker: Any, say: Say,
                 kill_coordinator: Callable[[], None], stop_node: Callable[[str], None],
                 start_node: Callable[[str], None], intruder: str,
                 login: dict[str, Any]) -> None:
        """`intruder`/`login`: the compromised node whose broker login sends the junk (the
        broker refuses anonymous clients; the ACL keeps it to its own topics)."""
        self.c = chaos
        self.intruder = intruder
        self.login = login
        self.out = out
        self.mesh = mesh
        self.broker = broker
        self.say = say
        self.kill_coordinator = kill_coordinator
        self.stop_node = stop_node
        self.start_node = start_node
        self.done: set[str] = set()
        self.revoked: set[str] = set()
        self.awaiting_registry: str | None = None
        self.flooders: list[Any] = []
        self.junk_sent = 0  # malformed + flood frames the broker acknowledged
        self.rejected_seen = 0  # the coordinator's "rejected" events
        self.outage_due: float | None = None
        self.reload_at_next_round = False
        self.report: dict[str, Any] = {"actions": []}

    def _once(self, name: str) -> bool:
        if name in self.done:
            return False
        self.done.add(name)
        return True

    def _act(self, what: str, **kw: Any) -> None:
        kw["action"] = what
        kw["t"] = round(time.time(), 3)
        self.report["actions"].append(kw)

    def on_event(self, ev: dict[str, Any]) -> None:
        k = ev.get("ev")
        c = self.c
        if k == "rejected":
            self.rejected_seen += 1
        if self.outage_due is not None and (self.rejected_seen >= self.junk_sent
                                            or time.monotonic() > self.outage_due):
            # A broker without persistence loses what it still queues for the coordinator:
            # the outage waits until the junk sent so far has been handled, so the junk
            # counts stay exact (honest updates are re-sent by the nodes either way).
            self.outage_due = None
            self._broker_outage()
        if k == "accepted":
            r = int(ev.get("round", 0))
            if c.faults and r == c.malformed_round and self._once("malformed"):
                self._malformed()
            if c.faults and r == c.flood_round and c.flood_frames and self._once("flood"):
                self._flood()
            if c.faults and r == c.broker_restart_round and self._once("broker"):
                self.outage_due = time.monotonic() + 60.0
                self.on_event({"ev": "tick"})
            if (c.faults and r == c.kill_coordinator_round and ev.get("have", 0) >= 1
                    and ev.get("have", 0) < ev.get("want", 0) and self._once("kill")):
                self.say(f"  *** chaos: SIGKILL to the coordinator in round {r}")
                self._act("kill_coordinator", round=r)
                self.kill_coordinator()
        elif k == "round":
            r = int(ev.get("round", 0))
            if self.reload_at_next_round:
                self.reload_at_next_round = False
                self._reload_broker()
            if c.faults and c.reenrol_node and r == c.reenrol_round and self._once("reenrol"):
                self._wipe_and_reenrol()
            if c.faults and c.wipe_node and r == c.wipe_round and self._once("wipe"):
                self._wipe(c.wipe_node)
                self.say(f"  *** chaos: {c.wipe_node} lost its counter file; restarting it")
                self._act("wipe", node=c.wipe_node)
                self.start_node(c.wipe_node)
        elif k == "registry" and ev.get("revoked"):
            # The coordinator revoked on its schedule (coordinator.json revoke_at). The broker
            # re-reads its password file when the next round closes, so the revoked login
            # stops working only after the node had a round to receive the signed registry
            # (both enforcement points are then exercised, in a fixed order).
            self.reload_at_next_round = True
            self.revoked.update(ev["revoked"])
            self._act("revoke", node=",".join(ev["revoked"]), version=ev.get("version"))
            self.say(f"  *** chaos: coordinator revoked {', '.join(ev['revoked'])} "
                     f"(registry v{ev.get('version')})")
        if k == "registry" and self.awaiting_registry:
            node, self.awaiting_registry = self.awaiting_registry, None
            if node in ev.get("reenrolled", []):
                self.say(f"  *** chaos: coordinator adopted {node}'s new key; restarting it")
                self.start_node(node)

    # -- actions ---------------------------------------------------------------------------
    def _broker_outage(self) -> None:
        self.say(f"  *** chaos: broker down for {self.c.outage_s:g} s (restarts empty)")
        self._act("broker_restart", outage_s=self.c.outage_s)
        self.broker.stop()
        time.sleep(self.c.outage_s)
        self.broker.start()

    def _flood(self) -> None:
        from microfed_host.flood import Flooder

        base = f"microfed/{self.mesh}/"
        topics = [base + f"{s}/{self.intruder}" for s in ("update", "digest", "hello")]
        self.say(f"  *** chaos: {self.intruder} floods {self.c.flood_frames} junk QoS 1 frames")
        f = Flooder(self.broker.host, self.broker.port, topics, self.c.flood_frames, 300, 1,
                    username=self.login.get("username"), password=self.login.get("password"),
                    seed=7)
        f.start()
        self.flooders.append(f)
        # Wait until the broker holds all of it: it is then queued for the coordinator AHEAD
        # of the nodes' next messages, so the run cannot end before every frame is handled.
        f.join(120)
        self.junk_sent += f.sent
        self._act("flood", frames=self.c.flood_frames, acknowledged=f.sent,
                  seconds=round(f.elapsed, 2))

    def _malformed(self) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        frames = malformed_frames(self.mesh, self.intruder)
        self.say(f"  *** chaos: {self.intruder} sends {len(frames)} malformed frames")
        from microfed_host.brokerauth import apply_paho

        cli = paho.Client(CallbackAPIVersion.VERSION2, client_id="microfed-chaos-malformed")
        apply_paho(cli, self.login)
        cli.connect(self.broker.host, self.broker.port)
        cli.loop_start()
        try:
            for sub, fr in frames:
                cli.publish(f"microfed/{self.mesh}/{sub}", fr, qos=1).wait_for_publish(5)
        finally:
            cli.disconnect()
            cli.loop_stop()
        self.junk_sent += len(frames)
        self._act("malformed", frames=len(frames),
                  sha256=[hashlib.sha256(f).hexdigest()[:16] for _s, f in frames])

    def _wipe_and_reenrol(self) -> None:
        from microfed_host.provision import reenrol_node

        node = self.c.reenrol_node
        self._wipe(node)
        nd = self.out / "nodes" / node
        reg = reenrol_node(self.out / "mesh", node)
        self._reload_broker()  # the new broker password of the re-enrolled node
        shutil.copy(self.out / "mesh" / "bundles" / f"{node}.json", nd / "bundle.json")
        self.awaiting_registry = node
        self.say(f"  *** chaos: {node} wiped and re-enrolled (registry v{reg.version})")
        self._act("reenrol", node=node, version=reg.version)

    def _wipe(self, node: str) -> None:
        """SIGKILL the node and delete its state directory (counters, last round)."""
        self.stop_node(node)
        nd = self.out / "nodes" / node
        shutil.rmtree(nd / "state", ignore_errors=True)
        (nd / "state").mkdir()

    def _reload_broker(self) -> None:
        from microfed_host.broker import BrokerError

        try:
            self.broker.reload()
        except BrokerError as e:  # an external broker: the operator reloads it
            self.say(f"  chaos: {e}")

    def close(self) -> None:
        for f in self.flooders:
            f.stop()
            self.report.setdefault("flood_sent", 0)
            self.report["flood_sent"] += int(getattr(f, "sent", 0))

