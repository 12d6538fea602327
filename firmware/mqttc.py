# mqttc: a small MQTT 3.1.1 client over any byte stream, every packet's bytes in view.
#
# The stream is anything with write(bytes), read(n) and readinto(buf, n): a TCP socket, a
# TLS-wrapped one, or a serial-line stream (serialstream.py). Waiting for data uses the
# stream's own readable(ms) when it has one, else select.poll on the stream. A read that
# stalls part-way through a packet is bounded by the stream's own timeout (socket timeout,
# or the serial stream's). This file knows packets only: deadlines for whole operations,
# keepalive scheduling, reconnects and queueing are the caller's (mqtt.py, the policy).
#
# Packets (MQTT 3.1.1, OASIS standard, section 3; "rl" = remaining length, a 1..4 byte
# varint of 7 bits per byte, low group first, high bit = more follows):
#
#   CONNECT     10 rl | 00 04 'MQTT' 04 | flags | keepalive (2) | client id [| will topic
#               | will message] [| user name [| password]]   (each string: 2-byte length)
#               flags: 0x02 clean session, 0x04 will, 0x08/0x10 will QoS, 0x20 will retain,
#               0x40 password, 0x80 user name
#   CONNACK     20 02 | session present (bit 0) | return code (0 = accepted)
#   PUBLISH     3f rl | topic (2-byte length + bytes) [| packet id (2) if QoS > 0] | payload
#               f (low nibble): 0x08 DUP, QoS << 1, 0x01 RETAIN
#   PUBACK      40 02 | packet id
#   SUBSCRIBE   82 rl | packet id | topic | requested QoS
#   SUBACK      90 03 | packet id | granted QoS (0x80 = refused)       (one topic per request)
#   PINGREQ     c0 00          PINGRESP   d0 00          DISCONNECT   e0 00
#
# Receiving is bounded: the remaining length is read from at most 4 bytes; a PUBLISH larger
# than max_msg is skipped in 256-byte chunks (never held in RAM), still acknowledged, and
# counted in dropped / dropped_bytes; one the heap has no block for right now is skipped the
# same way and counted in dropped_oom. Anything malformed raises MQTTError; a stream that
# ends or times out raises OSError. Either way the caller must drop the connection: a
# stream that fell out of step cannot be trusted again.
# MicroPython subset: no f-strings, no typing.

import struct
import time

try:
    from micropython import const
except ImportError:  # pragma: no cover - CPython tooling only

    def const(x):
        return x


CONNECT = const(0x10)
CONNACK = const(0x20)
PUBLISH = const(0x30)
PUBACK = const(0x40)
SUBSCRIBE = const(0x82)
SUBACK = const(0x90)
PINGREQ = const(0xC0)
PINGRESP = const(0xD0)
DISCONNECT = const(0xE0)

MAX_REMAINING = const(268435455)  # the largest 4-byte remaining length
_ETIMEDOUT = const(110)
_SKIP_CHUNK = const(256)

PING_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"

_REFUSED = ("", "unacceptable protocol version", "client id rejected", "server unavailable",
            "bad user name or password", "not authorized")


class MQTTError(Exception):
    """A protocol violation or a refusal by the broker."""


def _b(s):
    if isinstance(s, str):
        return s.encode()
    return bytes(s)


def remaining_length(n):
    """The remaining-length varint for n (0..268435455)."""
    if not 0 <= n <= MAX_REMAINING:
        raise MQTTError("remaining length %d out of range" % n)
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def string(s):
    """A UTF-8 string or binary field: 2-byte big-endian length, then the bytes."""
    s = _b(s)
    if len(s) > 65535:
        raise MQTTError("field longer than 65535 bytes")
    return struct.pack("!H", len(s)) + s


