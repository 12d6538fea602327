# The signed registry, as a node holds it: who may sign what (node id -> public key, active),
# and the coordinator's pinned key; and Rejected, the error every check raises. Its own
# module so that a node that checks no peer's frame (coordinated mode) imports this and not
# the whole pipeline (microfed.verify, which re-exports these names): ~0.5 KB less of a
# 32-bit node's heap (benchmarks/node_boot_heap.py). Portable MicroPython 1.29 / CPython.

import hashlib

from microfed import wire
from microfed.wire import WireError


class Rejected(WireError):
    """A frame rejected, with its reason (microfed.verify.REASONS) and a message: raised by
    microfed.verify.Verifier.verify, load_registry_frame and microfed.noderound; a WireError,
    so `except WireError` catches both."""


class Registry:
    """Node id -> public key, plus the coordinator's key. Built from a REGISTRY frame's body
    (after checking the coordinator's signature) or from the host's registry file."""

    def __init__(self, mesh_id, coordinator_pub, entries, version=0, only=None):
        self.mesh_id = mesh_id
        self.coordinator = coordinator_pub
        self.version = version
        self.nodes = {}
        for node_id, pub, active in entries:
            if only is None or node_id == only:
                self.nodes[node_id] = (pub, active)

    def lookup(self, sender):
        """(public_key, active) for a sender id, or None if unknown."""
        if sender == wire.COORDINATOR:
            return (self.coordinator, True)
        return self.nodes.get(sender)

    def active_ids(self):
        return sorted([k for k in self.nodes if self.nodes[k][1]])

    def digest(self):
        return hashlib.sha256(self.payload()).digest()

    def payload(self):
        return wire.encode_registry(self.mesh_id, self.version, self.coordinator,
                                    [(k, v[0], v[1]) for k, v in self.nodes.items()])


def load_registry_frame(data, mesh_id, coordinator_pub, check_sig, min_version=0, only=None):
    """Verify a REGISTRY frame against the PINNED coordinator key (from the node's bundle),
    never the key inside the payload; return a Registry. Raises Rejected. `only`: a node id;
    the Registry then holds that node's entry alone (a node that checks no peer's frame
    needs no peer's key: ~1.5 KB for 13 nodes on a 32-bit port)."""
    # While the signature is checked only its digest and the signature stay on the heap: the
    # decoded entries (~2.9 KB with the frame for 13 nodes on a 32-bit port) would sit under
    # Ed25519's temporaries, on a heap of a few tens of KB. The frame is decoded again after.
    digest, sig = _signed_part(data, mesh_id, coordinator_pub)
    if not _sig_ok(check_sig, coordinator_pub, digest, sig):
        raise Rejected("bad_signature", "registry signature does not verify")
    digest = sig = None
    b = _registry_frame(data, mesh_id, coordinator_pub).body
    if b["version"] < min_version:
        raise Rejected("replay", "registry version %d older than %d" % (b["version"], min_version))
    return Registry(b["mesh_id"], b["coordinator"], b["entries"], b["version"], only)


def _signed_part(data, mesh_id, coordinator_pub):
    # A function of its own: on MicroPython a frame's value stack keeps what it held after it
    # is popped, and the collector scans it, so a decoded frame that passed through
    # load_registry_frame's own stack stayed on the heap while the signature was checked
    # (seen in a unix32 heap dump). This stack is gone when it returns.
    fr = _registry_frame(data, mesh_id, coordinator_pub)
    return fr.signing_digest(), fr.signature


def _registry_frame(data, mesh_id, coordinator_pub):
    # Every check of a REGISTRY frame but its signature and version, in load_registry_frame's
    # order of reasons. The payload stays a view into data (values=False): the frame is
    # dropped before data is, and a copy is a ~600-byte block at boot (on a 32 KB heap the
    # block a coordinated unix32 node once lacked).
    try:
        fr = wire.decode(data, wire.MAX_FRAME, False)
    except Rejected:
        raise
    except WireError as e:
        raise Rejected(e.reason, e.message)
    if fr.kind != wire.REGISTRY:
        raise Rejected("wrong_kind", "not a registry frame")
    if fr.mesh_id != mesh_id:
        raise Rejected("wrong_mesh", "registry for another mesh")
    if fr.sender != wire.COORDINATOR:
        raise Rejected("wrong_role", "registry not sent by the coordinator")
    if fr.body["coordinator"] != coordinator_pub:
        raise Rejected("bad_signature", "registry names a different coordinator key")
    return fr


def _sig_ok(check_sig, pub, digest, signature):
    try:
        return check_sig(pub, digest, signature) is True
    except MemoryError:
        raise  # out of heap is not a bad signature: the caller reports it as what it is
    except Exception:
        # A signature backend that throws on malformed input is treated as "does not verify".
        return False
