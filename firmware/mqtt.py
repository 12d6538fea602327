# microfed node transport: MQTT on the umqtt.simple API, made robust.
#
# umqtt.simple (frozen into ESP32 images; firmware/lib/umqtt/simple.py on the unix port)
# never pings, blocks forever waiting for PUBACK/SUBACK/CONNACK, reads any payload the
# broker sends into RAM, and writes each packet in several small pieces. This module
# subclasses its MQTTClient (so whichever copy is installed keeps doing the packet
# encoding for publish/subscribe/ping) and adds:
#   - a deadline on every blocking operation (connect, subscribe, QoS 1 publish);
#   - TCP_NODELAY, because the split writes otherwise cost ~44 ms of Nagle delay per
#     QoS 1 round trip instead of ~0.3 ms;
#   - a bounded receive path: a PUBLISH whose remaining length exceeds max_msg is
#     skipped in small chunks (and acknowledged) before any of it is kept in memory;
#   - keepalive pings on a schedule and a dead-link check on the PINGRESP;
#   - reconnect with bounded exponential back-off, deterministic per-node jitter,
#     and the subscription list re-established on every reconnect.
# MicroPython only (time.ticks_*); no f-strings, no typing.

import time
import select
import socket
import struct
import hashlib

from umqtt.simple import MQTTClient, MQTTException

try:
    from micropython import const
except ImportError:  # pragma: no cover - CPython tooling only

    def const(x):
        return x


_ETIMEDOUT = const(110)
_IPPROTO_TCP = const(6)
_TCP_NODELAY = const(1)
_SKIP_CHUNK = const(256)
_MAX_PACKET = const(268435455)  # MQTT 3.1.1 remaining-length limit
_UMQTT_MAX = const(2097152)  # umqtt.simple asserts publish size < this
_PUBACK = const(0x40)
_SUBACK = const(0x90)

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff
ticks_add = time.ticks_add
sleep_ms = time.sleep_ms


def _b(s):
    if isinstance(s, str):
        return s.encode()
    return bytes(s)


def _field(s):
    s = _b(s)
    return struct.pack("!H", len(s)) + s


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return out


def _is_timeout(e):
    return isinstance(e, OSError) and len(e.args) > 0 and e.args[0] == _ETIMEDOUT


