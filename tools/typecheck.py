"""Type-check firmware/ and shared/ against the MicroPython ESP32 stubs.

    python tools/typecheck.py              check what pyrightconfig.json includes
    python tools/typecheck.py FILE...      check these files with the same settings
    python tools/typecheck.py --install    only make sure the stubs are in typings/

The stubs replace CPython's typeshed (`typeshedPath: typings`), so a call that exists on
CPython but not on the device, such as `hashlib.sha512`, is an error here. The rules enabled
in pyrightconfig.json are the ones about what exists on the device (imports, attributes,
names); inference noise from untyped MicroPython-style code is left off.

Exit status: 0 clean, 1 type errors, 2 the check could not run (no pyright, stubs missing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pyrightconfig.json"
TYPINGS = ROOT / "typings"
STUBS = "micropython-esp32-stubs"
STAMP = TYPINGS / ".microfed-stubs"


def _stub_spec() -> str:
    # Same version as the dev environment has, so CI and laptops see the same device API.
    try:
        return f"{STUBS}=={metadata.version(STUBS)}"
    except metadata.PackageNotFoundError:
        return STUBS


def ensure_stubs() -> None:
    spec = _stub_spec()
    if STAMP.exists() and STAMP.read_text().strip() == spec and (TYPINGS / "stdlib").is_dir():
        return
    print(f"typecheck: installing {spec} into {TYPINGS}", file=sys.stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade", "--no-input",
         "--target", str(TYPINGS), spec],
        capture_output=True, text=True,
    )
    if proc.returncode != 0 or not (TYPINGS / "stdlib").is_dir():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"typecheck: cannot install {spec} into {TYPINGS}: {last}")
    STAMP.write_text(spec + "\n")


def _pyright() -> str:
    local = Path(sys.executable).parent / "pyright"
    if local.exists():
        return str(local)
    found = shutil.which("pyright")
    if not found:
        raise SystemExit("typecheck: pyright not installed: pip install pyright")
    return found


def run_pyright(files: list[str]) -> tuple[int, list[str]]:
    """(error count, one line per diagnostic) for the configured project or the given files."""
    env = dict(os.environ, PYRIGHT_PYTHON_IGNORE_WARNINGS="1")
    proc = subprocess.run(
        [_pyright(), "--outputjson", "--project", str(CONFIG), *files],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )
    start = proc.stdout.find("{")
    try:
        report = json.loads(proc.stdout[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        report = None
    if report is None:
        detail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise SystemExit(f"typecheck: pyright failed (exit {proc.returncode}): {detail}")
    lines = []
    for d in report.get("generalDiagnostics", []):
        if d.get("severity") != "error":
            continue
        pos = d.get("range", {}).get("start", {})
        path = Path(d.get("file", "?"))
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        message = " ".join(d.get("message", "").split())
        rule = f" [{d['rule']}]" if d.get("rule") else ""
        lines.append(f"{shown}:{pos.get('line', 0) + 1}:{pos.get('character', 0) + 1}: "
                     f"error: {message}{rule}")
    return int(report.get("summary", {}).get("errorCount", len(lines))), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="check these files instead of the project")
    parser.add_argument("--install", action="store_true", help="only install the stubs")
    args = parser.parse_args(argv)
    try:
        ensure_stubs()
        if args.install:
            return 0
        errors, lines = run_pyright(args.files)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print(f"typecheck: {errors} error{'s' if errors != 1 else ''} "
          f"(pyright against {_stub_spec()})")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
