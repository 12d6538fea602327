"""`microfed provision`: create a mesh's identities and keep its registry.

    microfed provision init   --mesh NAME --nodes N --out DIR [--broker HOST:PORT] [--tls] [--force]
    microfed provision add    --dir DIR NODE_ID [--force]
    microfed provision revoke --dir DIR NODE_ID
    microfed provision reenrol --dir DIR NODE_ID

The mesh directory's layout and the operations live in microfed_host.provision (the
coordinator and the mesh runner use them too); this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from microfed_host import keys
from microfed_host.provision import (
    DEFAULT_BROKER,
    SHARDS_DIR,
    MeshDir,
    ProvisionError,
    add_node,
    init_mesh,
    node_ids,
    reenrol_node,
    revoke_node,
    write_digit_shards,
)
from microfed_host.registry import RegistryError


def cmd_init(args: argparse.Namespace) -> int:
    seed = getattr(args, "seed", 1)
    if not 0 <= seed <= 0xFFFFFFFF:  # checked before any key is written
        raise ProvisionError(f"--seed must be in 0..2^32-1, got {seed}")
    mesh, reg = init_mesh(Path(args.out), args.mesh, args.nodes, args.broker, args.force,
                          getattr(args, "tls", False))
    root = Path(args.out)
    print(f"mesh {args.mesh!r} (id {mesh['mesh_id']}) in {root}: coordinator + {args.nodes} nodes, "
          f"registry v{reg.version} digest {reg.digest().hex()[:16]}")
    # Programmatic callers (tests) shard their own data: default to none for them.
    if getattr(args, "data", "none") == "digits":
        write_digit_shards(root / SHARDS_DIR, node_ids(args.nodes), args.split, args.seed)
        print(f"training data: digits, {args.split} shards in {root / SHARDS_DIR} "
              "(deploy copies each node's shard as /shard.bin)")
    print(f"broker login: {root / 'broker'} holds the mosquitto password file, ACL and TLS "
          f"certificates; run the broker with: mosquitto -c {root / 'broker' / 'mosquitto.conf'}")
    print(f"deploy {root / 'bundles'}/<node>.json to each device as /bundle.json")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    reg = add_node(Path(args.dir), args.node_id, args.force)
    print(f"added {args.node_id}: registry v{reg.version}; bundle {MeshDir(Path(args.dir)).bundle(args.node_id)}")
    print("every active bundle now carries the new registry; redeploy or publish the registry frame")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    reg = revoke_node(Path(args.dir), args.node_id)
    print(f"revoked {args.node_id}: registry v{reg.version} re-signed; its bundle and broker login "
          "were removed (send mosquitto SIGHUP to reload broker/passwd and broker/acl)")
    return 0


def cmd_reenrol(args: argparse.Namespace) -> int:
    reg = reenrol_node(Path(args.dir), args.node_id)
    print(f"re-enrolled {args.node_id} with a new key: registry v{reg.version}; deploy "
          f"{MeshDir(Path(args.dir)).bundle(args.node_id)} to the device as /bundle.json")
    print("a running coordinator adopts the new registry within a second and the node's "
          "counters restart from 1 (new epoch)")
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
    pi.add_argument("--nodes", required=True, type=int,
                    help="number of nodes, 1..1000 (ids node-01 ...)")
    pi.add_argument("--out", required=True, help="output directory")
    pi.add_argument("--broker", default=DEFAULT_BROKER, help=f"MQTT broker HOST:PORT (default {DEFAULT_BROKER})")
    pi.add_argument("--force", action="store_true", help="replace the keys of an existing mesh in --out")
    pi.add_argument("--tls", action="store_true",
                    help="clients connect over TLS (--broker names the broker's TLS port, e.g. 8883)")
    pi.add_argument("--data", choices=("digits", "none"), default="digits",
                    help="training data to shard for the nodes (default: digits, the reference task)")
    pi.add_argument("--split", choices=("iid", "dirichlet"), default="iid",
                    help="how the digits are split across nodes (default iid)")
    pi.add_argument("--seed", type=int, default=1,
                    help="seed of the data split, 0..2^32-1 (default 1)")
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

    pe = sub.add_parser("reenrol", help="re-enrol a reflashed node: new key, new counter epoch")
    pe.add_argument("--dir", required=True, help="mesh directory made by `provision init`")
    pe.add_argument("node_id")
    pe.set_defaults(func=_run(cmd_reenrol))
