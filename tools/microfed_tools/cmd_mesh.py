"""`microfed mesh`: run a whole mesh under attack, or the results sweep.

    microfed mesh run   [--scenario FILE] [--honest N] [--byzantine K] [--attack NAME]
                        [--rule RULE] [--f F] [--allow-more-byzantine]
                        [--rounds R] [--mode coordinated|gossip]
                        [--split iid|dirichlet] [--alpha A] [--seed S] [--out DIR]
                        [--crosscheck always|sampled:N|off] [--transport mqtt|inproc]
                        [--boards unix32:8,mps2-an385:2] [--unix32-heap 512k] [--m3-heap 72k]
                        [--broker auto|mosquitto|amqtt|HOST:PORT]
                        [--privacy none|dp|secagg|secagg+dp]
                        [--dp-epsilon E | --dp-noise-multiplier Z]
                        [--dp-delta D] [--clip-norm C] [--dp-noise urandom|seeded] [--clip-l2 RAW]
    microfed mesh sweep [--rounds 30] [--jobs 2] [--out DIR] [--md docs/results.md]
    microfed mesh study [--splits iid,dir0.5,dir0.1] [--pres none,nnm] [--seeds 1,2,3,4,5] ...
    microfed mesh dp-sweep [--rules fedavg,krum] [--epsilons 0,16,64,256,1024] [--seeds 1,2,3]

`run` without arguments runs scenarios/default.toml (10 honest MicroPython nodes + 3
Byzantine sign-flip attackers, Krum f = 3) over a real MQTT broker and ends with a table and
the plots' paths. Flags override the scenario file. --boards (scenario key `boards`) runs the
honest nodes on a mix of board kinds; their firmware is built first (`microfed firmware
build`, cached). unix32 nodes run the frozen 32-bit build; mps2-an385 nodes are one QEMU
each, their MQTT over the serial line and microfed bridge (docs/results.md, "Board mixes").

Byzantine budget: a run is refused when more nodes poison their updates than f, the number
the rule is configured to tolerate (trimmed_mean: the trim count; median also needs an honest
majority); --byzantine K without --f sets f = K. Wire attacks (replay, forged, unregistered)
send honest updates and do not count. --allow-more-byzantine runs past the guarantee.
Privacy (docs/privacy.md): --privacy dp makes every honest node clip its delta to L2 norm
--clip-norm (model units) and add exact discrete Gaussian noise before signing (local DP);
give a target --dp-epsilon for the whole run at --dp-delta (the noise multiplier is
calibrated) or the --dp-noise-multiplier itself. The coordinator reports epsilon spent.
The robust rules and reputation then run on the noised updates.

--privacy secagg runs secure aggregation (docs/privacy.md): the coordinator learns only the
sum of the nodes' clipped, weighted updates; it needs --rule fedavg, coordinated mode and no
attackers, because the robust rules and reputation need the individual updates.
--privacy secagg+dp is both (distributed DP): every node clips to --clip-norm and adds its
1/n share of the noise before masking, so the sum carries the variance --dp-epsilon or
--dp-noise-multiplier asks for; --clip-l2 does not apply (one clip).

Every bad flag or scenario value ends the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed_host.adversary import ATTACKS
from microfed_host.coordinator import PRES, PRIVACY, RULES
from microfed_tools import observe


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def cmd_run(args: argparse.Namespace) -> int:
    from microfed_host import mesh

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sc = mesh.load_scenario(Path(args.scenario) if args.scenario else mesh.DEFAULT_SCENARIO)
        mesh.apply_overrides(sc, args)
        sc.check()  # bad flags fail before any firmware is built
        launchers = board_launchers(sc) if args.transport == "mqtt" else None
        out = Path(args.out) if args.out else Path("runs") / f"{sc.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if observe.wanted(args) and sc.chaos is not None:
            raise mesh.MeshError("--metrics, --dashboard and --alerts follow one run's store; "
                                 "a [chaos] scenario runs two")
        if "mqtt" in (args.alerts or []) and args.transport != "mqtt":
            raise mesh.MeshError("--alerts mqtt needs the mqtt transport (inproc has no broker)")
        try:
            obs = observe.Observers.start(args, out / "coordinator.sqlite",
                                          say=lambda m: print("  " + m, flush=True))
        except observe.ObserveError as e:
            raise mesh.MeshError(str(e)) from None
        ready = done = None
        if obs.mqtt_sink is not None:
            def ready(host: str, port: int, _mesh: str) -> None:
                obs.broker_ready(host, port, out / "mesh")
            done = obs.poll  # the last alerts, while the run's broker is still up
        try:
            summary = mesh.run(sc, out, transport=args.transport, broker=args.broker,
                               force=args.force, kill_coordinator_at=args.kill_coordinator_at,
                               timeout=args.timeout, launchers=launchers, on_ready=ready,
                               on_done=done)
        finally:
            line = obs.stop()
            if line:
                print("  " + line)
    except KeyboardInterrupt:
        print("microfed mesh: interrupted; every mesh process was stopped", file=sys.stderr)
        return 130
    except mesh.MeshError as e:
        print(f"microfed mesh: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: one line, and the children are already gone
        print(f"microfed mesh: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print()
    print(mesh.table(summary))
    print()
    if "chaos_result" in summary:  # a [chaos] scenario: two runs under out/
        print(f"  chaos:   {out / 'chaos.json'} (reference run in {out / 'reference'})")
        out = Path(summary["chaos_result"]["run"])
    print(f"  summary: {out / 'summary.json'}")
    print(f"  rounds:  {out / 'rounds.csv'}")
    print(f"  store:   {out / 'coordinator.sqlite'}")
    for p in summary["plots"]:
        print(f"  plot:    {p}")
    bad = summary["honest_banned"]
    if bad:
        print(f"microfed mesh: honest node(s) banned: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def board_launchers(sc: Any) -> dict[str, Any]:
    """A node launcher per board kind in `sc.boards` other than unix (which the runner starts
    by itself): builds (or reuses) the firmware images here, in the tools layer, and hands the
    runner what it needs (host code never imports microfed_tools)."""
    from microfed_host import nodeproc
    from microfed_host.mesh import MeshError
    from microfed_tools import firmware

    out: dict[str, Any] = {}
    for kind, _n in sc.board_counts():
        if kind == "unix":
            continue
        try:
            heap = (sc.m3_heap or None) if kind == "mps2-an385" else None
            image = firmware.build(kind, say=lambda m: print(m, file=sys.stderr), heap=heap)
            if kind == "mps2-an385":
                from microfed_tools import emunode

                # QEMU + RAM disk + serial bridge
                out[kind] = emunode.launcher(kind, image=str(image) if heap else None)
            else:
                out[kind] = nodeproc.unix32_launcher(image, sc.unix32_heap)
        except (firmware.FirmwareError, nodeproc.NodeError) as e:
            raise MeshError(f"board kind {kind}: {e}") from None
    return out


def _sweep_command(name: str, main: Callable[[argparse.Namespace], None],
                   args: argparse.Namespace) -> int:
    from microfed_host import mesh

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main(args)
    except KeyboardInterrupt:
        print(f"microfed mesh {name}: interrupted", file=sys.stderr)
        return 130
    except mesh.MeshError as e:
        print(f"microfed mesh {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"microfed mesh {name}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 2
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from microfed_host.sweep import main_sweep

    return _sweep_command("sweep", main_sweep, args)


def cmd_study(args: argparse.Namespace) -> int:
    from microfed_host.study import main_study

    return _sweep_command("study", main_study, args)


def cmd_dp_sweep(args: argparse.Namespace) -> int:
    from microfed_host.sweep import main_dp_sweep

    return _sweep_command("dp-sweep", main_dp_sweep, args)


def register(subparsers: Any) -> None:
    from microfed_host.broker import add_broker_arguments

    p = subparsers.add_parser("mesh", help="run a simulated mesh under attack (the main job)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mesh_command", metavar="ACTION")
    sub.required = True

    r = sub.add_parser("run", help="run one scenario end to end and report")
    r.add_argument("--scenario", help="scenario TOML (default: scenarios/default.toml)")
    r.add_argument("--honest", type=int, help="honest MicroPython nodes")
    r.add_argument("--byzantine", type=int,
                   help="compromised nodes (run by the adversary); without --f, f = this number")
    r.add_argument("--attack", help="Byzantine behaviour: " + ", ".join(ATTACKS))
    r.add_argument("--tau", type=float, help="IPM strength, 0..1e6 (default 10)")
    r.add_argument("--sigma", type=float, help="Gaussian noise sigma in model units, 0..1e6 "
                   "(default 1)")
    r.add_argument("--scale", type=float, help="scaling attack factor, -1e6..1e6 (default 10)")
    r.add_argument("--rule", choices=RULES, help="aggregation rule")
    r.add_argument("--f", type=int,
                   help="tolerated Byzantine count for the rule (default: --byzantine if given, "
                   "else the scenario's); must be >= the model-poisoning Byzantine nodes "
                   "(trimmed_mean: the trim count; median also needs an honest majority)")
    r.add_argument("--allow-more-byzantine", dest="allow_more_byzantine", action="store_true",
                   help="run with more Byzantine nodes than f (past the rule's guarantee) on "
                   "purpose instead of refusing")
    r.add_argument("--pre", choices=PRES, help="pre-aggregation step before the rule "
                   "(coordinated mode): nnm (nearest-neighbour mixing, with f) or bucketing "
                   "(docs/determinism.md 4.7-4.8)")
    r.add_argument("--bucket", type=int, help="--pre bucketing: updates per bucket (default 2)")
    r.add_argument("--model", choices=("softmax", "mlp"),
                   help="the model: softmax (650 parameters, default) or mlp (64-32-10, 2 410 "
                   "parameters; coordinated mode)")
    r.add_argument("--rounds", type=int, help="training rounds")
    r.add_argument("--mode", choices=("coordinated", "gossip"))
    r.add_argument("--split", choices=("iid", "dirichlet"))
    r.add_argument("--alpha", type=float, help="Dirichlet concentration, > 0 (default 0.5)")
    r.add_argument("--seed", type=int, help="seed of data split, init, training and attacks")
    r.add_argument("--max-samples", dest="max_samples", type=int,
                   help="cap every node's shard at this many samples (0: no cap)")
    r.add_argument("--crosscheck", help="reference cross-check: always | sampled:N | off")
    r.add_argument("--deadline", type=float, help="round deadline in seconds, at most 86400")
    r.add_argument("--boards", help="board kind per honest node, in node order: KIND[:COUNT],... "
                   "with KIND one of unix (default), unix32, mps2-an385; one kind without a "
                   "count takes the rest (e.g. unix32:8,mps2-an385:2 or unix32); mqtt only")
    r.add_argument("--unix32-heap", dest="unix32_heap",
                   help="-X heapsize= of the unix32 nodes (default 512k)")
    r.add_argument("--m3-heap", dest="m3_heap",
                   help="MicroPython heap of the mps2-an385 nodes' firmware, built for it "
                   "(e.g. 72k; default: the board profile's build, 138 000 B)")
    r.add_argument("--transport", choices=("mqtt", "inproc"), default="mqtt",
                   help="mqtt: broker + MicroPython processes (default); inproc: one CPython process")
    r.add_argument("--clip-l2", dest="clip_l2", type=int, metavar="RAW",
                   help="secagg: each node's L2 clip bound, raw Q16.16 (default 1048576 = 16.0); "
                   "secagg+dp clips with --clip-norm instead")
    r.add_argument("--out", help="run directory (default runs/<scenario>-<time>)")
    observe.add_arguments(r)
    r.add_argument("--force", action="store_true", help="replace a non-empty --out")
    r.add_argument("--timeout", type=float, default=1800.0,
                   help="give up after this many seconds (default 1800, at most 7 days)")
    r.add_argument("--kill-coordinator-at", dest="kill_coordinator_at", type=int, default=0,
                   metavar="ROUND", help="demonstration: SIGKILL the coordinator mid-round ROUND "
                   "and restart it (it resumes from SQLite)")
    r.add_argument("--privacy", help="privacy mode: " + " | ".join(PRIVACY) + " (default: the "
                   "scenario's, else none): dp = local differential privacy, secagg = secure "
                   "aggregation (needs --rule fedavg), secagg+dp = both: distributed DP; "
                   "docs/privacy.md")
    r.add_argument("--dp-epsilon", dest="dp_epsilon", type=float,
                   help="dp: target epsilon over the whole run (calibrates the noise)")
    r.add_argument("--dp-noise-multiplier", dest="dp_noise_multiplier", type=float,
                   help="dp: noise sigma = Z x clip norm, instead of a target epsilon")
    r.add_argument("--dp-delta", dest="dp_delta", type=float,
                   help="dp: delta of the reported (epsilon, delta) (default 1e-5)")
    r.add_argument("--clip-norm", dest="clip_norm", type=float,
                   help="dp, secagg+dp: L2 clip of every delta, in model units (default 1.0)")
    r.add_argument("--dp-noise", dest="dp_noise", choices=("urandom", "seeded"),
                   help="dp: noise from os.urandom (default) or seeded from (seed, round, node): "
                   "reproducible, no privacy against whoever knows the seed")
    add_broker_arguments(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="rules x attacks in-process; writes the results table")
    s.add_argument("--rounds", type=int, default=30)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--jobs", type=int, default=2, help="parallel runs (default 2)")
    s.add_argument("--out", default="runs/sweep", help="directory for the runs and results.json")
    s.add_argument("--md", default="docs/results.md", help="markdown report to write")
    s.add_argument("--rules", default=",".join(RULES))
    s.add_argument("--attacks", default="none,sign-flip,ipm,alie,gaussian,scaling,label-flip,sleeper")
    s.add_argument("--splits", default="iid,dirichlet")
    s.add_argument("--no-bans", dest="no_bans", action="store_true",
                   help="reputation never bans (ban_below = 0): measure the rules alone")
    s.add_argument("--render-only", dest="render_only", action="store_true",
                   help="rewrite the markdown from OUT/results.json without running")
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("study", help="rule x pre step x attack x split x Byzantine fraction "
                       "over seeds, with bootstrap intervals and detection rates (docs/results.md)")
    t.add_argument("--splits", default="iid,dir0.5,dir0.1", help="iid, dir0.5, dir0.1")
    t.add_argument("--rules", default=",".join(RULES))
    t.add_argument("--pres", default="none,nnm", help="pre steps: none, nnm, bucketing")
    t.add_argument("--attacks", default="none,alie,fang-krum,min-max,min-sum,adaptive,mimic")
    t.add_argument("--fractions", default="0.1,0.2,0.3",
                   help="Byzantine fractions b / n (f = b)")
    t.add_argument("--models", default="softmax", help="softmax and/or mlp")
    t.add_argument("--seeds", default="1,2,3,4,5")
    t.add_argument("--rounds", type=int, default=30)
    t.add_argument("--jobs", type=int, default=2, help="parallel runs (default 2)")
    t.add_argument("--out", default="runs/study", help="directory for the runs, results.json "
                   "and plots")
    t.add_argument("--md", default="docs/results.md", help="markdown report to write ('' none)")
    t.add_argument("--tag", default="study", help="its block in --md: between <!-- TAG:begin "
                   "--> and <!-- TAG:end --> (default study)")
    t.add_argument("--render-only", dest="render_only", action="store_true",
                   help="rewrite the markdown and plots from OUT/results.json without running")
    t.set_defaults(func=cmd_study)

    d = sub.add_parser("dp-sweep", help="accuracy vs epsilon (local DP) in-process; writes "
                       "its table into docs/results.md")
    d.add_argument("--rules", default="fedavg,krum", help="fedavg and/or krum")
    d.add_argument("--epsilons", default="0,16,64,256,1024",
                   help="target epsilons over the whole run, at delta 1e-5 (0: no DP)")
    d.add_argument("--seeds", default="1,2,3")
    d.add_argument("--rounds", type=int, default=30)
    d.add_argument("--jobs", type=int, default=2, help="parallel runs (default 2)")
    d.add_argument("--out", default="runs/dp-sweep", help="directory for the runs")
    d.add_argument("--json", default="docs/results/dp-sweep.json",
                   help="where the raw numbers go (read back by --render-only)")
    d.add_argument("--md", default="docs/results.md", help="markdown report to write")
    d.add_argument("--render-only", dest="render_only", action="store_true",
                   help="rewrite the markdown from --json without running")
    d.set_defaults(func=cmd_dp_sweep)
