"""Alerts of a mesh run, each with its evidence, to a webhook (HTTP POST of one JSON object)
and/or a JSON-lines file, from the coordinator store (read-only, polled; the coordinator's
loop is not involved). docs/metrics.md lists the kinds.

    watcher = Watcher(run_dir / "coordinator.sqlite", [sink("https://hooks.example/x"),
                                                        sink("alerts.jsonl")])
    watcher.start(interval=1.0) ... watcher.stop()     # stop() polls once more, then returns

Kinds: "ban" (a node's reputation fell below the ban line: its round, its accepted frames'
SHA-256 that round, the verdict), "crosscheck_mismatch" (fast and reference aggregates
differed: the round and the diff), "digest_disagreement" (a node's gossip digest differs from
the coordinator's aggregate: both digests), "revoked", "node_silent" (no update accepted from a
node for `silent_rounds` closed rounds: its last round), "accuracy_drop" (test accuracy fell
more than `accuracy_drop` below the best so far).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

Sink = Callable[[dict[str, Any]], None]


def sink(target: str) -> Sink:
    """A webhook for an http(s) URL, else a JSON-lines file (appended)."""
    if target.startswith(("http://", "https://")):
        def post(alert: dict[str, Any]) -> None:
            req = urllib.request.Request(target, data=json.dumps(alert).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
        return post
    path = Path(target)

    def append(alert: dict[str, Any]) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(alert) + "\n")
    return append


class Watcher:
    def __init__(self, store: Path, sinks: list[Sink], silent_rounds: int = 3,
                 accuracy_drop: float = 0.10) -> None:
        self.store = Path(store)
        self.sinks = sinks
        self.silent_rounds = silent_rounds
        self.accuracy_drop = accuracy_drop
        self.sent = 0
        self.failed = 0  # deliveries a sink refused (counted; the watcher carries on)
        self.last_error = ""
        self._security_id = 0
        self._rounds_seen = 0
        self._best = -1.0
        self._silent: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading the store -----------------------------------------------------------------
    def poll(self) -> list[dict[str, Any]]:
        """The alerts since the last poll (delivered to every sink), oldest first."""
        if not self.store.is_file():
            return []
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True, timeout=5)
        try:
            alerts = self._security(db) + self._rounds(db)
        except sqlite3.OperationalError:
            return []  # tables not created yet
        finally:
            db.close()
        for a in alerts:
            self._deliver(a)
        return alerts

    def _security(self, db: sqlite3.Connection) -> list[dict[str, Any]]:
        out = []
        rows = db.execute("SELECT id, at, round, kind, node, detail FROM security WHERE id > ? "
                          "ORDER BY id", (self._security_id,)).fetchall()
        for sid, at, r, kind, node, detail in rows:
            self._security_id = sid
            if kind == "ban":
                frames = [h for (h,) in db.execute(
                    "SELECT frame_sha256 FROM updates WHERE round = ? AND sender = ? AND "
                    "verdict = 'accepted' ORDER BY id", (r, node))]
                verdict = db.execute("SELECT verdict FROM reputation WHERE round = ? AND "
                                     "node = ?", (r, node)).fetchone()
                out.append(_alert("ban", r, node, detail, at, {
                    "frames_sha256": frames, "verdict": verdict[0] if verdict else None}))
            elif kind == "digest_mismatch":
                agg = db.execute("SELECT agg_digest FROM rounds WHERE round = ?", (r,)).fetchone()
                out.append(_alert("digest_disagreement", r, node,
                                  "gossip digest differs from the coordinator's aggregate", at,
                                  {"node_digest": detail,
                                   "coordinator_digest": agg[0] if agg else None}))
            elif kind in ("crosscheck_mismatch", "revoked"):
                out.append(_alert(kind, r, node, detail, at, {}))
        return out

    def _rounds(self, db: sqlite3.Connection) -> list[dict[str, Any]]:
        out = []
        rows = db.execute("SELECT round, closed, accuracy FROM rounds WHERE round > ? "
                          "ORDER BY round", (self._rounds_seen,)).fetchall()
        for r, closed, acc in rows:
            self._rounds_seen = r
            if acc is not None:
                if self._best >= 0 and acc < self._best - self.accuracy_drop:
                    out.append(_alert("accuracy_drop", r, None,
                                      "accuracy %.4f, best so far %.4f" % (acc, self._best),
                                      closed, {"accuracy": acc, "best": self._best}))
                self._best = max(self._best, acc)
            out += self._silence(db, r, closed)
        return out

    def _silence(self, db: sqlite3.Connection, r: int, closed: float) -> list[dict[str, Any]]:
        out = []
        last = dict(db.execute("SELECT sender, max(round) FROM updates WHERE verdict = "
                               "'accepted' AND round <= ? GROUP BY sender", (r,)).fetchall())
        banned = {n for (n,) in db.execute("SELECT node FROM reputation WHERE round <= ? AND "
                                           "banned = 1", (r,))}
        for node, lr in sorted(last.items()):
            if r - lr >= self.silent_rounds and node not in banned:
                if node not in self._silent:
                    self._silent.add(node)
                    out.append(_alert("node_silent", r, node,
                                      "no update accepted for %d rounds" % (r - lr), closed,
                                      {"last_accepted_round": lr}))
            else:
                self._silent.discard(node)
        return out

    # -- delivering ------------------------------------------------------------------------
    def _deliver(self, alert: dict[str, Any]) -> None:
        for s in self.sinks:
            try:
                s(alert)
                self.sent += 1
            except Exception as e:  # a webhook that is down must not stop the run
                self.failed += 1
                self.last_error = f"{type(e).__name__}: {e}"

    def start(self, interval: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                self.poll()
        self._thread = threading.Thread(target=loop, name="alerts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # what the last interval wrote


def watch(store: Path, targets: list[str], interval: float = 1.0) -> Watcher:
    """A started Watcher on `store` delivering to each target (see sink)."""
    w = Watcher(store, [sink(t) for t in targets])
    w.start(interval)
    return w


def _alert(kind: str, round_: int | None, node: str | None, reason: str, at: float,
           evidence: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "round": round_, "node": node, "reason": reason, "at": at,
            "evidence": evidence, "sent": time.time()}
