"""firmware/mqttc.py, the node's MQTT 3.1.1 client, run on the MicroPython unix port: exact
packet bytes, malformed input raising mqttc.MQTTError, the bounded receive path, and a
session against real brokers (mosquitto and amqtt) including the will message."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from test_mqtt import broker, host_client  # noqa: F401  (the broker fixture, both kinds)

from microfed_host.broker import Broker

REPO = Path(__file__).resolve().parents[1]
MICROPYPATH = os.pathsep.join(str(REPO / d) for d in ("firmware", "shared"))


def upy(micropython: str, tmp: Path, code: str, timeout: float = 60) -> list[Any]:
    """Run code on the unix port with firmware/ on the path; its stdout, one JSON per line."""
    script = tmp / "mqttc_case.py"
    script.write_text(code)
    r = subprocess.run([micropython, str(script)], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, MICROPYPATH=MICROPYPATH))
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


ENCODE = r'''
import json, binascii, mqttc
def h(b):
    return binascii.hexlify(b).decode()
out = [
    h(mqttc.connect_packet("n1", 30)),
    h(mqttc.connect_packet("n1", 300, False, "u", "pw", ("w/t", b"gone", 1, True))),
    h(mqttc.publish_header("a/b", 3, 0) + b"xyz"),
    h(mqttc.publish_header("a/b", 3, 1, True, 0x1234) + b"xyz"),
    h(mqttc.publish_header("t", 200, 1, False, 1)),
    h(mqttc.subscribe_packet(7, "a/#", 1)),
    h(mqttc.puback_packet(0xBEEF)),
    h(mqttc.PING_PACKET), h(mqttc.DISCONNECT_PACKET),
    [h(mqttc.remaining_length(n)) for n in (0, 127, 128, 16383, 16384, 2097151, 2097152,
                                            268435455)],
]
bad = []
for f in [lambda: mqttc.remaining_length(268435456), lambda: mqttc.publish_header("", 1),
          lambda: mqttc.publish_header("t", 1, 2), lambda: mqttc.publish_header("t", 1, 1),
          lambda: mqttc.subscribe_packet(0, "t"), lambda: mqttc.connect_packet("n", 70000),
          lambda: mqttc.connect_packet("n", 0, True, None, "pw"),
          lambda: mqttc.string(b"x" * 65536)]:
    try:
        f()
        bad.append("accepted")
    except mqttc.MQTTError as e:
        bad.append("MQTTError")
print(json.dumps(out))
print(json.dumps(bad))
'''


def test_packets_have_the_exact_bytes(micropython: str, tmp_path: Path) -> None:
    out, bad = upy(micropython, tmp_path, ENCODE)
    assert out[0] == "100e" "00044d515454" "04" "02" "001e" "0002" "6e31"
    assert out[1] == ("1020" "00044d515454" "04" "ec" "012c" "0002" "6e31" "0003" "772f74"
                      "0004" "676f6e65" "0001" "75" "0002" "7077")
    assert out[2] == "3008" "0003" "612f62" "78797a"
    assert out[3] == "330a" "0003" "612f62" "1234" "78797a"
    assert out[4] == "32" "cd01" "0001" "74" "0001"  # remaining length 205 = cd 01
    assert out[5] == "8208" "0007" "0003" "612f23" "01"
    assert out[6] == "4002beef"
    assert out[7:9] == ["c000", "e000"]
    assert out[9] == ["00", "7f", "8001", "ff7f", "808001", "ffff7f", "80808001", "ffffff7f"]
    assert bad == ["MQTTError"] * 8


WIRE = r'''
import json, mqttc

class Wire:
    """The broker side of a stream: scripted bytes in, the client's writes recorded."""
    def __init__(self, data):
        self.data = bytes(data)
        self.out = b""
    def readable(self, ms):
        return True
    def read(self, n):
        d = self.data[:n]
        self.data = self.data[n:]
        return d
    def readinto(self, buf, n):
        d = self.read(n)
        buf[:len(d)] = d
        return len(d)
    def write(self, b):
        self.out += bytes(b)
        return len(b)
