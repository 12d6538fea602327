# microfed node transport: the policy around mqttc (the MQTT client).
#
# mqttc.py encodes and decodes packets over one byte stream; this module decides when and
# how long: a deadline on every blocking operation (connect, subscribe, QoS 1 publish);
# keepalive pings on a schedule and a dead-link check on the PINGRESP; reconnect with
# bounded exponential back-off and deterministic per-node jitter; the subscription list
# re-established on every reconnect; messages that arrive while an acknowledgement is
# awaited queued (bounded) and delivered afterwards, in order; counters for all of it.
# The byte stream comes from a factory: TCP (TCP_NODELAY on, because a QoS 1 round trip
# otherwise costs ~44 ms of Nagle delay instead of ~0.3 ms), TLS on top of it, or whatever
# the caller passes as stream= (serialstream.Link.open: the board's serial line, bridged to
# the broker by `microfed bridge`).
# MicroPython only (time.ticks_*); no f-strings, no typing.

import time
import struct
import hashlib

import mqttc

_ETIMEDOUT = 110
_IPPROTO_TCP = 6
_TCP_NODELAY = 1

ticks_ms = time.ticks_ms
ticks_diff = time.ticks_diff
ticks_add = time.ticks_add
sleep_ms = time.sleep_ms


def _b(s):
    if isinstance(s, str):
        return s.encode()
    return bytes(s)


def _is_timeout(e):
    return isinstance(e, OSError) and len(e.args) > 0 and e.args[0] == _ETIMEDOUT


def tcp_stream(server, port, timeout_ms, ssl=None, nodelay=True):
    """A connected TCP stream (TLS on top when ssl is an SSLContext); returns
    (stream, nodelay_ok). Reads and writes time out after timeout_ms."""
    import socket

    addr = socket.getaddrinfo(server, port)[0][-1]
    s = socket.socket()
    try:
        # An SSLSocket has no settimeout: the TCP socket's timeout bounds its reads too.
        s.settimeout(timeout_ms / 1000)
        s.connect(addr)
        ok = False
        if nodelay:
            try:
                s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                ok = True
            except Exception:
                pass  # a port without the option: correct, only slower
        if ssl is not None:
            s = ssl.wrap_socket(s, server_hostname=server)
        return s, ok
    except Exception:
        s.close()
        raise


def _close(s):
    if s is not None:
        try:
            s.close()
        except Exception:
            pass


