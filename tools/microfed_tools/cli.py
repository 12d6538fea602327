"""The `microfed` command: one entry point, one module per subcommand.

Each module named in COMMANDS exposes `register(subparsers)` which adds its parser and sets
`func` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

COMMANDS: tuple[str, ...] = (
    "microfed_tools.cmd_aggregate",
    "microfed_tools.cmd_bridge",
    "microfed_tools.cmd_deploy",
    "microfed_tools.cmd_emulate",
    "microfed_tools.cmd_provision",
    "microfed_tools.cmd_boards",
    "microfed_tools.cmd_flash",
    "microfed_tools.cmd_flower_bridge",
    "microfed_tools.cmd_firmware",
    "microfed_tools.cmd_mesh",
    "microfed_tools.cmd_hier",
    "microfed_tools.cmd_coordinator",
    "microfed_tools.cmd_package",
    "microfed_tools.cmd_report",
)


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, `microfed <cmd>: error: <sentence>`, exit code 2 (argparse's
    default prints the whole usage first). Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="microfed",
        description="Byzantine-robust federated learning for microcontroller meshes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("microfed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
