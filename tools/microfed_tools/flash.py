"""Write a MicroPython image to an ESP32-family board with esptool's Python API.

Order matters: the chip is detected and compared with the board profile *before* anything is
erased, so a wrong `--board` (or the wrong board on the cable) never costs the user a flash
that was working. Then: optional flasher stub, faster baud, attach flash, erase, write at the
profile's offset (esptool checks the MD5 itself), an independent MD5 check of the written
region, hard reset.

Boards that are not flashed over a serial ROM bootloader get the exact command to use instead.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from microfed_tools.boards import Board, BoardError, list_boards, load_board

ESP_IMAGE_MAGIC = 0xE9
ROM_BAUD = 115200
MAX_IMAGE_BYTES = 16 * 1024 * 1024

# Exit codes: bad input is the user's to fix (2); a device or link failure is 1.
EXIT_INPUT = 2
EXIT_DEVICE = 1


class FlashError(Exception):
    def __init__(self, message: str, code: int = EXIT_DEVICE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class FlashResult:
    board: str
    chip: str
    offset: int
    size: int
    md5: str
    stub: bool


def how_to_flash(board: Board, image: str | None = None) -> str:
    """One line telling the user how this board is flashed when it is not esptool's job."""
    img = image or board.image
    if board.flasher == "uf2":
        return (f"board '{board.name}' is flashed by UF2 copy, not over serial: hold BOOTSEL "
                f"while plugging in USB, then copy {img} onto the RPI-RP2 drive")
    if board.flasher == "dfu":
        return (f"board '{board.name}' is flashed over USB DFU, not by microfed: set BOOT0 high, "
                f"reset, then run: dfu-util -a 0 -D {img}")
    if board.flasher == "nrfjprog":
        return (f"board '{board.name}' is flashed through its J-Link: copy {img} onto the JLINK "
                f"drive, or run: nrfjprog --program {img} --chiperase --reset")
    if board.flasher == "qemu":
        return (f"board '{board.name}' is emulated, nothing to flash: "
                "`microfed emulate microbit` boots its image in QEMU")
    if board.flasher == "none":
        return (f"board '{board.name}' runs MicroPython as a local process; nothing to flash")
    return f"board '{board.name}' uses flasher '{board.flasher}', which microfed flash does not drive"


def read_image(path: Path) -> bytes:
    """The image bytes, or a FlashError saying why this file cannot be an ESP image."""
    if not path.exists():
        raise FlashError(f"image {path} does not exist", EXIT_INPUT)
    if not path.is_file():
        raise FlashError(f"image {path} is not a file", EXIT_INPUT)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FlashError(f"cannot read image {path}: {exc.strerror}", EXIT_INPUT) from None
    if not data:
        raise FlashError(f"image {path} is empty", EXIT_INPUT)
    if len(data) > MAX_IMAGE_BYTES:
        raise FlashError(f"image {path} is {len(data)} bytes, larger than any ESP32 flash "
                         f"({MAX_IMAGE_BYTES})", EXIT_INPUT)
    if data[0] != ESP_IMAGE_MAGIC:
        raise FlashError(f"image {path} is not an ESP firmware image (first byte "
                         f"{data[0]:#04x}, expected {ESP_IMAGE_MAGIC:#04x}); "
                         "download the .bin for your board", EXIT_INPUT)
    return data


def check_image_chip(image: bytes, board: Board, path: Path) -> None:
    """Refuse an image built for another chip before the port is even opened.

    Every ESP32-family image carries the chip id in its extended header (bytes 12-13); without
    this check a wrong download would only be noticed by esptool after the erase.
    """
    from esptool.targets import CHIP_DEFS

    if len(image) < 24:
        raise FlashError(f"image {path} is too short ({len(image)} bytes) to be an ESP image",
                         EXIT_INPUT)
    (image_id,) = struct.unpack_from("<H", image, 12)
    want_id = CHIP_DEFS[board.chip].IMAGE_CHIP_ID
    if image_id != want_id:
        names = [c.CHIP_NAME for c in CHIP_DEFS.values() if c.IMAGE_CHIP_ID == image_id]
        built_for = names[0] if names else f"chip id {image_id}"
        raise FlashError(f"image {path} is built for {built_for}, but board '{board.name}' is "
                         f"{board.esptool_chip}; download {board.image}", EXIT_INPUT)


