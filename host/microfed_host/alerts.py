"""Alerts of a mesh run, each with its evidence, to a webhook (HTTP POST of one JSON object),
a JSON-lines file and/or the run's MQTT broker (MqttSink), from the coordinator store
(read-only, polled; the coordinator's loop is not involved). docs/metrics.md lists the kinds.

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


class MqttSink:
    """Alerts published (JSON, QoS 1, not retained) on microfed/<mesh>/alerts of the run's
    broker, with the coordinator's login (its ACL may write there; the mesh's `monitor` login
    may read it: docs/metrics.md). Alerts that come before connect() wait for it (at most
    MAX_WAITING, then they count as failed)."""

    MAX_WAITING = 1000

    def __init__(self) -> None:
        self.client: Any = None
        self.topic = ""
        self.waiting: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the watcher's thread and the runner's both come here

    def connect(self, host: str, port: int, mesh_dir: Path) -> None:
        from microfed_host import brokerauth
        from microfed_host.mqtt import HostMQTT

        mesh = json.loads((Path(mesh_dir) / "mesh.json").read_text())["mesh"]
        self.topic = brokerauth.topic_base(mesh) + "alerts"
        client = HostMQTT(host, port, f"microfed-alerts-{mesh}"[:64],
                          **brokerauth.client_auth(Path(mesh_dir)))
        client.connect(10.0)
        with self._lock:
            self.client = client
            waiting, self.waiting = self.waiting, []
            for alert in waiting:
                client.publish(self.topic, json.dumps(alert).encode(), qos=1)

    def __call__(self, alert: dict[str, Any]) -> None:
        with self._lock:
            if self.client is None:
                if len(self.waiting) >= self.MAX_WAITING:
                    raise RuntimeError("the MQTT alert sink has no broker yet and %d alerts "
                                       "wait" % len(self.waiting))
                self.waiting.append(alert)
                return
            self.client.publish(self.topic, json.dumps(alert).encode(), qos=1)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


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
        self._polling = threading.Lock()  # its thread and a caller's poll() never interleave

    # -- reading the store -----------------------------------------------------------------
    def poll(self) -> list[dict[str, Any]]:
        """The alerts since the last poll (delivered to every sink), oldest first."""
        with self._polling:
            return self._poll()

    def _poll(self) -> list[dict[str, Any]]:
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


def _alert(kind: str, round_: int | None, node: str | None, reason: str, at: float,
           evidence: dict[str, Any]) -> dict[str, Any]:
    return {"kind": kind, "round": round_, "node": node, "reason": reason, "at": at,
            "evidence": evidence, "sent": time.time()}