class _Client(MQTTClient):
    # umqtt's publish() and subscribe() call self.wait_msg() while they wait for their
    # acknowledgement, so overriding wait_msg/check_msg/connect is enough to bound them.

    def __init__(self, client_id, server, port, user, password, keepalive, ssl,
                 io_timeout_ms, max_msg, nodelay):
        if ssl:
            MQTTClient.__init__(self, client_id, server, port, user, password, keepalive, ssl)
        else:
            MQTTClient.__init__(self, client_id, server, port, user, password, keepalive)
        self.io_timeout_ms = io_timeout_ms
        self.max_msg = max_msg
        self.nodelay = nodelay
        self.nodelay_ok = False
        self.deadline = None  # ticks_ms by which the current operation must be done
        self.expect = None  # ack opcode the running publish/subscribe wants returned
        self.poller = None
        self.raw_sock = None
        self.last_rx = ticks_ms()
        self.pongs = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self._skipbuf = bytearray(_SKIP_CHUNK)

    # --- socket helpers -------------------------------------------------------------
    def close_sock(self):
        s = self.sock
        self.sock = None
        self.poller = None
        if s is not None:
            try:
                s.close()
            except Exception:
                pass

    def set_timeout_ms(self, ms):
        s = self.sock
        if s is not None:
            if not hasattr(s, "settimeout"):
                s = self.raw_sock  # an SSLSocket has none: time out its TCP socket's reads
            s.settimeout(ms / 1000)

    def _read(self, n):
        if n == 0:
            return b""
        data = self.sock.read(n)
        if not data or len(data) != n:
            raise OSError(-1)  # connection closed (or cut mid-packet)
        return data

    def _skip(self, n):
        buf = self._skipbuf
        while n > 0:
            k = n if n < _SKIP_CHUNK else _SKIP_CHUNK
            got = self.sock.readinto(buf, k)
            if not got:
                raise OSError(-1)
            n -= got

    def _recv_len(self):
        # Bounded: the remaining length has at most 4 bytes; a 5th means garbage.
        n = 0
        sh = 0
        for _ in range(4):
            b = self._read(1)[0]
            n |= (b & 0x7F) << sh
            if not b & 0x80:
                return n
            sh += 7
        raise MQTTException("malformed remaining length")

    def readable(self, wait_ms):
        # poll first so an idle wait never hits the socket timeout: on the unix port a
        # read that times out part-way through loses the bytes it already had.
        return bool(self.poller.poll(wait_ms))

    # --- protocol ---------------------------------------------------------------
    def connect(self, clean_session=True):
        self.close_sock()
        addr = socket.getaddrinfo(self.server, self.port)[0][-1]
        s = socket.socket()
        self.sock = s
        self.raw_sock = s
        self.set_timeout_ms(self.io_timeout_ms)
        s.connect(addr)
        self.nodelay_ok = False
        if self.nodelay:
            try:
                s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                self.nodelay_ok = True
            except Exception:
                pass  # port without the option: correct, only slower
        if self.ssl:
            if hasattr(self.ssl, "wrap_socket"):  # newer umqtt: an SSLContext
                s = self.ssl.wrap_socket(s, server_hostname=self.server)
            else:
                import ssl

                s = ssl.wrap_socket(s, **getattr(self, "ssl_params", {}))
            self.sock = s
        flags = (1 if clean_session else 0) << 1
        payload = _field(self.client_id)
        if self.lw_topic:
            flags |= 0x4 | (self.lw_qos & 0x3) << 3 | (1 if self.lw_retain else 0) << 5
            payload += _field(self.lw_topic) + _field(self.lw_msg)
        if self.user is not None:
            flags |= 0x80
            payload += _field(self.user)
            if self.pswd is not None:
                flags |= 0x40
                payload += _field(self.pswd)
        ka = self.keepalive
        body = b"\x00\x04MQTT\x04" + bytes((flags, ka >> 8, ka & 0xFF)) + payload
        # One write: CONNECT goes out as a single segment even before NODELAY matters.
        s.write(b"\x10" + _varint(len(body)) + body)
        resp = self._read(4)
        if resp[0] != 0x20 or resp[1] != 0x02:
            raise MQTTException("bad CONNACK")
        if resp[3] != 0:
            raise MQTTException(resp[3])
        p = select.poll()
        p.register(s, select.POLLIN)
        self.poller = p
        self.last_rx = ticks_ms()
        return resp[2] & 1

    def _wrap_pid(self):
        # umqtt increments pid without bound; 0 is not a valid packet id.
        if self.pid >= 65535:
            self.pid = 0

    def publish(self, topic, msg, retain=False, qos=0):
        self._wrap_pid()
        self.expect = _PUBACK
        try:
            return MQTTClient.publish(self, topic, msg, retain, qos)
        finally:
            self.expect = None

    def subscribe(self, topic, qos=0):
        self._wrap_pid()
        self.expect = _SUBACK
        try:
            return MQTTClient.subscribe(self, topic, qos)
        finally:
            self.expect = None

    def wait_msg(self):
        d = self.deadline
        if d is None:
            wait = -1
        else:
            wait = ticks_diff(d, ticks_ms())
            if wait < 0:
                raise OSError(_ETIMEDOUT)
        if not self.readable(wait):
            if d is None:
                return None
            raise OSError(_ETIMEDOUT)
        return self.packet()

    def check_msg(self):
        if not self.readable(0):
            return None
        return self.packet()

    def packet(self):
        # Read one whole packet. Returns the opcode only when the running publish or
        # subscribe expects it (that caller reads the body, as in umqtt); every other
        # non-PUBLISH packet is skipped whole so the stream never falls out of step.
        res = self.sock.read(1)
        if not res:
            raise OSError(-1)
        self.last_rx = ticks_ms()
        op = res[0]
        if op == 0xD0:
            if self._read(1) != b"\x00":
                raise MQTTException("bad PINGRESP")
            self.pongs += 1
            return None
        if op & 0xF0 != 0x30:
            if op == self.expect:
                return op
            self._skip(self._recv_len())
            return None
        sz = self._recv_len()
        qos = (op >> 1) & 3
        if qos > 1:
            raise MQTTException("QoS 2 PUBLISH on a QoS <= 1 subscription")
        head = 4 if qos else 2
        if sz < head:
            raise MQTTException("short PUBLISH")
        tl = self._read(2)
        tl = tl[0] << 8 | tl[1]
        if tl + head > sz:
            raise MQTTException("PUBLISH topic longer than packet")
        n = sz - tl - head
        if sz > self.max_msg:
            self._skip(tl)
            pid = self._read(2) if qos else None
            self._skip(n)
            self.dropped += 1
            self.dropped_bytes += sz
            if qos:
                self.sock.write(b"\x40\x02" + pid)
            return None
        topic = self._read(tl)
        pid = self._read(2) if qos else None
        msg = self._read(n)
        if qos:
            # Ack before the callback: the message is fully received, and a callback
            # that publishes must not interleave with a half-written PUBACK.
            self.sock.write(b"\x40\x02" + pid)
        self.cb(topic, msg)
        return None


