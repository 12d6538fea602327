"""Hierarchical meshes (docs/hierarchy.md): sites of nodes, each with its own broker and edge
coordinator (microfed_host.edge), bridged to a root broker and the root coordinator.

    provision(out, spec, root_broker)   keys, the root-signed registry, one edge directory
                                        per site (edge key, site broker logins, ACL, bridge)
    run(spec, out)                      the whole hierarchy on this machine: the root's
                                        mosquitto and coordinator, per site a mosquitto
                                        bridged to the root's and an edge coordinator, and
                                        MicroPython unix-port nodes on the site brokers
    audit_plan(out)                     what the offline check recomputes: per round, each
                                        site's aggregation request (its accepted node
                                        updates) and the root's (the accepted edge updates),
                                        every frame's signature checked, with the digests the
                                        run recorded

One mesh id and one registry span the hierarchy: the root's key is the mesh's coordinator
key, pinned in every node's bundle, so a node takes only a global the root signed (whatever
its edge or the bridge relays); each edge's key is a registry member, so the root verifies
an edge update as it verifies a node's (signature, counter, round, dimension, range).

Run directory (--out):
    hier.json            the topology and settings;     summary.json  the outcome
    data/                test.mfds and one shard per node
    root/                the root coordinator's run directory: coordinator.json, .sqlite,
                         .log; mesh/ (the provisioning authority: every key), broker/ (the
                         root broker's passwd and ACL: the root and the edges' bridges)
    site-K/              edge K's run directory: coordinator.json, .sqlite, .log; edge/ (its
                         edge directory: mesh.json, coordinator.pub, registry.json, edge.json,
                         edge.key, coordinator.mqtt, broker/{passwd,acl,bridge.conf,
                         mosquitto.conf}); nodes/<id>/ (node directories)
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from microfed import audit, model, wire
from microfed_host import brokerauth, keys
from microfed_host import coordinator as coordmod
from microfed_host import edge as edgemod
from microfed_host import registry as regmod
from microfed_host.coordinator import CoordinatorConfig, rule_min_nodes
from microfed_host.rounds_store import RoundsStore
from microfed_host.scenario import (
    AttackGroup,
    MeshError,
    Scenario,
    adversary_of,
    make_node_dir,
    write_data,
)

MAX_SITES = 64
MAX_NODES_PER_SITE = 200
HIER_FILE = "hier.json"
EDGE_DIR = "edge"


@dataclass
class HierSpec:
    sites: int = 2
    nodes_per_site: int = 4
    rounds: int = 3
    edge_rule: str = "median"
    edge_f: int = 1  # krum / multi_krum: f; trimmed_mean: the trim count
    root_rule: str = "fedavg"
    root_f: int = 0
    byzantine: int = 0  # per site: its last ids are compromised (the host-side adversary)
    attack: str = "sign-flip"  # what they do (microfed_host.adversary.ATTACKS)
    allow_more_byzantine: bool = False  # run past the edge rule's guarantee on purpose
    seed: int = 1
    max_samples: int = 60  # per node (0: the whole shard); training otherwise as Scenario's
    deadline_s: float = 30.0

    def check(self) -> None:
        if not 2 <= self.sites <= MAX_SITES:
            raise MeshError(f"--sites must be in 2..{MAX_SITES}, got {self.sites}")
        if not 1 <= self.nodes_per_site <= MAX_NODES_PER_SITE:
            raise MeshError(f"--nodes-per-site must be in 1..{MAX_NODES_PER_SITE}")
        for tier, rule, f, n in (("edge", self.edge_rule, self.edge_f, self.nodes_per_site),
                                 ("root", self.root_rule, self.root_f, self.sites)):
            if rule not in coordmod.RULES:
                raise MeshError(f"--{tier}-rule {rule!r}: one of {', '.join(coordmod.RULES)}")
            need = rule_min_nodes(rule, f, f)
            if n < need:
                raise MeshError(f"--{tier}-rule {rule} with f={f} needs at least {need} "
                                f"{'nodes per site' if tier == 'edge' else 'sites'}, got {n}")
        if not 0 <= self.byzantine < self.nodes_per_site:
            raise MeshError(f"--byzantine-per-site must be in 0..{self.nodes_per_site - 1}")
        # Per site, the edge rule's Byzantine budget, as `microfed mesh run` enforces it.
        try:
            self.scenario().check()
        except MeshError as e:
            raise MeshError(f"each site: {e} (--f is --edge-f here)") from None

    def site_names(self) -> list[str]:
        return [f"site-{k}" for k in range(1, self.sites + 1)]

    def edge_ids(self) -> list[str]:
        return [f"edge-{k}" for k in range(1, self.sites + 1)]

    def site_nodes(self, k: int) -> list[str]:
        """Node ids of site k (1-based): s<k>-node-01, ..."""
        w = max(2, len(str(self.nodes_per_site)))
        return [f"s{k}-node-{i:0{w}d}" for i in range(1, self.nodes_per_site + 1)]

    def site_byzantine(self, k: int) -> list[str]:
        return self.site_nodes(k)[self.nodes_per_site - self.byzantine:]

    def node_ids(self) -> list[str]:
        return [n for k in range(1, self.sites + 1) for n in self.site_nodes(k)]

    def scenario(self) -> Scenario:
        """One site as a Scenario: its edge rule, its honest and compromised nodes, and the
        training settings a node's config.json is written from."""
        return Scenario(name="hier", honest=self.nodes_per_site - self.byzantine,
                        attackers=[AttackGroup(self.attack, self.byzantine)] if self.byzantine
                        else [], rule=self.edge_rule, f=self.edge_f, rounds=self.rounds,
                        seed=self.seed, max_samples=self.max_samples, deadline_s=self.deadline_s,
                        allow_more_byzantine=self.allow_more_byzantine)


