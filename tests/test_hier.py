"""Hierarchical meshes (docs/hierarchy.md): two sites of four real MicroPython unix-port nodes
and one compromised node (sign-flip, the host-side adversary) each, each site on its own
mosquitto with its edge coordinator (median), bridged to the root's mosquitto and the root
coordinator; the digests of both tiers agree every round, and `microfed aggregate` on the
recorded inputs reaches the final digest the root published. Hostile: forged and malformed
edge updates crossing the bridge, a replayed edge update, a global and a registry not signed
by the root, each rejected with its reason and counted while the run goes on.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from microfed import model, wire
from microfed_host import brokerauth, hier, keys, provision
from microfed_host import coordinator as coordmod
from microfed_host.coordinator import Coordinator
from microfed_host.edge import EdgeCoordinator
from microfed_host.rounds_store import RoundsStore

DIM = 650  # softmax, 64 features x 10 classes + 10 biases


def _need_tools() -> None:
    """Only mosquitto may be missing (its bridges are the point); the MicroPython unix port is
    a dev dependency: without it the run fails, naming it."""
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto (the sites' bridges)")


def _forger(ctx: dict[str, Any], sent: dict[str, bytes]) -> None:
    """At site 1's broker, with the edge coordinator's own login (a compromised edge host):
    an edge update for edge-1 signed with a key that is not edge-1's, and a frame that is not
    a frame. Both cross the bridge to the root."""
    from microfed_host.mqtt import HostMQTT

    s1 = ctx["sites"][0]
    host, port = s1["broker"]
    auth = brokerauth.client_auth(ctx["out"] / s1["site"] / hier.EDGE_DIR)
    c = HostMQTT(host, port, "test-forger", **auth)
    c.connect(10)
    try:
        topic = f"microfed/{ctx['mesh']}/{brokerauth.EDGE_UP}{s1['edge']}"
        forged = wire.encode(wire.MODEL_UPDATE, wire.mesh_id(ctx["mesh"]), s1["edge"], 1, 1 << 40,
                             int(time.time()), wire.encode_model_update(40, [65536] * DIM),
                             keys.signer(keys.generate_seed()))
        c.publish(topic, forged, qos=1)
        c.publish(topic, b"MF not a frame", qos=1)
        sent["forged"] = forged
    finally:
        c.close()


def _retained_globals(ctx: dict[str, Any], got: dict[str, bytes]) -> None:
    """What a node subscribing now gets at each site broker: the retained global, which the
    bridge must have kept retained (the root published it while the bridge was subscribed)."""
    import threading

    from microfed_host.mqtt import HostMQTT

    for site in ctx["sites"]:
        seen = threading.Event()

        def take(_topic: str, payload: bytes, name: str = site["site"],
                 ev: threading.Event = seen) -> None:
            got[name] = payload
            ev.set()

        host, port = site["broker"]
        c = HostMQTT(host, port, f"test-late-{site['site']}",
                     **brokerauth.client_auth(ctx["out"] / site["site"] / hier.EDGE_DIR))
        c.connect(10)
        try:
            c.subscribe(f"microfed/{ctx['mesh']}/global", take)
            seen.wait(5)
        finally:
            c.close()


def test_two_bridged_sites_agree_every_round_and_offline(tmp_path: Path, capsys: Any) -> None:
    _need_tools()
    from microfed_tools import cli
    from microfed_tools.cmd_hier import audit_run

    out = tmp_path / "run"
    sent: dict[str, bytes] = {}
    late: dict[str, bytes] = {}
    spec = hier.HierSpec(sites=2, nodes_per_site=5, byzantine=1, attack="sign-flip", rounds=3,
                         edge_rule="median", root_rule="fedavg", seed=5, max_samples=60,
                         deadline_s=30.0)
    t0 = time.monotonic()
    s = hier.run(spec, out, say=None, timeout=240, on_ready=lambda ctx: _forger(ctx, sent),
                 on_done=lambda ctx: _retained_globals(ctx, late), kill_edge_at=2)
    took = time.monotonic() - t0
    assert "forged" in sent

    # The run went on: three rounds, both edges aggregated in each, every node done.
    assert sorted(s["root_agg_digests"]) == [1, 2, 3]
    assert set(s["node_exit_codes"].values()) == {0}, s["node_exit_codes"]
    assert len(s["node_exit_codes"]) == 8  # 4 MicroPython nodes per site
    # Each edge verified every global the root signed, and ended with the root's final one.
    final = s["final_digest"]
    assert final and s["edge_final_digests"] == {"site-1": final, "site-2": final}
    root_store = RoundsStore(out / "root" / coordmod.STORE_NAME)
    try:
        rows = {r["round"]: r for r in root_store.rounds()}
        counts = root_store.rejection_counts()
        final_frame = (root_store.load_state() or {})["global_frame"]
    finally:
        root_store.close()
    # A node that (re)connects at its site after the end still finds the root's final global.
    assert late == {"site-1": final_frame, "site-2": final_frame}
    for site in ("site-1", "site-2"):
        seen = s["root_globals_seen"][site]
        assert [seen[r + 1] for r in (1, 2, 3)] == [rows[r]["model_digest"] for r in (1, 2, 3)]
    # Site 1's edge was SIGKILLed in round 2 and resumed from its store; it sent its last
    # update again (the same bytes: a duplicate at the root, unless the kill came before
    # that update ever left).
    assert s["edge_restarts"] == {"site-1": 1, "site-2": 0}
    assert counts.pop("duplicate", 0) <= 1 and s["rejected"]["root"].pop("duplicate", 0) <= 1
    # The hostile frames: rejected at the root with their reasons, counted, never aggregated.
    assert s["rejected"]["root"] == {"bad_signature": 1, "truncated": 1}
    assert counts == {"bad_signature": 1, "truncated": 1}
    # At site 1 only redeliveries: updates its edge had taken but not yet acknowledged when
    # it died come again from its broker session (the same bytes: duplicates).
    assert set(s["rejected"]["site-1"]) <= {"duplicate"} and s["rejected"]["site-2"] == {}

    # Offline: both tiers of every round recomputed from the stores by `microfed aggregate`'s
    # engines (all three, bit for bit), each digest checked, down to the final model.
    rep = audit_run(out, "all")
    assert rep["ok"], rep["problems"]
    for r in (1, 2, 3):  # the edges' medians had the attacker's update in their input
        req = json.loads((out / "audit" / f"round-{r:03d}" / "site-1.json").read_text())
        assert [u["node"] for u in req["updates"]] == [f"s1-node-0{i}" for i in range(1, 6)]
    assert rep["final_digest"] == final
    for row in rep["rounds"]:
        r = row["round"]
        assert row["root"] == rows[r]["agg_digest"] == s["root_agg_digests"][r]
        for site in ("site-1", "site-2"):
            assert row["sites"][site] == s["edge_agg_digests"][site][r]
    # ... and the command itself on the recorded root request of the last round.
    capsys.readouterr()
    assert cli.main(["aggregate", str(out / "audit" / "round-003" / "root.json"),
                     "--compact"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == rows[3]["agg_digest"]
    assert cli.main(["hier", "audit", str(out)]) == 0
    assert "agree" in capsys.readouterr().out
    # Every process of the run is gone: brokers, coordinators, nodes (their command lines
    # name the run directory).
    left = []
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if pid.isdigit() and str(out).encode() in cmd:
            left.append(cmd.decode(errors="replace"))
    assert left == []
    print(f"hierarchical run: {s['seconds']} s inside, {took:.1f} s in all")


def test_provisioning_keeps_root_secrets_home_and_the_bridge_narrow(tmp_path: Path) -> None:
    spec = hier.HierSpec(sites=2, nodes_per_site=4)
    doc = hier.prepare(spec, tmp_path, ("10.0.0.1", 1883), [("10.0.1.1", 1883),
                                                            ("10.0.2.1", 1883)])
    mesh = doc["mesh"]
    for k, site in enumerate(doc["sites"], start=1):
        ed = tmp_path / site["site"] / hier.EDGE_DIR
        # The edge machine gets the root's public key and signed registry, never its seed.
        names = {p.name for p in ed.rglob("*")}
        assert "coordinator.key" not in names and "coordinator.pub" in names
        assert (ed / "coordinator.pub").read_bytes() == \
            (tmp_path / "root" / "mesh" / "coordinator.pub").read_bytes()
        bridge = (ed / "broker" / "bridge.conf").read_text().splitlines()
        assert stat.S_IMODE(os.stat(ed / "broker" / "bridge.conf").st_mode) == 0o600
        b = f"microfed/{mesh}/"
        assert [ln for ln in bridge if ln.startswith("topic ")] == [
            f"topic {b}global in 1", f"topic {b}registry in 1",
            f"topic edge-{k} out 1 {b}up/ {b}update/"]
        assert "address 10.0.0.1:1883" in bridge and "bridge_outgoing_retain false" in bridge
        # The site's broker knows its own nodes and edge only.
        acl = brokerauth.parse_acl((ed / "broker" / "acl").read_text())
        assert sorted(acl) == sorted(["coordinator", *site["nodes"]])
        assert ("read", b + "global") in acl["coordinator"]
        assert ("readwrite", b + "global") not in acl["coordinator"]
        # Nodes pin the root's key: the only key a global can carry.
        bundle = json.loads((tmp_path / site["site"] / "nodes" / site["nodes"][0] /
                             "bundle.json").read_text())
        assert bundle["coordinator_public_key"] == \
            keys.read_public_key(ed / "coordinator.pub").hex()
    # A revocation reaches the site broker's files and the edge directory's registry.
    gone = doc["sites"][0]["nodes"][1]
    assert hier.revoke(tmp_path, gone) == 2
    ed = tmp_path / "site-1" / hier.EDGE_DIR
    assert gone not in brokerauth.read_password_file(ed / "broker" / "passwd")
    assert gone not in brokerauth.parse_acl((ed / "broker" / "acl").read_text())
    assert len(brokerauth.read_password_file(ed / "broker" / "passwd")) == 4  # edge + 3
    reg = json.loads((ed / "registry.json").read_text())
    assert reg["version"] == 2 and {n["id"]: n["status"] for n in reg["nodes"]}[gone] == "revoked"
    with pytest.raises(hier.MeshError, match="not a node of any site"):
        hier.revoke(tmp_path, "edge-1")
    root_acl = brokerauth.parse_acl((tmp_path / "root" / "broker" / "acl").read_text())
    assert sorted(root_acl) == ["coordinator", "edge-1", "edge-2", "monitor"]
    assert root_acl["edge-1"] == [("write", f"microfed/{mesh}/update/edge-1"),
                                  ("read", f"microfed/{mesh}/global"),
                                  ("read", f"microfed/{mesh}/registry")]


class _Tiers:
    """A root and one edge in process, wired as the bridge wires them, on a fake clock."""

    def __init__(self, root: Path) -> None:
        spec = hier.HierSpec(sites=2, nodes_per_site=4)
        self.doc = hier.prepare(spec, root, ("127.0.0.1", 1), [("127.0.0.1", 2), ("127.0.0.1", 3)])
        self.root_dir = root
        self.mesh = self.doc["mesh"]
        self.t = coordmod.topics(self.mesh)
        self.now = [1_800_000_000.0]
        self.events: dict[str, list[dict[str, Any]]] = {"root": [], "edge": []}
        self.to_root: list[tuple[str, bytes]] = []
        self.to_site: list[tuple[str, bytes]] = []
        self.root = Coordinator(coordmod.load_config(root / "root"),
                                RoundsStore(root / "root" / coordmod.STORE_NAME), self._root_pub,
                                self.events["root"].append, lambda: self.now[0])
        self.edge = EdgeCoordinator(coordmod.load_config(root / "site-1"),
                                    RoundsStore(root / "site-1" / coordmod.STORE_NAME),
                                    self._edge_pub, self.events["edge"].append,
                                    lambda: self.now[0])
        self.nodes = self.doc["sites"][0]["nodes"]
        self.seed2 = keys.read_private_key(root / "site-2" / hier.EDGE_DIR / "edge.key")

    def _root_pub(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic in (self.t["global"], self.t["registry"]):
            self.to_site.append((topic, payload))  # the bridge carries them down

    def _edge_pub(self, topic: str, payload: bytes, retain: bool) -> None:
        if topic.startswith(self.t["base"] + brokerauth.EDGE_UP):  # ... and this up
            self.to_root.append((self.t["update"] + topic.rsplit("/", 1)[1], payload))

    def pump(self) -> None:
        while self.to_root or self.to_site:
            if self.to_root:
                self.root.handle(*self.to_root.pop(0))
            if self.to_site:
                self.edge.handle(*self.to_site.pop(0))

    def edge2(self, round_: int) -> None:
        """Edge 2's update of round_ (counter = round) at the root, as its bridge delivers it."""
        up = wire.encode_update(wire.mesh_id(self.mesh), "edge-2", round_, round_,
                                int(self.now[0]), 40, [3] * DIM, keys.signer(self.seed2))
        self.root.handle(self.t["update"] + "edge-2", bytes(up))

    def node_update(self, node: str, round_: int, seq: int) -> bytes:
        seed = keys.read_private_key(self.root_dir / "root" / "mesh" / "nodes" / f"{node}.key")
        vals = [(self.nodes.index(node) + 1) * 7] * DIM
        return wire.encode(wire.MODEL_UPDATE, wire.mesh_id(self.mesh), node, round_, seq,
                           int(self.now[0]), wire.encode_model_update(10, vals),
                           keys.signer(seed))

    def rejections(self, tier: str) -> list[str]:
        return [e["reason"] for e in self.events[tier] if e["ev"] == "rejected"]