def _boards_for_chip(chip_name: str) -> list[str]:
    try:
        return [b.name for b in list_boards() if b.esptool_chip == chip_name]
    except BoardError:
        return []


def flash_board(
    port: str,
    board: Board | str,
    image_path: Path,
    *,
    baud: int | None = None,
    no_stub: bool = False,
    erase: bool = True,
    before: str = "default-reset",
    after: str = "hard-reset",
    connect_attempts: int = 7,
    say: Callable[[str], None] = print,
) -> FlashResult:
    """Detect, check, erase, write, verify, reset. Raises FlashError with a one-line reason."""
    try:
        prof = board if isinstance(board, Board) else load_board(board)
    except BoardError as exc:
        raise FlashError(str(exc), EXIT_INPUT) from None
    if prof.flasher != "esptool" or prof.flash_offset is None or prof.esptool_chip is None:
        raise FlashError(how_to_flash(prof, str(image_path)), EXIT_INPUT)
    image = read_image(image_path)
    offset = prof.flash_offset
    want_chip = prof.esptool_chip
    check_image_chip(image, prof, image_path)

    # Imported here so `microfed --help` and the other subcommands do not pay for esptool.
    import serial
    from esptool.cmds import (
        attach_flash,
        detect_chip,
        detect_flash_size,
        erase_flash,
        erase_region,
        reset_chip,
        run_stub,
        write_flash,
    )
    from esptool.util import FatalError, flash_size_bytes

    say(f"microfed flash: {image_path} ({len(image)} bytes) -> {prof.name} "
        f"({want_chip}) at {offset:#x} via {port}")
    try:
        esp = detect_chip(port, ROM_BAUD, before, connect_attempts=connect_attempts)
    except (FatalError, serial.SerialException, OSError) as exc:
        raise FlashError(f"no ESP bootloader answered on {port}: {_one_line(exc)}") from None

    try:
        found = esp.CHIP_NAME
        if found != want_chip:
            hint = _boards_for_chip(found)
            suggestion = f"; use --board {' or '.join(hint)}" if hint else ""
            raise FlashError(
                f"chip mismatch: board '{prof.name}' is {want_chip} but the chip on {port} is "
                f"{found}; nothing was erased or written{suggestion}", EXIT_INPUT)
        say(f"microfed flash: chip {found} matches board '{prof.name}'")
        if not no_stub:
            esp = run_stub(esp)
        rate = baud if baud is not None else prof.flash_baud
        if rate != ROM_BAUD:
            esp.change_baud(rate)
        attach_flash(esp)
        if erase:
            if esp.IS_STUB:
                erase_flash(esp)
            else:
                # The ROM has no chip erase; FLASH_BEGIN over the whole chip does the same.
                size = flash_size_bytes(detect_flash_size(esp) or "4MB")
                erase_region(esp, 0, size)
        write_flash(esp, [(offset, image)], flash_size="keep")
        # esptool already compared MD5s; check again ourselves so "verified" never depends
        # on an esptool default (it skips the check in secure download mode).
        padded = image + b"\xff" * (-len(image) % 4)
        expect = hashlib.md5(padded).hexdigest()
        got = esp.flash_md5sum(offset, len(padded))
        if got != expect:
            raise FlashError(f"verify failed: flash MD5 {got} != image MD5 {expect}")
        say(f"microfed flash: verified {len(image)} bytes at {offset:#x} (md5 {expect})")
        reset_chip(esp, after)
        return FlashResult(prof.name, found, offset, len(image), expect, esp.IS_STUB)
    except FatalError as exc:
        raise FlashError(f"esptool failed: {_one_line(exc)}") from None
    except (serial.SerialException, OSError) as exc:
        raise FlashError(f"serial link to {port} failed: {_one_line(exc)}") from None
    finally:
        try:
            esp._port.close()
        except Exception:  # closing a port that already vanished is not an error to report
            pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
