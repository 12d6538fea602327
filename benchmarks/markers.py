"""Writing a benchmark's tables into a document between its markers, with the date and the
command that produced them (shared by benchmarks/device.py and benchmarks/node_heap.py)."""

from __future__ import annotations

import datetime
import re
from pathlib import Path


def write_between(path: Path, marker: str, command: str, body: str) -> None:
    """Replace the text between `<!-- MARKER -->` and `<!-- end MARKER -->` in `path` with
    "Measured DATE with `COMMAND`:" and `body`; SystemExit when the markers are missing."""
    begin = f"<!-- {marker} -->"
    end = f"<!-- end {marker} -->"
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} markers to write between")
    stamp = f"Measured {datetime.date.today().isoformat()} with `{command}`:\n\n"
    path.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end),
                           lambda _m: begin + "\n" + stamp + body.strip() + "\n" + end, doc,
                           flags=re.S))


def publish(command: str, table: str, path: Path | None, marker: str) -> None:
    """Print the command and its table; with a path, also write them between its markers."""
    print(command + "\n\n" + table)
    if path is not None:
        write_between(path, marker, command, table)
