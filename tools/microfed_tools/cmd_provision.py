"""`microfed provision`: create a mesh's identities and keep its registry.

    microfed provision init   --mesh NAME --nodes N --out DIR [--broker HOST:PORT] [--force]
    microfed provision add    --dir DIR NODE_ID [--force]
    microfed provision revoke --dir DIR NODE_ID

DIR layout (docs/security.md):
    mesh.json               mesh name, mesh id, broker settings
    coordinator.key / .pub  the coordinator's Ed25519 seed (0600) and public key
    nodes/ID.key / ID.pub   one key pair per node (seed 0600)
    registry.json           node id -> public key, signed by the coordinator (a REGISTRY frame)
    bundles/ID.json         what one device needs, deploy it as /bundle.json (0600: has the seed)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from microfed import wire
from microfed_host import keys
from microfed_host import registry as regmod
from microfed_host.registry import MeshRegistry, NodeEntry, RegistryError

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


def check_node_id(node_id: str) -> None:
    if not wire.valid_id(node_id.encode()):
        raise ProvisionError(f"node id {node_id!r} must be 1..64 characters of [A-Za-z0-9._-]")
    if node_id == wire.COORDINATOR:
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
        found = [p for p in (self.mesh_file, self.coord_key, self.coord_pub, self.registry_file) if p.exists()]
        for sub in ("nodes", "bundles"):
            d = self.root / sub
            if d.is_dir():
                found += sorted(p for p in d.iterdir() if p.suffix in (".key", ".pub", ".json"))
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
        }
        keys.write_secret_file(path, json.dumps(bundle, indent=2) + "\n")
    return frame


def new_node_key(md: MeshDir, node_id: str, force: bool) -> bytes:
    seed = keys.generate_seed()
    pub = keys.public_key(seed)
    keys.write_private_key(md.node_key(node_id), seed, force=force)
    keys.write_public_key(md.node_pub(node_id), pub, force=True)
    return pub


def cmd_init(args: argparse.Namespace) -> int:
    md = MeshDir(Path(args.out))
    if not 1 <= args.nodes <= MAX_NODES:
        raise ProvisionError(f"--nodes must be in 1..{MAX_NODES}")
    name = args.mesh
    if not name or len(name.encode()) > 64:
        raise ProvisionError("--mesh must be 1..64 bytes")
    broker = parse_broker(args.broker)
    old = md.existing()
    if old and not args.force:
        raise ProvisionError(
            f"{md.root} already holds a mesh ({len(old)} files, e.g. {old[0].name}); refusing to "
            "overwrite keys. Use another --out, or --force to replace every key in it."
        )
    for p in old:
        if p.parent.name in ("nodes", "bundles"):
            p.unlink()
    md.root.mkdir(parents=True, exist_ok=True)
    seed = keys.generate_seed()
    keys.write_private_key(md.coord_key, seed, force=args.force)
    keys.write_public_key(md.coord_pub, keys.public_key(seed), force=True)
    reg = MeshRegistry(mesh=name, coordinator=keys.public_key(seed), version=1)
    for node_id in node_ids(args.nodes):
        reg.nodes[node_id] = NodeEntry(node_id, new_node_key(md, node_id, args.force))
    mesh = {"format": MESH_FORMAT, "mesh": name, "mesh_id": wire.mesh_id(name).hex(), "broker": broker}
    md.mesh_file.write_text(json.dumps(mesh, indent=2) + "\n")
    write_registry_and_bundles(md, mesh, seed, reg)
    print(f"mesh {name!r} (id {mesh['mesh_id']}) in {md.root}: coordinator + {args.nodes} nodes, "
          f"registry v{reg.version} digest {reg.digest().hex()[:16]}")
    # Programmatic callers (the mesh runner) shard their own data: default to none for them.
    if getattr(args, "data", "none") == "digits":
        write_digit_shards(md.root / SHARDS_DIR, node_ids(args.nodes), args.split, args.seed)
        print(f"training data: digits, {args.split} shards in {md.root / SHARDS_DIR} "
              "(deploy copies each node's shard as /shard.bin)")
    print(f"deploy {md.root / 'bundles'}/<node>.json to each device as /bundle.json")
    return 0


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


def cmd_add(args: argparse.Namespace) -> int:
    md = MeshDir(Path(args.dir))
    check_node_id(args.node_id)
    mesh, seed, reg = md.load()
    e = reg.nodes.get(args.node_id)
    if e is not None and e.active:
        raise ProvisionError(f"{args.node_id} is already registered")
    if e is not None:
        raise ProvisionError(
            f"{args.node_id} was revoked; ids are never reused (receivers keep its replay "
            "counters): pick a new id")
    if md.node_key(args.node_id).exists() and not args.force:
        raise ProvisionError(f"{md.node_key(args.node_id)} exists; refusing to overwrite a key (use --force)")
    reg.nodes[args.node_id] = NodeEntry(args.node_id, new_node_key(md, args.node_id, args.force))
    reg.version += 1
    write_registry_and_bundles(md, mesh, seed, reg)
    print(f"added {args.node_id}: registry v{reg.version}; bundle {md.bundle(args.node_id)}")
    print("every active bundle now carries the new registry; redeploy or publish the registry frame")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    md = MeshDir(Path(args.dir))
    check_node_id(args.node_id)
    mesh, seed, reg = md.load()
    e = reg.nodes.get(args.node_id)
    if e is None:
        raise ProvisionError(f"{args.node_id} is not in the registry")
    if not e.active:
        raise ProvisionError(f"{args.node_id} is already revoked")
    e.active = False
    reg.version += 1
    write_registry_and_bundles(md, mesh, seed, reg)
    print(f"revoked {args.node_id}: registry v{reg.version} re-signed; its bundle was removed")
    return 0


def _run(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (ProvisionError, RegistryError, keys.KeyFileError) as e:
            print(f"microfed provision: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"microfed provision: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
            return 2

    return wrapped


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("provision", help="create mesh keys, registry and device bundles",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="provision_command", metavar="ACTION")
    sub.required = True

    pi = sub.add_parser("init", help="new mesh: coordinator key, node keys, registry, bundles")
    pi.add_argument("--mesh", required=True, help="mesh name")
    pi.add_argument("--nodes", required=True, type=int, help="number of nodes (ids node-01 ...)")
    pi.add_argument("--out", required=True, help="output directory")
    pi.add_argument("--broker", default=DEFAULT_BROKER, help=f"MQTT broker HOST:PORT (default {DEFAULT_BROKER})")
    pi.add_argument("--force", action="store_true", help="replace the keys of an existing mesh in --out")
    pi.add_argument("--data", choices=("digits", "none"), default="digits",
                    help="training data to shard for the nodes (default: digits, the reference task)")
    pi.add_argument("--split", choices=("iid", "dirichlet"), default="iid",
                    help="how the digits are split across nodes (default iid)")
    pi.add_argument("--seed", type=int, default=1, help="seed of the data split (default 1)")
    pi.set_defaults(func=_run(cmd_init))

    pa = sub.add_parser("add", help="add a node: new key, re-signed registry, its bundle")
    pa.add_argument("--dir", required=True, help="mesh directory made by `provision init`")
    pa.add_argument("node_id")
    pa.add_argument("--force", action="store_true", help="replace a leftover key file for this id")
    pa.set_defaults(func=_run(cmd_add))

    pr = sub.add_parser("revoke", help="revoke a node and re-sign the registry")
    pr.add_argument("--dir", required=True, help="mesh directory made by `provision init`")
    pr.add_argument("node_id")
    pr.set_defaults(func=_run(cmd_revoke))
