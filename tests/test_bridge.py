"""The serial bridge (docs/bridge.md): microfed.serialframe on both sides, firmware/
serialstream.py on the MicroPython unix port whose stdin/stdout is a pty, and
microfed_tools.bridge on the pty's master side carrying its MQTT sessions to real brokers."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tty
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_mqtt import broker, host_client, wait_for  # noqa: F401  (the broker fixture)

from microfed import serialframe as sf
from microfed_host.broker import Broker, free_port
from microfed_tools.bridge import Bridge, BridgeError, FdLine, parse_broker

REPO = Path(__file__).resolve().parents[1]
MICROPYPATH = os.pathsep.join(str(REPO / d) for d in ("firmware", "shared"))
NODE = (REPO / "tests" / "bridge_node.py").read_text()


# ------------------------------------------------------------------ framing


def test_frames_round_trip_and_stay_printable_lines() -> None:
    payload = bytes(range(256))
    f = sf.encode(sf.DATA, 3, 255, payload)
    assert f[:1] == b"~" and f[-1:] == b"\n"
    assert all(0x20 <= b < 0x7F or b >= 0x80 for b in f[1:-1])  # no control byte inside
    assert b"~" not in f[1:] and b"\n" not in f[:-1]
    d = sf.Decoder()
    evs = d.feed(b"boot text\r\n" + f + b"more\n" + sf.encode(sf.LOG, 0, 0, b"{}"))
    assert evs == [(sf.TEXT, 0, 0, b"boot text"), (sf.DATA, 3, 255, payload),
                   (sf.TEXT, 0, 0, b"more"), (sf.LOG, 0, 0, b"{}")]
    # A tty that turns \n into \r\n changes nothing.
    assert sf.Decoder().feed(f.replace(b"\n", b"\r\n")) == [(sf.DATA, 3, 255, payload)]
    with pytest.raises(ValueError):
        sf.encode(sf.DATA, 0, 0, b"x" * (sf.MAX_PAYLOAD + 1))


def test_every_single_byte_change_is_caught() -> None:
    f = sf.encode(sf.DATA, 1, 2, b"hello, mqtt \x00\x7e\x7d\x0a")
    for i in range(len(f)):
        for flip in (0x01, 0x20, 0x80):
            bad = bytearray(f)
            bad[i] ^= flip
            d = sf.Decoder()
            evs = d.feed(bytes(bad) + sf.encode(sf.LOG, 0, 0, b"next"))
            frames = [e for e in evs if e[0] not in (sf.TEXT, sf.BAD)]
            assert frames[-1] == (sf.LOG, 0, 0, b"next"), (i, flip, evs)  # resynchronised
            assert len(frames) == 1, (i, flip, evs)  # the damaged frame never passes


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_the_decoder_is_total_and_bounded(data: bytes) -> None:
    d = sf.Decoder(max_text=64)
    for e in d.feed(data):
        assert e[0] in (sf.TEXT, sf.BAD) or 0x20 <= e[0] < 0x7F
        assert len(e[3]) <= max(64, sf.MAX_PAYLOAD)
    assert d.n <= sf.MAX_PAYLOAD + 7 and len(d.body) == sf.MAX_PAYLOAD + 7
    assert len(d.text) < 64


class _Sink:
    def __init__(self) -> None:
        self.out = bytearray()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.out += data
        self.writes += 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=sf.MAX_PAYLOAD), st.integers(8, 300), st.integers(0x20, 0x7E),
       st.integers(0, 255), st.integers(0, 255))
def test_writing_through_a_small_scratch_gives_the_encoded_frame(
        payload: bytes, size: int, ch: int, sess: int, seq: int) -> None:
    sink = _Sink()
    sf.write(sink, ch, sess, seq, memoryview(payload), bytearray(size))
    assert bytes(sink.out) == sf.encode(ch, sess, seq, payload)
    assert sink.writes >= len(sink.out) // size  # it flushed as it filled, never overflowed
    viewed = sf.Decoder(view=True).feed(bytes(sink.out))
    assert len(viewed) == 1 and bytes(viewed[0][3]) == payload


def test_a_view_payload_is_the_decoders_own_buffer() -> None:
    d = sf.Decoder(view=True)
    ev = d.feed(sf.encode(sf.DATA, 1, 2, b"abc"))[0]
    assert isinstance(ev[3], memoryview) and bytes(ev[3]) == b"abc"
    assert ev[3].obj is d.body  # no block of the frame's size per frame
    assert isinstance(sf.Decoder().feed(sf.encode(sf.DATA, 1, 2, b"abc"))[0][3], bytes)


def test_micropython_decodes_like_cpython(micropython: str) -> None:
    import random

    rng = random.Random(7)
    stream = b"".join(
        rng.choice([sf.encode(sf.DATA, rng.randrange(256), rng.randrange(256),
                              rng.randbytes(rng.randrange(300))),
                    b"text line\n", rng.randbytes(rng.randrange(40)), b"~\x7d\n"])
        for _ in range(60))
    code = ("import sys, binascii\nfrom microfed import serialframe as sf\n"
            "d = sf.Decoder()\nfor e in d.feed(binascii.unhexlify(sys.stdin.read().strip())):\n"
            "    print(e[0], e[1], e[2], binascii.hexlify(e[3]).decode())\n"
            "print('counts', d.frames, d.bad, d.lines)\n")
    r = subprocess.run([micropython, "-c", code], input=stream.hex(), capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, MICROPYPATH=MICROPYPATH))
    assert r.returncode == 0, r.stderr
    d = sf.Decoder()
    want = ["%d %d %d %s" % (e[0], e[1], e[2], e[3].hex()) for e in d.feed(stream)]
    want.append("counts %d %d %d" % (d.frames, d.bad, d.lines))
    assert r.stdout.splitlines() == want
    assert d.frames > 10 and d.bad > 0


def test_micropython_writes_frames_like_cpython(micropython: str) -> None:
    """The device's sf.write through a scratch of 8 and 128 bytes (MicroPython's crc32 chained
    from the header), byte for byte the host's encode."""
    import random

    rng = random.Random(11)
    cases = [(rng.randrange(0x20, 0x7F), rng.randrange(256), rng.randrange(256),
              rng.randbytes(rng.choice([0, 1, 7, 255, 256, 1024]))) for _ in range(24)]
    code = ("import sys, binascii\nfrom microfed import serialframe as sf\n"
            "class S:\n    def __init__(self): self.b = bytearray()\n"
            "    def write(self, d): self.b += d\n"
            "for line in sys.stdin.read().split():\n"
            "    c, s, q, p = line.split(',')\n"
            "    p = binascii.unhexlify(p)\n"
            "    for n in (8, 128):\n"
            "        o = S(); sf.write(o, int(c), int(s), int(q), memoryview(p), bytearray(n))\n"
            "        print(binascii.hexlify(o.b).decode())\n")
    stdin = " ".join("%d,%d,%d,%s" % (c, s, q, p.hex() or "") for c, s, q, p in cases)
    r = subprocess.run([micropython, "-c", code], input=stdin, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, MICROPYPATH=MICROPYPATH))
    assert r.returncode == 0, r.stderr
    want = [sf.encode(c, s, q, p).hex() for c, s, q, p in cases for _ in (8, 128)]
    assert r.stdout.split() == want


