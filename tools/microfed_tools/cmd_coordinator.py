"""`microfed coordinator`: run the coordinator for a provisioned mesh of real (or any) nodes.

`microfed mesh run` starts everything on the host; this command is the host half only, for
boards deployed with `microfed deploy`. It writes the run directory (settings, SQLite store)
and serves until the last round; re-running it on the same --out resumes the run.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

from microfed_host import coordinator as coordmod
from microfed_host.broker import BrokerError, parse_address
from microfed_host.mqtt import MQTTError
from microfed_host.provision import (
    SHARDS_DIR,
    TEST_SHARD,
    MeshDir,
    ProvisionError,
    check_mesh_name,
)

EXIT_USAGE = 2
MAX_DEADLINE_S = 86400.0


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
                   help="seconds a round waits for missing nodes, at most 86400 (default 120: "
                   "boards are slow)")
    p.add_argument("--crosscheck", default="always", help="always | sampled:N | off")
    p.add_argument("--out", help="run directory (default: <mesh>/run)")
    p.add_argument("--alerts", metavar="URL|FILE", action="append", default=None,
                   help="deliver alerts with their evidence to a webhook (http(s) URL) or a "
                   "JSON-lines file; repeatable (docs/metrics.md)")
    p.add_argument("--metrics", metavar="[HOST:]PORT", default=None,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (host default "
                   "127.0.0.1; docs/metrics.md)")
    p.set_defaults(func=main)


def _config(args: argparse.Namespace, mesh_dir: Path) -> coordmod.CoordinatorConfig:
    test = mesh_dir / SHARDS_DIR / TEST_SHARD
    return coordmod.CoordinatorConfig(
        mesh_dir=str(mesh_dir.resolve()), rule=args.rule, f=args.f, m=args.m, trim=args.trim,
        rounds=args.rounds, mode=args.mode, crosscheck=args.crosscheck,
        deadline_s=args.deadline, test_shard=str(test.resolve()) if test.is_file() else "",
    )


def _error(message: object) -> int:
    print(f"microfed coordinator: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _broker(args: argparse.Namespace, mesh: dict[str, Any], mesh_file: Path) -> str:
    if args.broker:
        return str(args.broker)
    b = mesh.get("broker")
    if not isinstance(b, dict) or not isinstance(b.get("host"), str) or type(b.get("port")) is not int:
        raise ProvisionError(f"{mesh_file} names no broker host and port; pass --broker HOST:PORT")
    return "%s:%d" % (b["host"], b["port"])


def main(args: argparse.Namespace) -> int:
    mesh_dir = Path(args.mesh)
    try:
        md = MeshDir(mesh_dir)
        mesh = md.read_mesh()
        name = mesh.get("mesh")
        if not isinstance(name, str):
            raise ProvisionError(f"{md.mesh_file} names no mesh")
        try:
            check_mesh_name(name)
        except ProvisionError as e:  # e.g. a hand-edited mesh.json: topics would break
            raise ProvisionError(f"{md.mesh_file}: {e}") from None
        host, port = parse_address(_broker(args, mesh, md.mesh_file))
        if not math.isfinite(args.deadline) or not 0 < args.deadline <= MAX_DEADLINE_S:
            raise coordmod.CoordinatorError(
                f"--deadline must be in (0, {MAX_DEADLINE_S:g}] seconds, got {args.deadline}")
        cfg = _config(args, mesh_dir)
        cfg.check()
        out = Path(args.out) if args.out else mesh_dir / "run"
        if out.exists() and not out.is_dir():
            raise coordmod.CoordinatorError(f"--out {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        path = out / coordmod.CONFIG_NAME
        doc = cfg.to_json()
        resuming = False
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                raise coordmod.CoordinatorError(
                    f"{path} is not JSON; use another --out to start afresh") from None
            if old != doc:
                raise coordmod.CoordinatorError(
                    f"{out} holds a run with other settings; use another --out to start afresh")
            resuming = True
        else:
            path.write_text(json.dumps(doc, indent=2) + "\n")
    except (ProvisionError, coordmod.CoordinatorError, BrokerError, ValueError) as e:
        return _error(e)
    except OSError as e:
        return _error(f"{e.filename or args.out or mesh_dir}: {e.strerror}" if e.strerror else e)
    banner = (f"{'resuming the run' if resuming else 'coordinator'} for mesh {name!r} on "
              f"{host}:{port}, run directory {out}; "
              f"{args.rounds} rounds of {args.rule}; one JSON event per line follows")
    events = coordmod._json_log
    said: list[bool] = []

    def log(ev: dict[str, Any]) -> None:
        # The banner waits for the first event (the coordinator is connected by then), so a
        # broker that cannot be reached gives exactly one line: the error.
        if not said:
            said.append(True)
            print(banner, file=sys.stderr)
        events(ev)

    server = None
    if args.metrics:
        from microfed_host import metrics

        try:
            server = metrics.serve(args.metrics, out / coordmod.STORE_NAME)
        except (ValueError, OSError) as e:
            return _error(f"--metrics {args.metrics}: {e}")
        print(f"metrics: {metrics.url(server)}", file=sys.stderr)
    watcher = None
    if args.alerts:
        from microfed_host import alerts

        watcher = alerts.watch(out / coordmod.STORE_NAME, args.alerts)
    # A service manager's stop (SIGTERM, or Ctrl-C): finish the message in hand and stop
    # cleanly; the run resumes from its store when this command runs again (docs/service.md).
    stopping: list[int] = []

    def _stop(signum: int, frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        return coordmod.serve(out, host, port, log=log, stop=lambda: bool(stopping))
    except (coordmod.CoordinatorError, MQTTError, ProvisionError) as e:
        # e.g. an unreachable broker: the coordinator's client gives up after its retries.
        return _error(e)
    except OSError as e:
        return _error(f"cannot reach MQTT broker {host}:{port}: {e.strerror or e}")
    finally:
        if server is not None:
            server.shutdown()
        if watcher is not None:
            watcher.stop()
