"""Prometheus metrics of a mesh run, read from its coordinator store (SQLite, read-only, one
connection per scrape): the coordinator's own loop is never touched, and a scrape sees what
the store has committed.

    server = serve("127.0.0.1:9108", run_dir / "coordinator.sqlite")   # GET /metrics
    text = render(store_path)                                          # the same, as text

The names and what they count are in docs/metrics.md.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
            v = str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))
            self.lines.append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")


def _query(db: sqlite3.Connection, sql: str) -> list[Any]:
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError:  # a table the coordinator has not created yet
        return []


def render(store: Path) -> str:
    """The metrics in Prometheus' text format. Before the coordinator has written its store,
    only microfed_store_up 0."""
    out = _Out()
    if not Path(store).is_file():
        out.metric("microfed_store_up", "gauge", "1 when the coordinator store can be read", [({}, 0)])
        return "\n".join(out.lines) + "\n"
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        out.metric("microfed_store_up", "gauge", "1 when the coordinator store can be read", [({}, 1)])
        st = _query(db, "SELECT round, done FROM state WHERE id=1")
        out.metric("microfed_round", "gauge", "the round the coordinator is collecting",
                   [({}, st[0][0] if st else 0)])
        out.metric("microfed_run_done", "gauge", "1 once the last round is closed",
                   [({}, st[0][1] if st else 0)])
        rounds = _query(db, "SELECT round, n_accepted, accuracy, crosschecked FROM rounds "
                            "ORDER BY round")
        out.metric("microfed_rounds_closed_total", "counter", "rounds closed",
                   [({}, len(rounds))])
        last = rounds[-1] if rounds else None
        out.metric("microfed_accuracy", "gauge",
                   "test accuracy of the global model after the last closed round (0..1)",
                   [({}, last[2])] if last and last[2] is not None else [])
        out.metric("microfed_round_accepted_updates", "gauge",
                   "updates accepted in the last closed round", [({}, last[1] if last else 0)])
        out.metric("microfed_crosschecked_rounds_total", "counter",
                   "rounds whose aggregate was recomputed by the reference engine",
                   [({}, sum(1 for r in rounds if r[3]))])
        rej = _query(db, "SELECT reason, count FROM reject_counts ORDER BY reason")
        out.metric("microfed_rejections_total", "counter",
                   "frames rejected by the coordinator, by reason",
                   [({"reason": r}, c) for r, c in rej])
        sec = _query(db, "SELECT kind, count(*) FROM security GROUP BY kind ORDER BY kind")
        out.metric("microfed_security_events_total", "counter", "security events, by kind",
                   [({"kind": k}, c) for k, c in sec])
        kinds = dict(sec)
        out.metric("microfed_crosscheck_mismatches_total", "counter",
                   "rounds where the fast and the reference aggregate differed",
                   [({}, kinds.get("crosscheck_mismatch", 0))])
        dis = _query(db, "SELECT count(*) FROM digests WHERE agree = 0")
        out.metric("microfed_digest_disagreements_total", "counter",
                   "gossip digests that differed from the coordinator's aggregate",
                   [({}, dis[0][0] if dis else 0)])
        rep = _query(db, "SELECT node, rep, banned FROM reputation r WHERE round = "
                         "(SELECT max(round) FROM reputation WHERE node = r.node) ORDER BY node")
        out.metric("microfed_node_reputation", "gauge", "each node's reputation (0..1)",
                   [({"node": n}, v / 65536) for n, v, _b in rep])
        out.metric("microfed_node_banned", "gauge", "1 for a banned node",
                   [({"node": n}, 1 if b else 0) for n, _v, b in rep])
        out.metric("microfed_banned_nodes", "gauge", "nodes banned",
                   [({}, sum(1 for _n, _v, b in rep if b))])
        seen = _query(db, "SELECT node, max(at) FROM (SELECT node, at FROM status UNION ALL "
                          "SELECT sender AS node, at FROM updates WHERE verdict = 'accepted') "
                          "GROUP BY node ORDER BY node")
        out.metric("microfed_node_last_seen_timestamp_seconds", "gauge",
                   "when the coordinator last heard from each node (a STATUS, HELLO or "
                   "accepted update), Unix time", [({"node": n}, t) for n, t in seen])
        q = _query(db, "SELECT value FROM run WHERE key = 'queue'")
        if q:
            qs = json.loads(q[0][0])
            out.metric("microfed_queue_depth", "gauge",
                       "messages waiting in the coordinator's receive queue (bounded: "
                       "frames beyond it wait at the broker)", [({}, qs.get("queued", 0))])
            out.metric("microfed_queue_dropped_total", "counter",
                       "frames the coordinator's MQTT client dropped unread, by why",
                       [({"why": "oversize"}, qs.get("dropped_oversize", 0)),
                        ({"why": "queue_full"}, qs.get("dropped_queue_full", 0))])
            out.metric("microfed_queue_reported_timestamp_seconds", "gauge",
                       "when the coordinator last wrote these queue figures, Unix time",
                       [({}, qs.get("at", 0))])
    finally:
        db.close()
    return "\n".join(out.lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    store: Path = Path()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404, "only /metrics")
            return
        try:
            body = render(self.store).encode()
        except sqlite3.Error as e:
            self.send_error(503, f"store unreadable: {e}")
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # a scrape every few seconds is not news


def parse_listen(text: str) -> tuple[str, int]:
    """"PORT" (localhost) or "HOST:PORT" -> (host, port); ValueError with a sentence. Port 0:
    a free one."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--metrics wants PORT or HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/metrics"


def serve(listen: str, store: Path) -> ThreadingHTTPServer:
    """Serve GET /metrics for the store at `listen` (see parse_listen) in a daemon thread;
    server.shutdown() stops it. Port 0 picks a free one (server.server_address)."""
    host, port = parse_listen(listen)
    handler = type("MetricsHandler", (_Handler,), {"store": Path(store)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