def connect_packet(client_id, keepalive=0, clean_session=True, user=None, password=None,
                   will=None):
    """CONNECT. will: None or (topic, message, qos, retain)."""
    if not 0 <= keepalive <= 65535:
        raise MQTTError("keepalive out of range")
    flags = 0x02 if clean_session else 0
    payload = string(client_id)
    if will is not None:
        wt, wm, wq, wr = will
        if wq not in (0, 1, 2):
            raise MQTTError("will QoS must be 0..2")
        flags |= 0x04 | wq << 3 | (0x20 if wr else 0)
        payload += string(wt) + string(wm)
    if user is not None:
        flags |= 0x80
        payload += string(user)
        if password is not None:
            flags |= 0x40
            payload += string(password)
    elif password is not None:
        raise MQTTError("a password needs a user name (MQTT 3.1.1 3.1.2.9)")
    body = b"\x00\x04MQTT\x04" + bytes((flags, keepalive >> 8, keepalive & 0xFF)) + payload
    return bytes((CONNECT,)) + remaining_length(len(body)) + body


def publish_header(topic, n, qos=0, retain=False, pid=0, dup=False):
    """Everything of a PUBLISH before its n-byte payload."""
    if qos not in (0, 1):
        raise MQTTError("QoS must be 0 or 1")
    topic = _b(topic)
    if not topic:
        raise MQTTError("empty topic")
    rest = string(topic)
    if qos:
        if not 0 < pid < 65536:
            raise MQTTError("packet id must be 1..65535")
        rest += struct.pack("!H", pid)
    op = PUBLISH | qos << 1 | (1 if retain else 0) | (0x08 if dup else 0)
    return bytes((op,)) + remaining_length(len(rest) + n) + rest


def puback_packet(pid):
    return b"\x40\x02" + struct.pack("!H", pid)


def subscribe_packet(pid, topic, qos=0):
    if qos not in (0, 1):
        raise MQTTError("QoS must be 0 or 1")
    if not 0 < pid < 65536:
        raise MQTTError("packet id must be 1..65535")
    topic = _b(topic)
    if not topic:
        raise MQTTError("empty topic")
    body = struct.pack("!H", pid) + string(topic) + bytes((qos,))
    return bytes((SUBSCRIBE,)) + remaining_length(len(body)) + body


