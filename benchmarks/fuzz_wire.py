"""Fuzz the wire decoder with structure-aware mutants of signed frames of every kind.

    python benchmarks/fuzz_wire.py [--cases N] [--seed S]

Generator: microfed_tools.fuzzwire (templates of all six kinds, incl. GLOBAL_MODEL with
announcements of 0..8 entries and REGISTRY of 0..8 entries, each signed once with Ed25519,
then header/payload fields set to boundary values, cuts, extensions, flips and splices).
Prints frames/s and the count of each outcome (decoded, or the WireError reason). Exit status
1 if anything but WireError escaped wire.decode (the first inputs are printed in hex).
"""

from __future__ import annotations

import argparse
import platform
import sys

from microfed_tools import fuzzwire


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fuzzwire.templates()  # signing the templates is not part of the timing
    res = fuzzwire.run(args.cases, args.seed)
    print("fuzz_wire: %d cases, seed %d, %.1f s, %.0f frames/s (CPython %s, one core)"
          % (res.n, args.seed, res.seconds, res.n / res.seconds, platform.python_version()))
    for k, v in sorted(res.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        print("  %-24s %9d  %5.1f %%" % (k, v, 100.0 * v / res.n))
    if res.failures:
        print("FAILED: %d inputs raised something other than WireError; first ones:"
              % sum(v for k, v in res.outcomes.items() if k.startswith("ESCAPED")))
        for exc, label, hx in res.failures:
            print("  %s [%s] %s" % (exc, label, hx))
        return 1
    print("only WireError raised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
