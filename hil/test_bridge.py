"""A board without a network joins a real broker through `microfed bridge` (docs/bridge.md):
the node program (tests/bridge_node.py: mqtt.Transport over serialstream.Link on the REPL's
own serial line) is started through the raw REPL, then the line is handed to a Bridge; a
paho client on the broker checks every echoed byte. Runs on any board whose modules include
mqtt, mqttc, serialstream and microfed.serialframe (frozen in the `microfed firmware build`
images: mps2-an385, virt-rv32, unix32)."""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microfed_host import broker as brokermod
from microfed_host.mqtt import HostMQTT
from microfed_tools.bridge import Bridge

ROOT = Path(__file__).resolve().parents[1]
NODE = (ROOT / "tests" / "bridge_node.py").read_text()


@pytest.fixture(scope="module")
def mqtt_broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    given = request.config.getoption("--broker")
    if given:
        host, _, port = given.rpartition(":")
        yield host, int(port)
        return
    try:
        b = brokermod.start_broker()
    except brokermod.BrokerError as e:
        pytest.skip("no MQTT broker could start: %s" % e)
    try:
        yield b.host, b.port
    finally:
        b.stop()


def test_node_on_the_serial_line_through_the_bridge(device, mqtt_broker) -> None:
    repl = device.repl
    have = repl.exec("try:\n import mqtt, mqttc, serialstream\n from microfed import "
                     "serialframe\n print('OK')\nexcept ImportError as e:\n print(e)").strip()
    if have != "OK":
        pytest.skip("board %s lacks the node's transport modules (%s): use an image built by "
                    "`microfed firmware build`" % (device.name, have))
    host_name, port = mqtt_broker
    base = "mf/hil/%s/bridge" % os.urandom(4).hex()
    logs: queue.Queue[dict[str, Any]] = queue.Queue()
    text: list[str] = []

    def on_log(line: str) -> None:
        try:
            logs.put(json.loads(line))
        except ValueError:
            text.append(line)

    seen: list[dict[str, Any]] = []

    def expect(ev: str, timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                d = logs.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(d)
            if d.get("ev") == ev:
                return d
        pytest.fail("no %r from %s within %.0f s: seen %s, text %s"
                    % (ev, device.name, timeout, seen[-8:], text[-8:]))

    host = HostMQTT(host_name, port, "hil-bridge-" + base[7:15], max_message=65536)
    host.connect(timeout=10)
    host.subscribe(base + "/echo")
    repl.start(NODE + "\nmain(%r, %r)\n" % ("dev-" + base[7:15], base), what="bridge node")
    bridge = Bridge(repl.transport, host_name, port, on_log=on_log, say=lambda m: None)
    t0 = time.monotonic()
    bridge.start()
    try:
        up = expect("up")
        assert up["ok"] is True, up
        connect_s = time.monotonic() - t0
        expect("ready")
        assert "plain text between frames" in text
        payloads = [b"hello from the host", bytes(range(256)) * 11]  # 2816 B: every value
        t1 = time.monotonic()
        for p in payloads:
            host.publish(base + "/down", p)
        got = [host.get(timeout=60) for _ in payloads]
        echo_s = time.monotonic() - t1
        assert [m.payload if m else None for m in got] == payloads
        host.publish(base + "/down", b"quit")
        bye = expect("bye")
        assert bye["stats"]["published"] == 2 and bye["stats"]["disconnects"] == 0
        print("\n[hil bridge] %s: connect %.2f s, echo of %d B round trips %.2f s; device "
              "link %s; bridge %s" % (device.name, connect_s, sum(map(len, payloads)), echo_s,
                                      bye["link"], bridge.stats()))
        s = bridge.stats()
        assert s["sessions"] == 1 and s["bad_frames"] >= 1  # the node's deliberate "~corrupt"
        assert bye["link"]["bad_frames"] == 0 and bye["link"]["gaps"] == 0
    finally:
        bridge.stop()
        host.close()
        repl.resume()
    assert repl.exec("print(1 + 1)").strip() == "2"  # the REPL is usable again
