"""The coordinator's side of one secure-aggregation round (docs/privacy.md, "Secure
aggregation"): four phases, each collecting one frame kind from the nodes that are still in,
each closed (by the coordinator: every wanted node in, or the deadline with at least the
threshold) into what it publishes next. No I/O and no verification here: the coordinator
verifies every frame (signature, replay, round, role) before `add`, and publishes what
`close` returns. The arithmetic is the portable reference's (microfed.secagg), so the
unmasked sum is exact.

    keys    SA_KEYS from the expected nodes     -> SA_KEYSET (U1, t = |U1| // 2 + 1)
    shares  SA_SHARES from U1                   -> one SA_INBOX per node of U2
    masked  SA_MASKED from U2 (summed mod 2^64) -> SA_UNMASK (alive U3, dropped U2 \\ U3)
    reveal  SA_REVEAL from U3                   -> the FedAvg aggregate of U3's updates
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from microfed import secagg, wire, wire_sa
from microfed.wire import Frame

PHASES = ("keys", "shares", "masked", "reveal")
KIND_OF = {"keys": wire.SA_KEYS, "shares": wire.SA_SHARES, "masked": wire.SA_MASKED,
           "reveal": wire.SA_REVEAL}
MAX_NODES = 100  # the key set of 100 nodes is ~15 KB; the tested range is 5..100


@dataclass
class Result:
    """What the round produced: the aggregate of `ids`, their total weight, and the SHA-256
    of each one's SA_MASKED frame (the announcement's accepted set)."""
    vector: list[int]
    weight: int
    ids: list[str]
    frame_sha: dict[str, bytes] = field(default_factory=dict)


class SecAggRound:
    def __init__(self, round_: int, expected: list[str], dim: int,
                 dh: Callable[[bytes, bytes], bytes] | None = None) -> None:
        self.round = round_
        self.dim = dim
        self.dh = dh
        self.phase = "keys"
        self.wanted = sorted(expected, key=lambda s: s.encode())
        self.got: dict[str, Frame] = {}
        self.sha: dict[str, bytes] = {}
        self.t = 0
        self.u1: list[str] = []
        self.keyset: dict[str, tuple[int, bytes]] = {}  # id -> (x, s_pk)
        self.blobs: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> blob
        self.u2: list[str] = []
        self.total = [0] * (dim + 1)
        self.masked_sha: dict[str, bytes] = {}
        self.alive: list[str] = []
        self.dropped: list[str] = []

    # -- collecting ----------------------------------------------------------------------
    def need(self) -> int:
        """How many frames this phase needs before a deadline may close it."""
        return secagg.MIN_NODES if self.phase == "keys" else self.t

    def complete(self) -> bool:
        return all(n in self.got for n in self.wanted)

    def add(self, fr: Frame, sha: bytes) -> tuple[str, str] | None:
        """Take a verified node frame for this round; (reason, message) if it does not fit."""
        if fr.kind != KIND_OF[self.phase]:
            return ("wrong_phase", "%s while collecting %s" % (fr.kind_name, self.phase))
        if fr.sender not in self.wanted:
            return ("not_expected", "%s is not in this phase's set" % fr.sender)
        if fr.sender in self.got:
            return ("equivocation", "second %s from %s in round %d"
                    % (fr.kind_name, fr.sender, self.round))
        bad = self._check(fr)
        if bad is not None:
            return ("bad_payload", bad)
        # State.
        self.got[fr.sender] = fr
        self.sha[fr.sender] = sha
        if self.phase == "masked":
            secagg.add_words(self.total, fr.body["words"])
            fr.body = {}  # summed: the masked words are not kept
        return None

    def _check(self, fr: Frame) -> str | None:
        b = fr.body
        if self.phase == "shares":
            to = [i for i, _blob in b["entries"]]
            want = [i for i in self.u1 if i != fr.sender]
            if to != want:
                return "shares for %d nodes, the key set has %d others" % (len(to), len(want))
        elif self.phase == "reveal":
            rows = [(i, w) for i, w, _s in b["entries"]]
            want = sorted([(i, wire_sa.SA_SELF) for i in self.alive]
                          + [(i, wire_sa.SA_PAIR) for i in self.dropped])
            if rows != want:
                return "reveal does not answer the unmask request"
        return None

    # -- closing -------------------------------------------------------------------------
    def close(self) -> list[tuple[str | None, int, bytes]] | Result:
        """End this phase: what to publish next, as (recipient or None for everyone, kind,
        payload), or the Result after the last phase. Raises secagg.SecAggError."""
        ids = sorted(self.got, key=lambda s: s.encode())
        if len(ids) < self.need():
            raise secagg.SecAggError("%s phase: %d nodes, %d needed" % (self.phase, len(ids),
                                                                         self.need()))
        if self.phase == "keys":
            entries = []
            for i in ids:
                f = self.got[i]
                entries.append((i, f.seq, f.timestamp, f.body["c_pk"], f.body["s_pk"],
                                bytes(f.signature)))
            self.u1 = ids
            self.t = len(ids) // 2 + 1
            self.keyset = {i: (k + 1, self.got[i].body["s_pk"]) for k, i in enumerate(ids)}
            return self._next("shares", ids, [(None, wire.SA_KEYSET,
                                               wire_sa.encode_sa_keyset(self.t, entries))])
        if self.phase == "shares":
            self.blobs = {i: dict(self.got[i].body["entries"]) for i in ids}
            self.u2 = ids
            out: list[tuple[str | None, int, bytes]] = []
            for v in ids:
                rows = [(u, self.blobs[u][v]) for u in ids if u != v]
                out.append((v, wire.SA_INBOX, wire_sa.encode_sa_blobs(rows)))
            self.blobs = {}
            return self._next("masked", ids, out)
        if self.phase == "masked":
            self.alive = ids
            self.dropped = [i for i in self.u2 if i not in self.got]
            self.masked_sha = {i: self.sha[i] for i in ids}
            return self._next("reveal", ids, [(None, wire.SA_UNMASK,
                                               wire_sa.encode_sa_unmask(self.alive, self.dropped))])
        reveals = {i: self.got[i].body["entries"] for i in ids}
        plain = secagg.unmask(self.total, self.keyset, self.alive, self.dropped, reveals,
                              self.t, self.dh)
        vec, weight = secagg.weighted_mean(plain)
        return Result(vec, weight, list(self.alive), dict(self.masked_sha))

    def _next(self, phase: str, wanted: list[str],
              out: list[tuple[str | None, int, bytes]]) -> list[tuple[str | None, int, bytes]]:
        self.phase = phase
        self.wanted = wanted
        self.got = {}
        self.sha = {}
        return out
