"""benchmarks/scaling.py's code path at a tiny size, so the scale model's benchmark cannot rot
silently: every field of its record is there and sane, and its message counts equal what the
coordinator's store says. Nothing here is timed against a bound (speed is measured in the
benchmark, never asserted)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import pytest

from microfed_host.broker import find_mosquitto
from microfed_host.upy import find_micropython

ROOT = Path(__file__).resolve().parents[1]
N = 5
ROUNDS = 2

FIELDS = ("engine", "n", "rounds", "mode", "rule", "f", "load_start", "load_end", "wall_s",
          "round_s", "coord_cpu_s", "coord_busy_cpu_s", "busy_share", "fast_ms", "ref_ms",
          "coord_rss_mb", "store_updates", "store_digests", "global_bytes", "broker_cpu_s",
          "broker_in_kb", "broker_out_kb", "msgs", "kb", "final_digest", "final_accuracy",
          "rounds_done", "samples_per_node")


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("scaling_bench", ROOT / "benchmarks" / "scaling.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _common(r: dict[str, Any], engine: str) -> None:
    for k in FIELDS:
        assert k in r, k
    assert (r["engine"], r["n"], r["rounds"], r["rounds_done"]) == (engine, N, ROUNDS, ROUNDS)
    assert r["round_s"] > 0 and r["wall_s"] > r["round_s"]
    assert r["coord_cpu_s"] > 0 and r["coord_busy_cpu_s"] > 0
    assert 0 < r["busy_share"] <= 1.0
    # cross-check "always": both paths ran in every round measured
    assert r["fast_ms"] > 0 and r["ref_ms"] > 0
    assert r["coord_rss_mb"] > 10
    # one update per node per round, as the store says; one GLOBAL_MODEL closes the round
    assert r["store_updates"] == N and r["msgs"]["update"] == N
    assert r["msgs"]["global"] == 1 and r["msgs"]["digest"] == 0 == r["store_digests"]
    assert r["kb"]["update"] > N * 2.5  # a signed 650-parameter update is ~2.7 KB
    assert abs(r["kb"]["global"] - r["global_bytes"] / 1024) < 0.1
    assert len(r["final_digest"]) == 64 and 0 < r["final_accuracy"] <= 1


def test_scaling_record_inproc_and_mqtt(tmp_path: Path) -> None:
    if find_micropython() is None or find_mosquitto() is None:
        pytest.skip("needs the MicroPython unix port and mosquitto")
    bench = _bench()
    ri = bench.measure(N, ROUNDS, "inproc", f=1, work=tmp_path)
    _common(ri, "inproc")
    assert ri["broker_cpu_s"] is None and ri["broker_in_kb"] is None

    rm = bench.measure(N, ROUNDS, "mqtt", f=1, work=tmp_path)
    _common(rm, "mqtt")
    # the same seed and scenario: the same bits on both engines
    assert rm["final_digest"] == ri["final_digest"]
    # the broker's own figures (/proc): over the whole run it read at least the measured
    # rounds' updates, and wrote each update to the coordinator and the counter and the global
    # to every node (the per-round figures, interpolated between samples taken every 50 ms,
    # move with the sampler's delay on a loaded machine: only their sign is held here)
    k = rm["rounds_measured"]
    assert rm["broker_cpu_run_s"] > 0 and rm["broker_cpu_s"] >= 0
    assert rm["broker_in_kb"] >= 0 and rm["broker_out_kb"] >= 0
    assert rm["broker_run_in_kb"] >= k * rm["kb"]["update"] - 0.1
    assert rm["broker_run_out_kb"] >= k * (2 * rm["kb"]["update"]
                                           + N * rm["kb"]["global"]) - 0.1
    assert rm["startup_msgs"]["hello"] == N and rm["startup_msgs"]["registry"] >= 1
    assert rm["node_rss_mb"]["processes"] == N and rm["node_rss_mb"]["mean"] > 1
    # what a row of the table shows
    row = bench.table([ri, rm]).splitlines()
    assert len(row) == 4 and row[2].startswith("| inproc | 5 |")
    assert row[3].startswith("| mqtt (mosquitto) | 5 |")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_rabbitmq_logins_follow_the_mesh_acl(tmp_path: Path) -> None:
    """What --rabbitmq imports: the run's users with their passwords (RabbitMQ's salted
    SHA-256) and the ACL as topic permissions on amq.topic, MQTT's '/' as AMQP's '.'."""
    import base64
    import hashlib
    import re

    from microfed_host import brokerauth
    from microfed_host.provision import init_mesh

    md = tmp_path / "mesh"
    init_mesh(md, "mesh-t", 2, "127.0.0.1:1883")
    defs = _bench().Rabbit.definitions(md)
    users = {u["name"]: u for u in defs["users"]}
    assert set(users) == {"coordinator", "monitor", "node-01", "node-02"}
    pw = brokerauth.read_credentials(md, "node-01")
    assert pw is not None
    raw = base64.b64decode(users["node-01"]["password_hash"])
    assert raw[4:] == hashlib.sha256(raw[:4] + pw["password"].encode()).digest()
    tp = {t["user"]: t for t in defs["topic_permissions"]}
    b = "microfed.mesh-t."
    assert re.match(tp["node-01"]["write"], b + "update.node-01")
    assert not re.match(tp["node-01"]["write"], b + "update.node-02")
    assert not re.match(tp["node-01"]["write"], b + "global")
    assert re.match(tp["node-01"]["read"], b + "global")
    assert re.match(tp["node-01"]["read"], b + "update.*")  # a subscription's binding key
    assert not re.match(tp["node-01"]["read"], b + "digest.*")
    assert re.match(tp["coordinator"]["write"], b + "global")
    assert not re.match(tp["coordinator"]["write"], b + "update.node-01")


def test_broker_load_test_counts_every_message() -> None:
    if find_mosquitto() is None:
        pytest.skip("needs mosquitto")
    (row,) = _bench().load_test([1], 0.5, 2700, "mosquitto")
    assert row["sent"] > 0 and row["received"] == row["sent"]
    assert row["broker"] == "mosquitto" and row["broker_cpu_s"] > 0
    assert row["broker_cpu_ms_per_msg"] > 0 and row["msgs_per_s"] > 0


def test_quorum_check_times_the_coordinators_walk() -> None:
    (row,) = _bench().quorum_check([5], calls=20)
    assert row["quorum_n"] == 5 and row["per_call_us"] > 0
    assert row["per_round_s"] == round(2 * 5 * row["per_call_us"] / 1e6, 4)


def test_model_recovers_the_constants_it_extrapolates_from() -> None:
    """Records made from known constants: the model's fits give them back, and its budget
    table is the root of C(n) = budget."""
    bench = _bench()
    a_ref, a_fast, q, c0, b, brk, g0, g1 = 26e-6, 0.5e-6, 0.7e-6, 0.02, 1.5e-3, 1e-4, 2758, 41
    recs = []
    for n in (10, 50, 200):
        recs.append({"engine": "mqtt", "broker": "mosquitto", "n": n,
                     "ref_ms": 1000 * a_ref * n * n, "fast_ms": 1000 * a_fast * n * n,
                     "coord_cpu_s": c0 + b * n + (q + a_fast + a_ref) * n * n,
                     "broker_cpu_s": brk * n, "global_bytes": g0 + g1 * n,
                     "kb": {"update": n * 2715 / 1024}})
    text = bench.model(recs, [{"broker_cpu_ms_per_msg": 0.016, "size": 2700}],
                       [{"quorum_n": 1000, "q_us_per_pair": 0.7}])
    assert "26.00 µs per pair" in text and "0.500 µs per pair" in text
    assert "20.0 ms per round + 1.50 ms per update" in text
    assert "0.100 ms per node" in text and "2758 B + 41.0 B" in text
    n1 = bench.n_within(10.0, c0, b, q + a_fast + a_ref)
    assert c0 + b * n1 + (q + a_fast + a_ref) * n1 ** 2 <= 10.0
    assert c0 + b * (n1 + 1) + (q + a_fast + a_ref) * (n1 + 1) ** 2 > 10.0
    assert f"| 10 s | {n1:,} |" in text
    assert "**62,500 messages per second**" in text
