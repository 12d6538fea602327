"""`microfed flash`: write a MicroPython image to a board (esptool boards; others get the how-to)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from microfed_tools.flash import FlashError, flash_board


def run(args: argparse.Namespace) -> int:
    try:
        result = flash_board(
            args.port,
            args.board,
            Path(args.image),
            baud=args.baud,
            no_stub=args.no_stub,
            erase=args.erase,
            before=args.before,
            after=args.after,
        )
    except FlashError as exc:
        print(f"microfed flash: {exc}", file=sys.stderr)
        return exc.code
    print(f"microfed flash: done: {result.size} bytes on {result.chip} at {result.offset:#x}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "flash",
        help="flash a MicroPython image (detects the chip, refuses a mismatch)",
        description=__doc__,
    )
    p.add_argument("image", help="MicroPython image, e.g. ESP32_GENERIC-<date>-v1.24.1.bin")
    p.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyUSB0")
    p.add_argument("--board", required=True, help="board profile (see `microfed boards`)")
    p.add_argument("--baud", type=int, default=None,
                   help="baud rate for the transfer (default: the profile's flash_baud)")
    p.add_argument("--no-stub", action="store_true",
                   help="talk to the ROM bootloader only (slower; for boards the stub upsets)")
    p.add_argument("--erase", action=argparse.BooleanOptionalAction, default=True,
                   help="erase the whole flash first (default: yes; --no-erase keeps the "
                        "filesystem, which holds the node's keys)")
    p.add_argument("--before", default="default-reset",
                   choices=["default-reset", "usb-reset", "no-reset", "no-reset-no-sync"],
                   help="how to put the chip into its bootloader")
    p.add_argument("--after", default="hard-reset",
                   choices=["hard-reset", "soft-reset", "no-reset", "no-reset-stub"],
                   help="what to do when done")
    p.set_defaults(func=run)
