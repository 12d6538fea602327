"""`microfed coordinator`: run the coordinator for a provisioned mesh of real (or any) nodes.

`microfed mesh run` starts everything on the host; this command is the host half only, for
boards deployed with `microfed deploy`. It writes the run directory (settings, SQLite store)
and serves until the last round; re-running it on the same --out resumes the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from microfed_host import coordinator as coordmod
from microfed_host.broker import BrokerError, parse_address
from microfed_host.provision import SHARDS_DIR, TEST_SHARD, MeshDir, ProvisionError

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the coordinator for a provisioned mesh (real boards)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--mesh", required=True, help="mesh directory made by `microfed provision init`")
    p.add_argument("--broker", help="MQTT broker HOST:PORT (default: the one in the mesh)")
    p.add_argument("--rule", default="krum", choices=coordmod.RULES)
    p.add_argument("--f", type=int, default=1, help="tolerated Byzantine nodes (default 1)")
    p.add_argument("--m", type=int, default=0, help="multi_krum: how many to average (0: n - f)")
    p.add_argument("--trim", type=int, default=-1, help="trimmed_mean: per end (-1: f)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--mode", default="coordinated", choices=coordmod.MODES)
    p.add_argument("--deadline", type=float, default=120.0,
                   help="seconds a round waits for missing nodes (default 120: boards are slow)")
    p.add_argument("--crosscheck", default="always", help="always | sampled:N | off")
    p.add_argument("--out", help="run directory (default: <mesh>/run)")
    p.set_defaults(func=main)


def _config(args: argparse.Namespace, mesh_dir: Path) -> coordmod.CoordinatorConfig:
    test = mesh_dir / SHARDS_DIR / TEST_SHARD
    return coordmod.CoordinatorConfig(
        mesh_dir=str(mesh_dir.resolve()), rule=args.rule, f=args.f, m=args.m, trim=args.trim,
        rounds=args.rounds, mode=args.mode, crosscheck=args.crosscheck,
        deadline_s=args.deadline, test_shard=str(test.resolve()) if test.is_file() else "",
    )


def main(args: argparse.Namespace) -> int:
    mesh_dir = Path(args.mesh)
    try:
        mesh = MeshDir(mesh_dir).read_mesh()
        broker = args.broker or "%s:%d" % (mesh["broker"]["host"], mesh["broker"]["port"])
        host, port = parse_address(broker)
        cfg = _config(args, mesh_dir)
        cfg.check()
        out = Path(args.out) if args.out else mesh_dir / "run"
        out.mkdir(parents=True, exist_ok=True)
        path = out / coordmod.CONFIG_NAME
        doc = cfg.to_json()
        if path.exists():
            old = json.loads(path.read_text())
            if old != doc:
                raise coordmod.CoordinatorError(
                    f"{out} holds a run with other settings; use another --out to start afresh")
            print(f"resuming the run in {out}", file=sys.stderr)
        else:
            path.write_text(json.dumps(doc, indent=2) + "\n")
    except (ProvisionError, coordmod.CoordinatorError, BrokerError, ValueError, OSError) as e:
        print(f"microfed coordinator: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"coordinator for mesh {mesh['mesh']!r} on {host}:{port}, run directory {out}; "
          f"{args.rounds} rounds of {args.rule}; one JSON event per line follows",
          file=sys.stderr)
    return coordmod.serve(out, host, port)
