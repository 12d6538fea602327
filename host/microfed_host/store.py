"""The coordinator's persistent security state in SQLite.

- `counters`: the last accepted sequence counter per (sender, kind). It only ever moves
  through `advance`, one conditional UPSERT inside a transaction, so a counter never goes
  backwards, two verifiers cannot both accept the same counter, and a crash leaves either the
  old or the new value. It survives coordinator restarts (that is the point).
- `events` / `reject_counts`: the audit log of rejections (bounded: oldest events are pruned
  beyond `max_events`, the per-reason counts are kept forever). Logging a rejection never
  touches `counters`.

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
"""


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: str | Path, max_events: int = 10000) -> None:
        self.path = str(path)
        self.max_events = max_events
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
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO events (at, reason, message, size, frame_sha256, sender, kind, round, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time(), reason, message, size, frame_sha256, sender, kind, round_, seq),
            )
            self.db.execute(
                "INSERT INTO reject_counts VALUES (?, 1) "
                "ON CONFLICT (reason) DO UPDATE SET count = count + 1",
                (reason,),
            )
            if self.max_events > 0 and cur.lastrowid is not None:
                self.db.execute("DELETE FROM events WHERE id <= ?", (cur.lastrowid - self.max_events,))

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT id, at, reason, message, size, frame_sha256, sender, kind, round, seq "
            "FROM events ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def rejection_counts(self) -> dict[str, int]:
        return {r: int(c) for r, c in self.db.execute("SELECT reason, count FROM reject_counts")}

    def counters(self) -> dict[tuple[str, int], int]:
        rows = self.db.execute("SELECT sender, kind, seq FROM counters")
        return {(s, int(k)): int(q) for s, k, q in rows}