'''

DECODE = WIRE + r'''

def run(data, max_msg=64):
    got = []
    w = Wire(data)
    c = mqttc.Client(w, max_msg, lambda t, m: got.append([t.decode(), len(m)]))
    res = []
    try:
        while w.data:
            r = c.packet()
            if r is not None:
                res.append(list(r))
        err = None
    except mqttc.MQTTError as e:
        err = "MQTTError: " + str(e)
    except OSError as e:
        err = "OSError"
    return {"got": got, "res": res, "err": err, "out": w.out.hex(), "dropped": c.dropped,
            "dropped_bytes": c.dropped_bytes, "pongs": c.pongs}

big = b"\x32" + mqttc.remaining_length(2 + 1 + 2 + 600) + b"\x00\x01t\x00\x09" + b"z" * 600
small = b"\x32\x08\x00\x01u\x00\x0aabc"
cases = {
    "oversize_then_small": big + small,
    "acks": b"\x20\x02\x01\x00" + b"\x40\x02\x00\x05" + b"\x90\x03\x00\x06\x01" + b"\xd0\x00",
    "five_byte_length": b"\x30\xff\xff\xff\xff\x01",
    "topic_past_end": b"\x30\x04\x00\x09ab",
    "qos2": b"\x34\x06\x00\x01t\x00\x01x",
    "pingresp_body": b"\xd0\x01\x00",
    "reserved_flags": b"\x42\x02\x00\x01",
    "unexpected_type": b"\xb0\x02\x00\x01",
    "suback_two_topics": b"\x90\x04\x00\x01\x01\x01",
    "cut_mid_packet": b"\x30\x0a\x00\x01t",
    "short_publish": b"\x32\x03\x00\x01t",
}
for k in sorted(cases):
    print(json.dumps([k, run(cases[k])]))

class Refuse(Wire):
    pass
for code in (5, 1, 9):
    try:
        mqttc.Client(Refuse(bytes((0x20, 2, 0, code)))).connect("n", timeout_ms=100)
        print(json.dumps(["refused", code, "accepted"]))
    except mqttc.MQTTError as e:
        print(json.dumps(["refused", code, str(e)]))
'''


def test_bounded_receive_and_malformed_input(micropython: str, tmp_path: Path) -> None:
    lines = upy(micropython, tmp_path, DECODE)
    r = {k: v for k, v in (x for x in lines if x[0] != "refused")}
    o = r["oversize_then_small"]
    assert o["err"] is None and o["got"] == [["u", 3]]
    assert o["dropped"] == 1 and o["dropped_bytes"] == 605
    assert o["out"] == "40020009" "4002000a"  # both acknowledged, the skipped one first
    a = r["acks"]
    assert a["res"] == [[0x20, 1, 0], [0x40, 5, 0], [0x90, 6, 1]] and a["pongs"] == 1
    for k, why in [("five_byte_length", "remaining length"), ("topic_past_end", "topic longer"),
                   ("qos2", "QoS 2"), ("pingresp_body", "PINGRESP"),
                   ("reserved_flags", "reserved flags"), ("unexpected_type", "unexpected"),
                   ("suback_two_topics", "SUBACK length"), ("short_publish", "shorter")]:
        assert r[k]["err"] is not None and r[k]["err"].startswith("MQTTError"), (k, r[k])
        assert why in r[k]["err"], (k, r[k]["err"])
    assert r["cut_mid_packet"]["err"] == "OSError"
    refused = [x for x in lines if x[0] == "refused"]
    assert refused == [["refused", 5, "connection refused: not authorized (5)"],
                       ["refused", 1, "connection refused: unacceptable protocol version (1)"],
                       ["refused", 9, "connection refused: code 9 (9)"]]


NO_HEAP = WIRE + r'''
class NoRoom(Wire):
    """Reading more than `room` bytes at once fails the way a heap without such a block
    does (before anything is read)."""
    def __init__(self, data, room):
        Wire.__init__(self, data)
        self.room = room
    def read(self, n):
        if n > self.room:
            raise MemoryError("memory allocation failed, allocating %d bytes" % n)
        return Wire.read(self, n)

