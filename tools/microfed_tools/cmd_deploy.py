"""`microfed deploy`: copy the core, the node app and the node's bundle to a board."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy", help="copy shared/ + firmware/ + the node bundle to a board (verified)",
        description="Copy shared/microfed to /lib/microfed, firmware/ to the device root and the "
                    "node bundle to /bundle.json over the raw REPL. Every file is verified on "
                    "the device (length + checksum); unchanged files are skipped.")
    p.add_argument("--port", help="serial port or pty (for --board unix: the directory that "
                                   "plays the device root; default: current directory)")
    p.add_argument("--board", help="board profile (boards/*.toml): paces the transfer")
    p.add_argument("--bundle", type=Path, help="node bundle from `microfed provision` "
                                               "(bundles/ID.json) -> bundle.json")
    p.add_argument("--mpy", action="store_true",
                   help="precompile .py with mpy-cross for the device's bytecode version")
    p.add_argument("--dry-run", action="store_true",
                   help="list what would be copied or skipped; write nothing "
                        "(without --port: everything is listed as to copy)")
    p.add_argument("--file", action="append", default=[], metavar="LOCAL[=DEVICE]",
                   help="also copy LOCAL to DEVICE (default: its file name); repeatable")
    p.add_argument("--only", action="store_true",
                   help="copy only the --file/--bundle files, not shared/ and firmware/ "
                        "(e.g. for the micro:bit's flat filesystem)")
    p.add_argument("--soft-reset", action="store_true", help="soft-reset the board afterwards")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from microfed_tools import deploy as dp
    from microfed_tools import rawrepl
    from microfed_tools.boards import BoardError

    def fail(msg: str, code: int = 1) -> int:
        print("microfed deploy: %s" % msg, file=sys.stderr)
        return code

    try:
        board = dp.board_for(args.board)
        if args.bundle is not None:
            dp.check_bundle(args.bundle)
        specs = [] if args.only else dp.default_files(bundle=args.bundle)
        if args.only and args.bundle is not None:
            specs.append(dp.FileSpec(args.bundle, dp.BUNDLE_DEVICE_PATH))
        specs += [dp.parse_file_arg(f) for f in args.file]
        if not specs:
            return fail("nothing to copy (--only without --file or --bundle)", 2)
    except (BoardError, dp.DeployError) as e:
        return fail(str(e), 2)

    unix = rawrepl.is_unix_board(board)
    if args.port is None and not unix and not args.dry_run:
        return fail("--port is required (e.g. /dev/ttyUSB0, or the pty `microfed emulate` "
                    "printed)", 2)
    repl = None
    try:
        if args.port is not None or unix:
            repl = rawrepl.connect(args.port, board)
        copied, skipped = dp.deploy(repl, specs, mpy=args.mpy, dry_run=args.dry_run)
        verb = "would copy" if args.dry_run else "copied"
        print("%s %d file(s), skipped %d unchanged" % (verb, copied, skipped))
        if repl is not None and args.soft_reset and not args.dry_run:
            repl.soft_reset()
        return 0
    except dp.DeployError as e:
        return fail(str(e))
    except rawrepl.ReplError as e:
        return fail(str(e))
    finally:
        if repl is not None:
            repl.close()
