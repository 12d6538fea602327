#!/usr/bin/env python3
"""Long fuzz run of the wire decoder and the verification pipeline (hypothesis).

    python tools/fuzz_wire.py [--examples N] [--seed S]

Feeds random byte strings and mutated valid frames (bit flips, byte overwrites, cuts,
insertions, extreme values written over every length field, splices of two frames) to
microfed.wire.decode and microfed.verify.Verifier.verify. The only acceptable outcomes are a
returned frame, WireError from decode, or Rejected from the verifier; a rejected frame must
leave the replay store untouched. Prints how often each reason occurred; exit status 1 on the
first violation (hypothesis then prints the shrunk input).
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
from collections import Counter

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from microfed import replay, verify, wire
from microfed.verify import Rejected
from microfed.wire import WireError
from microfed_host import keys

MESH = wire.mesh_id("fuzz")
NOW = 1_750_000_000
LENGTH_OFFSETS = (12, 16, 24, 32, 36, 44, 48, 76, 80, 81, 82, 83, 84)
EXTREMES = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"fuzz:" + label.encode()).digest()


def _registry() -> verify.Registry:
    return verify.Registry(MESH, keys.public_key(_seed("coordinator")), [
        ("n1", keys.public_key(_seed("n1")), True),
        ("n2", keys.public_key(_seed("n2")), False),
    ], 1)


def _corpus() -> list[bytes]:
    def f(kind: int, sender: str, seq: int, payload: bytes) -> bytes:
        return wire.encode(kind, MESH, sender, 1, seq, 0, payload, keys.signer(_seed(sender)))

    reg = _registry()
    return [
        f(wire.MODEL_UPDATE, "n1", 1, wire.encode_model_update(3, [1, -2, 3, 65536])),
        f(wire.GLOBAL_MODEL, "coordinator", 1, wire.encode_global_model([5, 6, 7])),
        f(wire.GOSSIP_DIGEST, "n1", 2, wire.encode_gossip_digest(bytes(32), "median", 0, 0, 4)),
        f(wire.HELLO, "n1", 3, wire.encode_status(1, 1000, 5, 0, "fuzz")),
        f(wire.STATUS, "n2", 1, wire.encode_status(2, 0, 0, 1, "")),
        f(wire.REGISTRY, "coordinator", 1, reg.payload()),
    ]


CORPUS = _corpus()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    b = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 5))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if op == 0:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            b[i] = draw(st.integers(0, 255))
        elif op == 2:
            del b[i:i + draw(st.integers(1, 200))]
        elif op == 3:
            b[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif op == 4:
            off = draw(st.sampled_from(LENGTH_OFFSETS))
            width = draw(st.sampled_from((1, 2, 4)))
            if off + width <= len(b):
                v = draw(st.sampled_from(EXTREMES)) & ((1 << (8 * width)) - 1)
                b[off:off + width] = v.to_bytes(width, "little")
        else:
            other = draw(st.sampled_from(CORPUS))
            j = draw(st.integers(0, len(other)))
            b = b[:i] + bytearray(other[j:])
    return bytes(b)


def header_only() -> st.SearchStrategy[bytes]:
    # A syntactically plausible header with random fields in front of random bytes.
    return st.builds(
        lambda kind, slen, plen, rest: struct.pack("<2sBB8sIQqIB", b"MF", 1, kind, MESH, 1, 1, 0,
                                                   plen, slen) + rest,
        st.integers(0, 8), st.integers(0, 255), st.sampled_from(EXTREMES + (5, 40, 100)),
        st.binary(max_size=400),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts: Counter[str] = Counter()
    reg = _registry()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(mutated(), st.binary(max_size=512), header_only()))
    def one(data: bytes) -> None:
        try:
            wire.decode(data)
            counts["decode:ok"] += 1
        except WireError as e:
            counts["decode:" + e.reason] += 1
        store = replay.MemoryStore()
        v = verify.Verifier(MESH, reg, store, keys.check_signature)
        try:
            v.verify(data, now=NOW)
        except Rejected as e:
            if store.counters:
                raise AssertionError("rejected frame changed the store") from e
            counts["verify:" + e.reason] += 1
            return
        if data not in CORPUS:
            raise AssertionError("a mutated frame was accepted")
        counts["verify:accepted"] += 1

    t0 = time.monotonic()
    try:
        one()
    except Exception as e:  # hypothesis re-raises the shrunk failure
        print(f"VIOLATION: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    total = sum(n for k, n in counts.items() if k.startswith("verify:"))
    print(f"{total} inputs in {time.monotonic() - t0:.1f} s, seed {args.seed}: "
          "only WireError/Rejected raised")
    for k in sorted(counts):
        print(f"  {k:28s} {counts[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