def pub(topic, payload, pid):
    body = mqttc.string(topic) + bytes((pid >> 8, pid & 255)) + payload
    return b"\x32" + mqttc.remaining_length(len(body)) + body

w = NoRoom(pub("g", b"G" * 300, 7) + pub("u", b"small", 8), 299)
got = []
c = mqttc.Client(w, 4096, lambda t, m: got.append([t.decode(), bytes(m).decode()]))
while w.data:
    c.packet()
print(json.dumps([got, c.dropped_oom, c.dropped, w.out.hex()]))
'''


def test_a_message_the_heap_cannot_hold_is_skipped_and_the_session_kept(micropython: str,
                                                                       tmp_path: Path) -> None:
    [(got, oom, oversize, out)] = upy(micropython, tmp_path, NO_HEAP)
    assert got == [["u", "small"]]  # the next message still arrives, whole and in step
    assert (oom, oversize) == (1, 0)
    assert out == "40020007" "40020008"  # both acknowledged: the broker does not resend


RX_BUFFER = WIRE + r'''
class Trickle(Wire):
    """A stream that hands over at most 7 bytes per readinto, as a serial line or a TLS
    record boundary may."""
    def readinto(self, buf, n):
        return Wire.readinto(self, buf, min(n, 7))

def pub(topic, payload, pid):
    body = mqttc.string(topic) + bytes((pid >> 8, pid & 255)) + payload
    return b"\x32" + mqttc.remaining_length(len(body)) + body

rx = bytearray(64)
got = []
def on(t, m):
    # what the handler is given, and whether it is the receive buffer's bytes
    got.append([t.decode(), bytes(m).hex(), type(m).__name__,
                len(m) <= len(rx) and bytes(m) == bytes(rx[:len(m)])])
w = Trickle(pub("a", bytes(range(64)), 1) + pub("b", b"\xff" * 65, 2) + pub("c", b"xy", 3)
            + pub("d", b"", 4))
c = mqttc.Client(w, 4096, on, rx)
while w.data:
    c.packet()
print(json.dumps([got, w.out.hex()]))
'''


def test_messages_up_to_the_receive_buffer_are_read_into_it(micropython: str,
                                                           tmp_path: Path) -> None:
    [(got, out)] = upy(micropython, tmp_path, RX_BUFFER)
    assert got == [["a", bytes(range(64)).hex(), "memoryview", True],  # fits exactly
                   ["b", "ff" * 65, "bytes", False],  # one byte more: a block of its own
                   ["c", "7879", "memoryview", True],  # the same buffer, refilled
                   ["d", "", "memoryview", True]]
    assert out == "40020001" "40020002" "40020003" "40020004"


WAIT = WIRE + r'''
import time

def pub(topic, payload, pid):
    body = mqttc.string(topic) + bytes((pid >> 8, pid & 255)) + payload
    return b"\x32" + mqttc.remaining_length(len(body)) + body

class Quiet(Wire):
    """Nothing more from the broker once the script is read: waits as a socket would."""
    def readable(self, ms):
        if self.data:
            return True
        time.sleep_ms(ms)
        return False

def slow(t, m):
    time.sleep_ms(150)  # a slow board checking a peer's update

def publish(data, timeout_ms, limit_ms=None):
    c = mqttc.Client(Quiet(data), 4096, slow)
    c.pid = 4  # the publish below gets packet id 5
    t0 = time.ticks_ms()
    try:
        c.send_publish("me", b"x", 1)
        c.wait(mqttc.PUBACK, 5, timeout_ms, limit_ms)
        res = "acknowledged"
    except OSError as e:
        res = "OSError %d" % e.args[0]
    return [res, time.ticks_diff(time.ticks_ms(), t0)]

