"""`microfed boards`: list the board profiles (or show one) from boards/*.toml."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from microfed_tools.boards import Board, BoardError, list_boards, load_board


def _row(b: Board) -> list[str]:
    caps = b.capabilities
    feats = [f for f, on in (("ed25519", caps.ed25519_on_device),
                             ("gossip", caps.gossip_aggregation),
                             ("sha256", caps.hashlib_sha256)) if on]
    offset = f"{b.flash_offset:#x}" if b.flash_offset is not None else "-"
    return [b.name, b.chip, b.flasher, offset, str(b.heap_bytes), str(caps.max_model_params),
            b.micropython, ",".join(feats) or "-"]


def _table(rows: list[list[str]]) -> str:
    head = ["board", "chip", "flasher", "offset", "heap", "max_params", "micropython", "features"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join(lines)


def _as_json(b: Board) -> dict[str, Any]:
    d = asdict(b)
    d["path"] = str(b.path)
    return d


def run(args: argparse.Namespace) -> int:
    try:
        boards = [load_board(args.name)] if args.name else list_boards()
    except BoardError as exc:
        print(f"microfed boards: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([_as_json(b) for b in boards], indent=2))
    elif args.name:
        b = boards[0]
        print(_table([_row(b)]))
        print(f"\n{b.description}\nimage: {b.image}  ({b.image_url})")
        if b.notes:
            print(f"notes: {b.notes}")
    else:
        print(_table([_row(b) for b in boards]))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("boards", help="list the board profiles (boards/*.toml)",
                              description=__doc__)
    p.add_argument("name", nargs="?", help="show only this board")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
