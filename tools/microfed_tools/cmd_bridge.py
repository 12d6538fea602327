"""`microfed bridge --port PORT [--broker HOST:PORT] [--baud N]`: connect a board without a
network (its node speaks firmware/serialstream.py on its serial line) to an MQTT broker."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bridge", help="carry a serial-line node's MQTT sessions to a broker (docs/bridge.md)",
        description="Read microfed.serialframe frames from a board's serial line: print its "
                    "log lines, open one TCP connection to the broker per session the board "
                    "opens, pump the bytes both ways. Runs until Ctrl-C, then prints its "
                    "counters (JSON) on stderr.")
    p.add_argument("--port", required=True, help="serial port or pty, e.g. /dev/ttyACM0")
    p.add_argument("--broker", default="127.0.0.1:1883",
                   help="HOST:PORT of the MQTT broker (default 127.0.0.1:1883)")
    p.add_argument("--baud", type=int, default=115200, help="serial baud rate (default 115200)")
    p.add_argument("--seconds", type=float, default=None,
                   help="stop after this many seconds (default: run until Ctrl-C)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from microfed_tools.bridge import Bridge, BridgeError, parse_broker

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        host, port = parse_broker(args.broker)
        bridge = Bridge(args.port, host, port, baud=args.baud)
        bridge.start()
    except BridgeError as e:
        print("microfed bridge: error: %s" % e, file=sys.stderr)
        return 2
    print("microfed bridge: %s <-> %s:%d (Ctrl-C stops)" % (args.port, host, port),
          file=sys.stderr, flush=True)
    end = None if args.seconds is None else time.monotonic() + args.seconds
    try:
        while end is None or time.monotonic() < end:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        bridge.stop()
        print(json.dumps(bridge.stats(), sort_keys=True), file=sys.stderr)
    return 0
