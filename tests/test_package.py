"""Signed model packages (microfed.package, docs/package.md): export -> verify round-trips on
CPython and on MicroPython (the portable verifier, as a board runs it before loading a model
for inference), every flipped byte and every truncation is rejected with a reason, a package
signed by another key is refused, and `microfed export` / `microfed verify-package` work on a
real run directory."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from conftest import inproc_run, run_microfed

from microfed import model, package, wire
from microfed.package import PackageError
from microfed_host import export, keys, upy

ROOT = Path(__file__).resolve().parents[1]
COORD = hashlib.sha256(b"microfed-test:package-coordinator").digest()
OTHER = hashlib.sha256(b"microfed-test:someone-else").digest()
MESH = wire.mesh_id("pkg-demo")


def make(params: list[int] | None = None, seed: bytes = COORD, signer: bytes | None = None,
         rule: str = "krum") -> bytes:
    m = model.get("softmax")
    p = params if params is not None else m.init(5)
    return package.encode(MESH, 7, 1_780_000_000, "softmax", 64, 10, rule, 3, 0,
                          hashlib.sha256(b"config").digest(), p,
                          signer if signer is not None else keys.public_key(seed),
                          keys.signer(seed))


def check(data: bytes, pub: bytes | None = None) -> package.Package:
    return package.verify(data, pub or keys.public_key(COORD), keys.check_signature, MESH)


def reason(data: bytes, pub: bytes | None = None) -> str:
    with pytest.raises(PackageError) as ei:
        check(data, pub)
    return ei.value.reason


def test_round_trip_and_inference() -> None:
    m = model.get("softmax")
    params = m.init(5)
    data = make(params)
    pkg = check(data)
    assert (pkg.round, pkg.model, pkg.n_features, pkg.n_classes, pkg.rule, pkg.p1, pkg.p2) == \
        (7, "softmax", 64, 10, "krum", 3, 0)
    assert pkg.params == params and bytes(pkg.params_digest) == model.params_digest(params)
    assert bytes(pkg.config_digest) == hashlib.sha256(b"config").digest()
    mdl, loaded = package.load_for_inference(data, keys.public_key(COORD),
                                             keys.check_signature, MESH)
    rng = random.Random(3)
    xs = [[rng.randint(0, 16 << 12) for _ in range(64)] for _ in range(20)]
    assert [mdl.predict(loaded, x) for x in xs] == [m.predict(params, x) for x in xs]
    # The initial model: no rule.
    assert check(make(rule="")).rule is None


def test_every_flipped_byte_is_rejected_with_a_reason() -> None:
    data = make()
    n = len(data)
    name_at = 25  # after magic, version, mesh id, round, timestamp
    params_at = name_at + 1 + len("softmax") + 4 + 1 + len("krum") + 2 + 32 + 4
    digest_at = n - 64 - 32 - 32
    got = {}
    for i in range(n):
        bad = bytearray(data)
        bad[i] ^= 0x01 << (i % 8)
        got[i] = reason(bytes(bad))  # a PackageError, never acceptance or another exception
    # Where the byte was decides the reason.
    assert {got[i] for i in range(0, 4)} == {"bad_magic"}
    assert got[4] == "bad_version"
    assert {got[i] for i in range(5, name_at)} == {"bad_signature"}  # mesh id, round, time
    assert {got[i] for i in range(params_at, digest_at + 32)} == {"bad_digest"}
    assert {got[i] for i in range(digest_at + 32, n - 64)} == {"wrong_key"}
    assert {got[i] for i in range(n - 64, n)} == {"bad_signature"}
    # Names, shape, rule parameters, config digest, count: structure or signature.
    assert {got[i] for i in range(name_at, params_at)} <= {
        "bad_field", "truncated", "bad_length", "bad_digest", "bad_signature"}


def test_truncated_and_padded_packages() -> None:
    data = make()
    for n in range(len(data)):
        assert reason(data[:n]) in {"truncated", "bad_length", "bad_digest", "bad_field"}, n
    assert reason(data + b"\x00") == "bad_length"
    assert reason(b"") == "truncated"
    with pytest.raises(PackageError) as ei:
        package.decode("not bytes")  # type: ignore[arg-type]
    assert ei.value.reason == "bad_type"


def test_another_key_is_refused() -> None:
    # Signed and named by another key: not the coordinator's.
    assert reason(make(seed=OTHER)) == "wrong_key"
    # Naming the coordinator's key, signed by another: the signature fails.
    assert reason(make(seed=OTHER, signer=keys.public_key(COORD))) == "bad_signature"
    # The right key, checked against another pinned key.
    assert reason(make(), keys.public_key(OTHER)) == "wrong_key"
    with pytest.raises(PackageError) as ei:
        package.verify(make(), keys.public_key(COORD), keys.check_signature, b"other-ms")
    assert ei.value.reason == "wrong_mesh"


def test_encoder_refuses_what_decode_would() -> None:
    with pytest.raises(PackageError, match="printable"):
        make(rule="kr um")
    with pytest.raises(PackageError, match="int32"):
        make(params=[1 << 31])
    with pytest.raises(PackageError, match="parameters"):
        make(params=[])


def test_a_package_of_another_shape_does_not_load() -> None:
    m = model.get("softmax", n_features=4, n_classes=3)
    data = package.encode(MESH, 1, 0, "softmax", 64, 10, "", 0, 0, bytes(32), m.init(1),
                          keys.public_key(COORD), keys.signer(COORD))
    check(data)  # signed and whole ...
    with pytest.raises(PackageError) as ei:  # ... but 64x10 softmax is not 15 parameters
        package.load_for_inference(data, keys.public_key(COORD), keys.check_signature)
    assert ei.value.reason == "bad_model"
    data = package.encode(MESH, 1, 0, "mlp", 64, 10, "", 0, 0, bytes(32), m.init(1),
                          keys.public_key(COORD), keys.signer(COORD))
    with pytest.raises(PackageError) as ei:
        package.load_for_inference(data, keys.public_key(COORD), keys.check_signature)
    assert ei.value.reason == "bad_model"


def test_micropython_verifies_and_loads_the_same_package(micropython: str) -> None:
    import package_runner

    m = model.get("softmax")
    params = m.init(5)
    data = make(params)
    n = len(data)
    # Every region of the package: header, names, shape, parameters, digest, key, signature.
    case = {"pkg": data.hex(), "pub": keys.public_key(COORD).hex(),
            "x": [(j * 37) % 65536 for j in range(64)],
            "flips": [0, 4, 6, 20, 26, 30, 40, 80, 200, 1500, n - 200, n - 130, n - 100,
                      n - 40, n - 1]}
    got = json.loads(upy.run([str(ROOT / "tests" / "package_runner.py")],
                             stdin=json.dumps(case)))
    want = package_runner.package_case(case)  # the same code on CPython
    assert got == json.loads(json.dumps(want))
    assert got[0] == len(params) and got[1] == params[:3]
    assert got[2] == m.predict(params, case["x"])
    assert "accepted" not in got[3:]


def test_export_and_verify_package_commands(tmp_path: Path) -> None:
    run, _ = inproc_run(tmp_path, 2)
    final = json.loads((run / "summary.json").read_text())["final_digest"]
    out = tmp_path / "m.mfpk"
    r = run_microfed("export", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = run_microfed("verify-package", str(out), "--mesh", str(run / "mesh"), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["ok"] is True and got["round"] == 2 and got["rule"] == "fedavg"
    assert got["params_digest"] == final  # the run's final model, as the run reported it
    r = run_microfed("verify-package", str(out), "--key", str(run / "mesh" / "coordinator.pub"))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    bad = bytearray(out.read_bytes())
    bad[-70] ^= 0x10  # in the signer's key
    out.write_bytes(bytes(bad))
    r = run_microfed("verify-package", str(out), "--mesh", str(run / "mesh"), "--json")
    assert r.returncode == export_rejected() and json.loads(r.stdout)["reason"] == "wrong_key"
    r = run_microfed("export", str(run), "--round", "1")
    assert r.returncode == 2 and "latest global model only" in r.stderr
    r = run_microfed("export", str(tmp_path))
    assert r.returncode == 2 and "no coordinator store" in r.stderr


def export_rejected() -> int:
    from microfed_tools import cmd_package
    return cmd_package.EXIT_REJECTED


def test_export_signs_what_the_store_holds(tmp_path: Path) -> None:
    # package_from_run checks the stored model against its round's digest before signing.
    run, _ = inproc_run(tmp_path, 1)
    import sqlite3
    con = sqlite3.connect(run / "coordinator.sqlite")
    con.execute("UPDATE state SET params = ? WHERE id = 1", (bytes(2600),))
    con.commit()
    con.close()
    with pytest.raises(export.ExportError, match="inconsistent"):
        export.package_from_run(run)
