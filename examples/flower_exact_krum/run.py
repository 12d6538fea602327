"""Flower simulation with microfed's ExactKrum: digits, >= 100 virtual clients, sign-flip attackers.

Each virtual client trains the project's softmax regression (float64, microfed_host.float_baseline)
for one epoch on its IID shard of scikit-learn's digits and replies with its model; the first
``--attackers`` partitions send the sign-flipped step instead (global - boost * delta). The ServerApp
aggregates with ``ExactKrum`` (or another exact rule, ``--rule``) and prints the final digest,
which is the same on every run: see README.md.

    python examples/flower_exact_krum/run.py [--clients 100] [--rounds 5] [--attackers 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# Ray's workers inherit the environment: they import `task` (and microfed, when it is not
# installed) from the same places as this process.
_paths = [str(HERE)] + [str(ROOT / p) for p in ("shared", "host", "tools")]
os.environ["PYTHONPATH"] = os.pathsep.join(_paths + [os.environ.get("PYTHONPATH", "")])
sys.path[:0] = _paths
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline: no usage events sent

from flwr.app import Array, ArrayRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from task import MODEL, SEED, client_app, shards  # noqa: E402

from microfed_host import flower as mf  # noqa: E402
from microfed_host.float_baseline import features  # noqa: E402


def make_strategy(rule: str, f: int, audit_dir: str | None) -> mf.FedAvg:
    common = {"fraction_evaluate": 0.0, "audit_dir": audit_dir}
    if rule == "krum":
        return mf.ExactKrum(num_malicious_nodes=f, **common)
    if rule == "multi_krum":
        return mf.ExactMultiKrum(num_malicious_nodes=f, num_nodes_to_select=10, **common)
    if rule == "median":
        return mf.ExactMedian(**common)
    if rule == "trimmed_mean":
        return mf.ExactTrimmedMean(beta=0.25, **common)
    return mf.ExactFedAvg(**common)


def server_app(args: argparse.Namespace, out: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = make_strategy(args.rule, args.attackers, args.audit_dir)
        _, test = shards(args.clients)
        x_test = features(test.x)
        init = MODEL.init(SEED)

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            acc = MODEL.accuracy(arrays["params"].numpy(), x_test, test.y)
            return MetricRecord({"accuracy": acc})

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"params": Array(init)}),
            num_rounds=args.rounds,
            evaluate_fn=evaluate,
        )
        last = max(result.train_metrics_clientapp)
        out["digest"] = mf.digest_hex(result.train_metrics_clientapp[last])
        out["accuracy"] = result.evaluate_metrics_serverapp[args.rounds]["accuracy"]
        out["digests"] = dict(strategy.digests)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--attackers", type=int, default=20, help="sign-flip clients (and Krum's f)")
    ap.add_argument("--boost", type=float, default=5.0,
                    help="attackers send global - boost * (their honest step)")
    ap.add_argument("--rule", default="krum",
                    choices=("krum", "multi_krum", "median", "trimmed_mean", "fedavg"))
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs (one per client actor)")
    ap.add_argument("--audit-dir", help="write each round's `microfed aggregate` request here")
    ap.add_argument("--out", help="also write the final digest to this file")
    args = ap.parse_args(argv)
    out: dict = {}
    run_simulation(
        server_app=server_app(args, out),
        client_app=client_app(args.attackers, args.boost),
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "warning"},
        },
    )
    if "digest" not in out:
        print("the ServerApp did not finish (see the log above)", file=sys.stderr)
        return 1
    for rnd, dig in sorted(out["digests"].items()):
        print(f"round {rnd}: digest {dig}")
    print(f"accuracy after {args.rounds} rounds: {out['accuracy']:.4f}")
    print(f"final digest: {out['digest']}")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(out["digest"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