class Client:
    """One MQTT session over one stream. on_message(topic, msg) is called from packet()
    for each PUBLISH kept (after its PUBACK went out). `rx`: None, or a bytearray that every
    message up to its size is read into: msg is then a memoryview into it, valid until
    on_message returns (a handler that keeps a message copies it), and a small heap never
    has to find a message-sized block mid-run."""

    def __init__(self, stream, max_msg=16384, on_message=None, rx=None):
        self.s = stream
        self.max_msg = max_msg
        self.on_message = on_message
        self.rx = rx
        self.pid = 0
        self.pongs = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self.dropped_oom = 0
        self.rx_writes = 0  # messages read into rx: what a user of rx's bytes checks
        self.last_rx = time.ticks_ms()
        self._skipbuf = bytearray(_SKIP_CHUNK)
        self._poll = None
        if not hasattr(stream, "readable"):
            import select

            p = select.poll()
            p.register(stream, select.POLLIN)
            self._poll = p

    # --- stream ---------------------------------------------------------------
    def readable(self, wait_ms):
        """True when a packet's first byte can be read now or within wait_ms (-1: forever).
        Waiting here, not in a read, keeps idle waits away from the stream's timeout: on
        the unix port a socket read that times out part-way loses the bytes it had."""
        if self._poll is None:
            return self.s.readable(wait_ms)
        return bool(self._poll.poll(wait_ms))

    def _read(self, n):
        if n == 0:
            return b""
        data = self.s.read(n)
        if not data or len(data) != n:
            raise OSError(-1)  # closed, or cut mid-packet
        return data

    def _read_rx(self, n):
        # n bytes into the receive buffer; a stream may hand them over in pieces.
        self.rx_writes += 1
        mv = memoryview(self.rx)
        got = 0
        while got < n:
            k = self.s.readinto(mv[got:n], n - got)
            if not k:
                raise OSError(-1)  # closed, or cut mid-packet
            got += k
        return mv[:n]

    def _skip(self, n):
        buf = self._skipbuf
        while n > 0:
            got = self.s.readinto(buf, n if n < _SKIP_CHUNK else _SKIP_CHUNK)
            if not got:
                raise OSError(-1)
            n -= got

    def _remaining(self):
        n = 0
        sh = 0
        for _ in range(4):
            b = self._read(1)[0]
            n |= (b & 0x7F) << sh
            if not b & 0x80:
                return n
            sh += 7
        raise MQTTError("malformed remaining length (more than 4 bytes)")

    def next_pid(self):
        self.pid = self.pid + 1 if self.pid < 65535 else 1
        return self.pid

    # --- sending --------------------------------------------------------------
    def send_connect(self, client_id, keepalive=0, clean_session=True, user=None,
                     password=None, will=None):
        # One write: the whole CONNECT goes out as a single segment.
        self.s.write(connect_packet(client_id, keepalive, clean_session, user, password, will))

    def send_publish(self, topic, msg, qos=0, retain=False):
        """Write a PUBLISH; returns its packet id (0 for QoS 0)."""
        pid = self.next_pid() if qos else 0
        head = publish_header(topic, len(msg), qos, retain, pid)
        one = None
        if len(msg) < 1024:
            try:
                one = head + msg  # one segment for small messages
            except MemoryError:
                # No block for the copy (a split heap: a 48 KB unix32 gossip node lost its
                # connection, and then peers' updates, to this): two writes instead.
                pass
        if one is not None:
            self.s.write(one)
        else:
            self.s.write(head)  # no copy of a large payload
            self.s.write(msg)
        return pid

    def send_subscribe(self, topic, qos=0):
        pid = self.next_pid()
        self.s.write(subscribe_packet(pid, topic, qos))
        return pid

    def ping(self):
        self.s.write(PING_PACKET)

    def disconnect(self):
        self.s.write(DISCONNECT_PACKET)

    # --- receiving ------------------------------------------------------------
    def packet(self):
        """Read one whole packet. PUBLISH and PINGRESP are handled here (None is returned);
        CONNACK, PUBACK and SUBACK are returned as (type, a, b): (CONNACK, session present,
        return code), (PUBACK, packet id, 0), (SUBACK, packet id, granted QoS)."""
        op = self._read(1)[0]
        self.last_rx = time.ticks_ms()
        kind = op & 0xF0
        if kind == PUBLISH:
            self._publish(op)
            return None
        if op & 0x0F:
            raise MQTTError("reserved flags set in packet type 0x%02x" % op)
        n = self._remaining()
        if kind == PINGRESP:
            if n:
                raise MQTTError("PINGRESP with a body")
            self.pongs += 1
            return None
        if kind == CONNACK or kind == PUBACK:
            if n != 2:
                raise MQTTError("packet 0x%02x: length %d, want 2" % (op, n))
            a, b = self._read(2)
            if kind == CONNACK:
                return (CONNACK, a & 1, b)
            return (PUBACK, a << 8 | b, 0)
        if kind == SUBACK:
            if n != 3:
                raise MQTTError("SUBACK length %d, want 3 (one topic per SUBSCRIBE)" % n)
            d = self._read(3)
            return (SUBACK, d[0] << 8 | d[1], d[2])
        raise MQTTError("unexpected packet type 0x%02x from the broker" % op)

    def _publish(self, op):
        n = self._remaining()
        qos = (op >> 1) & 3
        if qos > 1:
            raise MQTTError("QoS %d PUBLISH on a QoS <= 1 subscription" % qos)
        head = 4 if qos else 2
        if n < head:
            raise MQTTError("PUBLISH shorter than its header")
        tl = self._read(2)
        tl = tl[0] << 8 | tl[1]
        if tl + head > n:
            raise MQTTError("PUBLISH topic longer than the packet")
        size = n - tl - head
        if n > self.max_msg:
            self._skip(tl)
            pid = self._read(2) if qos else None
            self._skip(size)
            self.dropped += 1
            self.dropped_bytes += n
            if pid is not None:
                self.s.write(b"\x40\x02" + pid)
            return
        topic = self._read(tl)
        pid = self._read(2) if qos else None
        try:
            if self.rx is not None and size <= len(self.rx):
                msg = self._read_rx(size)
            else:
                msg = self._read(size)
        except MemoryError:
            # No free block of the message's size right now (a fragmented heap). The stream
            # allocates before it reads, so none of it was read: skip it like an oversize one,
            # acknowledged and counted, and keep the session. Dropping the connection instead
            # brings a retained message straight back into the same heap, again and again.
            self._skip(size)
            self.dropped_oom += 1
            msg = None
        if pid is not None:
            # Ack before the callback: the message is fully received, and a callback that
            # publishes must not interleave with a half-written PUBACK.
            self.s.write(b"\x40\x02" + pid)
        if msg is not None and self.on_message is not None:
            self.on_message(topic, msg)

    def wait(self, kind, pid, timeout_ms, limit_ms=None):
        """Handle packets until the acknowledgement (kind, pid) arrives; returns its
        (type, a, b). Raises OSError(ETIMEDOUT) when the broker is silent for timeout_ms, or
        when limit_ms (default 6 x timeout_ms) have passed in all.

        Silent, not slow: every packet that arrives restarts the deadline. The acknowledgement
        is queued behind the messages the broker sent before it, and a slow device (the
        emulated Cortex-M3 reads a round's 12 peer updates, 2.7 KB each, through its serial
        line and checks each in the handler) took longer than the deadline for them on a
        live link; it dropped the link and lost what the broker had in flight. The limit
        still ends a wait on a broker that keeps delivering but never acknowledges."""
        start = time.ticks_ms()
        end = time.ticks_add(start, timeout_ms)
        limit = time.ticks_add(start, limit_ms if limit_ms is not None else 6 * timeout_ms)
        while True:
            now = time.ticks_ms()
            left = time.ticks_diff(end, now)
            rest = time.ticks_diff(limit, now)
            if rest < left:
                left = rest
            if left < 0 or not self.readable(left):
                raise OSError(_ETIMEDOUT)
            r = self.packet()
            if r is not None and r[0] == kind and (kind == CONNACK or r[1] == pid):
                return r
            end = time.ticks_add(time.ticks_ms(), timeout_ms)

    # --- whole operations -------------------------------------------------------
    def connect(self, client_id, keepalive=0, clean_session=True, user=None, password=None,
                will=None, timeout_ms=5000):
        """CONNECT and wait for the CONNACK; returns the session-present flag."""
        self.send_connect(client_id, keepalive, clean_session, user, password, will)
        end = time.ticks_add(time.ticks_ms(), timeout_ms)
        if not self.readable(timeout_ms):
            raise OSError(_ETIMEDOUT)
        r = self.packet()
        if r is None or r[0] != CONNACK:
            raise MQTTError("the broker's first packet was not a CONNACK")
        if r[2]:
            why = _REFUSED[r[2]] if r[2] < len(_REFUSED) else "code %d" % r[2]
            raise MQTTError("connection refused: %s (%d)" % (why, r[2]))
        if time.ticks_diff(end, time.ticks_ms()) < 0:
            raise OSError(_ETIMEDOUT)
        return r[1]

    def publish(self, topic, msg, qos=0, retain=False, timeout_ms=5000):
        """QoS 0: write and return. QoS 1: wait at most timeout_ms for the PUBACK."""
        pid = self.send_publish(topic, msg, qos, retain)
        if qos:
            self.wait(PUBACK, pid, timeout_ms)

    def subscribe(self, topic, qos=0, timeout_ms=5000):
        """Subscribe and wait for the SUBACK; returns the granted QoS."""
        pid = self.send_subscribe(topic, qos)
        r = self.wait(SUBACK, pid, timeout_ms)
        if r[2] == 0x80:
            raise MQTTError("the broker refused the subscription to %r" % (topic,))
        return r[2]
