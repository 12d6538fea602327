"""`microfed flower-bridge`: a Flower ServerApp with ExactKrum trains on MicroPython nodes.

    microfed flower-bridge [--nodes 4] [--rounds 3] [--f 0] [--seed 1] [--max-samples N]
                           [--timeout 60] [--broker auto|mosquitto|amqtt|HOST:PORT]
                           [--out DIR] [--force]

Starts the MQTT broker, provisions a mesh of --nodes nodes, starts one MicroPython unix-port
node per mesh node (the firmware `microfed mesh run` runs), and runs a ServerApp with
ExactKrum(f) for --rounds rounds in Flower's simulation engine. Every virtual SuperNode runs
the bridge's ClientApp (microfed_host.flowerbridge), which relays its round to one MQTT node:
partition-id i fronts node i + 1 (0: node-01, 1: node-02, ...). Prints each round's digest,
which `microfed aggregate` recomputes from OUT/flower-audit/round-NNNN.json (docs/flower.md).

Needs Flower 1.42 with its simulation engine (ray): `pip install microfed[flower-dev]`, or run
it as `./dev flower-bridge ...` (the .venv-flower venv).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from microfed_host.scenario import MeshError

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flower-bridge",
        help="a Flower ServerApp (ExactKrum) trains on MicroPython nodes over MQTT",
        description=(__doc__ or "").splitlines()[0],
    )
    p.add_argument("--nodes", type=int, default=4, help="MicroPython nodes (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="Flower rounds (default 3)")
    p.add_argument("--f", type=int, default=0,
                   help="ExactKrum's num_malicious_nodes (needs nodes >= 2f + 3; default 0)")
    p.add_argument("--seed", type=int, default=1, help="data split, initial model, training")
    p.add_argument("--max-samples", type=int, default=0,
                   help="cap each node's shard (0: the whole shard)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds a ClientApp waits for its node's update (default 60)")
    p.add_argument("--broker", default="auto", help="auto | mosquitto | amqtt | HOST:PORT")
    p.add_argument("--out", type=Path, help="run directory (default runs/flower-bridge-<time>)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=main)


def usage_error(a: argparse.Namespace) -> str:
    """What is wrong with the flags, or ''."""
    if not 0 <= a.f <= 255 or a.nodes < 2 * a.f + 3:
        return (f"ExactKrum with --f {a.f} needs --nodes >= 2f + 3 = {2 * a.f + 3}, got "
                f"{a.nodes}")
    if not 1 <= a.rounds <= 10000:
        return f"--rounds must be in 1..10000, got {a.rounds}"
    if not 0 < a.timeout <= 3600:
        return f"--timeout must be in (0, 3600] seconds, got {a.timeout}"
    if a.max_samples < 0:
        return f"--max-samples must be >= 0 (0: the whole shard), got {a.max_samples}"
    return ""


def main(a: argparse.Namespace) -> int:
    bad = usage_error(a)
    if bad:
        print(f"microfed flower-bridge: error: {bad}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from microfed_host import flowerbridge
    except ImportError as e:
        print(f"microfed flower-bridge: {e}; or run it as ./dev flower-bridge", file=sys.stderr)
        return EXIT_USAGE
    try:
        import ray  # noqa: F401  (Flower's simulation engine)
    except ImportError:
        print("microfed flower-bridge: Flower's simulation engine (ray) is missing: "
              "pip install microfed[flower-dev], or run it as ./dev flower-bridge",
              file=sys.stderr)
        return EXIT_USAGE
    out = a.out or Path("runs") / time.strftime("flower-bridge-%Y%m%d-%H%M%S")
    try:
        flowerbridge.run(out, nodes=a.nodes, rounds=a.rounds, f=a.f, seed=a.seed,
                         max_samples=a.max_samples, timeout_s=a.timeout, broker=a.broker,
                         force=a.force)
    except (MeshError, flowerbridge.BridgeError) as e:
        print(f"microfed flower-bridge: {e}", file=sys.stderr)
        return 1
    return 0