def test_root_rejects_replayed_edge_updates_and_edges_reject_unsigned_globals(
        tmp_path: Path) -> None:
    w = _Tiers(tmp_path)
    w.root.start()
    w.edge.start()
    w.pump()
    assert [e["round"] for e in w.events["edge"] if e["ev"] == "root_global"] == [1]
    for n in w.nodes:
        w.edge.handle(w.t["update"] + n, w.node_update(n, 1, 1))
    first = w.to_root[0][1]
    w.pump()
    # Round 1 at the root waits for edge-2: send its update as its edge would.
    w.edge2(1)
    w.pump()
    assert w.root.round == 2 and w.edge.round == 2
    seen = [e for e in w.events["edge"] if e["ev"] == "root_global"]
    assert seen[-1]["round"] == 2 and seen[-1]["included"] is True
    # Replays of edge-1's accepted round-1 update, in round 2: rejected, counted.
    w.root.handle(w.t["update"] + "edge-1", first)
    assert w.rejections("root")[-1] == "duplicate"
    # The same update re-signed by edge-2's key under edge-1's name: a forgery.
    fr = wire.decode(first)
    forged = wire.encode(wire.MODEL_UPDATE, fr.mesh_id, "edge-1", 2, fr.seq + 1, fr.timestamp,
                         fr.payload, keys.signer(w.seed2))
    w.root.handle(w.t["update"] + "edge-1", forged)
    assert w.rejections("root")[-1] == "bad_signature"
    # A global the root did not sign (here: by the edge's own key) never reaches the round.
    own = keys.read_private_key(tmp_path / "site-1" / hier.EDGE_DIR / "edge.key")
    fake = wire.encode(wire.GLOBAL_MODEL, wire.mesh_id(w.mesh), wire.COORDINATOR, 3, 1 << 50,
                       int(w.now[0]), wire.encode_global_payload(w.edge.params), keys.signer(own))
    w.edge.handle(w.t["global"], fake)
    assert w.rejections("edge")[-1] == "bad_signature"
    assert w.edge.root_round == 2
    # The root's own global again (a reconnect's retained copy) is no rejection.
    before = len(w.rejections("edge"))
    w.edge.handle(w.t["global"], w.root.global_frame)
    assert len(w.rejections("edge")) == before
    assert w.root.rejected == {"duplicate": 1, "bad_signature": 1}
    assert model.params_digest(w.edge.params) == model.params_digest(w.root.params)
    # A revocation at the root reaches the edge down the bridge: its round stops waiting.
    gone = w.nodes[-1]
    provision.revoke_node(tmp_path / "root" / "mesh", gone)
    w.root.check_registry(force=True)
    w.pump()
    assert w.edge.registry.version == w.root.registry.version
    assert gone not in w.edge.expected_now() and len(w.edge.expected_now()) == 3
    # A registry the root did not sign is refused at the edge.
    bad = wire.encode(wire.REGISTRY, wire.mesh_id(w.mesh), wire.COORDINATOR, 0, 99,
                      int(w.now[0]), wire.decode(w.root.registry_frame).payload,
                      keys.signer(own))
    w.edge.handle(w.t["registry"], bad)
    assert w.rejections("edge")[-1] == "bad_signature"