def _trim(rule: str, f: int) -> int:
    return f if rule == "trimmed_mean" else -1


# ------------------------------------------------------------------ provisioning
def provision(out: Path, spec: HierSpec, root_broker: tuple[str, int],
              site_brokers: list[tuple[str, int]] | None = None) -> dict[str, Any]:
    """Provision a hierarchy into `out` (empty): the mesh (root key, every member's key, the
    registry the root signs, node bundles), the root broker's logins and ACL, and one edge
    directory per site. Returns hier.json's content."""
    from microfed_host.provision import ProvisionError, init_mesh

    spec.check()
    out = Path(out)
    mesh_name = f"hier-{spec.seed}-{os.urandom(3).hex()}"
    edges, ids = spec.edge_ids(), spec.node_ids()
    mesh_dir = out / "root" / "mesh"
    try:
        init_mesh(mesh_dir, mesh_name, len(edges) + len(ids), f"{root_broker[0]}:{root_broker[1]}",
                  ids=edges + ids)
    except ProvisionError as e:
        raise MeshError(f"provisioning failed: {e}") from None
    # The root broker: the root coordinator, the monitor, and one bridge login per edge.
    users = [(brokerauth.COORDINATOR_USER, brokerauth.coordinator_acl(mesh_name)),
             (brokerauth.MONITOR_USER, brokerauth.monitor_acl(mesh_name))]
    users += [(e, brokerauth.edge_bridge_acl(mesh_name, e)) for e in edges]
    rbd = out / "root" / brokerauth.BROKER_DIR
    brokerauth.write_auth_files(
        rbd, [brokerauth.ensure_credentials(mesh_dir, u) for u, _r in users],
        brokerauth.users_acl_text(mesh_name, users, "`microfed hier provision`, root broker"))
    (rbd / "mosquitto.conf").write_text("\n".join(
        ["# mosquitto 2.0 configuration of the root broker (written by `microfed hier "
         "provision`).", "# Run: mosquitto -c " + str((rbd / "mosquitto.conf").resolve()),
         "per_listener_settings false", *brokerauth.mosquitto_auth_lines(rbd), brokerauth.mosquitto_user_line(),
         f"listener {root_broker[1]}", "set_tcp_nodelay true"]) + "\n")
    sites = []
    for k, (site, edge) in enumerate(zip(spec.site_names(), edges, strict=True), start=1):
        nodes = spec.site_nodes(k)
        site_addr = site_brokers[k - 1] if site_brokers else ("127.0.0.1", 1883)
        write_edge_dir(mesh_dir, out / site / EDGE_DIR, site, edge, nodes, root_broker, site_addr)
        sites.append({"site": site, "edge": edge, "nodes": nodes,
                      "broker": f"{site_addr[0]}:{site_addr[1]}"})
    doc = {"format": "microfed-hier/1", "mesh": mesh_name, "spec": asdict(spec),
           "root_broker": f"{root_broker[0]}:{root_broker[1]}", "sites": sites}
    (out / HIER_FILE).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def write_edge_dir(mesh_dir: Path, ed: Path, site: str, edge: str, nodes: list[str],
                   root_broker: tuple[str, int], site_broker: tuple[str, int]) -> None:
    """What one site's edge machine gets: never a root secret. The root's public key, the
    registry it signed, the edge's seed, the site broker's logins (the edge coordinator's,
    its nodes') and ACL, and the site broker's bridge to the root (0600: it holds the
    edge's root-broker password)."""
    mesh_doc = json.loads((mesh_dir / "mesh.json").read_text())
    ed.mkdir(parents=True)
    site_doc = dict(mesh_doc, broker={"host": site_broker[0], "port": site_broker[1]})
    (ed / "mesh.json").write_text(json.dumps(site_doc, indent=2) + "\n")
    shutil.copy(mesh_dir / "coordinator.pub", ed / edgemod.ROOT_PUB)
    shutil.copy(mesh_dir / "registry.json", ed / "registry.json")
    keys.write_private_key(ed / edgemod.EDGE_KEY, keys.read_private_key(mesh_dir / "nodes" / f"{edge}.key"))
    (ed / edgemod.EDGE_FILE).write_text(json.dumps({"edge": edge, "site": site, "nodes": nodes},
                                                   indent=2) + "\n")
    write_site_auth(mesh_dir, ed)
    bd = ed / brokerauth.BROKER_DIR
    bridge = site_bridge_lines(ed, mesh_dir, root_broker)
    keys.write_secret_file(bd / "bridge.conf", "\n".join(bridge) + "\n")
    keys.write_secret_file(bd / "mosquitto.conf", "\n".join(
        [f"# mosquitto 2.0 configuration of {site}'s broker (written by `microfed hier "
         "provision`).", "# Run: mosquitto -c " + str((bd / "mosquitto.conf").resolve()),
         "per_listener_settings false", *brokerauth.mosquitto_auth_lines(bd), brokerauth.mosquitto_user_line(),
         f"listener {site_broker[1]}", "set_tcp_nodelay true", "",
         "# The bridge to the root broker: the root's global and registry in, this edge's",
         "# update out; nothing else crosses.", *bridge]) + "\n")


