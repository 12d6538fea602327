"""The coordinator's round state in SQLite, in the same database (and connection) as the
security store of `microfed_host.store`, so that accepting an update is ONE transaction:
the sender's replay counter and the update row move together or not at all.

Tables (besides `store.Store`'s counters / events / reject_counts):

- `run`:        the coordinator's configuration (JSON), written once; a restart must match it.
- `state`:      one row: the round being collected, the global parameters it trains from,
                the reputation book, the exact bytes of the last GLOBAL_MODEL frame published
                (re-published verbatim after a restart) and the coordinator's frame counter.
- `rounds`:     one row per closed round: accepted count, rule, aggregate digest, model
                digest, test accuracy, whether the reference cross-check ran.
- `updates`:    one row per ACCEPTED update with the whole signed frame (what a restart
                re-aggregates from). Rejected frames are counted in the bounded audit tables
                of `store.Store` (events, rejections), never here: a flood cannot grow it.
- `reputation`: reputation history: (round, node) -> reputation, banned flag, verdict.
- `security`:   security events beyond frame rejections: bans, digest mismatches, cross-check
                mismatches, restarts.
- `digests`:    gossip digests per (round, node) and whether they matched.
- `status`:     HELLO / STATUS frames the nodes sent (their own rejection counters).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from microfed_host.store import Store, StoreError

ROUNDS_SCHEMA = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    round INTEGER NOT NULL,
    params BLOB NOT NULL,
    reputation BLOB NOT NULL,
    global_frame BLOB NOT NULL,
    coord_seq INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    closed REAL NOT NULL,
    n_accepted INTEGER NOT NULL,
    rule TEXT NOT NULL,
    params TEXT NOT NULL,
    selected TEXT,
    agg_digest TEXT NOT NULL,
    model_digest TEXT NOT NULL,
    accuracy REAL,
    crosschecked INTEGER NOT NULL,
    close_reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    round INTEGER,
    sender TEXT,
    seq INTEGER,
    samples INTEGER,
    frame_sha256 TEXT,
    verdict TEXT NOT NULL,
    reason TEXT,
    frame BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS updates_one_per_round
    ON updates (round, sender) WHERE verdict = 'accepted';
CREATE INDEX IF NOT EXISTS updates_hash ON updates (frame_sha256);
CREATE TABLE IF NOT EXISTS reputation (
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    rep INTEGER NOT NULL,
    banned INTEGER NOT NULL,
    verdict TEXT,
    PRIMARY KEY (round, node)
);
CREATE TABLE IF NOT EXISTS security (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    round INTEGER,
    kind TEXT NOT NULL,
    node TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS digests (
    round INTEGER NOT NULL,
    node TEXT NOT NULL,
    digest TEXT NOT NULL,
    agree INTEGER NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (round, node)
);
CREATE TABLE IF NOT EXISTS status (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    node TEXT NOT NULL,
    kind TEXT NOT NULL,
    state INTEGER NOT NULL,
    last_round INTEGER NOT NULL,
    label TEXT NOT NULL
);
"""