def test_the_device_stream_reads_back_what_arrived_in_any_pieces(micropython: str) -> None:
    """firmware/serialstream.Stream on MicroPython: payloads of random sizes pushed in, read
    back with read() and readinto() of random sizes, across buffer compactions and one
    growth (a read longer than the Link's buffer), equal the bytes sent."""
    code = ("import random, sys, serialstream\n"
            "class L:\n"
            "    def __init__(s): s.rxbuf = bytearray(serialstream._RXBUF); s.eof = False\n"
            "    def pump(s, w):\n"
            "        if s.src: s.st.push(memoryview(s.src.pop(0)))\n"
            "random.seed(5)\n"
            "data = bytes([random.getrandbits(8) for _ in range(6000)])\n"
            "link = L(); st = serialstream.Stream(link, 1, 1000); link.st = st\n"
            "link.src = []; i = 0\n"
            "while i < len(data):\n"
            "    n = random.getrandbits(8) + 1; link.src.append(data[i:i + n]); i += n\n"
            "got = bytearray(); out = bytearray(300); long = True\n"
            "while len(got) < len(data):\n"
            "    left = len(data) - len(got)\n"
            "    if long and len(got) >= 600: got += st.read(2500); long = False\n"
            "    elif random.getrandbits(1): got += st.read(min(left, random.getrandbits(5) + 1))\n"
            "    else:\n"
            "        k = st.readinto(memoryview(out)[:random.getrandbits(8) + 1])\n"
            "        got += out[:k]\n"
            "print(bytes(got) == data, len(link.rxbuf) > serialstream._RXBUF)\n")
    env = dict(os.environ, MICROPYPATH=MICROPYPATH)
    r = subprocess.run([micropython, "-c", code], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


def test_the_link_buffers_are_made_with_the_nodes_boot_buffers(micropython: str) -> None:
    """mqtt.Transport.use_rx_buffer, which the node calls at boot before any Ed25519 work,
    makes the serial link's receive-side buffers too (allocate=Link.allocate), and a later
    open() reuses them: the first connection needs no block of a heap strewn since."""
    code = ("import sys, serialstream, mqtt\n"
            "link = serialstream.Link(sys.stdin.buffer, sys.stdout.buffer)\n"
            "t = mqtt.Transport('n1', 'bridge', stream=link.open, allocate=link.allocate)\n"
            "before = (link.rxbuf, link.dec)\n"
            "t.use_rx_buffer(100)\n"
            "rx, dec = link.rxbuf, link.dec\n"
            "link.allocate()\n"
            "print(before == (None, None), len(rx), rx is link.rxbuf and dec is link.dec)\n")
    r = subprocess.run([micropython, "-c", code], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL, env=dict(os.environ, MICROPYPATH=MICROPYPATH))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "512", "True"]


