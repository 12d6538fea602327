"""Board profiles: the one place that knows what each board is and can do.

Every profile is a TOML file in the repository's `boards/` directory (or the directory named by
MICROFED_BOARDS_DIR). Tools and tests call `load_board(name)` / `list_boards()` instead of
hard-coding a chip, an offset or a heap size. Loading validates every field, so a typo in a
profile is a clear `BoardError` naming the file and the field, never a KeyError deep in a tool.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLASHERS: tuple[str, ...] = ("esptool", "uf2", "dfu", "nrfjprog", "none", "qemu")
FAMILIES: tuple[str, ...] = ("esp32", "rp2", "stm32", "nrf", "unix", "qemu")
NETWORKS: tuple[str, ...] = ("wifi", "none", "host")

# Chips esptool can talk to, mapped to the CHIP_NAME esptool reports after detection.
ESPTOOL_CHIP_NAMES: dict[str, str] = {
    "esp32": "ESP32",
    "esp32s2": "ESP32-S2",
    "esp32s3": "ESP32-S3",
    "esp32c2": "ESP32-C2",
    "esp32c3": "ESP32-C3",
    "esp32c6": "ESP32-C6",
    "esp32h2": "ESP32-H2",
}
# Where the MicroPython image starts: the ROM of these two looks for the bootloader at 0x1000.
_OFFSET_0X1000 = ("esp32", "esp32s2")

# A gossip round holds GOSSIP_PEERS updates of max_model_params 32-bit values at once; that
# working set must fit in half of the heap budget (the rest is code, buffers, MQTT, Ed25519).
GOSSIP_PEERS = 8
# Pure-Python Ed25519 (big-int field maths + portable SHA-512) needs roughly this much heap.
ED25519_MIN_HEAP = 32_000

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class BoardError(ValueError):
    """A board profile is missing, unknown or invalid."""


@dataclass(frozen=True)
class Capabilities:
    ed25519_on_device: bool
    gossip_aggregation: bool
    max_model_params: int
    hashlib_sha256: bool
    network: str
    filesystem: bool = True  # False: nothing can be written; code comes frozen in
    frozen_core: bool = False  # microfed (shared/ + firmware/) frozen into the firmware


@dataclass(frozen=True)
class Transfer:
    """Raw-REPL flow control: bytes per write and pause between writes."""

    chunk_size: int
    chunk_delay_ms: int


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    chip: str
    family: str
    flasher: str
    image: str
    image_url: str
    heap_bytes: int
    serial_baud: int
    micropython: str
    capabilities: Capabilities
    transfer: Transfer
    path: Path
    flash_offset: int | None = None
    flash_baud: int = 460800
    mpy_version: int | None = None
    mpy_arch: str | None = None
    notes: str = ""
    emulator: dict[str, Any] = field(default_factory=dict)
    # Statement that mounts the filesystem after every reset, for a filesystem the firmware
    # does not mount by itself (mps2-an385's RAM disk); "" = nothing to do.
    fs_mount: str = ""

    @property
    def esptool_chip(self) -> str | None:
        """esptool's CHIP_NAME for this board's chip, or None when esptool cannot flash it."""
        return ESPTOOL_CHIP_NAMES.get(self.chip)

    @property
    def micropython_version(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.micropython.split("."))


_TOP_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "description": str,
    "chip": str,
    "family": str,
    "flasher": str,
    "image": str,
    "image_url": str,
    "heap_bytes": int,
    "serial_baud": int,
    "micropython": str,
    "flash_offset": int,
    "flash_baud": int,
    "mpy_version": int,
    "mpy_arch": str,
    "notes": str,
    "capabilities": dict,
    "transfer": dict,
    "emulator": dict,
    "fs_mount": str,
}
_REQUIRED = (
    "name", "description", "chip", "family", "flasher", "image", "image_url",
    "heap_bytes", "serial_baud", "micropython", "capabilities", "transfer",
)
_CAP_KEYS: dict[str, type] = {
    "ed25519_on_device": bool,
    "gossip_aggregation": bool,
    "max_model_params": int,
    "hashlib_sha256": bool,
    "network": str,
    "filesystem": bool,
    "frozen_core": bool,
}
_CAP_REQUIRED = ("ed25519_on_device", "gossip_aggregation", "max_model_params",
                 "hashlib_sha256", "network")
_TRANSFER_KEYS: dict[str, type] = {"chunk_size": int, "chunk_delay_ms": int}


def boards_dir() -> Path:
    """The directory holding the profiles.

    MICROFED_BOARDS_DIR wins; then the repository this package lives in (editable install);
    then ./boards, for an installed package run from a checkout.
    """
    env = os.environ.get("MICROFED_BOARDS_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "boards"
    if repo.is_dir():
        return repo
    return Path.cwd() / "boards"


def _check_table(
    where: str, table: dict[str, Any], schema: dict[str, type | tuple[type, ...]],
    required: tuple[str, ...],
) -> None:
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise BoardError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(schema)}")
    for key in required:
        if key not in table:
            raise BoardError(f"{where}: missing field '{key}'")
    for key, value in table.items():
        want = schema[key]
        # bool is an int subclass: `heap_bytes = true` must not pass as 1.
        if (want is int and isinstance(value, bool)) or not isinstance(value, want):
            names = want.__name__ if isinstance(want, type) else "/".join(t.__name__ for t in want)
            raise BoardError(f"{where}: field '{key}' must be {names}, got {value!r}")


def _parse(path: Path) -> Board:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise BoardError(f"{path}: cannot read board profile: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BoardError(f"{path}: not valid TOML: {exc}") from None
    where = str(path)
    _check_table(where, raw, _TOP_KEYS, _REQUIRED)
    caps = raw["capabilities"]
    _check_table(f"{where} [capabilities]", caps, _CAP_KEYS, _CAP_REQUIRED)
    transfer = raw["transfer"]
    _check_table(f"{where} [transfer]", transfer, _TRANSFER_KEYS, tuple(_TRANSFER_KEYS))

    name = raw["name"]
    if name != path.stem:
        raise BoardError(f"{where}: name '{name}' must equal the file name '{path.stem}'")
    if not _NAME_RE.match(name):
        raise BoardError(f"{where}: name '{name}' must be lower-case letters, digits, - or _")
    if raw["family"] not in FAMILIES:
        raise BoardError(f"{where}: family '{raw['family']}' is not one of {', '.join(FAMILIES)}")
    if raw["flasher"] not in FLASHERS:
        raise BoardError(
            f"{where}: flasher '{raw['flasher']}' is not one of {', '.join(FLASHERS)}")
    if caps["network"] not in NETWORKS:
        raise BoardError(
            f"{where}: network '{caps['network']}' is not one of {', '.join(NETWORKS)}")
    if not re.match(r"^\d+(\.\d+){1,2}$", raw["micropython"]):
        raise BoardError(f"{where}: micropython '{raw['micropython']}' must look like 1.24 or 1.9.2")
    for key in ("heap_bytes", "flash_baud", "mpy_version"):
        if key in raw and raw[key] <= 0:
            raise BoardError(f"{where}: {key} must be positive, got {raw[key]}")
    if raw["serial_baud"] < 0:
        raise BoardError(f"{where}: serial_baud must be >= 0 (0: no serial port)")
    if caps["max_model_params"] <= 0:
        raise BoardError(f"{where}: max_model_params must be positive")
    if transfer["chunk_size"] <= 0 or transfer["chunk_delay_ms"] < 0:
        raise BoardError(f"{where}: transfer needs chunk_size > 0 and chunk_delay_ms >= 0")

    # Cross-field rules: a profile that claims more than the board can do is a bug.
    if raw["flasher"] == "esptool":
        chip = raw["chip"]
        if chip not in ESPTOOL_CHIP_NAMES:
            raise BoardError(f"{where}: esptool cannot flash chip '{chip}'; "
                             f"esptool chips: {', '.join(ESPTOOL_CHIP_NAMES)}")
        if "flash_offset" not in raw:
            raise BoardError(f"{where}: an esptool board needs flash_offset")
        want = 0x1000 if chip in _OFFSET_0X1000 else 0x0
        if raw["flash_offset"] != want:
            raise BoardError(f"{where}: MicroPython images for {chip} start at {want:#x}, "
                             f"not {raw['flash_offset']:#x}")
    elif "flash_offset" in raw:
        raise BoardError(f"{where}: flash_offset only applies to esptool boards")
    if raw.get("fs_mount") and not caps.get("filesystem", True):
        raise BoardError(f"{where}: fs_mount needs capabilities.filesystem = true")
    if raw["flasher"] == "qemu" and "emulator" not in raw:
        raise BoardError(f"{where}: a qemu board needs an [emulator] table")
    working_set = GOSSIP_PEERS * caps["max_model_params"] * 4
    if working_set > raw["heap_bytes"] // 2:
        raise BoardError(
            f"{where}: max_model_params {caps['max_model_params']} needs {working_set} bytes for "
            f"{GOSSIP_PEERS} peers, more than half of heap_bytes {raw['heap_bytes']}")
    if caps["ed25519_on_device"]:
        if not caps["hashlib_sha256"]:
            raise BoardError(f"{where}: ed25519_on_device needs hashlib_sha256 "
                             "(updates are signed over their SHA-256 digest)")
        if raw["heap_bytes"] < ED25519_MIN_HEAP:
            raise BoardError(f"{where}: ed25519_on_device needs heap_bytes >= {ED25519_MIN_HEAP}")

    return Board(
        name=name,
        description=raw["description"],
        chip=raw["chip"],
        family=raw["family"],
        flasher=raw["flasher"],
        image=raw["image"],
        image_url=raw["image_url"],
        heap_bytes=raw["heap_bytes"],
        serial_baud=raw["serial_baud"],
        micropython=raw["micropython"],
        capabilities=Capabilities(**caps),
        transfer=Transfer(**transfer),
        path=path,
        flash_offset=raw.get("flash_offset"),
        flash_baud=raw.get("flash_baud", 460800),
        mpy_version=raw.get("mpy_version"),
        mpy_arch=raw.get("mpy_arch"),
        notes=raw.get("notes", ""),
        emulator=raw.get("emulator", {}),
        fs_mount=raw.get("fs_mount", ""),
    )


def board_names(directory: Path | None = None) -> list[str]:
    d = directory or boards_dir()
    if not d.is_dir():
        raise BoardError(f"board profiles directory {d} does not exist "
                         "(set MICROFED_BOARDS_DIR to the repository's boards/)")
    return sorted(p.stem for p in d.glob("*.toml"))


def load_board(name: str, directory: Path | None = None) -> Board:
    """Load and validate one profile; an unknown name lists the known ones."""
    known = board_names(directory)
    if name not in known:
        raise BoardError(f"unknown board '{name}'; known boards: {', '.join(known)}")
    return _parse((directory or boards_dir()) / f"{name}.toml")


def list_boards(directory: Path | None = None) -> list[Board]:
    """Every profile, validated, sorted by name. One bad file fails the whole listing."""
    d = directory or boards_dir()
    return [_parse(d / f"{n}.toml") for n in board_names(d)]
