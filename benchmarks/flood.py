"""Junk floods against the real mesh (mosquitto, coordinator process, MicroPython nodes).

    .venv/bin/python benchmarks/flood.py [--scenario scenarios/default.toml] [--count 50000]

1. The scenario clean, then again with `--count` QoS 1 junk frames (microfed_host.flood) from
   node-01's leaked broker login on its own update/, digest/ and hello/ topics (the broker
   refuses anonymous clients): the nodes start once the broker has
   acknowledged `--count` of them, the flood goes on (up to `--overlap` more) during the rounds.
2. The small test scenario (5 honest nodes, 4 rounds) with 500 x 1,000,000-byte and
   500 x 60,000-byte QoS 0 junk frames on node-01's update/ topic.
The coordinator's RSS (VmRSS) is sampled every 50 ms throughout. Prints the figures; asserts
nothing (tests/test_flood.py does, on a small run).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from microfed_host import brokerauth, mesh
from microfed_host.flood import Flooder


def coordinator_rss_mb(out: Path) -> float | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "microfed_host.coordinator" in cmd and str(out) in cmd:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            continue
    return None


class Peak:
    def __init__(self, out: Path) -> None:
        self.out, self.peak, self._stop = out, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            v = coordinator_rss_mb(self.out)
            if v is not None:
                self.peak = max(self.peak, v)

    def stop(self) -> float:
        self._stop.set()
        self._t.join(5)
        return self.peak


LEAKED = "node-01"  # an honest node whose broker login leaked: the junk uses its own topics


def topics(name: str) -> list[str]:
    return [f"microfed/{name}/{k}/{LEAKED}" for k in ("update", "digest", "hello")]


def login(out: Path) -> dict[str, Any]:
    auth = brokerauth.client_auth(out / "mesh", LEAKED)
    return {"username": auth.get("username"), "password": auth.get("password")}


def honest_lost(out: Path, honest: list[str]) -> int:
    lost = 0
    for line in (out / "coordinator.log").read_text(errors="replace").splitlines():
        if '"ev": "round"' in line:
            ev = json.loads(line)
            lost += sum(1 for n in honest if n not in ev["accepted"])
    return lost


def run_flooded(sc: Any, out: Path, on_ready: Any, floods: list[Flooder],
                peak: Peak) -> tuple[dict[str, Any], float]:
    """Run `sc` with `on_ready` starting the floods; stop them and the RSS sampler whatever
    happens. Returns the summary and the coordinator's peak RSS (MB)."""
    try:
        s = mesh.run(sc, out, say=None, broker="mosquitto", on_ready=on_ready)
    finally:
        rss = peak.stop()
        for f in floods:
            f.stop()
    return s, rss


def qos1_flood(sc: Any, root: Path, count: int, overlap: int) -> None:
    t0 = time.monotonic()
    clean = mesh.run(sc, root / "clean", say=None, broker="mosquitto")
    clean_s = time.monotonic() - t0
    floods: list[Flooder] = []

    def on_ready(host: str, port: int, name: str) -> None:
        f = Flooder(host, port, topics(name), count + overlap, 200, qos=1, seed=8, **login(out))
        f.start()
        floods.append(f)
        while f.running and f.sent < count:
            time.sleep(0.01)

    out = root / "flooded"
    t0 = time.monotonic()
    s, rss = run_flooded(sc, out, on_ready, floods, Peak(out))
    took = time.monotonic() - t0
    f = floods[0]
    evs = [json.loads(x) for x in (out / "coordinator.log").read_text().splitlines() if x.startswith("{")]
    ready = next(e["t"] for e in evs if e["ev"] == "ready")
    rej_t = [e["t"] for e in evs if e["ev"] == "rejected"]
    rejected = sum(s["rejected"].values()) - sum(clean["rejected"].values())
    print(f"scenario {sc.name}: {sc.honest} honest + {sc.byzantine} Byzantine, {sc.rounds} rounds, {sc.mode}")
    print(f"  clean run: {clean_s:.1f} s, final digest {clean['final_digest'][:16]}")
    print(f"  QoS 1 junk flood: {f.sent} frames of ~200 bytes acknowledged by the broker in "
          f"{f.elapsed:.1f} s ({f.sent / max(f.elapsed, 1e-9):.0f}/s); nodes started after {count}")
    print(f"  flooded run: {took:.1f} s; coordinator rejected {rejected} junk frames in "
          f"{rej_t[-1] - ready:.1f} s ({rejected / max(rej_t[-1] - ready, 1e-9):.0f} frames/s)")
    print(f"  by reason: {s['rejected']}")
    print(f"  honest updates lost: {honest_lost(out, sc.honest_ids())}")
    print(f"  final digest == clean digest: {s['final_digest'] == clean['final_digest']}")
    print(f"  coordinator peak RSS: {rss:.0f} MB")


def big_frames(root: Path) -> None:
    sc = mesh.Scenario(name="flood", honest=5, rule="krum", f=1, rounds=4, seed=11,
                       max_samples=60, deadline_s=30.0)
    out = root / "big"
    peak = Peak(out)
    idle: list[float] = []
    floods: list[Flooder] = []

    def on_ready(host: str, port: int, name: str) -> None:
        time.sleep(0.5)
        idle.append(peak.peak)
        for count, size, seed in ((500, 1_000_000, 1), (500, 60_000, 2)):
            fl = Flooder(host, port, [f"microfed/{name}/update/{LEAKED}"], count, size, qos=0,
                         seed=seed, window=16, **login(out))
            fl.start()
            floods.append(fl)
        while any(fl.running for fl in floods):
            time.sleep(0.05)

    t0 = time.monotonic()
    s, rss = run_flooded(sc, out, on_ready, floods, peak)
    print("500 x 1,000,000 B + 500 x 60,000 B QoS 0 junk on update/ (5 honest nodes, 4 rounds):")
    for fl in floods:
        print(f"  {fl.size} B: {fl.sent} sent in {fl.elapsed:.1f} s, error {fl.error}")
    print(f"  run {time.monotonic() - t0:.1f} s, {s['rounds']} rounds, rejected {s['rejected']}")
    print(f"  coordinator RSS: idle {idle[0] if idle else 0:.0f} MB, peak {rss:.0f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", type=Path, default=mesh.DEFAULT_SCENARIO)
    ap.add_argument("--count", type=int, default=50_000)
    ap.add_argument("--overlap", type=int, default=20_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="microfed-flood-") as tmp:
        qos1_flood(mesh.load_scenario(a.scenario), Path(tmp), a.count, a.overlap)
        big_frames(Path(tmp))


if __name__ == "__main__":
    main()
