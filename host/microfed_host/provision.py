"""A provisioned mesh directory and the operations on it: create a mesh (keys, signed
registry, device bundles), add a node, revoke a node. The `microfed provision` CLI
(microfed_tools.cmd_provision), the coordinator and the mesh runner all call these.

DIR layout (docs/security.md):
    mesh.json               mesh name, mesh id, broker settings
    coordinator.key / .pub  the coordinator's Ed25519 seed (0600) and public key
    nodes/ID.key / ID.pub   one key pair per node (seed 0600)
    registry.json           node id -> public key, signed by the coordinator (a REGISTRY frame)
    bundles/ID.json         what one device needs, deploy it as /bundle.json (0600: has the seed
                            and the node's MQTT password)
    coordinator.mqtt, nodes/ID.mqtt, broker/   MQTT credentials, mosquitto password file, ACL
                            and TLS material (microfed_host.brokerauth)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from microfed import wire
from microfed_host import brokerauth, keys
from microfed_host import registry as regmod
from microfed_host.registry import MeshRegistry, NodeEntry

MESH_FORMAT = "microfed-mesh/1"
BUNDLE_FORMAT = "microfed-bundle/1"
MAX_NODES = 1000
DEFAULT_BROKER = "localhost:1883"


class ProvisionError(Exception):
    pass


def parse_broker(text: str) -> dict[str, Any]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisionError(f"--broker must be HOST:PORT with a port in 1..65535, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return {"host": host, "port": int(port)}


def node_ids(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"node-{i:0{width}d}" for i in range(1, n + 1)]


def check_mesh_name(name: str) -> None:
    """Mesh names become MQTT topic levels (microfed/<mesh>/...): no '/', '+', '#', NUL or
    control characters, 1..64 bytes."""
    if not name or len(name.encode()) > 64:
        raise ProvisionError("--mesh must be 1..64 bytes")
    bad = sorted({c for c in name if c in "/+#" or ord(c) < 0x20 or ord(c) == 0x7F})
    if bad:
        raise ProvisionError(
            f"--mesh {name!r} contains {', '.join(repr(c) for c in bad)}: mesh names are MQTT "
            "topic levels and may not contain '/', '+', '#' or control characters")


def check_node_id(node_id: str) -> None:
    if not wire.valid_id(node_id.encode()):
        raise ProvisionError(f"node id {node_id!r} must be 1..64 characters of [A-Za-z0-9._-]")
    if node_id in (wire.COORDINATOR, brokerauth.MONITOR_USER):
        raise ProvisionError(f"node id {node_id!r} is reserved")


class MeshDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    mesh_file = property(lambda self: self.root / "mesh.json")
    coord_key = property(lambda self: self.root / "coordinator.key")
    coord_pub = property(lambda self: self.root / "coordinator.pub")
    registry_file = property(lambda self: self.root / "registry.json")

    def node_key(self, node_id: str) -> Path:
        return self.root / "nodes" / f"{node_id}.key"

    def node_pub(self, node_id: str) -> Path:
        return self.root / "nodes" / f"{node_id}.pub"

    def bundle(self, node_id: str) -> Path:
        return self.root / "bundles" / f"{node_id}.json"

    def existing(self) -> list[Path]:
        found = [p for p in (self.mesh_file, self.coord_key, self.coord_pub, self.registry_file,
                             brokerauth.cred_path(self.root, brokerauth.COORDINATOR_USER),
                             brokerauth.cred_path(self.root, brokerauth.MONITOR_USER))
                 if p.exists()]
        for sub in ("nodes", "bundles", brokerauth.BROKER_DIR):
            d = self.root / sub
            if d.is_dir():
                found += sorted(p for p in d.iterdir() if p.is_file())
        return found

    def read_mesh(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.mesh_file.read_text())
        except OSError:
            raise ProvisionError(f"{self.root} is not a provisioned mesh (no mesh.json): run `microfed provision init`") from None
        except ValueError as e:
            raise ProvisionError(f"{self.mesh_file}: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != MESH_FORMAT:
            raise ProvisionError(f"{self.mesh_file} is not a {MESH_FORMAT} file")
        return doc

    def load(self) -> tuple[dict[str, Any], bytes, MeshRegistry]:
        mesh = self.read_mesh()
        seed = keys.read_private_key(self.coord_key)
        pinned = keys.read_public_key(self.coord_pub)
        if keys.public_key(seed) != pinned:
            raise ProvisionError(f"{self.coord_key} and {self.coord_pub} do not match")
        reg, _ = regmod.load(self.registry_file, pinned)
        if reg.mesh != mesh["mesh"]:
            raise ProvisionError("registry.json and mesh.json name different meshes")
        return mesh, seed, reg


def write_registry_and_bundles(md: MeshDir, mesh: dict[str, Any], seed: bytes, reg: MeshRegistry) -> bytes:
    frame = reg.sign(seed)
    if len(frame) > wire.MAX_FRAME:
        raise ProvisionError("registry too large for one frame")
    regmod.save(md.registry_file, reg, frame)
    digest = reg.digest().hex()
    active = [e.node_id for e in reg.nodes.values() if e.active]
    revoked = [e.node_id for e in reg.nodes.values() if not e.active]
    try:
        brokerauth.write_broker_files(md.root, reg.mesh, active, revoked, mesh["broker"]["host"])
    except brokerauth.BrokerAuthError as e:
        raise ProvisionError(str(e)) from None
    ca = brokerauth.ca_der(brokerauth.broker_dir(md.root)).hex()
    for e in reg.nodes.values():
        path = md.bundle(e.node_id)
        if not e.active:
            path.unlink(missing_ok=True)  # a revoked node's bundle must not be deployed again
            continue
        node_seed = keys.read_private_key(md.node_key(e.node_id))
        if keys.public_key(node_seed) != e.public_key:
            raise ProvisionError(f"{md.node_key(e.node_id)} does not match the registry's key for {e.node_id}")
        bundle = {
            "format": BUNDLE_FORMAT,
            "mesh": reg.mesh,
            "mesh_id": reg.mesh_id.hex(),
            "node_id": e.node_id,
            "seed": node_seed.hex(),
            "public_key": e.public_key.hex(),
            "coordinator_public_key": reg.coordinator.hex(),
            "registry_digest": digest,
            "registry_version": reg.version,
            "registry_frame": frame.hex(),
            "broker": mesh["broker"],
            # The broker refuses anonymous clients: this node's own login, and the mesh CA
            # (DER) that a TLS connection verifies the broker's certificate against.
            "mqtt": brokerauth.read_credentials(md.root, e.node_id),
            "broker_ca": ca,
        }
        keys.write_secret_file(path, json.dumps(bundle, indent=2) + "\n")
    return frame


def new_node_key(md: MeshDir, node_id: str, force: bool) -> bytes:
    seed = keys.generate_seed()
    pub = keys.public_key(seed)
    keys.write_private_key(md.node_key(node_id), seed, force=force)
    keys.write_public_key(md.node_pub(node_id), pub, force=True)
    return pub


def init_mesh(out: Path, name: str, nodes: int, broker: str = DEFAULT_BROKER,
              force: bool = False, tls: bool = False,
              ids: list[str] | None = None) -> tuple[dict[str, Any], MeshRegistry]:
    """A new mesh in `out`: coordinator key, `nodes` node keys, signed registry v1, bundles.
    `ids`: the members' ids (default node_ids(nodes)). Refuses to overwrite the keys of an
    existing mesh unless `force`."""
    md = MeshDir(Path(out))
    if not 1 <= nodes <= MAX_NODES:
        raise ProvisionError(f"--nodes must be in 1..{MAX_NODES}")
    members = node_ids(nodes) if ids is None else list(ids)
    if len(members) != nodes or len(set(members)) != nodes:
        raise ProvisionError(f"{nodes} distinct member ids needed, got {len(set(members))}")
    for node_id in members:
        check_node_id(node_id)
    check_mesh_name(name)
    broker_doc = parse_broker(broker)
    if tls:
        broker_doc["tls"] = True  # clients use TLS, verified against broker/ca.crt
    old = md.existing()
    if old and not force:
        raise ProvisionError(
            f"{md.root} already holds a mesh ({len(old)} files, e.g. {old[0].name}); refusing to "
            "overwrite keys. Use another --out, or --force to replace every key in it."
        )
    for p in old:
        if p.parent.name in ("nodes", "bundles", brokerauth.BROKER_DIR) or p.suffix == ".mqtt":
            p.unlink()  # --force: new keys, new MQTT passwords, a new CA
    md.root.mkdir(parents=True, exist_ok=True)
    seed = keys.generate_seed()
    keys.write_private_key(md.coord_key, seed, force=force)
    keys.write_public_key(md.coord_pub, keys.public_key(seed), force=True)
    reg = MeshRegistry(mesh=name, coordinator=keys.public_key(seed), version=1)
    for node_id in members:
        reg.nodes[node_id] = NodeEntry(node_id, new_node_key(md, node_id, force))
    mesh = {"format": MESH_FORMAT, "mesh": name, "mesh_id": wire.mesh_id(name).hex(),
            "broker": broker_doc}
    md.mesh_file.write_text(json.dumps(mesh, indent=2) + "\n")
    write_registry_and_bundles(md, mesh, seed, reg)
    return mesh, reg


SHARDS_DIR = "shards"
TEST_SHARD = "test.mfds"


def write_digit_shards(out: Path, ids: list[str], split: str, seed: int) -> None:
    """The reference task's data: one digits shard per node (<id>.mfds, next to the bundles'
    directory so `microfed deploy --bundle` finds it) and the held-out test split that
    `microfed coordinator` scores the global model on."""
    from microfed_host import data

    try:
        ds = data.train_test_split(seed)
        shards = data.shard(ds.train, len(ids), split, seed)
    except data.DataError as e:
        raise ProvisionError(f"cannot shard the digits data: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    for i, (node_id, sh) in enumerate(zip(ids, shards, strict=True)):
        data.write_shard(out / f"{node_id}.mfds", sh, i, len(ids))
    data.write_shard(out / TEST_SHARD, ds.test)


def add_node(mesh_dir: Path, node_id: str, force: bool = False) -> MeshRegistry:
    """Register a new node: new key, registry version + 1, re-signed, every bundle rewritten."""
    md = MeshDir(Path(mesh_dir))
    check_node_id(node_id)
    mesh, seed, reg = md.load()
    e = reg.nodes.get(node_id)
    if e is not None and e.active:
        raise ProvisionError(f"{node_id} is already registered")
    if e is not None:
        raise ProvisionError(
            f"{node_id} was revoked; ids are never reused (receivers keep its replay "
            "counters): pick a new id")
    if md.node_key(node_id).exists() and not force:
        raise ProvisionError(f"{md.node_key(node_id)} exists; refusing to overwrite a key (use --force)")
    reg.nodes[node_id] = NodeEntry(node_id, new_node_key(md, node_id, force))
    reg.version += 1
    write_registry_and_bundles(md, mesh, seed, reg)
    return reg


def _active_entry(mesh_dir: Path, node_id: str, if_revoked: str, if_unknown: str
                  ) -> tuple[MeshDir, dict[str, Any], bytes, MeshRegistry, NodeEntry]:
    """The loaded mesh and the registry entry of an active node, else ProvisionError."""
    md = MeshDir(Path(mesh_dir))
    check_node_id(node_id)
    mesh, seed, reg = md.load()
    e = reg.nodes.get(node_id)
    if e is None:
        raise ProvisionError(f"{node_id} is not in the registry{if_unknown}")
    if not e.active:
        raise ProvisionError(f"{node_id} {if_revoked}")
    return md, mesh, seed, reg, e


def revoke_node(mesh_dir: Path, node_id: str) -> MeshRegistry:
    """Mark a node revoked: registry version + 1, re-signed; its bundle is deleted."""
    md, mesh, seed, reg, e = _active_entry(mesh_dir, node_id, "is already revoked", "")
    e.active = False
    reg.version += 1
    write_registry_and_bundles(md, mesh, seed, reg)
    return reg


def reenrol_node(mesh_dir: Path, node_id: str) -> MeshRegistry:
    """A reflashed (or wiped) device: same id, NEW key, registry version + 1, new bundle.

    The key change starts a new counter epoch for the node everywhere: the coordinator and the
    peers drop the node's old replay counters when they adopt this registry (frames signed
    with the old key can never verify again), so the wiped device may count from 1 again.
    The old key file and broker password are replaced: a stolen copy of the old bundle is
    useless from now on (at the broker once it re-reads its password file)."""
    md, mesh, seed, reg, e = _active_entry(
        mesh_dir, node_id, "was revoked; a revoked id cannot be re-enrolled",
        " (use `provision add`)")
    e.public_key = new_node_key(md, node_id, force=True)
    # A new broker password too: the old bundle's login stops working at the broker.
    brokerauth.cred_path(md.root, node_id).unlink(missing_ok=True)
    reg.version += 1
    write_registry_and_bundles(md, mesh, seed, reg)
    return reg
