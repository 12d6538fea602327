"""The mesh registry on the host: node id -> Ed25519 public key (+ active/revoked), signed by
the coordinator.

The authority is a signed REGISTRY frame (microfed.wire, kind 6): its payload is the canonical
binary registry, its sequence counter is the registry version, and its signature is the
coordinator's. `registry.json` carries that frame in hex next to a human-readable mirror of
its contents; loading re-derives everything from the frame, checks the signature against a
PINNED coordinator key supplied by the caller, and refuses a file whose mirror disagrees.
The registry digest given to devices is SHA-256(payload).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from microfed import verify, wire
from microfed_host import keys

FORMAT = "microfed-registry/1"


class RegistryError(Exception):
    pass


@dataclass
class NodeEntry:
    node_id: str
    public_key: bytes
    active: bool = True


@dataclass
class MeshRegistry:
    mesh: str
    coordinator: bytes
    version: int = 1
    nodes: dict[str, NodeEntry] = field(default_factory=dict)

    @property
    def mesh_id(self) -> bytes:
        return wire.mesh_id(self.mesh)

    def payload(self) -> bytes:
        try:
            return wire.encode_registry(
                self.mesh_id,
                self.version,
                self.coordinator,
                [(e.node_id, e.public_key, e.active) for e in self.nodes.values()],
            )
        except wire.WireError as e:
            raise RegistryError(e.message) from None

    def digest(self) -> bytes:
        return wire.sha256(self.payload())

    def portable(self) -> verify.Registry:
        return verify.Registry(
            self.mesh_id,
            self.coordinator,
            [(e.node_id, e.public_key, e.active) for e in self.nodes.values()],
            self.version,
        )

    def sign(self, coordinator_seed: bytes, timestamp: int | None = None) -> bytes:
        """The signed REGISTRY frame: sender 'coordinator', round 0, seq = version."""
        if keys.public_key(coordinator_seed) != self.coordinator:
            raise RegistryError("the coordinator key does not match the registry's coordinator")
        ts = int(time.time()) if timestamp is None else timestamp
        return wire.encode(
            wire.REGISTRY, self.mesh_id, wire.COORDINATOR, 0, self.version, ts,
            self.payload(), keys.signer(coordinator_seed),
        )

    def to_json(self, frame: bytes) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "mesh": self.mesh,
            "mesh_id": self.mesh_id.hex(),
            "version": self.version,
            "coordinator": self.coordinator.hex(),
            "digest": self.digest().hex(),
            "nodes": [
                {"id": e.node_id, "public_key": e.public_key.hex(),
                 "status": "active" if e.active else "revoked"}
                for e in sorted(self.nodes.values(), key=lambda e: e.node_id.encode())
            ],
            "frame": frame.hex(),
        }


def from_frame(mesh: str, frame: bytes, coordinator_pub: bytes) -> MeshRegistry:
    """Verify a REGISTRY frame against the pinned coordinator key; return its registry."""
    try:
        reg = verify.load_registry_frame(
            frame, wire.mesh_id(mesh), coordinator_pub, keys.check_signature
        )
    except wire.WireError as e:
        raise RegistryError(f"registry frame rejected: {e.reason}: {e.message}") from None
    out = MeshRegistry(mesh=mesh, coordinator=reg.coordinator, version=reg.version)
    for node_id, (pub, active) in reg.nodes.items():
        out.nodes[node_id] = NodeEntry(node_id, pub, active)
    return out


def load(path: Path, coordinator_pub: bytes) -> tuple[MeshRegistry, bytes]:
    """Read registry.json; return (registry, signed frame). Raises RegistryError."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"cannot read registry {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise RegistryError(f"{path} is not a {FORMAT} file")
    try:
        frame = bytes.fromhex(doc["frame"])
        mesh = str(doc["mesh"])
    except (KeyError, TypeError, ValueError):
        raise RegistryError(f"{path}: missing or malformed 'frame'/'mesh'") from None
    reg = from_frame(mesh, frame, coordinator_pub)
    # The mirror must say what the signed frame says, or someone edited the file by hand.
    if reg.to_json(frame) != doc:
        raise RegistryError(f"{path}: readable fields disagree with the signed frame")
    return reg, frame


def save(path: Path, reg: MeshRegistry, frame: bytes) -> None:
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(reg.to_json(frame), indent=2) + "\n")
    tmp.replace(p)
