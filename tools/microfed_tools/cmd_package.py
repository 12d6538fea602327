"""`microfed export` and `microfed verify-package`: a run's global model as a signed package
(microfed.package, docs/package.md), and the check a holder of the coordinator's public key
runs on one.

    microfed export RUN_DIR [--round N] [--out model.mfpk]
    microfed verify-package model.mfpk (--mesh MESH_DIR | --key coordinator.pub) [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from microfed import package
from microfed_host import export, keys

EXIT_REJECTED = 1
EXIT_INPUT = 2


def _summary(pkg: package.Package) -> dict[str, Any]:
    return {"mesh_id": bytes(pkg.mesh_id).hex(), "round": pkg.round, "timestamp": pkg.timestamp,
            "model": pkg.model, "n_features": pkg.n_features, "n_classes": pkg.n_classes,
            "n_params": len(pkg.params), "rule": pkg.rule, "p1": pkg.p1, "p2": pkg.p2,
            "params_digest": bytes(pkg.params_digest).hex(),
            "config_digest": bytes(pkg.config_digest).hex(), "signer": bytes(pkg.signer).hex()}


def run_export(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    try:
        data, pkg = export.package_from_run(run_dir, args.round)
    except (export.ExportError, package.PackageError) as e:
        print(f"microfed export: {e}", file=sys.stderr)
        return EXIT_INPUT
    out = Path(args.out) if args.out else run_dir / f"model-round{pkg.round}.mfpk"
    out.write_bytes(data)
    print(f"microfed export: {out} ({len(data)} bytes): {pkg.model} "
          f"{pkg.n_features}x{pkg.n_classes}, the model after round {pkg.round} "
          f"({pkg.rule or 'initial model'}), params digest {bytes(pkg.params_digest).hex()[:16]}..., "
          f"signed by the coordinator {bytes(pkg.signer).hex()[:16]}...")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        data = Path(args.package).read_bytes()
        if args.mesh:
            pub, mesh_id = export.coordinator_key(Path(args.mesh))
        else:
            pub, mesh_id = keys.read_public_key(Path(args.key)), None
    except (OSError, export.ExportError, keys.KeyFileError) as e:
        print(f"microfed verify-package: {e}", file=sys.stderr)
        return EXIT_INPUT
    try:
        pkg = export.check_package(data, pub, mesh_id)
    except package.PackageError as e:
        if args.json:
            print(json.dumps({"ok": False, "reason": e.reason, "message": e.message}))
        print(f"microfed verify-package: rejected ({e.reason}): {e.message}", file=sys.stderr)
        return EXIT_REJECTED
    if args.json:
        print(json.dumps({"ok": True, **_summary(pkg)}, indent=2))
    else:
        print(f"microfed verify-package: OK: {pkg.model} {pkg.n_features}x{pkg.n_classes}, "
              f"the model after round {pkg.round} ({pkg.rule or 'initial model'}), "
              f"params digest {bytes(pkg.params_digest).hex()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="write a run's global model as a signed package",
                       description=__doc__)
    p.add_argument("run_dir", help="a run directory (microfed mesh run --out)")
    p.add_argument("--round", type=int, default=None,
                   help="the round the model must come from (the store keeps the latest)")
    p.add_argument("--out", default=None,
                   help="package file (default: RUN_DIR/model-roundN.mfpk)")
    p.set_defaults(func=run_export)
    v = sub.add_parser("verify-package",
                       help="check a model package's signature, digest and structure",
                       description=__doc__)
    v.add_argument("package")
    who = v.add_mutually_exclusive_group(required=True)
    who.add_argument("--mesh", help="the mesh directory (its coordinator.pub and mesh id)")
    who.add_argument("--key", help="the coordinator's public key file (coordinator.pub)")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=run_verify)