@pytest.mark.parametrize("args, message", [
    (["--sites", "1"], "--sites must be in 2..64"),
    (["--edge-rule", "krum"], "krum with f=1 needs at least 5 nodes per site, got 4"),
    (["--root-rule", "krum"], "krum with f=0 needs at least 3 sites, got 2"),
    (["--byzantine-per-site", "2"], "each site: median with f=1 cannot tolerate 2"),
])
def test_bad_flags_exit_2_with_a_reason(tmp_path: Path, capsys: Any, args: list[str],
                                        message: str) -> None:
    from microfed_tools import cli

    assert cli.main(["hier", "run", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("microfed hier: error: ") and message in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_restarted_edge_resumes_its_round_and_its_counter(tmp_path: Path) -> None:
    w = _Tiers(tmp_path)
    w.root.start()
    w.edge.start()
    w.pump()
    for n in w.nodes:
        w.edge.handle(w.t["update"] + n, w.node_update(n, 1, 1))
    w.edge2(1)
    w.pump()
    assert w.root.round == 2 and w.edge.round == 2
    w.edge.handle(w.t["update"] + w.nodes[0], w.node_update(w.nodes[0], 2, 2))
    # The edge dies with one update of round 2 in its store, and starts again on it.
    w.edge.store.close()
    w.edge = EdgeCoordinator(coordmod.load_config(tmp_path / "site-1"),
                             RoundsStore(tmp_path / "site-1" / coordmod.STORE_NAME),
                             w._edge_pub, w.events["edge"].append, lambda: w.now[0])
    w.edge.start()
    assert w.edge.round == 2 and sorted(w.edge.pending) == [w.nodes[0]]
    w.pump()  # it sent its round-1 update again: the same bytes, a duplicate at the root
    assert w.rejections("root") == ["duplicate"]
    w.edge.handle(w.t["global"], w.root.global_frame)  # the retained global, as after a reconnect
    for n in w.nodes[1:]:
        w.edge.handle(w.t["update"] + n, w.node_update(n, 2, 2))
    w.edge2(2)
    w.pump()
    assert w.root.round == 3 and w.rejections("root") == ["duplicate"]
    store = RoundsStore(tmp_path / "root" / coordmod.STORE_NAME)
    try:
        ups = [wire.decode(f) for f in store.accepted_frames(2)]
    finally:
        store.close()
    assert {(u.sender, u.seq) for u in ups} == {("edge-1", 2), ("edge-2", 2)}


def test_an_edge_the_root_closed_a_round_without_follows_the_root(tmp_path: Path) -> None:
    w = _Tiers(tmp_path)
    w.root.start()
    w.edge.start()
    w.pump()
    w.edge2(1)
    w.edge.handle(w.t["update"] + w.nodes[0], w.node_update(w.nodes[0], 1, 1))
    # Site 1 is slow: the root's deadline closes round 1 with edge-2 alone.
    w.now[0] += 31
    w.root.tick()
    assert w.root.round == 2
    w.pump()
    assert w.edge.round == 2 and not w.edge.pending
    assert [e for e in w.events["edge"] if e["ev"] == "round_skipped"][-1]["dropped"] == \
        [w.nodes[0]]
    # Site 1 takes part in round 2 as usual.
    for n in w.nodes:
        w.edge.handle(w.t["update"] + n, w.node_update(n, 2, 2))
    w.pump()
    assert "edge-1" in w.root.pending and w.rejections("root") == []
