# The board's one serial line as a byte stream for mqttc, shared with the node's log.
#
#   link = serialstream.Link()                  # sys.stdin.buffer / sys.stdout.buffer
#   t = mqtt.Transport(node_id, "bridge", 1883, stream=link.open)
#   emit = lambda line: link.log(line)          # log lines travel as frames too
#
# Every byte on the line belongs to a frame of microfed.serialframe (docs/bridge.md): log
# lines on channel L, and one MQTT session at a time on channels C/O/D/X. `microfed bridge`
# on the host opens a TCP connection to the broker for each session the device opens and
# pumps the bytes both ways. A corrupted frame is dropped and counted; since a dropped DATA
# frame would leave a hole in the MQTT byte stream, the session is then closed (as a TCP
# reset would) and mqtt.Transport reconnects: MQTT QoS 1 makes that loss-free.
# MicroPython subset: no f-strings, no typing.

import sys
import time
import select

from microfed import serialframe as sf

_ETIMEDOUT = 110
_ECONNREFUSED = 111
_ECONNRESET = 104
_CHUNK = 256  # payload bytes per DATA frame: ~300 B of line, small enough for any RAM
# Buffers allocated once and reused by every frame and session: a frame on the way out is
# escaped through _TXBUF bytes at a time; one coming in is decoded in a body buffer for a
# DATA frame of _CHUNK bytes (the bridge sends no larger one), and its payload waits in _RXBUF
# until mqttc reads it (mqttc asks for at most a few hundred bytes beyond what a frame
# brings, except for a message it reads whole: the buffer then grows, once). The incoming
# side's are allocated by allocate(), which the node calls with its own boot-time buffers
# (mqtt.Transport.use_rx_buffer): with the Link, before them, a 64 KB Cortex-M3 node had
# 0.9 KB less after boot and lost more rounds; at the first open(), after the node's
# Ed25519 work had strewn the heap, there was at times no 512-byte block left and the node
# never connected (2026-11-27: docs/boards.md). open() still allocates them if no one did.
_TXBUF = 128
_RXBUF = 512


class Link:
    """The serial line: frames out through tx.write, bytes in from rx.read(1) (read only
    when select.poll says a byte is there, so it never blocks)."""

    def __init__(self, rx=None, tx=None):
        if rx is None:
            # Ctrl-C stays an interrupt: no frame contains one (serialframe escapes every
            # control byte), so the host can still stop the program with it.
            rx = sys.stdin.buffer
        if tx is None:
            tx = sys.stdout.buffer
        self.rx = rx
        self.tx = tx
        self._poll = select.poll()
        self._poll.register(rx, select.POLLIN)
        self.rxbuf = None  # and self.dec: made by the first open()
        self.dec = None
        self.txbuf = bytearray(_TXBUF)
        self.sess = 0
        self.stream = None
        self.eof = False
        self.n = {"frames_in": 0, "frames_out": 0, "bad_frames": 0, "gaps": 0, "stale": 0,
                  "text_in": 0, "sessions": 0}

    # --- frames out -------------------------------------------------------------
    def send(self, channel, session, seq, payload=b""):
        sf.write(self.tx, channel, session, seq, payload, self.txbuf)
        self.n["frames_out"] += 1

    def log(self, line):
        """One log line (str or bytes) as an L frame; longer lines are cut."""
        if isinstance(line, str):
            line = line.encode()
        self.send(sf.LOG, 0, 0, memoryview(line)[:sf.MAX_PAYLOAD])

    # --- frames in --------------------------------------------------------------
    def pump(self, wait_ms):
        """Read and handle the bytes that arrive within wait_ms (-1: until one frame);
        returns as soon as one frame was handled. True if a frame was."""
        if self.eof:
            return False
        end = time.ticks_add(time.ticks_ms(), wait_ms) if wait_ms >= 0 else None
        while True:
            if end is None:
                left = -1
            else:
                left = time.ticks_diff(end, time.ticks_ms())
                if left < 0:
                    left = 0
            if not self._poll.poll(left):
                return False
            c = self.rx.read(1)
            if not c:
                self.eof = True  # the line is gone (stdin closed): end the session
                self._end(self.stream, b"serial line closed")
                return False
            ev = self.dec.byte(c[0])
            if ev is not None:
                self._handle(ev)
                if ev[0] != sf.TEXT:
                    return True

    def _handle(self, ev):
        ch, sess, seq, payload = ev
        s = self.stream
        if ch == sf.TEXT:
            self.n["text_in"] += 1
            return
        if ch == sf.BAD:
            self.n["bad_frames"] += 1
            # Maybe it carried MQTT bytes: the stream has a hole, so it is over.
            self._end(s, b"corrupt frame: " + payload)
            return
        self.n["frames_in"] += 1
        if s is None or sess != s.sess or s.closed:
            self.n["stale"] += 1
            return
        if ch == sf.DATA and s.accepted:
            if seq != s.seq_in:
                self.n["gaps"] += 1
                self._end(s, b"frame missing (sequence gap)")
                return
            s.seq_in = (seq + 1) & 0xFF
            s.push(payload)  # a view into the decoder's buffer: copied now
        elif ch == sf.ACCEPT:
            s.accepted = True
        elif ch == sf.CLOSE:
            s.reason = payload
            s.closed = True
        else:
            self.n["stale"] += 1

    def _end(self, s, reason):
        if s is not None and not s.closed:
            s.reason = reason
            s.closed = True
            if not self.eof:
                try:
                    self.send(sf.CLOSE, s.sess, 0, reason[:120])
                except Exception:
                    pass

    # --- sessions -----------------------------------------------------------------
    def open(self, timeout_ms=5000):
        """A new session through the bridge: a byte stream to the broker (what
        mqtt.Transport's stream= factory returns). Raises OSError when the bridge says no or
        does not answer within timeout_ms."""
        old = self.stream
        if old is not None:
            old.close()
        if self.eof:
            raise OSError(_ECONNRESET, "serial line closed")
        self.allocate()
        self.sess = self.sess % 255 + 1
        s = Stream(self, self.sess, timeout_ms)
        self.stream = s
        self.n["sessions"] += 1
        self.send(sf.OPEN, s.sess, 0)
        end = time.ticks_add(time.ticks_ms(), timeout_ms)
        while not s.accepted and not s.closed:
            left = time.ticks_diff(end, time.ticks_ms())
            if left <= 0:
                self._end(s, b"no answer from the bridge")
                raise OSError(_ETIMEDOUT, "no answer from the bridge")
            self.pump(left)
        if s.closed:
            raise OSError(_ECONNREFUSED, bytes(s.reason))
        return s

    def allocate(self):
        """The incoming side's buffers, now (once)."""
        if self.rxbuf is None:
            self.rxbuf = bytearray(_RXBUF)
        if self.dec is None:
            self.dec = sf.Decoder(64, view=True, max_payload=_CHUNK)

    def stats(self):
        d = dict(self.n)
        d["bad_frames"] = 0 if self.dec is None else self.dec.bad
        return d


