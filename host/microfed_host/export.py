"""A run's global model as a signed package (microfed.package, docs/package.md).

    data, pkg = package_from_run(run_dir)              # the latest model the store holds
    pkg = check_package(data, mesh_dir)                # who signed it: the mesh's coordinator

The coordinator's store (`coordinator.sqlite`) keeps the current global model and, per
closed round, the rule and the model's digest: the package holds the model after the last
closed round, checked against that round's digest before it is signed with the coordinator's
key from the run's mesh directory.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

from microfed import package
from microfed_host import keys
from microfed_host.provision import MeshDir, ProvisionError


class ExportError(Exception):
    pass


def _p1_p2(rule: str, params: dict[str, Any]) -> tuple[int, int]:
    """The rule's parameters as GOSSIP_DIGEST and the announcement carry them."""
    if rule == "krum":
        return int(params["f"]), 0
    if rule == "multi_krum":
        return int(params["f"]), int(params["m"])
    if rule == "trimmed_mean":
        return int(params["trim"]), 0
    return 0, 0


def _read_store(store: Path) -> tuple[dict[str, Any], tuple[Any, ...] | None, dict[str, Any], str]:
    if not store.is_file():
        raise ExportError(f"{store}: no coordinator store (is this a run directory?)")
    try:
        con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            st = con.execute("SELECT round, params FROM state WHERE id=1").fetchone()
            cfg_row = con.execute("SELECT value FROM run WHERE key='config'").fetchone()
            if st is None or cfg_row is None:
                raise ExportError(f"{store}: the coordinator has not started a round yet")
            last = int(st[0]) - 1
            row = con.execute("SELECT rule, params, model_digest FROM rounds WHERE round=?",
                              (last,)).fetchone()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise ExportError(f"{store}: {e}") from None
    cfg = json.loads(cfg_row[0])
    state = {"round": last, "params": bytes(st[1])}
    return state, row, cfg, cfg_row[0]


def package_from_run(run_dir: Path, round_: int | None = None,
                     timestamp: int | None = None) -> tuple[bytes, package.Package]:
    """The signed package of the run's latest global model (the model after the last closed
    round, or the initial model when no round closed). `round_`: the round the caller expects
    (an ExportError names the one the store holds otherwise)."""
    state, row, cfg, cfg_text = _read_store(run_dir / "coordinator.sqlite")
    last = state["round"]
    if round_ is not None and round_ != last:
        raise ExportError(f"the store keeps the latest global model only: the model after "
                          f"round {last}, not {round_}")
    raw = state["params"]
    if len(raw) % 4:
        raise ExportError("stored parameters are not whole int32 values")
    params = list(struct.unpack(f"<{len(raw) // 4}i", raw))
    rule, p1, p2 = "", 0, 0
    if row is not None:
        rule = row[0]
        p1, p2 = _p1_p2(rule, json.loads(row[1]))
        if hashlib.sha256(raw).hexdigest() != row[2]:
            raise ExportError(f"stored model does not match round {last}'s digest "
                              f"{row[2][:16]}...: the store is inconsistent")
    md = MeshDir(Path(cfg["mesh_dir"]))
    try:
        mesh = md.read_mesh()
        seed = keys.read_private_key(md.coord_key)
    except (ProvisionError, keys.KeyFileError) as e:
        raise ExportError(str(e)) from None
    data = package.encode(bytes.fromhex(mesh["mesh_id"]), last,
                          int(time.time()) if timestamp is None else timestamp,
                          cfg["model"], int(cfg["n_features"]), int(cfg["n_classes"]), rule,
                          p1, p2, hashlib.sha256(cfg_text.encode()).digest(), params,
                          keys.public_key(seed), keys.signer(seed))
    return data, package.decode(data)


def coordinator_key(mesh_dir: Path) -> tuple[bytes, bytes]:
    """(coordinator public key, mesh id) of a provisioned mesh directory."""
    md = MeshDir(mesh_dir)
    try:
        mesh = md.read_mesh()
        return keys.read_public_key(md.coord_pub), bytes.fromhex(mesh["mesh_id"])
    except (ProvisionError, keys.KeyFileError) as e:
        raise ExportError(str(e)) from None


def check_package(data: bytes, coordinator_pub: bytes,
                  mesh_id: bytes | None = None) -> package.Package:
    """microfed.package.verify with the host's Ed25519 (raises package.PackageError)."""
    return package.verify(data, coordinator_pub, keys.check_signature, mesh_id)