class Transport:
    """A node's MQTT link. Never blocks longer than its timeouts; reports failures
    by return value and counters (stats()), reconnects by itself.

    stream: None for TCP to server:port (TLS when ssl is an SSLContext), or a callable
    stream(timeout_ms) returning a fresh connected byte stream for each connection
    (e.g. serialstream.Link(...).open); server and port are then only labels. allocate:
    None, or a callable that makes the stream's own buffers (serialstream.Link.allocate),
    called by use_rx_buffer."""

    def __init__(self, client_id, server, port=1883, user=None, password=None,
                 keepalive=30, nodelay=True, max_msg=16384, io_timeout_ms=5000,
                 publish_timeout_ms=5000, backoff_min_ms=250, backoff_max_ms=8000,
                 jitter_pct=25, max_pending=8, clean_session=True, ssl=None, log=None,
                 stream=None, allocate=None):
        if not client_id or len(_b(client_id)) > 65535:
            raise ValueError("client_id must be 1..65535 bytes")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("port must be 1..65535")
        if not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
            raise ValueError("keepalive must be 0..65535 s")
        if not isinstance(max_msg, int) or not 16 <= max_msg <= mqttc.MAX_REMAINING:
            raise ValueError("max_msg must be 16..268435455 bytes")
        if io_timeout_ms <= 0 or publish_timeout_ms <= 0:
            raise ValueError("timeouts must be > 0 ms")
        if not 0 < backoff_min_ms <= backoff_max_ms:
            raise ValueError("need 0 < backoff_min_ms <= backoff_max_ms")
        if not 0 <= jitter_pct < 100:
            raise ValueError("jitter_pct must be 0..99")
        self.client_id = client_id
        self.server = server
        self.port = port
        self.user = user
        self.password = password
        self.ssl = ssl
        self.nodelay = nodelay
        self.max_msg = max_msg
        self.stream_factory = stream
        self.allocate = allocate
        self.client = None  # the mqttc.Client of the live connection
        self._stream = None
        self._nodelay_ok = False
        self._dropped = 0  # oversize drops of earlier connections
        self._dropped_bytes = 0
        self._dropped_oom = 0  # messages skipped for want of heap, earlier connections
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
        self._rx = None  # use_rx_buffer's
        self._rx_writes = 0  # messages read into it by earlier connections (rx_writes())
        # A handler that never publishes (the node's: it queues its output for step()) can
        # take messages while an ack is awaited, so none waits in RAM: set this to True.
        self.deliver_while_busy = False
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
        """fn(topic: bytes, msg: bytes), called from poll() (never re-entered). After
        use_rx_buffer, msg may be a memoryview valid until fn returns."""
        self._handler = fn

    def use_rx_buffer(self, size):
        """Read every message of up to `size` bytes into one buffer allocated now and kept
        for good (mqttc.Client's rx), from the next connection on; and the stream's own
        buffers (allocate), now too: a node calls this at boot, when large blocks are there.
        Returns the buffer: between messages its owner may build in it what it sends, if it
        checks rx_writes() before it uses those bytes again."""
        if self._rx is None or len(self._rx) != size:
            self._rx = bytearray(size)
        if self.allocate is not None:
            self.allocate()
        return self._rx

    def rx_writes(self):
        """How many messages have been read into the receive buffer so far (it changes
        whenever the buffer's bytes may have)."""
        c = self.client
        return self._rx_writes + (c.rx_writes if c is not None else 0)

    def stats(self):
        d = dict(self._n)
        c = self.client
        d["dropped_oversize"] = self._dropped + (c.dropped if c is not None else 0)
        d["dropped_oversize_bytes"] = self._dropped_bytes + (c.dropped_bytes if c is not None
                                                             else 0)
        d["dropped_oom"] = self._dropped_oom + (c.dropped_oom if c is not None else 0)
        d["nodelay"] = self._nodelay_ok
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
        if 2 + len(topic) + len(msg) + 2 > mqttc.MAX_REMAINING:
            raise ValueError("message too large for MQTT (> 256 MiB)")
        if not self.connected and not self._try_connect():
            self._n["publish_failures"] += 1
            self.last_error = "publish: not connected"
            return False
        self._busy = True
        try:
            self.client.publish(topic, msg, qos, retain,
                                self.publish_timeout_ms if timeout_ms is None else timeout_ms)
        except Exception as e:
            self._busy = False
            self._n["publish_failures"] += 1
            if _is_timeout(e):
                self._n["publish_timeouts"] += 1
            self._fail("publish", e)
            return False
        self._busy = False
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
        self._drop()
        self.connected = False

    # --- internals --------------------------------------------------------------
    def _say(self, msg):
        if self.log is not None:
            self.log(msg)

    def _open(self):
        """A fresh stream and an mqttc.Client on it, CONNECT acknowledged."""
        self._drop()
        t = self.io_timeout_ms
        if self.stream_factory is None:
            s, self._nodelay_ok = tcp_stream(self.server, self.port, t, self.ssl, self.nodelay)
        else:
            s = self.stream_factory(t)
            self._nodelay_ok = False
        self._stream = s
        c = mqttc.Client(s, self.max_msg, self._on_publish, self._rx)
        self.client = c
        c.connect(self.client_id, self.keepalive, self.clean_session, self.user,
                  self.password, None, t)

    def _drop(self):
        c = self.client
        if c is not None:
            self._dropped += c.dropped
            self._dropped_bytes += c.dropped_bytes
            self._dropped_oom += c.dropped_oom
            self._rx_writes += c.rx_writes
        self.client = None
        s = self._stream
        self._stream = None
        _close(s)

    def _on_publish(self, topic, msg):
        if self._busy and not self.deliver_while_busy:
            if len(self._pending) >= self.max_pending:
                self._pending.pop(0)  # the newest state matters more than the oldest
                self._n["dropped_pending"] += 1
            # A copy: a message read into the receive buffer is gone with the next one.
            self._pending.append((topic, bytes(msg)))
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
        self._busy = True
        try:
            self.client.subscribe(topic, qos, self.io_timeout_ms)
        except Exception as e:
            self._busy = False
            self._fail("subscribe", e)
            return False
        self._busy = False
        self._last_tx = ticks_ms()
        return True

    def _try_connect(self):
        if self.connected:
            return True
        if ticks_diff(self._next_try, ticks_ms()) > 0:
            return False
        try:
            self._open()
        except Exception as e:
            self._drop()
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
        self._drop()
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