def write_site_auth(mesh_dir: Path, ed: Path) -> list[str]:
    """(Re)write a site broker's passwd and ACL: the edge coordinator (as "coordinator", its
    own password) and the site's nodes still active in the root's registry, with the logins
    their bundles carry. Returns those nodes."""
    mesh = json.loads((ed / "mesh.json").read_text())["mesh"]
    info = edgemod.read_edge(ed)
    reg, _frame = regmod.load(mesh_dir / "registry.json",
                              keys.read_public_key(mesh_dir / "coordinator.pub"))
    nodes = [n for n in info["nodes"] if n in reg.nodes and reg.nodes[n].active]
    creds = [brokerauth.ensure_credentials(ed, brokerauth.COORDINATOR_USER)]
    creds += [brokerauth.ensure_credentials(mesh_dir, n) for n in nodes]
    users = [(brokerauth.COORDINATOR_USER, brokerauth.edge_site_acl(mesh, info["edge"]))]
    users += [(n, brokerauth.node_acl(mesh, n)) for n in nodes]
    brokerauth.write_auth_files(ed / brokerauth.BROKER_DIR, creds, brokerauth.users_acl_text(
        mesh, users, f"`microfed hier`, broker of {info.get('site', info['edge'])}"))
    return nodes


def revoke(out: Path, node: str) -> int:
    """Revoke a node of a provisioned hierarchy: at the root (registry version + 1, re-signed;
    its bundle and logins go: provision.revoke_node) and at its site (the edge directory's
    registry, the site broker's passwd and ACL without it). A running root adopts the
    registry within a second and publishes it, the bridge carries it to the edge and the
    nodes, who adopt it too; the site broker re-reads its files on SIGHUP. Returns the new
    registry version."""
    from microfed_host.provision import ProvisionError, revoke_node

    out = Path(out)
    doc = json.loads((out / HIER_FILE).read_text())
    site = next((s for s in doc["sites"] if node in s["nodes"]), None)
    if site is None:
        raise MeshError(f"{node} is not a node of any site of {out} (an edge: `microfed "
                        "provision revoke --mesh OUT/root/mesh EDGE`)")
    mesh_dir = out / "root" / "mesh"
    try:
        reg = revoke_node(mesh_dir, node)
    except ProvisionError as e:
        raise MeshError(str(e)) from None
    ed = out / site["site"] / EDGE_DIR
    shutil.copy(mesh_dir / "registry.json", ed / "registry.json")
    write_site_auth(mesh_dir, ed)
    return reg.version


