"""Prometheus metrics and alerts of a run (microfed_host.metrics and .alerts, docs/metrics.md):
scraped over HTTP during a real mesh run (MicroPython nodes, mosquitto or amqtt, an attacker),
the figures move with the run and, once it ends, equal what the run reports in summary.json;
the alerts reach a webhook and a file, the same ones, with their evidence, and a webhook that
is down costs the run nothing."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from microfed_host import metrics

SCENARIO = """
name = "metrics"
honest = 5
rule = "krum"
f = 1
rounds = 6
mode = "gossip"
seed = 2
crosscheck = "always"
deadline_s = 60.0
round_min_s = 1.5   # slow enough to be scraped mid-run
max_samples = 60

[[attackers]]
attack = "sign-flip"
count = 1
"""


def parse(text: str) -> dict[str, float]:
    """'name{labels}' -> value, for every sample line of Prometheus' text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(r.read().decode())


class _Hook(BaseHTTPRequestHandler):
    got: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        self.got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_metrics_and_alerts_during_a_real_mesh_run(tmp_path: Path, micropython: str) -> None:
    (tmp_path / "s.toml").write_text(SCENARIO)
    run = tmp_path / "run"
    hook = type("Hook", (_Hook,), {"got": []})
    web = ThreadingHTTPServer(("127.0.0.1", 0), hook)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    url_hook = "http://127.0.0.1:%d/alerts" % web.server_address[1]
    down = "http://127.0.0.1:%d/down" % _closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "microfed_tools.cli", "mesh", "run",
                             "--scenario", str(tmp_path / "s.toml"), "--metrics", "0",
                             "--alerts", url_hook, "--alerts", str(tmp_path / "alerts.jsonl"),
                             "--alerts", down, "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    url = None
    mid = None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"metrics: (http://\S+/metrics)", line)
            if m:
                url = m.group(1)
            if url and mid is None and re.match(r"\s+round\s+2/6", line):
                mid = scrape(url)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines)
    assert url is not None and mid is not None, "".join(lines)
    # Mid-run: some rounds closed, not all; every node known; the attacker's digests differ.
    assert 2 <= mid["microfed_rounds_closed_total"] < 6
    assert mid["microfed_store_up"] == 1 and mid["microfed_run_done"] == 0
    assert 0 < mid["microfed_accuracy"] <= 1
    # The coordinator's receive queue, as it wrote it within the last seconds.
    assert 0 <= mid["microfed_queue_depth"] <= 256
    assert mid["microfed_queue_reported_timestamp_seconds"] > time.time() - 120
    assert mid['microfed_queue_dropped_total{why="oversize"}'] == 0
    assert mid['microfed_queue_dropped_total{why="queue_full"}'] == 0
    nodes = [f"node-{i:02d}" for i in range(1, 7)]
    for n in nodes:
        assert 0 <= mid[f'microfed_node_reputation{{node="{n}"}}'] <= 1
        assert mid[f'microfed_node_last_seen_timestamp_seconds{{node="{n}"}}'] > time.time() - 600
    # After the run (the server went with it): the same metrics from the store equal the
    # run's own report.
    end = parse(metrics.render(run / "coordinator.sqlite"))
    summary = json.loads((run / "summary.json").read_text())
    assert end["microfed_rounds_closed_total"] == summary["rounds"] == 6
    assert end["microfed_run_done"] == 1
    assert end["microfed_accuracy"] == pytest.approx(summary["final_accuracy"], abs=0)
    assert end["microfed_banned_nodes"] == len(summary["banned"])
    assert end["microfed_crosschecked_rounds_total"] == summary["crosscheck"]["checked"]
    assert end["microfed_crosscheck_mismatches_total"] == summary["crosscheck"]["mismatches"] == 0
    for reason, count in summary["rejected"].items():
        assert end[f'microfed_rejections_total{{reason="{reason}"}}'] == count
    for kind, count in summary["security_events"].items():
        assert end[f'microfed_security_events_total{{kind="{kind}"}}'] == count
    da = summary["digest_agreement"]
    assert end["microfed_digest_disagreements_total"] >= len(da["flagged"]) >= 1
    assert mid["microfed_digest_disagreements_total"] <= end["microfed_digest_disagreements_total"]
    # Alerts: the webhook and the file got the same ones; the dead webhook failed each time
    # and the run went on (exit 0 above).
    web.shutdown()
    filed = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert hook.got == filed and filed
    n = len(filed)
    assert re.search(r"alerts: %d delivered, %d failed" % (2 * n, n), "".join(lines))
    dis = [a for a in filed if a["kind"] == "digest_disagreement"]
    assert len(dis) == end["microfed_digest_disagreements_total"]
    for a in dis:
        assert {a["node"]} <= set(da["flagged"])
        ev = a["evidence"]
        assert len(ev["node_digest"]) == 64 and ev["node_digest"] != ev["coordinator_digest"]
    bans = sorted(a["node"] for a in filed if a["kind"] == "ban")
    assert bans == summary["banned"] == ["node-06"]  # the sign-flipper, banned in round 5
    for a in filed:
        if a["kind"] == "ban":
            assert a["evidence"]["frames_sha256"] and a["round"] >= 1
    assert not [a for a in filed if a["kind"] in ("crosscheck_mismatch", "node_silent")]


def test_before_the_store_exists_and_other_paths(tmp_path: Path) -> None:
    server = metrics.serve("127.0.0.1:0", tmp_path / "coordinator.sqlite")
    try:
        host, port = server.server_address[:2]
        assert scrape(f"http://{host}:{port}/metrics") == {"microfed_store_up": 0.0}
        with pytest.raises(urllib.error.HTTPError) as ei:
            urllib.request.urlopen(f"http://{host}:{port}/", timeout=10)
        assert ei.value.code == 404
    finally:
        server.shutdown()
    for bad in ("", "host:", "x:99999", "9108x"):
        with pytest.raises(ValueError, match="--metrics wants"):
            metrics.parse_listen(bad)
    assert metrics.parse_listen("9108") == ("127.0.0.1", 9108)
    assert metrics.parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