class RoundsStore(Store):
    """Store + round tables. `stage()` makes the next replay-counter advance provisional so
    that `accept_update()` can commit it together with the update row."""

    def __init__(self, path: str | Path, max_events: int = 10000, max_groups: int = 10000,
                 flush_every: int = 1000) -> None:
        super().__init__(path, max_events=max_events, max_groups=max_groups,
                         flush_every=flush_every)
        self._staging = False
        self._staged: tuple[str, int, int] | None = None
        try:
            self.db.executescript(_SCHEMA)
            with self.transaction():
                row = self.db.execute("SELECT value FROM meta WHERE key='rounds_schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('rounds_schema', ?)", (ROUNDS_SCHEMA,))
                elif row[0] != ROUNDS_SCHEMA:
                    raise StoreError(f"{self.path}: rounds schema {row[0]}, expected {ROUNDS_SCHEMA}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from None

    # -- replay counters, staged ---------------------------------------------------------
    def stage(self) -> None:
        """The next `advance` only remembers the counter; `accept_update`, `commit_staged`
        or `drop_staged` finishes it."""
        self._staging = True
        self._staged = None

    def advance(self, sender: str, kind: int, seq: int) -> bool:
        if not self._staging:
            return super().advance(sender, kind, seq)
        if seq <= self.last(sender, kind):
            return False
        self._staged = (sender, kind, seq)
        return True

    def _write_staged(self) -> None:
        if self._staged is None:
            return
        sender, kind, seq = self._staged
        self.db.execute(
            "INSERT INTO counters (sender, kind, seq, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sender, kind) DO UPDATE SET seq=excluded.seq, updated=excluded.updated "
            "WHERE excluded.seq > counters.seq",
            (sender, kind, seq, time.time()),
        )

    def commit_staged(self) -> None:
        with self.transaction():
            self._write_staged()
        self.drop_staged()

    def drop_staged(self) -> None:
        self._staging = False
        self._staged = None

    # -- run configuration ---------------------------------------------------------------
    def get_config(self) -> dict[str, Any] | None:
        row = self.db.execute("SELECT value FROM run WHERE key='config'").fetchone()
        return None if row is None else json.loads(row[0])

    def put_config(self, cfg: dict[str, Any]) -> None:
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO run VALUES ('config', ?)",
                            (json.dumps(cfg, sort_keys=True),))

    def put_queue(self, stats: dict[str, int]) -> None:
        """The coordinator's receive queue as its MQTT client counts it (messages waiting,
        frames dropped oversize or for a full queue), for the metrics (read from the store)."""
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO run VALUES ('queue', ?)",
                            (json.dumps(dict(stats, at=time.time()), sort_keys=True),))

    # -- state ---------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT round, params, reputation, global_frame, coord_seq, done FROM state WHERE id=1"
        ).fetchone()
        if row is None:
            return None
        return {"round": int(row[0]), "params": bytes(row[1]), "reputation": bytes(row[2]),
                "global_frame": bytes(row[3]), "coord_seq": int(row[4]), "done": bool(row[5])}

    def _put_state(self, round_: int, params: bytes, reputation: bytes, global_frame: bytes,
                   coord_seq: int, done: bool) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO state (id, round, params, reputation, global_frame, coord_seq,"
            " done, updated) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (round_, params, reputation, global_frame, coord_seq, int(done), time.time()),
        )

    def init_state(self, round_: int, params: bytes, reputation: bytes, global_frame: bytes,
                   coord_seq: int) -> None:
        with self.transaction():
            self._put_state(round_, params, reputation, global_frame, coord_seq, False)

    def mark_done(self) -> None:
        with self.transaction():
            self.db.execute("UPDATE state SET done=1, updated=? WHERE id=1", (time.time(),))

    # -- updates -------------------------------------------------------------------------
    def accept_update(self, round_: int, sender: str, seq: int, samples: int, sha: str,
                      frame: bytes) -> None:
        """Persist an accepted update and its (staged) replay counter atomically."""
        try:
            with self.transaction():
                self._write_staged()
                self.db.execute(
                    "INSERT INTO updates (at, round, sender, seq, samples, frame_sha256, verdict,"
                    " reason, frame) VALUES (?, ?, ?, ?, ?, ?, 'accepted', NULL, ?)",
                    (time.time(), round_, sender, seq, samples, sha, frame),
                )
        finally:
            self.drop_staged()

    def accepted_frames(self, round_: int) -> list[bytes]:
        rows = self.db.execute(
            "SELECT frame FROM updates WHERE round=? AND verdict='accepted' ORDER BY id", (round_,)
        )
        return [bytes(r[0]) for r in rows]

    def accepted_round_of(self, sha: str) -> int | None:
        row = self.db.execute(
            "SELECT round FROM updates WHERE frame_sha256=? AND verdict='accepted'", (sha,)
        ).fetchone()
        return None if row is None else int(row[0])

    # -- closing a round -----------------------------------------------------------------
    def close_round(
        self,
        round_: int,
        row: dict[str, Any],
        reputation_rows: list[tuple[str, int, bool, str | None]],
        security: list[tuple[str, str | None, str]],
        next_round: int,
        params: bytes,
        reputation: bytes,
        global_frame: bytes,
        coord_seq: int,
    ) -> None:
        """Everything a closed round changes, in one transaction: its row, the reputation
        history, the security events, and the new state (model, book, next global frame)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO rounds (round, closed, n_accepted, rule, params, selected, agg_digest,"
                " model_digest, accuracy, crosschecked, close_reason) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (round_, time.time(), row["n_accepted"], row["rule"], json.dumps(row["params"]),
                 json.dumps(row["selected"]) if row["selected"] is not None else None,
                 row["agg_digest"], row["model_digest"], row["accuracy"],
                 int(row["crosschecked"]), row["close_reason"]),
            )
            for node, rep, banned, verdict in reputation_rows:
                self.db.execute("INSERT OR REPLACE INTO reputation VALUES (?, ?, ?, ?, ?)",
                                (round_, node, rep, int(banned), verdict))
            for kind, node, detail in security:
                self._security(round_, kind, node, detail)
            self._put_state(next_round, params, reputation, global_frame, coord_seq, False)

    def _security(self, round_: int | None, kind: str, node: str | None, detail: str) -> None:
        self.db.execute("INSERT INTO security (at, round, kind, node, detail) VALUES (?, ?, ?, ?, ?)",
                        (time.time(), round_, kind, node, detail))

    def security_event(self, round_: int | None, kind: str, node: str | None, detail: str) -> None:
        with self.transaction():
            self._security(round_, kind, node, detail)

    def record_digest(self, round_: int, node: str, digest: str, agree: bool) -> bool:
        """False if this node already reported a digest for this round (kept: the first)."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO digests VALUES (?, ?, ?, ?, ?)",
                (round_, node, digest, int(agree), time.time()),
            )
            if cur.rowcount != 1:
                return False
            if not agree:
                self._security(round_, "digest_mismatch", node, digest)
            return True

    def record_status(self, node: str, kind: str, state: int, last_round: int, label: str) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO status (at, node, kind, state, last_round, label) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), node, kind, state, last_round, label),
            )

    # -- queries for reports -------------------------------------------------------------
    def rounds(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT * FROM rounds ORDER BY round")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def round_row(self, round_: int) -> dict[str, Any] | None:
        cur = self.db.execute("SELECT * FROM rounds WHERE round=?", (round_,))
        names = [d[0] for d in cur.description]
        r = cur.fetchone()
        return None if r is None else dict(zip(names, r, strict=True))

    def reputation_history(self) -> list[tuple[int, str, int, bool, str | None]]:
        return [(int(r), n, int(v), bool(b), vd) for r, n, v, b, vd in self.db.execute(
            "SELECT round, node, rep, banned, verdict FROM reputation ORDER BY round, node")]

    def security_events(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT id, at, round, kind, node, detail FROM security ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def digests(self) -> list[tuple[int, str, str, bool]]:
        return [(int(r), n, d, bool(a)) for r, n, d, a in self.db.execute(
            "SELECT round, node, digest, agree FROM digests ORDER BY round, node")]

    def rejected_hashes(self) -> dict[str, str]:
        """frame SHA-256 -> reason, for every rejected frame still in the audit log."""
        self.flush()
        out: dict[str, str] = {}
        for sha, reason in self.db.execute(
                "SELECT frame_sha256, reason FROM events WHERE frame_sha256 IS NOT NULL ORDER BY id"):
            out.setdefault(sha, reason)
        return out

    def update_verdicts(self) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT at, round, sender, seq, samples, frame_sha256, verdict, reason FROM updates ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
