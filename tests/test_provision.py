"""`microfed provision`: keys, signed registry, bundles; refusing to overwrite keys; add and
revoke; the bundle a device gets is enough to sign frames the coordinator accepts, and to
verify the registry itself (also under MicroPython with the portable Ed25519)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from microfed import verify, wire
from microfed_host import keys, upy
from microfed_host import registry as regmod
from microfed_host.store import Store
from microfed_host.verifier import HostVerifier, Rejected
from microfed_tools import cli


def run(*argv: str) -> int:
    return cli.main(["provision", *argv])


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    out = tmp_path / "mesh"
    assert run("init", "--mesh", "lab", "--nodes", "3", "--out", str(out), "--broker", "10.1.2.3:8883") == 0
    return out


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def load(mesh: Path) -> regmod.MeshRegistry:
    pinned = keys.read_public_key(mesh / "coordinator.pub")
    return regmod.load(mesh / "registry.json", pinned)[0]


def test_init_layout_and_permissions(mesh: Path) -> None:
    ids = ["node-01", "node-02", "node-03"]
    assert mode(mesh / "coordinator.key") == 0o600
    for i in ids:
        assert mode(mesh / "nodes" / f"{i}.key") == 0o600
        assert mode(mesh / "bundles" / f"{i}.json") == 0o600
    reg = load(mesh)
    assert sorted(reg.nodes) == ids and reg.version == 1 and reg.mesh == "lab"
    doc = json.loads((mesh / "mesh.json").read_text())
    assert doc["broker"] == {"host": "10.1.2.3", "port": 8883}
    assert doc["mesh_id"] == wire.mesh_id("lab").hex()
    # Every node got a different key.
    assert len({e.public_key for e in reg.nodes.values()} | {reg.coordinator}) == 4


def test_bundle_contents(mesh: Path) -> None:
    reg = load(mesh)
    b = json.loads((mesh / "bundles" / "node-02.json").read_text())
    assert b["node_id"] == "node-02"
    assert keys.public_key(bytes.fromhex(b["seed"])).hex() == b["public_key"]
    assert bytes.fromhex(b["public_key"]) == reg.nodes["node-02"].public_key
    assert b["coordinator_public_key"] == reg.coordinator.hex()
    assert b["registry_digest"] == reg.digest().hex()
    assert b["broker"] == {"host": "10.1.2.3", "port": 8883}
    # The registry frame in the bundle verifies against the bundle's pinned coordinator key
    # and hashes to the bundle's digest.
    r = verify.load_registry_frame(bytes.fromhex(b["registry_frame"]), wire.mesh_id("lab"),
                                   bytes.fromhex(b["coordinator_public_key"]), keys.check_signature)
    assert r.digest().hex() == b["registry_digest"]


def test_bundle_signs_frames_the_coordinator_accepts(mesh: Path, tmp_path: Path) -> None:
    b = json.loads((mesh / "bundles" / "node-01.json").read_text())
    raw = wire.encode(wire.MODEL_UPDATE, bytes.fromhex(b["mesh_id"]), b["node_id"], 1, 1, 0,
                      wire.encode_model_update(5, [1, 2]), keys.signer(bytes.fromhex(b["seed"])))
    store = Store(tmp_path / "c.db")
    v = HostVerifier(load(mesh).portable(), store)
    assert v.verify(raw).sender == "node-01"
    store.close()


def test_rerun_refuses_and_keeps_keys(mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(mesh)
    capsys.readouterr()
    assert run("init", "--mesh", "lab", "--nodes", "3", "--out", str(mesh)) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite keys" in err and "--force" in err
    assert snapshot(mesh) == before


def test_force_replaces_keys(mesh: Path) -> None:
    old = (mesh / "coordinator.key").read_bytes()
    assert run("init", "--mesh", "lab", "--nodes", "2", "--out", str(mesh), "--force") == 0
    assert (mesh / "coordinator.key").read_bytes() != old
    assert mode(mesh / "coordinator.key") == 0o600
    assert sorted(load(mesh).nodes) == ["node-01", "node-02"]
    assert not (mesh / "nodes" / "node-03.key").exists()
    assert not (mesh / "bundles" / "node-03.json").exists()


def test_key_writer_refuses_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "k.key"
    keys.write_private_key(p, bytes(32))
    with pytest.raises(keys.KeyFileError, match="refusing to overwrite"):
        keys.write_private_key(p, bytes([1]) * 32)
    assert keys.read_private_key(p) == bytes(32)
    p.chmod(0o644)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.read_private_key(p)


def test_add_node(mesh: Path) -> None:
    old01 = (mesh / "nodes" / "node-01.key").read_bytes()
    assert run("add", "--dir", str(mesh), "cam-7") == 0
    reg = load(mesh)
    assert reg.version == 2 and reg.nodes["cam-7"].active
    assert mode(mesh / "nodes" / "cam-7.key") == 0o600
    assert (mesh / "nodes" / "node-01.key").read_bytes() == old01
    digests = {json.loads(p.read_text())["registry_digest"] for p in (mesh / "bundles").glob("*.json")}
    assert digests == {reg.digest().hex()}  # every bundle carries the new registry
    assert run("add", "--dir", str(mesh), "cam-7") == 2


def test_add_rejects_bad_ids(mesh: Path) -> None:
    before = snapshot(mesh)
    for bad in ("coordinator", "a/b", "x" * 65, "sp ace"):
        assert run("add", "--dir", str(mesh), bad) == 2
    assert snapshot(mesh) == before


def test_revoke_node(mesh: Path, tmp_path: Path) -> None:
    b = json.loads((mesh / "bundles" / "node-02.json").read_text())
    assert run("revoke", "--dir", str(mesh), "node-02") == 0
    reg = load(mesh)
    assert reg.version == 2 and not reg.nodes["node-02"].active
    assert not (mesh / "bundles" / "node-02.json").exists()
    raw = wire.encode(wire.MODEL_UPDATE, bytes.fromhex(b["mesh_id"]), "node-02", 1, 1, 0,
                      wire.encode_model_update(5, [1, 2]), keys.signer(bytes.fromhex(b["seed"])))
    store = Store(tmp_path / "c.db")
    with pytest.raises(Rejected) as ei:
        HostVerifier(reg.portable(), store).verify(raw)
    assert ei.value.reason == "revoked"
    store.close()
    assert run("revoke", "--dir", str(mesh), "node-02") == 2   # already revoked
    assert run("add", "--dir", str(mesh), "node-02") == 2      # ids are never reused
    assert run("revoke", "--dir", str(mesh), "node-77") == 2   # unknown


def test_tampered_registry_refused(mesh: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = mesh / "registry.json"
    doc = json.loads(p.read_text())
    doc["nodes"][0]["public_key"] = "00" * 32  # mirror edited, signed frame untouched
    p.write_text(json.dumps(doc))
    before = snapshot(mesh)
    assert run("add", "--dir", str(mesh), "n9") == 2
    assert "disagree" in capsys.readouterr().err
    assert snapshot(mesh) == before


def test_registry_signed_by_other_key_refused(mesh: Path) -> None:
    reg = load(mesh)
    other = keys.generate_seed()
    reg.coordinator = keys.public_key(other)
    frame = reg.sign(other)
    with pytest.raises(regmod.RegistryError, match="bad_signature"):
        regmod.from_frame("lab", frame, keys.read_public_key(mesh / "coordinator.pub"))


def test_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert run("init", "--mesh", "x", "--nodes", "2", "--out", str(out), "--broker", "nohost") == 2
    assert run("init", "--mesh", "x", "--nodes", "0", "--out", str(out)) == 2
    assert run("add", "--dir", str(tmp_path / "nothing"), "n1") == 2
    err = capsys.readouterr().err
    assert "HOST:PORT" in err and "no mesh.json" in err
    assert "Traceback" not in err


def test_console_script(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "provision", "init", "--mesh",
                           "m", "--nodes", "1", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "bundles" / "node-01.json").exists()


MP_BUNDLE = r"""
import sys, json
from microfed import wire, verify, ed25519
f = open(sys.argv[1]); b = json.load(f); f.close()
seed = bytes.fromhex(b["seed"])
assert ed25519.public_key(seed) == bytes.fromhex(b["public_key"])
reg = verify.load_registry_frame(bytes.fromhex(b["registry_frame"]), bytes.fromhex(b["mesh_id"]),
                                 bytes.fromhex(b["coordinator_public_key"]), ed25519.verify)
d = "".join(["%02x" % x for x in reg.digest()])
raw = wire.encode(wire.MODEL_UPDATE, reg.mesh_id, b["node_id"], 1, 1, 0,
                  wire.encode_model_update(3, [1, -1]), lambda m: ed25519.sign(seed, m))
f = open(sys.argv[2], "wb"); f.write(raw); f.close()
print(d == b["registry_digest"], reg.active_ids())
"""


def test_bundle_on_micropython(mesh: Path, tmp_path: Path, micropython: str) -> None:
    try:
        upy.run(["-c", "from microfed import ed25519"])
    except upy.MicroPythonError:
        pytest.skip("shared/microfed/ed25519.py not present: MicroPython bundle test skipped")
    script = tmp_path / "b.py"
    script.write_text(MP_BUNDLE)
    out_frame = tmp_path / "f.bin"
    out = upy.run([str(script), str(mesh / "bundles" / "node-03.json"), str(out_frame)])
    assert out.split() == ["True", "['node-01',", "'node-02',", "'node-03']"]
    store = Store(tmp_path / "c.db")
    fr = HostVerifier(load(mesh).portable(), store).verify(out_frame.read_bytes())
    assert fr.sender == "node-03" and fr.body["values"] == [1, -1]
    store.close()