# ------------------------------------------------------------------ node over a pty


class PtyNode:
    """A unix-port process whose stdin and stdout are the slave side of a pty; the bridge
    gets the master side."""

    def __init__(self, micropython: str, tmp: Path, code: str) -> None:
        script = tmp / "serial_node.py"
        script.write_text(code)
        self.master, slave = os.openpty()
        tty.setraw(slave)  # a serial line: no echo, no newline translation
        self.proc = subprocess.Popen([micropython, str(script)], stdin=slave, stdout=slave,
                                     stderr=subprocess.PIPE,
                                     env=dict(os.environ, MICROPYPATH=MICROPYPATH))
        os.close(slave)
        self.logs: queue.Queue[dict[str, Any]] = queue.Queue()
        self.text: list[str] = []
        self.seen: list[dict[str, Any]] = []

    def on_log(self, line: str) -> None:
        try:
            d = json.loads(line)
        except ValueError:
            self.text.append(line)
            return
        self.logs.put(d)

    def expect(self, ev: str, timeout: float = 20.0) -> dict[str, Any]:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                d = self.logs.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(d)
            if d.get("ev") == ev:
                return d
        err = self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
        pytest.fail("no %r from the node: seen %s, text %s, stderr %s"
                    % (ev, self.seen[-8:], self.text[-5:], err[-2000:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_a_serial_node_joins_the_broker_through_the_bridge(
        broker: Broker, micropython: str, tmp_path: Path) -> None:  # noqa: F811
    base = "mf/bridge/%s" % broker.kind
    node = PtyNode(micropython, tmp_path, NODE + "\nmain(%r, %r)\n" % ("serial-1", base))
    host = host_client(broker, max_message=65536)
    bridge = Bridge(FdLine(node.master), broker.host, broker.port, on_log=node.on_log,
                    say=lambda m: None)
    try:
        host.subscribe(base + "/echo")
        bridge.start()
        assert node.expect("up")["ok"] is True
        node.expect("ready")
        assert "plain text between frames" in node.text  # unframed text passed through
        assert wait_for(lambda: bridge.stats()["bad_frames"] >= 1)  # "~corrupt": dropped

        every_byte = bytes(range(256)) * 12  # 3 KB: every escaped value, several frames
        for payload in (b"hello", every_byte, b"x" * 9000, b"after-oversize"):
            host.publish(base + "/down", payload)
        got = [host.get(timeout=20) for _ in range(3)]
        assert [m.payload if m else None for m in got] == [b"hello", every_byte,
                                                         b"after-oversize"]
        # The broker forwards an echo before the node has its PUBACK: wait for the node.
        assert [node.expect("echo")["ok"] for _ in range(3)] == [True] * 3

        # Garbage from the host side: the device drops the frame, ends the session (its
        # bytes may have had a hole) and reconnects; the bridge follows with a new session.
        os.write(node.master, b"~\x01garbage\n" + bytes(range(200)) + b"\n")
        assert node.expect("down")["stats"]["connected"] is False
        up = node.expect("up")
        assert up["stats"]["reconnects"] == 1
        host.publish(base + "/down", b"after-garbage")
        m = host.get(timeout=20)
        assert m is not None and m.payload == b"after-garbage"

        host.publish(base + "/down", b"quit")
        bye = node.expect("bye")
        assert bye["stats"]["dropped_oversize"] == 1
        assert bye["stats"]["published"] == 4 and bye["stats"]["publish_failures"] == 0
        assert bye["link"]["bad_frames"] >= 1
        assert node.proc.wait(20) == 0
        s = bridge.stats()
        # 2, or 3 when the rest of the garbage also hit the first reconnect attempt
        assert s["sessions"] >= 2 and s["connect_failures"] == 0
        assert s["log_lines"] >= 6 and s["text_lines"] >= 1 and s["handler_errors"] == 0
    finally:
        bridge.stop()
        host.close()
        node.close()


REFUSED = r'''
import serialstream
link = serialstream.Link()
try:
    link.open(5000)
    link.log("opened")
except OSError as e:
    link.log("refused %r" % (e.args[1],))
'''


def test_broker_refused_reaches_the_device_as_a_reason(micropython: str, tmp_path: Path) -> None:
    node = PtyNode(micropython, tmp_path, REFUSED)
    port = free_port()  # nothing listens there
    lines: list[str] = []
    said: list[str] = []
    bridge = Bridge(FdLine(node.master), "127.0.0.1", port, on_log=lines.append,
                    say=said.append)
    try:
        bridge.start()
        assert node.proc.wait(20) == 0
        assert wait_for(lambda: bool(lines))
        assert lines[0].startswith("refused b'broker 127.0.0.1:%d refused or unreachable" % port)
        assert bridge.stats()["connect_failures"] == 1
        assert said[0].startswith("broker 127.0.0.1:%d refused or unreachable" % port)
    finally:
        bridge.stop()
        node.close()


def test_bridge_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BridgeError, match="cannot open serial port .*nope"):
        Bridge(str(tmp_path / "nope"), "127.0.0.1", 1883).start()
    with pytest.raises(BridgeError, match="HOST:PORT"):
        parse_broker("localhost")
    r = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "bridge", "--port",
                        str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "microfed bridge: error: cannot open serial port" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_bridge_survives_garbage_and_counts_it() -> None:
    import random

    sent: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            sent.append(data)

        def read(self, timeout: float) -> bytes:
            return b""

        def close(self) -> None:
            pass

    lines: list[str] = []
    b = Bridge(Sink(), "127.0.0.1", 1, on_log=lines.append, say=lambda m: None)
    rng = random.Random(1)
    for _ in range(200):
        b.feed(rng.randbytes(rng.randrange(1, 300)))
        b.feed(b"~" + rng.randbytes(20) + b"\n")
    b.feed(sf.encode(sf.DATA, 9, 0, b"no session"))  # DATA for a session that is not open
    b.feed(sf.encode(sf.LOG, 0, 0, b"still here"))
    s = b.stats()
    assert lines[-1] == "still here"
    assert s["bad_frames"] >= 200 and s["stale"] >= 1 and s["handler_errors"] == 0
    assert sf.Decoder().feed(sent[-1])[0][:2] == (sf.CLOSE, 9)  # the device is told


def test_a_deployed_node_with_link_serial_takes_part_in_a_mesh(tmp_path: Path,
                                                                micropython: str) -> None:
    """The hardware path of tests/test_hardware_path.py with one of the five boards on
    config "link": "serial": its main.py reaches the broker only through the bridge."""
    from test_hardware_path import microfed

    from microfed_host import broker as brokermod

    try:
        br = brokermod.start_broker()
    except brokermod.BrokerError as e:
        pytest.skip(f"no MQTT broker could start: {e}")
    procs: list[subprocess.Popen] = []
    bridge: Bridge | None = None
    try:
        mesh = tmp_path / "mesh"
        microfed("provision", "init", "--mesh", "lab", "--nodes", "5", "--out", str(mesh),
                 "--broker", f"{br.host}:{br.port}")
        boards = []
        for i in range(1, 6):
            dev = tmp_path / f"board{i}"
            dev.mkdir()
            microfed("deploy", "--board", "unix", "--port", str(dev),
                     "--bundle", str(mesh / "bundles" / f"node-{i:02d}.json"))
            boards.append(dev)
        (boards[0] / "config.json").write_text(json.dumps({"link": "serial"}))
        coord = subprocess.Popen(
            [sys.executable, "-m", "microfed_tools.cli", "coordinator", "--mesh", str(mesh),
             "--rounds", "2", "--f", "1", "--deadline", "90", "--out", str(tmp_path / "run")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(coord)
        env = dict(os.environ, MICROPYPATH="lib")
        for dev in boards[1:]:
            procs.append(subprocess.Popen([micropython, "-X", "heapsize=4m", "main.py"],
                                          cwd=dev, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.STDOUT))
        master, slave = os.openpty()
        tty.setraw(slave)
        p = subprocess.Popen([micropython, "-X", "heapsize=4m", "main.py"], cwd=boards[0],
                             env=env, stdin=slave, stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        procs.append(p)
        events: list[dict[str, Any]] = []
        bridge = Bridge(FdLine(master), br.host, br.port,
                        on_log=lambda line: events.append(json.loads(line)), say=lambda m: None)
        bridge.start()
        out, err = coord.communicate(timeout=300)
        assert coord.returncode == 0, err[-2000:]
        rounds = [json.loads(x) for x in out.splitlines() if '"ev": "round"' in x]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all("node-01" in r["accepted"] and len(r["accepted"]) == 5 for r in rounds)
        assert p.wait(60) == 0
        assert wait_for(lambda: any(e.get("ev") == "exit" for e in events))
        ex = [e for e in events if e.get("ev") == "exit"][0]
        assert ex["code"] == 0 and ex["counters"]["mqtt"]["connects"] >= 1
        assert bridge.stats()["handler_errors"] == 0
        os.close(master)
    finally:
        if bridge is not None:
            bridge.stop()
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.wait()
        br.stop()
