"""The model, reputation and wire vectors on a board whose firmware has microfed frozen in
(`frozen_core = true`: mps2-an385, virt-rv32, unix32), bit for bit with the x86 reference.

The same portable runners the suite uses on the MicroPython unix port (tests/model_runner.py,
tests/reputation_runner.py) are uploaded as verified code; each case goes over as verified
JSON data and comes back as JSON. Wire: every frame of tests/vectors/wire.json is decoded,
its signature verified with the portable Ed25519, re-signed from the vector's seed (must give
the same bytes) and put through the portable verification pipeline — the same function runs
on the host for the expected answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"

# Runs on the device and (for the expected values) under CPython: the portable subset only.
WIRE_CHECK = '''
from microfed import wire, ed25519, verify, replay
try:
    from binascii import hexlify, unhexlify
except ImportError:
    from ubinascii import hexlify, unhexlify


def _h(b):
    return hexlify(b).decode()


def wire_case(c):
    raw = unhexlify(c["frame"])
    fr = wire.decode(raw)
    pub = unhexlify(c["public_key"])
    seed = unhexlify(c["seed"])
    out = [fr.kind, fr.sender, fr.round, fr.seq, fr.timestamp, _h(fr.header), _h(fr.payload),
           _h(fr.signing_digest()), ed25519.public_key(seed) == pub,
           ed25519.verify(pub, fr.signing_digest(), fr.signature)]
    again = wire.encode(fr.kind, fr.mesh_id, fr.sender, fr.round, fr.seq, fr.timestamp,
                        fr.payload, lambda m: ed25519.sign(seed, m))
    out.append(again == raw)
    me = fr.sender if fr.sender != wire.COORDINATOR else "node-x"
    reg = verify.Registry(fr.mesh_id, pub, [(me, pub, True)])
    v = verify.Verifier(fr.mesh_id, reg, replay.ReplayGuard(replay.MemoryStore()),
                        ed25519.verify)
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 1
    for frame in (raw, bytes(bad), raw):  # accepted; corrupted; then a replay
        try:
            out.append(["accepted", v.verify(frame).kind])
        except verify.Rejected as e:
            out.append(["rejected", e.reason])
    return out
'''


def _need_frozen(device: Any) -> None:
    if not device.cap("frozen_core", False):
        pytest.skip("board %s has no microfed frozen in (frozen_core = false): these vectors "
                    "run on firmware built by `microfed firmware build`" % device.name)


def _run_cases(device: Any, call: str, cases: list[Any]) -> list[Any]:
    out = []
    for case in cases:
        # Raw UTF-8, not \u escapes: MicroPython's json turns an escaped astral character
        # (a surrogate pair) into two lone surrogates.
        device.repl.upload_data(json.dumps(case, ensure_ascii=False).encode(), what="case")
        # A collection first: it also sends the allocator back to the start of the heap, so
        # what a case keeps does not end up strewn across it (measured on mps2-an385: after
        # 51 reputation cases a 3.3 KB block was missing with 126 KB free).
        text = device.repl.exec("import json, gc\ngc.collect()\n"
                                "print(json.dumps(%s(json.loads(_mfD))))\n"
                                "_mfD=None" % call, timeout=300)
        out.append(json.loads(text))
    return out


def _runner_source(name: str) -> str:
    src = (ROOT / "tests" / name).read_text()
    return src.split("\ndef main():")[0]  # the device needs the functions, not the CLI


def test_model_vectors_on_device(device: Any) -> None:
    _need_frozen(device)
    cases = json.loads((VECTORS / "model.json").read_text())["cases"]
    device.repl.exec_verified(_runner_source("model_runner.py"), what="model runner")
    got = _run_cases(device, "run", [{k: v for k, v in c.items() if k != "expect"}
                                     for c in cases])
    bad = [(c["op"], i) for i, (c, g) in enumerate(zip(cases, got, strict=True))
           if g != c["expect"]]
    assert bad == [], "%d of %d model cases differ on %s" % (len(bad), len(cases), device.name)
    assert len(cases) == 302


def test_reputation_vectors_on_device(device: Any) -> None:
    _need_frozen(device)
    device.fresh()  # the model runner of the test before must not hold (or split) the heap
    doc = json.loads((VECTORS / "reputation.json").read_text())
    device.repl.exec_verified(_runner_source("reputation_runner.py"), what="reputation runner")
    cases = doc["cases"]
    got = _run_cases(device, "run_case", [{k: v for k, v in c.items() if k != "expect"}
                                          for c in cases])
    bad = [i for i, (c, g) in enumerate(zip(cases, got, strict=True)) if g != c["expect"]]
    assert bad == [], "reputation cases %s differ on %s" % (bad, device.name)
    dec = doc["decode"]
    got = _run_cases(device, "run_decode", [d["hex"] for d in dec])
    assert got == [d["expect"] for d in dec]
    assert (len(cases), len(dec)) == (52, 30)


def test_wire_sign_verify_pipeline_on_device(device: Any) -> None:
    _need_frozen(device)
    device.fresh()
    cases = json.loads((VECTORS / "wire.json").read_text())["cases"]
    ns: dict[str, Any] = {}
    exec(compile(WIRE_CHECK, "wire_check", "exec"), ns)  # the host's answer: same code
    want = [json.loads(json.dumps(ns["wire_case"](c))) for c in cases]
    device.repl.exec_verified(WIRE_CHECK, what="wire check")
    got = _run_cases(device, "wire_case", cases)
    assert got == want
    # Every vector signs back to its own bytes and verifies; the corrupted copy and the
    # replay are rejected.
    for g in got:
        assert g[8:11] == [True, True, True]
        assert g[12][0] == "rejected"
        # A rejection changes no state: the same frame again gets the same answer; an
        # accepted frame, sent again, is a replay.
        assert g[13] == (["rejected", "replay"] if g[11][0] == "accepted" else g[11])
    assert sum(1 for g in got if g[11][0] == "accepted") >= 1


# A signed model package (microfed.package, docs/package.md) checked and loaded for inference
# on the device, and corrupted copies rejected with the host's reasons (tests/package_runner.py).
def test_signed_model_package_on_device(device: Any) -> None:
    import hashlib

    from microfed import model, package, wire
    from microfed_host import keys

    _need_frozen(device)
    device.fresh()
    seed = hashlib.sha256(b"microfed-hil:package").digest()
    m = model.get("softmax")
    data = package.encode(wire.mesh_id("hil"), 3, 0, "softmax", 64, 10, "krum", 3, 0,
                          bytes(32), m.init(11), keys.public_key(seed), keys.signer(seed))
    n = len(data)
    case = {"pkg": data.hex(), "pub": keys.public_key(seed).hex(),
            "x": [(j * 4099) % 65536 for j in range(64)],
            # magic, version, mesh id, a name, the parameters, their digest, key, signature
            "flips": [0, 4, 9, 26, 600, n - 140, n - 70, n - 5]}
    code = _runner_source("package_runner.py")
    ns: dict[str, Any] = {}
    exec(compile(code, "package_runner", "exec"), ns)  # the host's answer: same code
    want = json.loads(json.dumps(ns["package_case"](case)))
    device.repl.exec_verified(code, what="package check")
    [got] = _run_cases(device, "package_case", [case])
    assert got == want
    assert got[0] == m.n_params and "accepted" not in got[3:]
    # (the name "softmax" becomes "woftmax": still a name, so only the signature catches it)
    assert got[3:] == ["bad_magic", "bad_version", "bad_signature", "bad_signature",
                       "bad_digest", "bad_digest", "wrong_key", "bad_signature"]
