"""The coordinator's persistent security state in SQLite.

- `counters`: the last accepted sequence counter per (sender, kind). It only ever moves
  through `advance`, one conditional UPSERT inside a transaction, so a counter never goes
  backwards, two verifiers cannot both accept the same counter, and a crash leaves either the
  old or the new value. It survives coordinator restarts (that is the point).
- `events` / `rejections` / `reject_counts`: the audit log of rejections. `events` keeps the
  newest `max_events` frames one by one (with their SHA-256); `rejections` keeps counts per
  (sender, reason, round), pruned to the newest `max_groups` groups; `reject_counts` keeps the
  per-reason totals forever. Logging a rejection never touches `counters`.
- Rejections are buffered in memory and written `flush_every` at a time in ONE transaction
  (the coordinator also flushes once a second): a flood of junk costs one fsync per batch,
  not one per frame. Reads flush first, so they always see every rejection recorded.

Implements the store interface of microfed.replay (`last`, `advance`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (
    sender TEXT NOT NULL,
    kind INTEGER NOT NULL,
    seq INTEGER NOT NULL CHECK (seq > 0),
    updated REAL NOT NULL,
    PRIMARY KEY (sender, kind)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    size INTEGER NOT NULL,
    frame_sha256 TEXT,
    sender TEXT,
    kind INTEGER,
    round INTEGER,
    seq INTEGER
);
CREATE TABLE IF NOT EXISTS reject_counts (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rejections (
    sender TEXT NOT NULL,
    reason TEXT NOT NULL,
    round INTEGER NOT NULL,
    count INTEGER NOT NULL,
    last_at REAL NOT NULL,
    last_sha256 TEXT,
    last_message TEXT NOT NULL,
    PRIMARY KEY (sender, reason, round)
);
CREATE INDEX IF NOT EXISTS rejections_age ON rejections (last_at);
CREATE TABLE IF NOT EXISTS node_keys (
    sender TEXT PRIMARY KEY,
    public_key BLOB NOT NULL,
    epoch INTEGER NOT NULL
);
"""