five = b"".join(pub("peer", b"u", i) for i in range(1, 6))
ack = b"\x40\x02\x00\x05"
# Five peer updates (750 ms of handler) queued ahead of the PUBACK, a 300 ms deadline.
print(json.dumps(publish(five + ack, 300)))
# The same with the whole wait bounded at 600 ms: the bound holds, handlers included.
print(json.dumps(publish(five + ack, 300, 600)))
# Deliveries, then silence: 300 ms from the last packet, after the 750 ms of handlers.
print(json.dumps(publish(five, 300)))
'''


def test_an_ack_deadline_is_on_silence_and_the_whole_wait_is_bounded(micropython: str,
                                                                     tmp_path: Path) -> None:
    """mqttc.Client.wait: a PUBACK queued behind peer updates that take the device longer
    than the deadline is still taken (every packet shows the link alive); the deadline runs
    from the last packet; a bound on the whole wait holds."""
    ok, bounded, silent = upy(micropython, tmp_path, WAIT)
    assert ok[0] == "acknowledged" and ok[1] >= 750
    # The fourth delivery ends past 600 ms: the wait gives up before reading the PUBACK.
    assert bounded[0] == "OSError 110" and 600 <= bounded[1] < 5000
    assert silent[0] == "OSError 110" and 1050 <= silent[1] < 5000


SESSION = r'''
import json, socket, time, mqttc

def sock():
    s = socket.socket()
    s.settimeout(5)
    s.connect(socket.getaddrinfo(%(host)r, %(port)d)[0][-1])
    return s

got = []
s1 = sock()
a = mqttc.Client(s1, 4096, lambda t, m: got.append([t.decode(), m.decode()]))
print(json.dumps(["connack", a.connect("mqttc-a", 30, True, "user", "pw",
                                       ("mf/c/will", b"a is gone", 1, False), 5000)]))
print(json.dumps(["granted", a.subscribe("mf/c/in", 1, 5000)]))
a.ping()
while a.pongs == 0 and a.readable(3000):
    a.packet()
print(json.dumps(["pongs", a.pongs]))
a.publish("mf/c/out", b"qos0", 0)
a.publish("mf/c/out", b"qos1", 1, False, 5000)
print(json.dumps(["published"]))
end = time.ticks_add(time.ticks_ms(), 10000)
while len(got) < 3 and time.ticks_diff(end, time.ticks_ms()) > 0:
    if a.readable(200):
        a.packet()
print(json.dumps(["got", got, a.dropped]))
s1.close()  # no DISCONNECT: the broker must publish the will
'''


def test_session_against_a_real_broker(broker: Broker, micropython: str,  # noqa: F811
                                       tmp_path: Path) -> None:
    host = host_client(broker)
    try:
        host.subscribe("mf/c/#")
        script = tmp_path / "session.py"
        script.write_text(SESSION % {"host": broker.host, "port": broker.port})
        p = subprocess.Popen([micropython, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, MICROPYPATH=MICROPYPATH))
        assert p.stdout is not None
        first = p.stdout.readline()
        assert json.loads(first) == ["connack", 0], first + (p.stderr.read() if p.stderr else "")
        assert json.loads(p.stdout.readline()) == ["granted", 1]
        assert json.loads(p.stdout.readline()) == ["pongs", 1]
        assert json.loads(p.stdout.readline()) == ["published"]
        host.publish("mf/c/in", b"one")
        host.publish("mf/c/in", b"x" * 5000)  # over the client's 4096: skipped, counted
        host.publish("mf/c/in", b"two")
        host.publish("mf/c/in", b"three")
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == [
            "got", [["mf/c/in", "one"], ["mf/c/in", "two"], ["mf/c/in", "three"]], 1]
        seen: dict[str, list[bytes]] = {}
        for _ in range(20):
            m = host.get(timeout=1)
            if m is not None:
                seen.setdefault(m.topic, []).append(m.payload)
            if "mf/c/will" in seen:
                break
        assert seen.get("mf/c/out") == [b"qos0", b"qos1"]
        assert seen.get("mf/c/will") == [b"a is gone"]
    finally:
        host.close()
