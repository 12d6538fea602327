"""`microfed aggregate`: the audit command. Reads one aggregation request (JSON), runs it on
one engine or all of them, prints the result as JSON; with `all`, any disagreement is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from microfed import audit
from microfed.aggregate import AggregationError

ENGINES = ("fast", "reference", "micropython")
EXIT_INPUT = 2
EXIT_MISMATCH = 1


# Longest integer literal accepted in a request: an int32 needs at most 11 characters; a
# longer literal is refused before CPython's int/str digit limit (4300) fails deep inside json.
MAX_INT_CHARS = 32


class UsageError(Exception):
    pass


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_CHARS:
        raise UsageError(f"the request holds a {digits}-digit integer; every value must be an "
                         "int32 (raw Q16.16)")
    return int(text)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="aggregate updates from a JSON file and print the result (the audit contract)",
        description=(
            "Run one aggregation rule (krum, multi_krum, median, trimmed_mean, fedavg, "
            "centered_clipping) over raw Q16.16 updates, optionally after a pre step "
            "(\"pre\": \"nnm\" or \"bucketing\"). FILE is a JSON request, '-' for stdin; see "
            "docs/determinism.md."
        ),
    )
    p.add_argument("file", metavar="FILE", help="request JSON, or - for stdin")
    p.add_argument(
        "--engine",
        choices=(*ENGINES, "all"),
        default="fast",
        help="fast (numpy), reference (portable code on CPython), micropython (portable code on "
        "the MicroPython unix port), or all (run every engine and require identical bits)",
    )
    p.add_argument("--compact", action="store_true", help="print JSON on one line")
    p.set_defaults(func=main)


def _load(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    try:
        return json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise UsageError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise UsageError("invalid JSON: nested too deeply") from None
    except ValueError as e:  # any other limit of the json module: one line, not a traceback
        raise UsageError(f"invalid JSON: {e}") from None


def run_engine(engine: str, req: dict, parsed: tuple) -> dict:
    rule, ids, vecs, params = parsed
    if engine == "reference":
        return audit.run(rule, ids, vecs, params)
    if engine == "fast":
        from microfed_host import fast

        return fast.run(rule, ids, fast.as_matrix(vecs), params)
    from microfed_host import upy

    # Raw UTF-8 both ways: MicroPython's json turns a \ud83d\ude00 escape pair into two
    # CESU-8 surrogates (not UTF-8), while it reads and writes raw UTF-8 text unchanged. Node
    # ids are valid Unicode here (audit.parse refused lone surrogates), so this encodes.
    try:
        text = upy.run_module_main("microfed.audit_cli", json.dumps([req], ensure_ascii=False))
        out = json.loads(text)[0]
    except upy.MicroPythonError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:
        raise UsageError(f"MicroPython returned unreadable JSON: {e}") from None
    if "error" in out:
        raise AggregationError(out["error"])
    return out["ok"]


class Mismatch(Exception):
    """Engines disagree: the message holds every difference."""


def aggregate(req: Any, engine: str = "fast") -> dict:
    """One request on `engine` (or "all": every engine, identical bits required): the result
    `microfed aggregate` prints. Raises audit.InputError, AggregationError, UsageError or
    Mismatch."""
    parsed = audit.parse(req)
    engines = ENGINES if engine == "all" else (engine,)
    results = {e: run_engine(e, req, parsed) for e in engines}
    first = results[engines[0]]
    if len(engines) == 1:
        return first
    from microfed_host.crosscheck import diff_results

    diffs = []
    for other in engines[1:]:
        diff = diff_results(first, results[other], (engines[0], other))
        if diff is not None:
            diffs.append(f"{engines[0]} and {other} disagree:\n{diff}")
    if diffs:
        raise Mismatch("\n".join(diffs))
    return dict(first, engines=list(engines), agree=True)


def main(args: argparse.Namespace) -> int:
    try:
        first = aggregate(_load(args.file), args.engine)
    except (UsageError, audit.InputError, AggregationError) as e:
        print(f"microfed aggregate: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Mismatch as e:
        print(f"microfed aggregate: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    print(json.dumps(first, indent=None if args.compact else 1))
    return 0
