"""A junk flood for a local MQTT broker: the load a hostile client can put on the coordinator.

`Flooder` publishes `count` junk payloads of about `size` bytes to the given topics from its own
thread (paho-mqtt, its own connection), then stops by itself. It is a test and benchmark tool
(tests/test_flood.py, benchmarks/flood.py, the chaos scenario of `microfed mesh run`), so it
is bounded on purpose: a fixed number of frames, a time limit, at most `window` frames not yet
acknowledged in memory at once, and loopback brokers only.

The junk is deterministic from `seed` and mixes four shapes (frame i's shape and bytes depend
only on seed and i):

- random bytes (rejected as bad_magic, truncated, ...);
- frames with the microfed magic b"MF", version 1 and a plausible header (the mesh id and
  sender parsed from a microfed/<mesh>/<kind>/<id> topic, a sequence counter, a round) whose
  declared lengths match, with a garbage payload and signature (bad_payload, unregistered,
  bad_signature, ...);
- the same frames cut short (truncated);
- a plausible header followed by random bytes whose length disagrees with it (bad_length).

QoS 1: up to `window` PUBLISHes in flight (paho's max_inflight_messages_set), and the flood
is done only once the broker has acknowledged every one. QoS 0: done once paho has written
every frame to the socket.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from microfed import wire
from microfed_host.broker import is_loopback

SHAPES = ("random", "frame", "truncated", "bad_length")
DEFAULT_WINDOW = 1000  # QoS 1 PUBLISHes in flight / frames not yet written (QoS 0)
_KINDS = {"update": wire.MODEL_UPDATE, "digest": wire.GOSSIP_DIGEST, "hello": wire.HELLO}


class FloodError(RuntimeError):
    """Bad Flooder arguments (the message says which)."""


def _topic_parts(topic: str) -> tuple[bytes, int, str]:
    """(mesh id, frame kind, sender) a plausible frame on `topic` would carry."""
    parts = topic.split("/")
    mesh = parts[1] if len(parts) > 1 and parts[1] else "junk"
    kind = _KINDS.get(parts[2], wire.MODEL_UPDATE) if len(parts) > 2 else wire.MODEL_UPDATE
    sender = parts[3] if len(parts) > 3 and parts[3] else "junk"
    if not wire.valid_id(sender.encode()) or len(sender.encode()) > wire.MAX_ID:
        sender = "junk"
    return wire.mesh_id(mesh), kind, sender


def junk(seed: int, i: int, topic: str, size: int) -> bytes:
    """Junk payload number `i` of the flood with this seed (deterministic, about `size` bytes)."""
    rng = random.Random(seed * 1_000_003 + i)
    shape = SHAPES[rng.randrange(len(SHAPES))]
    if shape == "random" or size < wire.MIN_FRAME:
        return rng.randbytes(max(1, size))
    mesh, kind, sender = _topic_parts(topic)
    sb = sender.encode()
    plen = max(0, size - wire.HDR_FIXED - len(sb) - wire.SIG_LEN)
    hdr = struct.pack("<2sBB8sIQqIB", wire.MAGIC, wire.VERSION, kind, mesh, rng.randrange(1, 100),
                      rng.randrange(1, 1 << 40), int(time.time()), plen, len(sb)) + sb
    if shape == "bad_length":
        return hdr + rng.randbytes(plen + wire.SIG_LEN + rng.randrange(1, 64))
    frame = hdr + rng.randbytes(plen + wire.SIG_LEN)
    if shape == "truncated":
        return frame[:rng.randrange(1, len(frame))]
    return frame


class Flooder:
    """Publish `count` junk frames of about `size` bytes at `qos` to `topics` (round-robin)
    on the broker at host:port (loopback only), from a thread of its own.

    rate: frames per second (None: as fast as the broker takes them). max_seconds: the flood
    stops there whatever is left. After join(): `sent` frames were acknowledged by the broker
    (QoS 1) or written to the socket (QoS 0); `error` says why it stopped early, else None;
    `elapsed` is the flood's duration in seconds (connect to last acknowledgement).
    """

    def __init__(
        self,
        host: str,
        port: int,
        topics: list[str],
        count: int,
        size: int,
        qos: int,
        rate: float | None = None,
        username: str | None = None,
        password: str | None = None,
        seed: int = 0,
        max_seconds: float = 600.0,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if not is_loopback(host):
            raise FloodError(f"the flooder only targets a loopback broker, not {host!r}")
        if not 0 < port < 65536:
            raise FloodError(f"port must be 1..65535, got {port}")
        if not topics or any(not t or "+" in t or "#" in t for t in topics):
            raise FloodError("topics must be a non-empty list of concrete topic names")
        if count < 0 or size < 1 or qos not in (0, 1):
            raise FloodError("count must be >= 0, size >= 1 and qos 0 or 1")
        if rate is not None and not rate > 0:
            raise FloodError("rate must be > 0 frames/s or None")
        if not max_seconds > 0 or window < 1:
            raise FloodError("max_seconds must be > 0 and window >= 1")
        self.host = host
        self.port = port
        self.topics = list(topics)
        self.count = count
        self.size = size
        self.qos = qos
        self.rate = rate
        self.username = username
        self.password = password
        self.seed = seed
        self.max_seconds = max_seconds
        self.window = window
        self.sent = 0
        self.published = 0
        self.error: str | None = None
        self.elapsed = 0.0
        self._done_cv = threading.Condition()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._conn_rc = ""
        self._thread = threading.Thread(target=self._run, name="microfed-flood", daemon=True)

    # -- public surface --------------------------------------------------------------------
    def start(self) -> None:
        """Start flooding (returns at once)."""
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the flood to end; True if it has (finished, stopped or failed)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop early (what is in flight is abandoned) and wait for the thread."""
        self._stop.set()
        with self._done_cv:
            self._done_cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(15)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the thread ------------------------------------------------------------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any) -> None:
        self._conn_rc = str(rc)
        if not rc.is_failure:
            self._connected.set()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, rc: Any,
                    props: Any) -> None:
        with self._done_cv:
            self.sent += 1
            self._done_cv.notify_all()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any,
                       props: Any) -> None:
        if not self._stop.is_set() and self.sent < self.count and self.error is None:
            self.error = f"broker closed the connection after {self.sent} frames: {rc}"
        with self._done_cv:
            self._done_cv.notify_all()

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def _run(self) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.max_seconds
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"microfed-flood-{self.seed}-{id(self)}",
                        clean_session=True, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(self.window)
        c.max_queued_messages_set(0)  # paho's own queue is unbounded; the window bounds it
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        c.on_socket_open = self._on_socket_open
        started = False
        try:
            c.connect(self.host, self.port, keepalive=60)
            c.loop_start()
            started = True
            if not self._connected.wait(10):
                self.error = f"no CONNACK from {self.host}:{self.port}: {self._conn_rc or 'timeout'}"
                return
            for i in range(self.count):
                if self._stop.is_set() or self.error is not None:
                    return
                if self.rate is not None:
                    due = t0 + i / self.rate
                    while not self._stop.is_set():
                        left = due - time.monotonic()
                        if left <= 0:
                            break
                        self._stop.wait(min(left, 0.5))
                with self._done_cv:  # at most `window` frames unacknowledged / unwritten
                    while (self.published - self.sent >= self.window and not self._stop.is_set()
                           and self.error is None):
                        if time.monotonic() > deadline:
                            break
                        self._done_cv.wait(0.5)
                if time.monotonic() > deadline:
                    self.error = f"time limit of {self.max_seconds:g} s reached after {self.sent} frames"
                    return
                topic = self.topics[i % len(self.topics)]
                info = c.publish(topic, junk(self.seed, i, topic, self.size), qos=self.qos)
                if info.rc == paho.MQTT_ERR_NO_CONN:
                    if self.error is None:
                        self.error = f"broker closed the connection after {self.sent} frames"
                    return
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    self.error = f"publish {i} failed: {paho.error_string(info.rc)}"
                    return
                self.published += 1
            with self._done_cv:
                while self.sent < self.published and not self._stop.is_set() and self.error is None:
                    if time.monotonic() > deadline:
                        self.error = (f"time limit of {self.max_seconds:g} s reached with "
                                      f"{self.published - self.sent} frames unacknowledged")
                        return
                    self._done_cv.wait(0.5)
        except Exception as e:  # the thread reports, never raises
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.elapsed = time.monotonic() - t0
            try:
                c.disconnect()
            except Exception:
                pass
            if started:
                c.loop_stop()
