"""`microfed firmware`: MicroPython firmware with microfed frozen in, built from the vendored
source for the emulated boards and the 32-bit unix port.

    microfed firmware build --board mps2-an385 [--heap 64k] [--force]   print the image's path
    microfed firmware list                                 targets, tools, cached images

The build lives in a cache outside the repository ($MICROFED_CACHE, else ~/.cache/microfed)
and is redone only when an input changed (tools/microfed_tools/firmware.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from microfed_tools import firmware


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1024 if t.endswith("k") else 1
    try:
        return int(t[:-1] if t.endswith("k") else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 65536 or 64k") from None


def cmd_build(args: argparse.Namespace) -> int:
    try:
        image = firmware.build(args.board, force=args.force,
                               say=lambda m: print(m, file=sys.stderr), heap=args.heap)
    except firmware.FirmwareError as e:
        print(f"microfed firmware: error: {e}", file=sys.stderr)
        return 2
    print(image)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name, t in firmware.TARGETS.items():
        image = firmware.build_dir(name) / t.image
        why = firmware.missing_tools(t)
        state = why or ("built: %s" % image if image.is_file() else "not built yet")
        print(f"{name:12} {state}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("firmware", help="build MicroPython with microfed frozen in",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_subparsers(dest="firmware_command", metavar="ACTION")
    s.required = True
    b = s.add_parser("build", help="build (or reuse) the firmware for one target")
    b.add_argument("--board", required=True, choices=sorted(firmware.TARGETS),
                   help="firmware target (a board profile of the same name uses it)")
    b.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    b.add_argument("--heap", type=_size, default=None, metavar="BYTES",
                   help="QEMU targets: MicroPython heap size (e.g. 64k), in its own build")
    b.set_defaults(func=cmd_build)
    ls = s.add_parser("list", help="the targets, whether they can be built here, cached images")
    ls.set_defaults(func=cmd_list)