def site_bridge_lines(ed: Path, mesh_dir: Path, root_broker: tuple[str, int]) -> list[str]:
    edge = edgemod.read_edge(ed)["edge"]
    mesh = json.loads((ed / "mesh.json").read_text())["mesh"]
    login = brokerauth.read_credentials(mesh_dir, edge)
    if login is None:
        raise MeshError(f"no root-broker login for {edge} in {mesh_dir}")
    return brokerauth.bridge_lines(mesh, edge, root_broker, login)


def prepare(spec: HierSpec, out: Path, root_broker: tuple[str, int],
            site_brokers: list[tuple[str, int]], force: bool = False) -> dict[str, Any]:
    """provision() plus what a run needs: shards, node directories, both tiers' settings."""
    out = Path(out)
    spec.check()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MeshError(f"{out} is not empty; pick another --out or add --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = provision(out, spec, root_broker, site_brokers)
    sc = spec.scenario()
    ddir = out / "data"
    write_data(sc, spec.node_ids(), ddir)
    bundles = out / "root" / "mesh" / "bundles"
    common = {"rounds": spec.rounds, "mode": "coordinated", "deadline_s": spec.deadline_s,
              "init_seed": spec.seed, "model": sc.model, "crosscheck": "always"}
    root_cfg = CoordinatorConfig(mesh_dir=str(out / "root" / "mesh"), rule=spec.root_rule,
                                 f=spec.root_f, trim=_trim(spec.root_rule, spec.root_f),
                                 test_shard=str(ddir / "test.mfds"), expected=spec.edge_ids(),
                                 **common)
    (out / "root" / coordmod.CONFIG_NAME).write_text(json.dumps(root_cfg.to_json(), indent=2) + "\n")
    for k, site in enumerate(doc["sites"], start=1):
        sd = out / site["site"]
        for nid in site["nodes"][:spec.nodes_per_site - spec.byzantine]:
            make_node_dir(sd / "nodes" / nid, bundles / f"{nid}.json", ddir / f"{nid}.mfds", sc,
                          site_brokers[k - 1])
        cfg = CoordinatorConfig(mesh_dir=str(sd / EDGE_DIR), rule=spec.edge_rule, f=spec.edge_f,
                                trim=_trim(spec.edge_rule, spec.edge_f), expected=site["nodes"],
                                **common)
        (sd / coordmod.CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return doc


# ------------------------------------------------------------------ running it
class _Tier:
    """One coordinator process (root or edge) with its events."""

    def __init__(self, name: str, run_dir: Path, broker: str, module: str) -> None:
        from microfed_host.mesh import _Coord

        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = _Coord(run_dir, broker, self.events, module,
                           what=f"the {name} coordinator")
        self.done: dict[str, Any] | None = None
        self.restarts = 0

    def kill_and_restart(self) -> None:
        """mesh._Coord.restart: it resumes from its store."""
        self.proc.restart()
        self.restarts += 1

    def poll(self, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        while True:
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                break
            if ev.get("ev") == "fatal":
                raise MeshError(f"{self.name} coordinator failed: {ev.get('error')}")
            if ev.get("ev") == "done":
                self.done = ev
            on_event(self.name, ev)
        if self.done is None:
            self.proc.check_alive()


def run(spec: HierSpec, out: Path, force: bool = False,
        say: Callable[[str], None] | None = print, timeout: float = 600.0,
        on_ready: Callable[[dict[str, Any]], None] | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
        kill_edge_at: int = 0) -> dict[str, Any]:
    """Run the hierarchy on this machine (mosquitto brokers on loopback) and return its
    summary (also in OUT/summary.json). on_ready(ctx): once every coordinator is up and
    every bridge carried the root's first global, before the nodes start; ctx has "out",
    "mesh", "root_broker" and "sites" ([{site, edge, nodes, broker: (host, port)}]).
    on_done(ctx): once every coordinator is done, while the brokers still run.
    kill_edge_at: > 0: SIGKILL site 1's edge coordinator once it has accepted two updates of
    that round, and start it again (it resumes from its store)."""
    from microfed_host.broker import Broker, BrokerError, find_mosquitto, free_port
    from microfed_host.nodeproc import NodeError, NodeProcess, unix_launcher

    emit = say or (lambda _m: None)
    spec.check()
    if not 0 <= kill_edge_at <= spec.rounds:
        raise MeshError(f"--kill-edge-at must be a round in 1..{spec.rounds} (0: never)")
    if find_mosquitto() is None:
        raise MeshError("a hierarchical run needs mosquitto (its bridges): apt-get install mosquitto")
    try:
        launch = unix_launcher()
    except NodeError as e:
        raise MeshError(str(e)) from None
    t0 = time.monotonic()
    out = Path(out)
    root_addr = ("127.0.0.1", free_port())
    site_addrs = [("127.0.0.1", free_port()) for _ in range(spec.sites)]
    doc = prepare(spec, out, root_addr, site_addrs, force)
    mesh = doc["mesh"]
    emit(f"microfed hier: {spec.sites} sites x {spec.nodes_per_site - spec.byzantine} MicroPython "
         "nodes" + (f" + {spec.byzantine} compromised ({spec.attack})" if spec.byzantine else "")
         + f", edge rule "
         f"{spec.edge_rule} (f={spec.edge_f}), root rule {spec.root_rule} (f={spec.root_f}), "
         f"{spec.rounds} rounds, seed {spec.seed}")
    emit(f"  run directory: {out}")
    brokers: list[Any] = []
    tiers: list[_Tier] = []
    nodes: list[NodeProcess] = []
    advs: list[Any] = []
    rejected: dict[str, dict[str, int]] = {}
    rounds: dict[str, dict[int, dict[str, Any]]] = {}
    root_globals: dict[str, dict[int, str]] = {}

    kill = {"due": False}

    def on_event(tier: str, ev: dict[str, Any]) -> None:
        k = ev.get("ev")
        if (kill_edge_at and tier == "site-1" and k == "accepted" and tiers[1].restarts == 0
                and ev.get("round") == kill_edge_at and ev.get("have", 0) >= 2):
            kill["due"] = True
        if k == "round":
            rounds.setdefault(tier, {})[ev["round"]] = ev
            if tier == "root":
                acc = ev.get("accuracy")
                emit(f"  round {ev['round']}: root aggregated {','.join(ev['accepted'])} -> "
                     f"model {ev['model_digest'][:16]}"
                     + (f", accuracy {acc:.3f}" if acc is not None else ""))
        elif k == "root_global":
            root_globals.setdefault(tier, {})[ev["round"]] = ev["model_digest"]
        elif k == "rejected":
            emit(f"  {tier}: rejected a frame from {ev.get('node')}: {ev.get('reason')} "
                 f"({ev.get('msg', '')[:80]})")
        if "rejected" in ev and isinstance(ev["rejected"], dict):
            rejected[tier] = dict(ev["rejected"])

    try:
        try:
            root_b = Broker("mosquitto", port=root_addr[1], workdir=out / "root" / "broker-run",
                            auth_dir=out / "root" / brokerauth.BROKER_DIR)
            brokers.append(root_b)
            root_b.start()
            root = _Tier("root", out / "root", root_b.address, "microfed_host.coordinator")
            tiers.append(root)
            _wait(root, "ready", lambda ev: True, 60, on_event)
            for site, addr in zip(doc["sites"], site_addrs, strict=True):
                sd = out / site["site"]
                bridge = site_bridge_lines(sd / EDGE_DIR, out / "root" / "mesh", root_addr)
                b = Broker("mosquitto", port=addr[1], workdir=sd / "broker-run",
                           auth_dir=sd / EDGE_DIR / brokerauth.BROKER_DIR, extra_conf=bridge)
                brokers.append(b)
                b.start()
                tiers.append(_Tier(site["site"], sd, b.address, "microfed_host.edge"))
        except BrokerError as e:
            raise MeshError(str(e)) from None
        for t in tiers[1:]:
            # Ready, and the root's first global came down its bridge.
            _wait(t, "root_global", lambda ev: ev.get("round") == 1, 60, on_event)
        emit(f"  root broker {root_addr[0]}:{root_addr[1]}; "
             + "; ".join(f"{s['site']} broker {a[0]}:{a[1]} bridged"
                         for s, a in zip(doc["sites"], site_addrs, strict=True)))
        ctx = {"out": out, "mesh": mesh, "root_broker": root_addr,
               "sites": [dict(s, broker=a) for s, a in zip(doc["sites"], site_addrs, strict=True)]}
        if on_ready is not None:
            on_ready(ctx)
        sc = spec.scenario()
        for k, (site, addr) in enumerate(zip(doc["sites"], site_addrs, strict=True), start=1):
            byz = spec.site_byzantine(k)
            if byz:
                advs.append(_adversary(sc, out, mesh, byz, site["nodes"], addr))
            for nid in site["nodes"][:spec.nodes_per_site - spec.byzantine]:
                node = launch(nid, out / site["site"] / "nodes" / nid, addr)
                try:
                    node.start()
                except NodeError as e:
                    raise MeshError(str(e)) from None
                nodes.append(node)
        emit(f"  started the root, {spec.sites} edge coordinators and {len(nodes)} nodes"
             + (f"; {spec.byzantine} {spec.attack} attacker(s) per site" if advs else ""))
        end = time.monotonic() + timeout
        while not all(t.done is not None for t in tiers):
            for t in tiers:
                t.poll(on_event)
            if kill["due"]:
                kill["due"] = False
                tiers[1].kill_and_restart()
                emit(f"  *** SIGKILL to site-1's edge coordinator in round {kill_edge_at}; "
                     "restarting it")
            for a in advs:
                if a.error:
                    raise MeshError(f"adversary failed: {a.error}")
            for node in nodes:
                rc = node.poll()
                if rc is not None and rc != 0:
                    from microfed_host.mesh import _tail

                    raise MeshError(f"node {node.node_id} exited with code {rc}:\n"
                                    + _tail(node.log_path))
            if time.monotonic() > end:
                waiting = [t.name for t in tiers if t.done is None]
                raise MeshError(f"the run did not finish within {timeout:.0f} s "
                                f"(waiting for {', '.join(waiting)})")
            time.sleep(0.05)
        if on_done is not None:
            on_done(ctx)
        stop = time.monotonic() + 15
        exits = {n.node_id: n.wait(max(0.1, stop - time.monotonic())) for n in nodes}
    finally:
        for node in nodes:
            node.stop()
        for a in advs:
            a.stop()
        for t in tiers:
            t.proc.stop()
        for b in reversed(brokers):
            b.close()
    root_done = tiers[0].done or {}
    summary = {
        "mesh": mesh, "sites": spec.sites, "nodes_per_site": spec.nodes_per_site,
        "byzantine_per_site": spec.byzantine, "attack": spec.attack if spec.byzantine else None,
        "rounds": spec.rounds, "edge_rule": spec.edge_rule, "root_rule": spec.root_rule,
        "final_digest": root_done.get("final_digest"), "accuracy": root_done.get("accuracy"),
        "edge_final_digests": {t.name: (t.done or {}).get("final_digest") for t in tiers[1:]},
        "rejected": rejected, "edge_restarts": {t.name: t.restarts for t in tiers[1:]},
        "root_agg_digests": {r: ev["agg_digest"] for r, ev in rounds.get("root", {}).items()},
        # From each edge's store, not its log: an edge killed mid-run may close a round and
        # store it without the runner ever reading that round's event (seen once in 20 runs).
        "edge_agg_digests": {t.name: {r: row["agg_digest"] for r, row in
                                      _rows(out / t.name / coordmod.STORE_NAME).items()}
                             for t in tiers[1:]},
        "root_globals_seen": root_globals, "node_exit_codes": exits,
        "seconds": round(time.monotonic() - t0, 1), "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    emit(f"  final digest {summary['final_digest']} (every edge saw "
         + ("the same" if set(summary["edge_final_digests"].values()) == {summary["final_digest"]}
            else "A DIFFERENT ONE") + f"), {summary['seconds']} s")
    return summary


def _adversary(sc: Scenario, out: Path, mesh: str, byz: list[str], site_nodes: list[str],
               addr: tuple[str, int]) -> Any:
    """A site's compromised nodes: the adversary (microfed_host.adversary) on the site's
    broker, each node logged in as itself, publishing on its own topic."""
    from microfed_host.mesh import start_adversary

    adv = adversary_of(sc, mesh, out / "root" / "mesh", out / "data", byz,
                       [n for n in site_nodes if n not in byz])
    return start_adversary(adv, out / "root" / "mesh", addr[0], addr[1], sc.deadline_s,
                           own_topics=True)


def _wait(t: _Tier, kind: str, match: Callable[[dict[str, Any]], bool], seconds: float,
          on_event: Callable[[str, dict[str, Any]], None]) -> None:
    """Until tier t logs event `kind` that `match`es (its events still go to on_event)."""
    seen: list[dict[str, Any]] = []

    def grab(tier: str, ev: dict[str, Any]) -> None:
        on_event(tier, ev)
        if ev.get("ev") == kind and match(ev):
            seen.append(ev)

    end = time.monotonic() + seconds
    while not seen:
        t.poll(grab)
        if time.monotonic() > end:
            from microfed_host.mesh import _tail

            raise MeshError(f"the {t.name} coordinator did not log {kind} within {seconds:.0f} s:"
                            "\n" + _tail(t.proc.log_path))
        time.sleep(0.05)


# ------------------------------------------------------------------ the offline check
def _frames(store_path: Path, round_: int, reg: regmod.MeshRegistry) -> list[wire.Frame]:
    """The updates a tier accepted in round r, each signature checked against the registry,
    in the order the coordinator aggregates them (node id as UTF-8 bytes)."""
    store = RoundsStore(store_path)
    try:
        raws = store.accepted_frames(round_)
    finally:
        store.close()
    out = []
    for raw in raws:
        fr = wire.decode(raw)
        e = reg.nodes.get(fr.sender)
        if e is None or not keys.check_signature(e.public_key, fr.signing_digest(), fr.signature):
            raise MeshError(f"{store_path}: round {round_}: the frame of {fr.sender} does not "
                            "verify against the registry")
        out.append(fr)
    return sorted(out, key=lambda f: f.sender.encode())


def request(rule: str, params: dict[str, Any], frames: list[wire.Frame]) -> dict[str, Any]:
    """The `microfed aggregate` request of one tier's round: the recorded frames' updates."""
    req: dict[str, Any] = {"rule": rule, **{k: v for k, v in params.items()
                                            if k in audit.PARAMS[rule]}}
    req["updates"] = [{"node": f.sender, "vector": f.body["values"],
                       **({"weight": f.body["samples"]} if rule == "fedavg" else {})}
                      for f in frames]
    return req


def _rows(store_path: Path) -> dict[int, dict[str, Any]]:
    store = RoundsStore(store_path)
    try:
        return {int(r["round"]): r for r in store.rounds()}
    finally:
        store.close()


def audit_plan(out: Path) -> dict[str, Any]:
    """From a run directory's stores: per round, each site's request and recorded digest,
    the digest of the edge update the root accepted from it, the root's request and its
    recorded aggregate and model digests; the initial model; the final digest."""
    out = Path(out)
    doc = json.loads((out / HIER_FILE).read_text())
    mesh_dir = out / "root" / "mesh"
    reg, _frame = regmod.load(mesh_dir / "registry.json",
                              keys.read_public_key(mesh_dir / "coordinator.pub"))
    root_cfg = coordmod.load_config(out / "root")
    root_rows = _rows(out / "root" / coordmod.STORE_NAME)
    site_rows = {s["site"]: _rows(out / s["site"] / coordmod.STORE_NAME) for s in doc["sites"]}
    rounds = []
    for r in sorted(root_rows):
        row = root_rows[r]
        edge_frames = _frames(out / "root" / coordmod.STORE_NAME, r, reg)
        sent = {f.sender: audit.digest(f.body["values"]) for f in edge_frames}
        sites = []
        for s in doc["sites"]:
            srow = site_rows[s["site"]].get(r)
            if srow is None:
                continue
            frames = _frames(out / s["site"] / coordmod.STORE_NAME, r, reg)
            sites.append({"site": s["site"], "edge": s["edge"],
                          "request": request(srow["rule"], json.loads(srow["params"]), frames),
                          "agg_digest": srow["agg_digest"], "sent_digest": sent.get(s["edge"])})
        rounds.append({"round": r, "sites": sites,
                       "root": {"request": request(row["rule"], json.loads(row["params"]),
                                                   edge_frames),
                                "agg_digest": row["agg_digest"],
                                "model_digest": row["model_digest"]}})
    m = model.get(root_cfg.model, n_features=root_cfg.n_features, n_classes=root_cfg.n_classes)
    return {"mesh": doc["mesh"], "init": m.init(root_cfg.init_seed), "rounds": rounds,
            "final_digest": rounds[-1]["root"]["model_digest"] if rounds else None}
