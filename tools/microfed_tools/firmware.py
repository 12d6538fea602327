"""MicroPython firmware with microfed frozen in, built from the vendored source.

    image = build("mps2-an385")        # path of the firmware (built only if inputs changed)

The source is `../shared/vendor/micropython-*.tar.xz` (or $MICROFED_MPY_TARBALL): read-only
input, extracted once into a cache outside the repository ($MICROFED_CACHE, else
$XDG_CACHE_HOME/microfed, else ~/.cache/microfed) and never edited. Everything microfed adds
comes in through make variables and one manifest, boards/firmware/manifest.py, which freezes
the portable core (shared/microfed) and the node application (firmware/) — the way ESP32 users
ship code. Each target builds into its own directory; a stamp of every input (the tarball's
name and size, the make command, the manifest and every frozen file) decides whether a
rebuild is needed.

Targets (the recipes measured in DESIGN.md §5):
    mps2-an385   QEMU mps2-an385, Cortex-M3 (ports/qemu BOARD=MPS2_AN385)  firmware.elf
    virt-rv32    QEMU virt, RISC-V RV32IMAC, the ESP32-C3's ISA (BOARD=VIRT_RV32)  firmware.elf
    unix32       the unix port built -m32: 31-bit small ints like an MCU, real sockets
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "boards" / "firmware" / "manifest.py"
BOARDS_FW = REPO / "boards" / "firmware"  # manifests and our own board directories
FROZEN_DIRS = (REPO / "shared" / "microfed", REPO / "firmware", BOARDS_FW)
# Frozen files outside those directories (the manifest names them one by one).
FROZEN_FILES = (REPO / "tools" / "microfed_tools" / "roundprog.py",)
BUILD_SUFFIXES = (".py", ".mk", ".c", ".h")  # files whose change means a rebuild

Say = Callable[[str], None]


class FirmwareError(RuntimeError):
    """A firmware build cannot run or failed: the message says why and what to install."""


@dataclass(frozen=True)
class Target:
    name: str
    port: str  # directory under micropython/ports
    image: str  # file name inside the build directory
    tools: tuple[tuple[str, str], ...]  # (command that must exist, Debian package(s))
    make_vars: tuple[str, ...]
    manifest: Path = MANIFEST  # what gets frozen (a board's own manifest includes the common one)

    def extra_vars(self) -> list[str]:
        """Make variables that depend on this machine (found, not assumed)."""
        if self.name != "virt-rv32":
            return []
        # The Makefile's default LIBS picks the 64-bit libgcc: ask the compiler for the
        # rv32imac/ilp32 one.
        try:
            out = subprocess.run(["riscv64-unknown-elf-gcc", "-march=rv32imac", "-mabi=ilp32",
                                  "-print-libgcc-file-name"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            raise FirmwareError(f"cannot locate the rv32 libgcc: {e}") from None
        return [f"LIBS={out}"]


TARGETS: dict[str, Target] = {
    "mps2-an385": Target(
        "mps2-an385", "qemu", "firmware.elf",
        (("arm-none-eabi-gcc", "gcc-arm-none-eabi libnewlib-arm-none-eabi"),),
        # Our board directory: upstream MPS2_AN385 + littlefs for the RAM disk that plays its
        # flash (boards/firmware/mps2-an385/ramdisk.py, frozen by its manifest.py).
        (f"BOARD_DIR={BOARDS_FW / 'mps2-an385'}",),
        BOARDS_FW / "mps2-an385" / "manifest.py"),
    "virt-rv32": Target(
        "virt-rv32", "qemu", "firmware.elf",
        (("riscv64-unknown-elf-gcc", "gcc-riscv64-unknown-elf picolibc-riscv64-unknown-elf"),),
        ("BOARD=VIRT_RV32",)),
    "unix32": Target(
        "unix32", "unix", "micropython",
        (("gcc", "gcc-multilib"),),
        ("CFLAGS_EXTRA=-m32", "LDFLAGS_EXTRA=-m32", "MICROPY_PY_FFI=0", "MICROPY_PY_BTREE=0",
         "MICROPY_PY_SSL=0")),
}


def cache_dir() -> Path:
    env = os.environ.get("MICROFED_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "microfed"


def find_tarball() -> Path:
    env = os.environ.get("MICROFED_MPY_TARBALL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise FirmwareError(f"MICROFED_MPY_TARBALL={env} is not a file")
        return p
    vendor = REPO.parent / "shared" / "vendor"
    found = sorted(vendor.glob("micropython-*.tar.xz"))
    if not found:
        raise FirmwareError(f"no MicroPython source tarball in {vendor} (micropython-*.tar.xz); "
                            "set MICROFED_MPY_TARBALL to one")
    return found[-1]


def missing_tools(target: Target) -> str | None:
    """Why `target` cannot be built here (naming the Debian packages), or None."""
    need = [(cmd, pkg) for cmd, pkg in (("make", "make"), *target.tools) if not shutil.which(cmd)]
    if target.name == "unix32" and not need and not _m32_works():
        need = [("gcc -m32", "gcc-multilib")]
    if not need:
        return None
    pkgs = " ".join(dict.fromkeys(pkg for _c, pkg in need))
    return (f"cannot build {target.name}: {', '.join(c for c, _p in need)} not found: "
            f"apt-get install -y {pkgs}")


def _m32_works() -> bool:
    return Path("/usr/lib/gcc/x86_64-linux-gnu").exists() and any(
        Path("/usr/lib/gcc/x86_64-linux-gnu").glob("*/32/libgcc.a"))


def frozen_files() -> list[Path]:
    """Every file a build may freeze or compile (manifests, board directories): a change
    rebuilds."""
    files = [MANIFEST, *FROZEN_FILES]
    for d in FROZEN_DIRS:
        files += sorted(p for p in d.rglob("*") if p.suffix in BUILD_SUFFIXES
                        and p.is_file() and "__pycache__" not in p.parts)
    return list(dict.fromkeys(files))


def _stamp(target: Target, tarball: Path, make_cmd: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([tarball.name, tarball.stat().st_size, make_cmd]).encode())
    for p in frozen_files():
        name = p.relative_to(REPO) if p.is_relative_to(REPO) else p
        h.update(str(name).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _source(tarball: Path, say: Say) -> Path:
    """The extracted tree (extracted once per tarball; the tarball itself is never written)."""
    root = cache_dir() / ("src-" + tarball.name.removesuffix(".tar.xz"))
    top = root / "micropython"
    done = root / ".extracted"
    if done.is_file() and top.is_dir():
        return top
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    say(f"extracting {tarball.name} into {root}")
    with tarfile.open(tarball) as tf:
        tf.extractall(root, filter="data")
    if not top.is_dir():
        raise FirmwareError(f"{tarball} has no micropython/ directory at its top")
    done.write_text(tarball.name + "\n")
    return top


def _make(args: list[str], log: Path, say: Say, what: str) -> None:
    say(f"{what}: make {' '.join(args)}  (log: {log})")
    with open(log, "ab") as fh:
        fh.write(("\n$ make " + " ".join(args) + "\n").encode())
        fh.flush()
        rc = subprocess.call(["make", f"-j{os.cpu_count() or 2}", *args], stdout=fh,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise FirmwareError(f"{what} failed (make exit {rc}); last lines of {log}:\n"
                            + "\n".join(tail))


def build_dir(name: str, heap: int | None = None) -> Path:
    return cache_dir() / "build" / (name if heap is None else f"{name}-heap{heap}")


def build(name: str, force: bool = False, say: Say | None = None,
          heap: int | None = None) -> Path:
    """Build (or reuse) the firmware for target `name`; return the image's path. `heap`
    (bytes, QEMU targets only): a MicroPython heap of that size instead of the port's, in a
    build directory of its own — how a board with less RAM is measured."""
    emit = say or (lambda m: print(m, file=sys.stderr))
    target = TARGETS.get(name)
    if target is None:
        raise FirmwareError(f"unknown firmware target {name!r}; targets: {', '.join(TARGETS)}")
    why = missing_tools(target)
    if why:
        raise FirmwareError(why)
    heap_vars = []
    if heap is not None:
        if target.port != "qemu":
            raise FirmwareError(f"--heap applies to the QEMU targets; {name} sets its heap at "
                                "run time (-X heapsize=)")
        if not 16 * 1024 <= heap <= 4 * 1024 * 1024 or heap % 1024:
            raise FirmwareError(f"heap {heap} must be a multiple of 1024 in 16 KB .. 4 MB")
        heap_vars = [f"MICROPY_HEAP_SIZE={heap}"]
    tarball = find_tarball()
    out = build_dir(name, heap)
    image = out / target.image
    make_cmd = [*target.make_vars, *target.extra_vars(), *heap_vars,
                f"FROZEN_MANIFEST={target.manifest}"]
    stamp = _stamp(target, tarball, make_cmd)
    stamp_file = out / ".microfed-stamp"
    if not force and image.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return image
    top = _source(tarball, emit)
    # make rebuilds what a changed source needs, not what changed make variables need (a new
    # BOARD_DIR, heap or flag leaves stale objects): a different command starts from scratch.
    cmd_file = out / ".microfed-make"
    cmd_text = json.dumps(make_cmd)
    if out.exists() and (not cmd_file.is_file() or cmd_file.read_text() != cmd_text):
        emit(f"firmware {name}: make variables changed, building from scratch")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd_file.write_text(cmd_text)
    log = out / "build.log"
    log.write_text("")
    mpy_cross = top / "mpy-cross" / "build" / "mpy-cross"
    if not mpy_cross.is_file():
        _make(["-C", str(top / "mpy-cross")], log, emit, "mpy-cross")
    stamp_file.unlink(missing_ok=True)
    _make(["-C", str(top / "ports" / target.port), f"BUILD={out}", *make_cmd], log, emit,
          f"firmware {name}")
    if not image.is_file():
        raise FirmwareError(f"the build of {name} produced no {image}")
    stamp_file.write_text(stamp)
    emit(f"firmware {name}: {image} ({image.stat().st_size} bytes)")
    return image


IMAGE_PREFIX = "firmware:"


def built_target(board: object) -> str | None:
    """The firmware target a board profile's `image = "firmware:TARGET"` names, or None."""
    image = str(getattr(board, "image", "") or "")
    return image[len(IMAGE_PREFIX):] if image.startswith(IMAGE_PREFIX) else None


def image_path(board: object, say: Say | None = None) -> str:
    """The board's image file: built here (or reused from the cache) for firmware: images."""
    target = built_target(board)
    if target is None:
        return str(getattr(board, "image", "") or "")
    return str(build(target, say=say))
