"""Junk floods against the real mesh (mosquitto, the coordinator process, MicroPython nodes):
the coordinator loses no honest update, reaches the clean run's final model, counts every junk
frame, keeps its SQLite audit log bounded and its memory bounded.

- 50,000 QoS 1 junk frames (random bytes, MF-magic frames with garbage inside, truncated
  frames) on the update/, digest/ and hello/ topics of an honest node whose broker login
  leaked, started once the coordinator is ready and overlapping the nodes' rounds.
- 500 x 1,000,000-byte QoS 0 frames (above wire.MAX_FRAME: the MQTT client drops them unread;
  mosquitto's max_packet_size is 1 MiB, so it delivers them) plus 500 x 60,000-byte frames
  (under MAX_FRAME: they reach the coordinator's bounded queue and are rejected), while the
  coordinator's RSS is sampled.

Small mesh on purpose (tests/test_mesh.py's: 5 honest nodes, 60-sample shards, 4 rounds);
the figures for a default-sized run are in docs/benchmarks.md ("Flood", benchmarks/flood.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

JUNK_COUNT = 50_000
# The nodes start once the broker has acknowledged JUNK_COUNT junk frames (so at least that
# many are queued ahead of their HELLOs and must be rejected before round 1 can even start);
# the flood goes on with up to OVERLAP more, interleaved with the nodes' rounds, until the
# run is over (the broker goes away with it: the rest of those are never sent).
OVERLAP = 20_000
# The coordinator's RSS must stay under this while 1 MB frames arrive. Measured: ~60 MB
# idle, ~70-80 MB under these floods; before the receive path was bounded it grew to 381 MB.
RSS_BOUND_MB = 150


def _need_tools() -> None:
    from microfed_host import upy
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto")
    if upy.find_micropython() is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")


def _scenario() -> Any:
    from microfed_host import mesh

    # Rounds of at least 1 s: the second flood (below) starts when round 1 closes and must
    # land between honest updates, whatever the machine's load.
    return mesh.Scenario(name="flood", honest=5, rule="krum", f=1, rounds=4, seed=11,
                         max_samples=60, deadline_s=30.0, round_min_s=1.0)


# The broker refuses anonymous clients and keeps every login to its own topics, so the junk
# comes from a node whose login leaked: node-01, an HONEST node, flooding its own update,
# digest and hello topics. Its own honest updates must still get through.
LEAKED = "node-01"


def junk_topics(mesh: str, node: str = LEAKED) -> list[str]:
    """The leaked node's own topics, which the coordinator subscribes to."""
    return [f"microfed/{mesh}/{kind}/{node}" for kind in ("update", "digest", "hello")]


def leaked_login(out: Path, node: str = LEAKED) -> dict[str, Any]:
    from microfed_host import brokerauth

    auth = brokerauth.client_auth(out / "mesh", node)
    return {"username": auth.get("username"), "password": auth.get("password")}


def coordinator_pid(out: Path) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if "microfed_host.coordinator" in cmd and str(out) in cmd:
            return int(pid)
    return None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples the coordinator's VmRSS every 50 ms from a thread until stopped."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        pid = None
        while not self._stop.is_set():
            pid = pid or coordinator_pid(self.out)
            if pid is not None:
                v = rss_mb(pid)
                if v is not None:
                    self.samples.append(v)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def round_events(out: Path) -> list[dict[str, Any]]:
    evs = []
    for line in (out / "coordinator.log").read_text(errors="replace").splitlines():
        if '"ev": "round"' in line:
            evs.append(json.loads(line))
    return evs


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from microfed_host import mesh

    _need_tools()
    out = tmp_path_factory.mktemp("flood") / "clean"
    return {"out": out, "summary": mesh.run(_scenario(), out, say=None, broker="mosquitto")}