class Stream:
    """One session's bytes: write/read/readinto/readable/settimeout/close, as mqttc wants.
    read(n) waits (pumping the link) at most the stream timeout for all n bytes."""

    def __init__(self, link, sess, timeout_ms):
        self.link = link
        self.sess = sess
        self.timeout_ms = timeout_ms
        self.buf = link.rxbuf  # bytes in: buf[h:t]
        self.h = 0
        self.t = 0
        self.accepted = False
        self.closed = False
        self.reason = b""
        self.seq_in = 0
        self.seq_out = 0

    def settimeout(self, seconds):
        self.timeout_ms = int(seconds * 1000)

    def write(self, data):
        if self.closed:
            raise OSError(_ECONNRESET, bytes(self.reason))
        link = self.link
        mv = memoryview(data)
        for i in range(0, len(data), _CHUNK):
            link.send(sf.DATA, self.sess, self.seq_out, mv[i:i + _CHUNK])
            self.seq_out = (self.seq_out + 1) & 0xFF
        return len(data)

    def push(self, data):
        """Append one frame's payload (called by the Link)."""
        n = len(data)
        buf = self.buf
        if self.t + n > len(buf):
            k = self.t - self.h
            if k + n > len(buf):
                # A read longer than the buffer is waiting (a message mqttc reads whole):
                # a larger buffer, kept for the next sessions too.
                nb = bytearray(k + n + _RXBUF)
                nb[:k] = memoryview(buf)[self.h:self.t]
                self.buf = self.link.rxbuf = buf = nb
            else:
                buf[:k] = memoryview(buf)[self.h:self.t]  # memmove: may overlap
            self.h = 0
            self.t = k
        buf[self.t:self.t + n] = data
        self.t += n

    def readable(self, wait_ms):
        """True when bytes (or the end of the session) can be read now or within wait_ms."""
        if self.t > self.h or self.closed:
            return True
        if wait_ms < 0:
            while self.t == self.h and not self.closed and not self.link.eof:
                self.link.pump(-1)
            return True
        end = time.ticks_add(time.ticks_ms(), wait_ms)
        while True:
            left = time.ticks_diff(end, time.ticks_ms())
            if left < 0:
                return False
            self.link.pump(left)
            if self.t > self.h or self.closed:
                return True

    def _fill(self, n):
        end = time.ticks_add(time.ticks_ms(), self.timeout_ms)
        while self.t - self.h < n and not self.closed:
            left = time.ticks_diff(end, time.ticks_ms())
            if left < 0:
                raise OSError(_ETIMEDOUT)
            self.link.pump(left)

    def _take(self, k):
        h = self.h
        self.h = h + k
        if self.h == self.t:
            self.h = self.t = 0
        return memoryview(self.buf)[h:h + k]

    def read(self, n):
        """n bytes; fewer only when the session ended first."""
        self._fill(n)
        return bytes(self._take(min(n, self.t - self.h)))

    def readinto(self, buf, n=-1):
        if n < 0 or n > len(buf):
            n = len(buf)
        self._fill(1)
        k = min(n, self.t - self.h)
        buf[:k] = self._take(k)
        return k

    def close(self):
        self.h = self.t = 0  # unread bytes go with the session (the buffer is the Link's)
        link = self.link
        link._end(self, b"closed by the device")
        if link.stream is self:
            link.stream = None