class Transport:
    """A node's MQTT link. Never blocks longer than its timeouts; reports failures
    by return value and counters (stats()), reconnects by itself."""

    def __init__(self, client_id, server, port=1883, user=None, password=None,
                 keepalive=30, nodelay=True, max_msg=16384, io_timeout_ms=5000,
                 publish_timeout_ms=5000, backoff_min_ms=250, backoff_max_ms=8000,
                 jitter_pct=25, max_pending=8, clean_session=True, ssl=None, log=None):
        if not client_id or len(_b(client_id)) > 65535:
            raise ValueError("client_id must be 1..65535 bytes")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("port must be 1..65535")
        if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
            raise ValueError("keepalive must be 0..65535 s")
        if not isinstance(max_msg, int) or not 16 <= max_msg <= _MAX_PACKET:
            raise ValueError("max_msg must be 16..268435455 bytes")
        if io_timeout_ms <= 0 or publish_timeout_ms <= 0:
            raise ValueError("timeouts must be > 0 ms")
        if not 0 < backoff_min_ms <= backoff_max_ms:
            raise ValueError("need 0 < backoff_min_ms <= backoff_max_ms")
        if not 0 <= jitter_pct < 100:
            raise ValueError("jitter_pct must be 0..99")
        self.client = _Client(client_id, server, port, user, password, keepalive, ssl,
                              io_timeout_ms, max_msg, nodelay)
        self.client.set_callback(self._on_publish)
        self._id = _b(client_id)
        self.keepalive = keepalive
        self.io_timeout_ms = io_timeout_ms
        self.publish_timeout_ms = publish_timeout_ms
        self.backoff_min_ms = backoff_min_ms
        self.backoff_max_ms = backoff_max_ms
        self.jitter_pct = jitter_pct
        self.max_pending = max_pending
        self.clean_session = clean_session
        self.log = log
        self.connected = False
        self.last_error = None
        self.backoffs = []  # the last few retry delays, for diagnostics
        self._handler = None
        self._subs = []  # [topic bytes, qos]; replayed on every reconnect
        self._pending = []  # messages that arrived while an ack was awaited
        self._busy = False
        self._attempt = 0
        self._next_try = ticks_ms()
        self._ever = False
        self._last_tx = ticks_ms()
        self._ping_at = None
        self._ping_pongs = 0
        self._n = {"connects": 0, "reconnects": 0, "connect_failures": 0, "disconnects": 0,
                   "published": 0, "publish_failures": 0, "publish_timeouts": 0,
                   "received": 0, "dropped_pending": 0, "pings": 0, "handler_errors": 0}

    # --- public API -----------------------------------------------------------
    def set_handler(self, fn):
        """fn(topic: bytes, msg: bytes), called from poll() (never re-entered)."""
        self._handler = fn

    def stats(self):
        d = dict(self._n)
        d["dropped_oversize"] = self.client.dropped
        d["dropped_oversize_bytes"] = self.client.dropped_bytes
        d["nodelay"] = self.client.nodelay_ok
        d["connected"] = self.connected
        return d

    def backoff_ms(self, attempt):
        """Delay before retry number `attempt` (0-based): min * 2^attempt capped at max,
        minus a jitter of up to jitter_pct % that is a fixed function of (client id,
        attempt): reproducible runs, yet nodes that lost the broker together spread out."""
        d = self.backoff_min_ms << (attempt if attempt < 20 else 20)
        if d > self.backoff_max_ms:
            d = self.backoff_max_ms
        h = hashlib.sha256(self._id + struct.pack("!I", attempt)).digest()
        u = h[0] << 8 | h[1]
        return d - d * self.jitter_pct * u // (100 * 65536)

    def connect(self, timeout_ms=None):
        """Try until connected (True) or timeout_ms has passed (False), with back-off."""
        start = ticks_ms()
        while not self._try_connect():
            wait = ticks_diff(self._next_try, ticks_ms())
            if wait < 0:
                wait = 0
            if timeout_ms is not None:
                left = timeout_ms - ticks_diff(ticks_ms(), start)
                if left <= 0:
                    return False
                if wait > left:
                    wait = left
            sleep_ms(wait)
        return True

    def subscribe(self, topic, qos=1):
        """Add topic to the subscription list (kept across reconnects). Returns True
        if the broker acknowledged it now, False if it will be (re)tried on connect."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        topic = _b(topic)
        if not topic:
            raise ValueError("empty topic")
        for s in self._subs:
            if s[0] == topic:
                s[1] = qos
                break
        else:
            self._subs.append([topic, qos])
        if not self.connected:
            return False
        return self._sub_now(topic, qos)

    def publish(self, topic, msg, retain=False, qos=1, timeout_ms=None):
        """Publish; QoS 1 waits for the PUBACK at most timeout_ms (default
        publish_timeout_ms). Returns True on success; on failure returns False, drops
        the connection (a QoS 1 stream with a lost ack is not trustworthy) and
        schedules a reconnect."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        topic = _b(topic)
        if not topic:
            raise ValueError("empty topic")
        if 2 + len(topic) + len(msg) + 2 >= _UMQTT_MAX:
            raise ValueError("message too large for umqtt (>= 2 MiB)")
        if not self.connected and not self._try_connect():
            self._n["publish_failures"] += 1
            self.last_error = "publish: not connected"
            return False
        self._begin(self.publish_timeout_ms if timeout_ms is None else timeout_ms)
        try:
            self.client.publish(topic, msg, retain, qos)
        except Exception as e:
            self._n["publish_failures"] += 1
            if _is_timeout(e):
                self._n["publish_timeouts"] += 1
            self._end()
            self._fail("publish", e)
            return False
        self._end()
        self._last_tx = ticks_ms()
        self._n["published"] += 1
        return True

    def poll(self, timeout_ms=0):
        """Keep the link alive: reconnect when due, ping when due, and deliver incoming
        messages to the handler. Waits up to timeout_ms for the first packet. Returns
        the number of messages delivered."""
        before = self._n["received"]
        self._flush()
        if not self.connected and not self._try_connect():
            if timeout_ms > 0:
                wait = ticks_diff(self._next_try, ticks_ms())
                sleep_ms(min(max(wait, 0), timeout_ms))
            return self._n["received"] - before
        if self._keepalive():
            c = self.client
            wait = timeout_ms
            try:
                for _ in range(64):  # bounded work per call
                    if not c.readable(wait):
                        break
                    c.packet()
                    wait = 0
            except Exception as e:
                self._fail("receive", e)
        self._flush()
        return self._n["received"] - before

    def run_for(self, ms):
        """poll() for ms milliseconds (e.g. while waiting for a round to close)."""
        end = ticks_add(ticks_ms(), ms)
        while True:
            left = ticks_diff(end, ticks_ms())
            if left <= 0:
                return
            self.poll(left if left < 100 else 100)

    def close(self):
        if self.connected:
            try:
                self.client.disconnect()
            except Exception:
                pass
        self.client.close_sock()
        self.connected = False

    # --- internals --------------------------------------------------------------
    def _say(self, msg):
        if self.log is not None:
            self.log(msg)

    def _begin(self, timeout_ms):
        c = self.client
        c.deadline = ticks_add(ticks_ms(), timeout_ms)  # pyright: ignore[reportAttributeAccessIssue]  (stub types ticks as _TicksMs)
        c.set_timeout_ms(timeout_ms if timeout_ms < self.io_timeout_ms else self.io_timeout_ms)
        self._busy = True

    def _end(self):
        c = self.client
        c.deadline = None
        self._busy = False
        if c.sock is not None:
            try:
                c.set_timeout_ms(self.io_timeout_ms)
            except Exception:
                pass

    def _on_publish(self, topic, msg):
        if self._busy:
            if len(self._pending) >= self.max_pending:
                self._pending.pop(0)  # the newest state matters more than the oldest
                self._n["dropped_pending"] += 1
            self._pending.append((topic, msg))
        else:
            # Messages held while we were busy came first: deliver them before this one
            # (the mesh relies on per-topic order: a round's updates before the next global).
            self._flush()
            self._deliver(topic, msg)

    def _deliver(self, topic, msg):
        self._n["received"] += 1
        if self._handler is None:
            return
        try:
            self._handler(topic, msg)
        except Exception as e:
            # A handler bug must not take the link down with it.
            self._n["handler_errors"] += 1
            self.last_error = "handler: " + repr(e)
            self._say(self.last_error)

    def _flush(self):
        while self._pending and not self._busy:
            t, m = self._pending.pop(0)
            self._deliver(t, m)

    def _sub_now(self, topic, qos):
        self._begin(self.io_timeout_ms)
        try:
            self.client.subscribe(topic, qos)
        except Exception as e:
            self._end()
            self._fail("subscribe", e)
            return False
        self._end()
        self._last_tx = ticks_ms()
        return True

    def _try_connect(self):
        if self.connected:
            return True
        if ticks_diff(self._next_try, ticks_ms()) > 0:
            return False
        try:
            self.client.connect(self.clean_session)
        except Exception as e:
            self.client.close_sock()
            self._n["connect_failures"] += 1
            self.last_error = "connect: " + repr(e)
            self._retry_later()
            self._say(self.last_error)
            return False
        self.connected = True
        self._last_tx = ticks_ms()
        self._ping_at = None
        for s in self._subs:
            if not self._sub_now(s[0], s[1]):
                return False
        self._n["connects"] += 1
        if self._ever:
            self._n["reconnects"] += 1
        self._ever = True
        self._attempt = 0
        self._say("mqtt: connected")
        return True

    def _retry_later(self):
        d = self.backoff_ms(self._attempt)
        self._attempt += 1
        self._next_try = ticks_add(ticks_ms(), d)
        self.backoffs.append(d)
        if len(self.backoffs) > 16:
            self.backoffs.pop(0)

    def _fail(self, what, e):
        self.last_error = what + ": " + repr(e)
        self._say("mqtt: " + self.last_error)
        if self.connected:
            self._n["disconnects"] += 1
        self.connected = False
        self.client.close_sock()
        self._retry_later()

    def _keepalive(self):
        if not self.keepalive:
            return True
        c = self.client
        now = ticks_ms()
        if self._ping_at is not None:
            if c.pongs != self._ping_pongs:
                self._ping_at = None
            elif ticks_diff(now, self._ping_at) > self.io_timeout_ms:
                self._fail("keepalive", OSError(_ETIMEDOUT))
                return False
        if self._ping_at is None and ticks_diff(now, self._last_tx) >= self.keepalive * 500:
            try:
                c.ping()
            except Exception as e:
                self._fail("ping", e)
                return False
            self._ping_at = now
            self._ping_pongs = c.pongs
            self._last_tx = now
            self._n["pings"] += 1
        return True
