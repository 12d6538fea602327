"""The coordinator's frame verifier: microfed.verify's pipeline with `cryptography` for the
signature step, SQLite (microfed_host.store) for replay counters, and every rejection
recorded in the store's audit log. A rejected frame changes no counter."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable

from microfed import verify, wire
from microfed.replay import DEFAULT_MAX_AGE, DEFAULT_MAX_FUTURE, ReplayGuard
from microfed.verify import Limits, Rejected
from microfed.wire import Frame
from microfed_host import keys
from microfed_host.store import Store

__all__ = ["HostVerifier", "Rejected", "Limits"]


class HostVerifier:
    def __init__(
        self,
        registry: verify.Registry,
        store: Store,
        limits: Limits | None = None,
        kinds: Iterable[int] | None = None,
        max_frame: int = wire.MAX_FRAME,
        max_age: int = DEFAULT_MAX_AGE,
        max_future: int = DEFAULT_MAX_FUTURE,
        check_sig: Callable[[bytes, bytes, bytes], bool] = keys.check_signature,
        clock: Callable[[], float] = time.time,
        refine: Callable[[bytes, Rejected], Rejected | None] | None = None,
    ) -> None:
        """refine(data, rejection) may replace a rejection with a more precise one before
        it is recorded (the coordinator tells `counter_behind` from `replay`)."""
        self.store = store
        self.refine = refine
        self.clock = clock
        self.max_frame = max_frame
        self._v = verify.Verifier(
            registry.mesh_id,
            registry,
            ReplayGuard(store, max_age=max_age, max_future=max_future),
            check_sig,
            max_frame=max_frame,
            limits=limits,
            kinds=tuple(kinds) if kinds is not None else None,
        )

    @property
    def stats(self) -> dict[str, int]:
        """Counts since this object was made; store.rejection_counts() is the persistent view."""
        return dict(self._v.stats)

    @property
    def last_header(self) -> tuple[str, int, int, int] | None:
        """(sender, kind, round, seq) of the frame the last verify() decoded, or None."""
        return self._v.last_header

    @property
    def registry(self) -> verify.Registry:
        return self._v.registry

    @registry.setter
    def registry(self, reg: verify.Registry) -> None:
        if reg.mesh_id != self._v.mesh_id:
            raise ValueError("a new registry must be for the same mesh")
        self._v.registry = reg

    def verify(
        self,
        data: bytes,
        now: int | None = None,
        min_round: int | None = None,
        max_round: int | None = None,
    ) -> Frame:
        t = int(self.clock()) if now is None else now
        try:
            return self._v.verify(data, t, min_round, max_round)
        except Rejected as e:
            better = self.refine(data, e) if self.refine is not None else None
            if better is not None:
                self._record(data, better)
                raise better from None
            self._record(data, e)
            raise

    def _record(self, data: object, e: Rejected) -> None:
        size = len(data) if isinstance(data, bytes | bytearray | memoryview) else -1
        digest = None
        sender = kind = rnd = seq = None
        # Oversized frames are logged by size only: nothing is hashed or parsed past the limit.
        if 0 <= size <= self.max_frame:
            digest = hashlib.sha256(bytes(data)).hexdigest()  # type: ignore[arg-type]
            if self._v.last_header is not None:  # decoded by the pipeline, if it got that far
                sender, kind, rnd, seq = self._v.last_header
        self.store.record_rejection(e.reason, e.message, size, digest, sender, kind, rnd, seq)
