"""`microfed hier`: hierarchical meshes (docs/hierarchy.md).

    microfed hier run   [--sites 2] [--nodes-per-site 4] [--rounds 3]
                        [--edge-rule median] [--edge-f 1] [--root-rule fedavg] [--root-f 0]
                        [--byzantine-per-site B] [--attack sign-flip] [--allow-more-byzantine]
                        [--seed 1] [--max-samples 60] [--deadline 30] [--out DIR] [--force]
                        [--kill-edge-at ROUND]
    microfed hier audit RUN_DIR [--engine fast|reference|micropython|all]
    microfed hier provision --root-broker HOST:PORT --site-brokers HOST:PORT,... [...] --out DIR
    microfed hier revoke RUN_DIR NODE
    microfed hier root  RUN_DIR/root   [--broker HOST:PORT]
    microfed hier edge  RUN_DIR/site-K [--broker HOST:PORT]

`run` runs a whole hierarchy on this machine: the root's mosquitto and coordinator, and per
site a mosquitto bridged to the root's, an edge coordinator and MicroPython unix-port nodes.
`audit` recomputes both tiers of every round offline from the run's stores with the
`microfed aggregate` engines and checks each digest the run recorded, down to the final model.
`provision`, `root` and `edge` are the same pieces for a deployment on separate machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from microfed_host.adversary import ATTACKS
from microfed_host.coordinator import RULES

EXIT_USAGE = 2
EXIT_MISMATCH = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hier", help="hierarchical meshes: sites with edge coordinators under a root",
                       description="Hierarchical meshes: sites with edge coordinators under "
                       "a root (docs/hierarchy.md).")
    hs = p.add_subparsers(dest="hier_command", metavar="ACTION")
    hs.required = True

    def spec_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--sites", type=int, default=2, help="sites, one edge each (default 2)")
        q.add_argument("--nodes-per-site", type=int, default=4, help="nodes per site (default 4)")
        q.add_argument("--rounds", type=int, default=3)
        q.add_argument("--edge-rule", default="median", choices=RULES,
                       help="each edge's rule over its nodes (default median)")
        q.add_argument("--edge-f", type=int, default=1,
                       help="krum/multi_krum f, trimmed_mean trim at the edge (default 1)")
        q.add_argument("--root-rule", default="fedavg", choices=RULES,
                       help="the root's rule over the edges (default fedavg, weighted by samples)")
        q.add_argument("--root-f", type=int, default=0)
        q.add_argument("--byzantine-per-site", type=int, default=0,
                       help="compromised nodes per site (the last ids; host-side adversary)")
        q.add_argument("--attack", default="sign-flip", choices=ATTACKS,
                       help="what the compromised nodes do (default sign-flip)")
        q.add_argument("--allow-more-byzantine", action="store_true",
                       help="run past the edge rule's Byzantine budget on purpose")
        q.add_argument("--seed", type=int, default=1)
        q.add_argument("--max-samples", type=int, default=60, help="samples per node (0: all)")
        q.add_argument("--deadline", type=float, default=30.0, help="seconds a round waits")
        q.add_argument("--out", help="run directory (default runs/hier-<time>)")
        q.add_argument("--force", action="store_true", help="replace a non-empty --out")

    q = hs.add_parser("run", help="run a hierarchy on this machine (mosquitto, MicroPython nodes)")
    spec_args(q)
    q.add_argument("--timeout", type=float, default=600.0)
    q.add_argument("--kill-edge-at", type=int, default=0, metavar="ROUND",
                   help="SIGKILL site 1's edge coordinator in ROUND and restart it (0: never)")
    q.set_defaults(func=cmd_run)
    q = hs.add_parser("audit", help="recompute both tiers offline and check every digest")
    q.add_argument("run_dir", type=Path)
    q.add_argument("--engine", default="fast", choices=("fast", "reference", "micropython", "all"))
    q.set_defaults(func=cmd_audit)
    q = hs.add_parser("provision", help="provision a hierarchy for separate machines")
    spec_args(q)
    q.add_argument("--root-broker", required=True, metavar="HOST:PORT")
    q.add_argument("--site-brokers", required=True, metavar="HOST:PORT,...")
    q.set_defaults(func=cmd_provision)
    q = hs.add_parser("revoke", help="revoke a node at the root and at its site")
    q.add_argument("run_dir", type=Path)
    q.add_argument("node")
    q.set_defaults(func=cmd_revoke)
    for role in ("root", "edge"):
        q = hs.add_parser(role, help=f"serve the {role} coordinator of a provisioned hierarchy")
        q.add_argument("run_dir", type=Path, help="OUT/root" if role == "root" else "OUT/site-K")
        q.add_argument("--broker", help="MQTT broker HOST:PORT (default: the provisioned one)")
        q.set_defaults(func=cmd_serve, role=role)


def _spec(a: argparse.Namespace) -> Any:
    from microfed_host.hier import HierSpec

    return HierSpec(sites=a.sites, nodes_per_site=a.nodes_per_site, rounds=a.rounds,
                    edge_rule=a.edge_rule, edge_f=a.edge_f, root_rule=a.root_rule,
                    root_f=a.root_f, byzantine=a.byzantine_per_site, attack=a.attack,
                    allow_more_byzantine=a.allow_more_byzantine,
                    seed=a.seed, max_samples=a.max_samples,
                    deadline_s=a.deadline)


def _error(e: object) -> int:
    print(f"microfed hier: error: {e}", file=sys.stderr)
    return EXIT_USAGE


def cmd_run(a: argparse.Namespace) -> int:
    import time

    from microfed_host import hier

    out = Path(a.out) if a.out else Path("runs") / f"hier-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        summary = hier.run(_spec(a), out, force=a.force, timeout=a.timeout,
                           kill_edge_at=a.kill_edge_at)
    except hier.MeshError as e:
        return _error(e)
    except KeyboardInterrupt:
        print("microfed hier: interrupted; every process was stopped", file=sys.stderr)
        return 130
    print(f"  summary: {out / 'summary.json'}")
    print(f"  verify offline: microfed hier audit {out}")
    same = set(summary["edge_final_digests"].values()) == {summary["final_digest"]}
    return 0 if same else 1


def audit_run(run_dir: Path, engine: str = "fast") -> dict[str, Any]:
    """Recompute every round of both tiers from the run's recorded inputs with `microfed
    aggregate` (requests written to RUN_DIR/audit/round-NNN/), chain the root's aggregates
    onto the initial model, and compare with every digest the run recorded. Returns the
    report (also RUN_DIR/audit/audit.json); "ok" is true when everything agrees."""
    from microfed import model, q16
    from microfed_host import hier
    from microfed_tools.cmd_aggregate import aggregate

    plan = hier.audit_plan(run_dir)
    adir = Path(run_dir) / "audit"
    params = plan["init"]
    problems: list[str] = []
    rounds = []

    def check(what: str, got: str, want: object) -> None:
        if got != want:
            problems.append(f"{what}: recomputed {got}, recorded {want}")

    for rd in plan["rounds"]:
        r = rd["round"]
        rdir = adir / f"round-{r:03d}"
        rdir.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"round": r, "sites": {}}
        for s in rd["sites"]:
            (rdir / f"{s['site']}.json").write_text(json.dumps(s["request"]) + "\n")
            got = aggregate(s["request"], engine)["digest"]
            check(f"round {r} {s['site']} aggregate", got, s["agg_digest"])
            if s["sent_digest"] is None:  # the root closed the round without this edge
                row.setdefault("left_out", []).append(s["edge"])
            else:
                check(f"round {r} {s['edge']}'s update at the root", got, s["sent_digest"])
            row["sites"][s["site"]] = got
        (rdir / "root.json").write_text(json.dumps(rd["root"]["request"]) + "\n")
        res = aggregate(rd["root"]["request"], engine)
        check(f"round {r} root aggregate", res["digest"], rd["root"]["agg_digest"])
        params = [q16.sat(p + d) for p, d in zip(params, res["vector"], strict=True)]
        row["root"] = res["digest"]
        row["model_digest"] = model.params_digest(params).hex()
        check(f"round {r} model", row["model_digest"], rd["root"]["model_digest"])
        rounds.append(row)
    final = model.params_digest(params).hex()
    check("final model", final, plan["final_digest"])
    report = {"ok": not problems, "engine": engine, "rounds": rounds, "final_digest": final,
              "recorded_final_digest": plan["final_digest"], "problems": problems}
    adir.mkdir(parents=True, exist_ok=True)
    (adir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def cmd_audit(a: argparse.Namespace) -> int:
    from microfed.aggregate import AggregationError
    from microfed.audit import InputError
    from microfed_host.hier import MeshError
    from microfed_tools.cmd_aggregate import Mismatch, UsageError

    try:
        rep = audit_run(a.run_dir, a.engine)
    except (OSError, ValueError, KeyError, MeshError, InputError, AggregationError, UsageError,
            Mismatch) as e:
        return _error(e)
    for row in rep["rounds"]:
        sites = ", ".join(f"{k} {v[:12]}" for k, v in row["sites"].items())
        print(f"round {row['round']}: {sites}; root {row['root'][:12]}; "
              f"model {row['model_digest'][:16]}")
    print(f"final model digest {rep['final_digest']} (recorded "
          f"{rep['recorded_final_digest']}): " + ("agree" if rep["ok"] else "DISAGREE"))
    for p in rep["problems"]:
        print(f"  {p}", file=sys.stderr)
    print(f"  requests and report: {Path(a.run_dir) / 'audit'}")
    return 0 if rep["ok"] else EXIT_MISMATCH


def cmd_provision(a: argparse.Namespace) -> int:
    from microfed_host import hier
    from microfed_host.broker import BrokerError, parse_address

    try:
        root = parse_address(a.root_broker)
        sites = [parse_address(x) for x in a.site_brokers.split(",") if x.strip()]
        if len(sites) != a.sites:
            raise hier.MeshError(f"--site-brokers names {len(sites)} brokers for {a.sites} sites")
        out = Path(a.out or "hier")
        hier.prepare(_spec(a), out, root, sites, a.force)
    except (hier.MeshError, BrokerError) as e:
        return _error(e)
    print(f"provisioned {out}: root/ for the root machine, site-K/ for site K's edge machine "
          "(docs/hierarchy.md, \"Deploying\")")
    return 0


def cmd_revoke(a: argparse.Namespace) -> int:
    from microfed_host import hier

    try:
        version = hier.revoke(a.run_dir, a.node)
    except (hier.MeshError, OSError, ValueError, KeyError) as e:
        return _error(e)
    print(f"{a.node} revoked: registry v{version}; a running root adopts it within a second and "
          "its edge and nodes get it over the bridge; send the site's mosquitto a SIGHUP (its "
          "passwd and acl no longer list the node)")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from microfed_host import coordinator as coordmod
    from microfed_host.broker import BrokerError, parse_address
    from microfed_host.edge import EdgeCoordinator
    from microfed_host.mqtt import MQTTError
    from microfed_host.provision import MeshDir, ProvisionError
    from microfed_tools.cmd_coordinator import _broker

    try:
        cfg = coordmod.load_config(a.run_dir)
        md = MeshDir(Path(cfg.mesh_dir))
        host, port = parse_address(_broker(a, md.read_mesh(), md.mesh_file))
        return coordmod.serve(a.run_dir, host, port,
                              role=EdgeCoordinator if a.role == "edge" else None)
    except (coordmod.CoordinatorError, ProvisionError, BrokerError, MQTTError, KeyError) as e:
        return _error(e)