def test_qos1_junk_flood_loses_no_honest_update(clean: dict[str, Any],
                                               tmp_path: Path) -> None:
    from microfed_host import mesh
    from microfed_host.flood import Flooder

    floods: list[Flooder] = []

    where: dict[str, Any] = {}

    def on_ready(host: str, port: int, name: str) -> None:
        where.update(host=host, port=port, name=name)
        f = Flooder(host, port, junk_topics(name), JUNK_COUNT, 200, qos=1, seed=8,
                    **leaked_login(out))
        f.start()
        floods.append(f)
        f.join(120)  # all of it queued for the coordinator ahead of the nodes' first frame

    def say(line: str) -> None:
        # The second flood: when round 1 closes, OVERLAP more frames while rounds 2-4 run.
        if "round  1/" in line and len(floods) == 1:
            f = Flooder(where["host"], where["port"], junk_topics(where["name"]), OVERLAP, 200,
                        qos=1, seed=9, **leaked_login(out))
            f.start()
            floods.append(f)

    out = tmp_path / "flooded"
    t0 = time.monotonic()
    try:
        s = mesh.run(_scenario(), out, say=say, broker="mosquitto", on_ready=on_ready)
    finally:
        for f in floods:
            f.stop()
    took = time.monotonic() - t0
    f, f2 = floods
    assert f.sent == JUNK_COUNT and f.error is None, (f.error, f.sent)
    assert f2.sent > 0
    assert f2.error is None or "broker closed the connection" in f2.error, f2.error
    # Every round accepted every honest node's update, and the model is the clean run's.
    honest = _scenario().honest_ids()
    rounds = round_events(out)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert r["accepted"] == honest, r
    assert s["final_digest"] == clean["summary"]["final_digest"]
    assert s["accuracy"] == clean["summary"]["accuracy"]
    assert s["honest_banned"] == []
    # Every junk frame was counted as a rejection (the clean run rejected nothing).
    assert clean["summary"]["rejected"] == {}
    rejected = sum(s["rejected"].values())
    assert JUNK_COUNT <= rejected <= f.sent + f2.sent, (s["rejected"], f.sent, f2.sent)
    assert "internal_error" not in s["rejected"]
    # The flood overlapped the rounds: junk was rejected between honest updates.
    evs = [json.loads(x) for x in (out / "coordinator.log").read_text().splitlines()
           if x.startswith("{")]
    first = next(i for i, e in enumerate(evs) if e["ev"] == "accepted")
    last = max(i for i, e in enumerate(evs) if e["ev"] == "accepted")
    interleaved = sum(1 for e in evs[first:last] if e["ev"] == "rejected")
    assert interleaved > 0
    db = sqlite3.connect(out / "coordinator.sqlite")
    try:
        verdicts = db.execute("SELECT verdict, COUNT(*) FROM updates GROUP BY verdict").fetchall()
        (events,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
        (total,) = db.execute("SELECT SUM(count) FROM reject_counts").fetchone()
    finally:
        db.close()
    assert verdicts == [("accepted", 4 * len(honest))]
    assert events <= 10000
    assert total == rejected
    print(f"\nQoS 1 junk flood: {f.sent} frames acknowledged by the broker in {f.elapsed:.1f} s, "
          f"run {took:.1f} s, coordinator rejected {rejected} ({interleaved} between the first "
          f"and last honest update): {s['rejected']}")


def test_large_frames_keep_the_coordinator_bounded(tmp_path: Path) -> None:
    from microfed_host import mesh
    from microfed_host.flood import Flooder

    _need_tools()
    out = tmp_path / "big"
    floods: list[Flooder] = []
    sampler = RssSampler(out)

    def on_ready(host: str, port: int, name: str) -> None:
        time.sleep(0.5)
        sampler.samples.append(0.0)  # marks the end of the idle baseline
        topics = [f"microfed/{name}/update/{LEAKED}"]
        for count, size, seed in ((500, 1_000_000, 1), (500, 60_000, 2)):
            f = Flooder(host, port, topics, count, size, qos=0, seed=seed, window=16,
                        **leaked_login(out))
            f.start()
            floods.append(f)
        until = time.monotonic() + 60
        while any(f.running for f in floods) and time.monotonic() < until:
            time.sleep(0.05)

    try:
        s = mesh.run(_scenario(), out, say=None, broker="mosquitto", on_ready=on_ready)
    finally:
        sampler.stop()
        for f in floods:
            f.stop()
    for f in floods:
        assert f.error is None and f.sent == 500, (f.size, f.error, f.sent)
    assert s["rounds"] == 4 and s["honest_banned"] == []
    mark = sampler.samples.index(0.0)
    idle, busy = sampler.samples[:mark], sampler.samples[mark + 1:]
    assert idle and busy
    peak = max(busy)
    print(f"\ncoordinator RSS: idle {max(idle):.0f} MB, peak under 500 x 1 MB + 500 x 60 KB "
          f"QoS 0 junk {peak:.0f} MB (bound {RSS_BOUND_MB} MB); rejected {s['rejected']}")
    assert peak < RSS_BOUND_MB
    # Frames under MAX_FRAME (the 60 KB ones, and 1 MB ones the junk mix truncated short)
    # reach the coordinator and are rejected; the larger ones are dropped unread.
    assert 0 < sum(s["rejected"].values()) <= 1000
