"""Structure-aware fuzzing of the wire decoder (microfed_tools.fuzzwire): 10^5 mutated frames of
every kind must each decode or raise WireError; a sample through microfed.verify.Verifier must
only ever be Rejected; the same sample under the MicroPython unix port must only raise
WireError; and the generator must produce the "long last announcement entry" shape that once
made decoding raise IndexError (so this file fails on that decoder).
"""

from __future__ import annotations

import time
from pathlib import Path

from microfed import replay, verify, wire
from microfed.verify import Rejected
from microfed_host import keys, upy
from microfed_tools import fuzzwire

N_CASES = 100_000
SEED = 20260801


def _report(res: fuzzwire.Result) -> str:
    lines = ["%d cases escaped WireError:" % len(res.failures)]
    for exc, label, hx in res.failures:
        lines.append("  %s  [%s]  %s" % (exc, label, hx))
    return "\n".join(lines)


def test_templates_cover_every_kind_and_are_valid() -> None:
    ts = fuzzwire.templates()
    assert {t.kind for t in ts} == set(wire.KIND_NAMES)
    anns = set()
    regs = set()
    for t in ts:
        fr = wire.decode(t.frame)
        if t.kind == wire.GLOBAL_MODEL and len(t.payload) > 36 + 4 * len(fr.body["values"]):
            anns.add((len(fr.body["accepted"]), fr.body["final"]))
        if t.kind == wire.REGISTRY:
            regs.add(len(fr.body["entries"]))
    assert {n for n, _ in anns} == set(range(fuzzwire.MAX_ENTRIES + 1))
    assert {f for _, f in anns} == {True, False}
    assert regs == set(range(fuzzwire.MAX_ENTRIES + 1))


def test_generator_is_deterministic() -> None:
    a = list(fuzzwire.Fuzzer(7).cases(300))
    b = list(fuzzwire.Fuzzer(7).cases(300))
    assert a == b
    assert a != list(fuzzwire.Fuzzer(8).cases(300))
    originals = {t.frame for t in fuzzwire.templates()}
    assert not originals & {d for _, d in a}


def test_fuzz_100k_cases_decode_or_raise_wire_error() -> None:
    t0 = time.perf_counter()
    res = fuzzwire.run(N_CASES, SEED)
    assert not res.failures, _report(res)
    assert sum(res.outcomes.values()) == N_CASES
    # The mutations reach the payload decoders, not only the header checks.
    assert res.outcomes["decoded"] > N_CASES // 10
    assert res.outcomes["bad_payload"] > N_CASES // 10
    for reason in ("truncated", "bad_length", "bad_magic", "bad_version", "bad_kind",
                   "bad_sender", "bad_seq"):
        assert res.outcomes[reason] > 0, reason
    print("%d cases in %.1f s: %s" % (N_CASES, time.perf_counter() - t0, dict(res.outcomes)))


def test_generator_finds_the_long_last_entry_shape() -> None:
    # The shape of the announcement IndexError: the first 20 000 cases hold several, so the
    # 10^5-case test above fails on a decoder without the bound (51 escapes at this seed's
    # 10^5 cases when the check is removed).
    shapes = [d for _, d in fuzzwire.Fuzzer(SEED).cases(20_000) if fuzzwire.long_last_entry(d)]
    assert len(shapes) >= 1
    for d in shapes:
        try:
            wire.decode(d)
        except wire.WireError as e:
            assert e.reason == "bad_payload"


def test_verifier_only_rejects_fuzzed_frames() -> None:
    reg = verify.Registry(fuzzwire.MESH, fuzzwire.coordinator_key(),
                          [(i, pub, True) for i, pub in fuzzwire.senders()], 3)
    seen: dict[str, int] = {}
    for _label, data in fuzzwire.Fuzzer(SEED + 1).cases(2000):
        store = replay.MemoryStore()
        v = verify.Verifier(fuzzwire.MESH_NAME, reg, store, keys.check_signature)
        try:
            fr = v.verify(data, now=1_750_000_000)
        except Rejected as e:
            assert not store.counters, data.hex()
            seen[e.reason] = seen.get(e.reason, 0) + 1
            continue
        raise AssertionError("fuzzed frame accepted: %r %s" % (fr, data.hex()))
    assert seen.get("bad_signature", 0) > 100  # decodable mutants reach the signature check
    assert set(seen) <= set(verify.REASONS)


MP_SCRIPT = r"""
import sys
from microfed import wire
out = {}
f = open(sys.argv[1])
for line in f:
    raw = bytes.fromhex(line.strip())
    try:
        wire.decode(raw)
        k = "decoded"
    except wire.WireError as e:
        k = e.reason
    except Exception as e:
        k = "ESCAPED " + type(e).__name__ + " " + line.strip()
    out[k] = out.get(k, 0) + 1
f.close()
for k in out:
    print(k, out[k])
"""


def test_micropython_decoder_raises_only_wire_error(micropython: str, tmp_path: Path) -> None:
    cases = [d for _, d in fuzzwire.Fuzzer(SEED + 2).cases(3000)]
    (tmp_path / "cases.txt").write_text("\n".join(d.hex() for d in cases) + "\n")
    (tmp_path / "fz.py").write_text(MP_SCRIPT)
    out = upy.run([str(tmp_path / "fz.py"), str(tmp_path / "cases.txt")])
    got = {}
    for line in out.splitlines():
        k, n = line.rsplit(" ", 1)
        got[k] = int(n)
    assert not [k for k in got if k.startswith("ESCAPED")], out
    want: dict[str, int] = {}
    for d in cases:
        try:
            wire.decode(d)
            k = "decoded"
        except wire.WireError as e:
            k = e.reason
        want[k] = want.get(k, 0) + 1
    assert got == want  # same outcome counts on both interpreters


def test_packed_decoding_agrees_with_full_decoding_on_fuzzed_frames() -> None:
    """wire.decode(values=False) and Verifier(values=False), the device's peer path, on 20 000
    fuzzed frames: the same WireError reason, or the same frame with the vector left packed;
    through the Verifier, the same accept / reject reason as the full decode."""
    reg = verify.Registry(fuzzwire.MESH, fuzzwire.coordinator_key(),
                          [(n, pub, True) for n, pub in fuzzwire.senders()])

    def verifier(values: bool) -> verify.Verifier:
        return verify.Verifier(fuzzwire.MESH, reg, replay.ReplayGuard(replay.MemoryStore()),
                               keys.check_signature, limits=verify.Limits(None, 1 << 20),
                               kinds=(wire.MODEL_UPDATE,), values=values)

    full, packed = verifier(True), verifier(False)
    compared = 0
    for _label, data in fuzzwire.Fuzzer(SEED + 1).cases(20_000):
        try:
            want = wire.decode(data)
        except wire.WireError as e:
            try:
                wire.decode(data, values=False)
            except wire.WireError as e2:
                assert e2.reason == e.reason
            else:
                raise AssertionError("packed decode accepted what the full decode refused")
        else:
            got = wire.decode(data, values=False)
            assert (got.kind, got.sender, got.seq, bytes(got.payload)) == (
                want.kind, want.sender, want.seq, want.payload)
            if want.kind == wire.MODEL_UPDATE:
                assert got.body == {"samples": want.body["samples"],
                                    "dim": len(want.body["values"]), "values": None}
                compared += 1
        outcome = []
        for v in (full, packed):
            try:
                outcome.append(("accepted", v.verify(data).seq))
            except Rejected as e:
                outcome.append((e.reason, e.message))
        assert outcome[0] == outcome[1], outcome
    assert compared > 100
