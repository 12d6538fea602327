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
import time
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
from microfed_tools import observe

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
    p.add_argument("--rounds", type=_rounds, default=30,
                   help="how many rounds, or 'forever' (%d: until stopped)" % coordmod.ROUNDS_FOREVER)
    p.add_argument("--mode", default="coordinated", choices=coordmod.MODES)
    p.add_argument("--deadline", type=float, default=120.0,
                   help="seconds a round waits for missing nodes, at most 86400 (default 120: "
                   "boards are slow)")
    p.add_argument("--crosscheck", default="always", help="always | sampled:N | off")
    p.add_argument("--out", help="run directory (default: <mesh>/run)")
    p.add_argument("--config", metavar="FILE",
                   help="settings from a JSON file, keys named as these options (rule, f, m, "
                   "trim, rounds, mode, deadline, crosscheck); they take precedence over the "
                   "flags; SIGHUP re-reads it and applies rounds, deadline and crosscheck to "
                   "the running run (docs/service.md)")
    observe.add_arguments(p)
    p.set_defaults(func=main)


def _rounds(text: str) -> int:
    if text == "forever":
        return coordmod.ROUNDS_FOREVER
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'forever', got {text!r}") from None


# --config FILE: its keys and the options they stand for.
CONFIG_KEYS = {"rule": "rule", "f": "f", "m": "m", "trim": "trim", "rounds": "rounds",
               "mode": "mode", "deadline": "deadline", "crosscheck": "crosscheck"}


def apply_config_file(args: argparse.Namespace, path: Path) -> None:
    """Set the options `path` (a JSON object) names; CoordinatorError with the file's name."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise coordmod.CoordinatorError(f"--config {path}: {e.strerror}") from None
    except ValueError as e:
        raise coordmod.CoordinatorError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise coordmod.CoordinatorError(f"--config {path}: must be a JSON object")
    bad = sorted(set(doc) - set(CONFIG_KEYS))
    if bad:
        raise coordmod.CoordinatorError(f"--config {path}: unknown setting(s) {', '.join(bad)} "
                                        f"(known: {', '.join(CONFIG_KEYS)})")
    for key, value in doc.items():
        if key == "rounds" and isinstance(value, str):
            try:
                value = _rounds(value)
            except argparse.ArgumentTypeError as e:
                raise coordmod.CoordinatorError(f"--config {path}: rounds: {e}") from None
        want = (str,) if key in ("rule", "mode", "crosscheck") else \
            (int, float) if key == "deadline" else (int,)
        if isinstance(value, bool) or not isinstance(value, want):
            raise coordmod.CoordinatorError(f"--config {path}: {key} must be "
                                            f"{'a string' if want == (str,) else 'a number'}, "
                                            f"got {value!r}")
        setattr(args, CONFIG_KEYS[key], value)


def _config(args: argparse.Namespace, mesh_dir: Path) -> coordmod.CoordinatorConfig:
    test = mesh_dir / SHARDS_DIR / TEST_SHARD
    return coordmod.CoordinatorConfig(
        mesh_dir=str(mesh_dir.resolve()), rule=args.rule, f=args.f, m=args.m, trim=args.trim,
        rounds=args.rounds, mode=args.mode, crosscheck=args.crosscheck,
        deadline_s=args.deadline, test_shard=str(test.resolve()) if test.is_file() else "",
    )


def _check_deadline(deadline: Any) -> None:
    if (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
            or not math.isfinite(deadline) or not 0 < deadline <= MAX_DEADLINE_S):
        raise coordmod.CoordinatorError(
            f"--deadline must be in (0, {MAX_DEADLINE_S:g}] seconds, got {deadline!r}")


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
        if args.config:
            apply_config_file(args, Path(args.config))
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
        _check_deadline(args.deadline)
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
    count = "rounds until stopped" if args.rounds == coordmod.ROUNDS_FOREVER else \
        f"{args.rounds} rounds"
    banner = (f"{'resuming the run' if resuming else 'coordinator'} for mesh {name!r} on "
              f"{host}:{port}, run directory {out}; "
              f"{count} of {args.rule}; one JSON event per line follows")
    events = coordmod._json_log
    said: list[bool] = []

    def log(ev: dict[str, Any]) -> None:
        # The banner waits for the first event (the coordinator is connected by then), so a
        # broker that cannot be reached gives exactly one line: the error.
        if not said:
            said.append(True)
            print(banner, file=sys.stderr)
        events(ev)

    try:
        obs = observe.Observers.start(args, out / coordmod.STORE_NAME,
                                      say=lambda m: print(m, file=sys.stderr))
        obs.broker_ready(host, port, mesh_dir)
    except (observe.ObserveError, MQTTError, OSError) as e:
        return _error(e)
    # A service manager's stop (SIGTERM, or Ctrl-C): finish the message in hand and stop
    # cleanly; the run resumes from its store when this command runs again (docs/service.md).
    stopping: list[int] = []

    def _stop(signum: int, frame: Any) -> None:
        stopping.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    # SIGHUP: re-read --config and hand the coordinator the new settings between messages.
    hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: hup.append(signum))

    def reload() -> coordmod.CoordinatorConfig | None:
        if not hup:
            return None
        hup.clear()
        if not args.config:
            log({"ev": "reload_refused", "t": time.time(),
                 "error": "SIGHUP, but no --config file to re-read"})
            return None
        again = argparse.Namespace(**vars(args))
        try:
            apply_config_file(again, Path(args.config))
            _check_deadline(again.deadline)
            return _config(again, mesh_dir)
        except coordmod.CoordinatorError as e:
            log({"ev": "reload_refused", "t": time.time(), "error": str(e)})
            return None

    try:
        return coordmod.serve(out, host, port, log=log, stop=lambda: bool(stopping),
                              reload=reload)
    except (coordmod.CoordinatorError, MQTTError, ProvisionError) as e:
        # e.g. an unreachable broker: the coordinator's client gives up after its retries.
        return _error(e)
    except OSError as e:
        return _error(f"cannot reach MQTT broker {host}:{port}: {e.strerror or e}")
    finally:
        line = obs.stop()
        if line:
            print(line, file=sys.stderr)