_Rejection = tuple[float, str, str, int, "str | None", "str | None", "int | None", "int | None",
                   "int | None"]


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: str | Path, max_events: int = 10000, max_groups: int = 10000,
                 flush_every: int = 1) -> None:
        self.path = str(path)
        self.max_events = max_events
        self.max_groups = max_groups
        self.flush_every = max(1, flush_every)
        self._pending: list[_Rejection] = []
        self._last_flush = 0.0
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            # Idempotent DDL; executescript would commit an open transaction, so run it first.
            self.db.executescript(_SCHEMA)
            with self.transaction():
                row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise StoreError(f"{self.path}: schema {row[0]}, expected {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()

    # -- microfed.replay store interface

    def last(self, sender: str, kind: int) -> int:
        row = self.db.execute(
            "SELECT seq FROM counters WHERE sender=? AND kind=?", (sender, kind)
        ).fetchone()
        return int(row[0]) if row else 0

    def advance(self, sender: str, kind: int, seq: int) -> bool:
        """Set the counter to `seq` iff it is greater than the stored one; atomic."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO counters (sender, kind, seq, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sender, kind) DO UPDATE SET seq=excluded.seq, updated=excluded.updated "
                "WHERE excluded.seq > counters.seq",
                (sender, kind, seq, time.time()),
            )
            return cur.rowcount == 1

    def adopt_keys(self, keys: dict[str, bytes]) -> list[str]:
        """Record each sender's registered public key. A sender whose key CHANGED (a re-enrolled
        node) starts a new counter epoch: its counters are deleted in the same transaction,
        because frames signed with the old key can never verify again and the new device
        counts from 1. Returns the senders that were re-keyed. Idempotent across restarts."""
        rekeyed: list[str] = []
        with self.transaction():
            for sender, pub in sorted(keys.items()):
                row = self.db.execute("SELECT public_key, epoch FROM node_keys WHERE sender=?",
                                      (sender,)).fetchone()
                if row is None:
                    self.db.execute("INSERT INTO node_keys VALUES (?, ?, 1)", (sender, pub))
                elif bytes(row[0]) != pub:
                    self.db.execute("DELETE FROM counters WHERE sender=?", (sender,))
                    self.db.execute("UPDATE node_keys SET public_key=?, epoch=? WHERE sender=?",
                                    (pub, int(row[1]) + 1, sender))
                    rekeyed.append(sender)
        return rekeyed

    def key_epoch(self, sender: str) -> int:
        row = self.db.execute("SELECT epoch FROM node_keys WHERE sender=?", (sender,)).fetchone()
        return int(row[0]) if row else 0

    # -- audit log

    def record_rejection(
        self,
        reason: str,
        message: str,
        size: int,
        frame_sha256: str | None = None,
        sender: str | None = None,
        kind: int | None = None,
        round_: int | None = None,
        seq: int | None = None,
    ) -> None:
        """Count a rejected frame; written with the next flush (at once if flush_every is 1)."""
        self._pending.append((time.time(), reason, message[:500], size, frame_sha256, sender,
                              kind, round_, seq))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush_if_due(self, now: float, every_s: float = 1.0) -> None:
        """Flush buffered rejections at most once per `every_s` (the coordinator's tick)."""
        if self._pending and now - self._last_flush >= every_s:
            self.flush()
            self._last_flush = now

    @property
    def pending_rejections(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Write every buffered rejection in one transaction, then prune the bounded tables."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        totals: dict[str, int] = {}
        groups: dict[tuple[str, str, int], list[Any]] = {}
        for at, reason, message, _size, sha, sender, _kind, rnd, _seq in batch:
            totals[reason] = totals.get(reason, 0) + 1
            key = (sender or "", reason, -1 if rnd is None else rnd)
            g = groups.setdefault(key, [0, at, sha, message])
            g[0] += 1
            g[1], g[2], g[3] = at, sha, message
        keep = batch[-self.max_events:] if self.max_events > 0 else []
        with self.transaction():
            cur = None
            for row in keep:
                cur = self.db.execute(
                    "INSERT INTO events (at, reason, message, size, frame_sha256, sender, kind, "
                    "round, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            for reason, n in totals.items():
                self.db.execute(
                    "INSERT INTO reject_counts VALUES (?, ?) "
                    "ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
                    (reason, n))
            for (sender, reason, rnd), (n, at, sha, message) in groups.items():
                self.db.execute(
                    "INSERT INTO rejections VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (sender, reason, round) DO UPDATE SET count = count + "
                    "excluded.count, last_at = excluded.last_at, last_sha256 = "
                    "excluded.last_sha256, last_message = excluded.last_message",
                    (sender, reason, rnd, n, at, sha, message))
            if cur is not None and cur.lastrowid is not None and self.max_events > 0:
                self.db.execute("DELETE FROM events WHERE id <= ?",
                                (cur.lastrowid - self.max_events,))
            if self.max_groups > 0:
                (n_groups,) = self.db.execute("SELECT COUNT(*) FROM rejections").fetchone()
                if n_groups > self.max_groups:
                    self.db.execute(
                        "DELETE FROM rejections WHERE rowid IN (SELECT rowid FROM rejections "
                        "ORDER BY last_at LIMIT ?)", (n_groups - self.max_groups,))

    def rejection_groups(self, limit: int = 100) -> list[dict[str, Any]]:
        """Rejections counted per (sender, reason, round), newest first ('' = no sender)."""
        self.flush()
        cur = self.db.execute(
            "SELECT sender, reason, round, count, last_at, last_sha256, last_message "
            "FROM rejections ORDER BY last_at DESC LIMIT ?", (limit,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        self.flush()
        cur = self.db.execute(
            "SELECT id, at, reason, message, size, frame_sha256, sender, kind, round, seq "
            "FROM events ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def rejection_counts(self) -> dict[str, int]:
        self.flush()
        return {r: int(c) for r, c in self.db.execute("SELECT reason, count FROM reject_counts")}

    def counters(self) -> dict[tuple[str, int], int]:
        rows = self.db.execute("SELECT sender, kind, seq FROM counters")
        return {(s, int(k)): int(q) for s, k, q in rows}
