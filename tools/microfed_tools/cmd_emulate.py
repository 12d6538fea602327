"""`microfed emulate BOARD`: boot an emulated board, print its pty, run until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "emulate", help="boot an emulated board (QEMU micro:bit) and print its serial pty",
        description="Boot an emulated board from its profile's [emulator] table, wait for the "
                    "MicroPython REPL, print the pty to pass as --port, run until Ctrl-C.")
    p.add_argument("board", help="emulated board: microbit (= microbit-qemu)")
    p.add_argument("--boot-timeout", type=float, default=30.0,
                   help="seconds to wait for the REPL (default 30)")
    p.add_argument("--check", action="store_true",
                   help="boot, print the pty and banner, then stop (a smoke test)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from microfed_tools.boards import BoardError
    from microfed_tools.emulator import Emulator, EmulatorError, resolve_board

    try:
        board = resolve_board(args.board)
    except (BoardError, EmulatorError) as e:
        print("microfed emulate: %s" % e, file=sys.stderr)
        return 2
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and `kill` both stop QEMU: a shell may start us with SIGINT ignored (a
    # background job), and SIGTERM would otherwise skip the cleanup below.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    emu = Emulator(board, boot_timeout=args.boot_timeout)
    try:
        pty = emu.start()
    except EmulatorError as e:
        print("microfed emulate: %s" % e, file=sys.stderr)
        return 1
    try:
        print(pty, flush=True)
        print("%s: %s on %s" % (board.name, emu.banner, pty), file=sys.stderr)
        if args.check:
            return 0
        print("use: microfed deploy --board %s --port %s   (Ctrl-C stops the emulator)"
              % (board.name, pty), file=sys.stderr, flush=True)
        while emu.alive():
            time.sleep(0.5)
        print("microfed emulate: the emulator exited", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        emu.stop()
