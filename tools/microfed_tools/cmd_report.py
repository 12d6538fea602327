"""`microfed report RUN_DIR | RUN_DIR/coordinator.sqlite [--out DIR] [--json]`: the tables and
plots of a past or running mesh run, regenerated from its coordinator store: the same
summary.json, rounds.csv, accuracy.png and reputation.png, and the same table, that
`microfed mesh run` writes and prints when it ends.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from microfed_host import report
from microfed_host.scenario import MeshError


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    try:
        summary = report.report_run(Path(args.run), out)
    except (MeshError, ValueError, OSError) as e:
        print(f"microfed report: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    dest = out or (Path(args.run).parent if Path(args.run).is_file() else Path(args.run))
    print(report.table(summary))
    print()
    print(f"  summary: {dest / 'summary.json'}")
    print(f"  rounds:  {dest / 'rounds.csv'}")
    for p in summary["plots"]:
        print(f"  plot:    {p}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("report", help="regenerate a mesh run's tables and plots from its store",
                       description=__doc__)
    p.add_argument("run", help="a run directory (microfed mesh run --out), or its coordinator.sqlite")
    p.add_argument("--out", default=None,
                   help="write the files here instead of into the run directory")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.set_defaults(func=run)
