# Frames for one serial line shared by a node's log and its MQTT byte stream (docs/bridge.md).
#
#   frame   = "~" escaped(body) "\n"
#   body    = channel (1) | session (1) | sequence (1) | payload (0..MAX_PAYLOAD) | CRC-32 (4)
#   CRC-32  = binascii.crc32 (the zlib polynomial) of channel..payload, big-endian
#   escaped = every body byte < 0x20, 0x7D "}", 0x7E "~" and 0x7F becomes 0x7D, byte ^ 0x20
#
# A frame is one line of printable bytes: no control character (so no raw-REPL Ctrl-A..E,
# no Ctrl-C, no newline) ever appears inside one, and text that is not framed (a traceback,
# a print) passes between frames as ordinary lines. The Decoder is total: any byte sequence
# yields frames, text lines and BAD events (counted), never an exception, and it holds at
# most MAX_PAYLOAD + 7 body bytes and max_text text bytes.
# Shared by firmware/serialstream.py (device side) and microfed_tools.bridge (host side).
# MicroPython subset: no f-strings, no typing.

try:
    from binascii import crc32
except ImportError:  # pragma: no cover - ports built without binascii.crc32

    def crc32(data, crc=0):
        crc ^= 0xFFFFFFFF
        for b in data:
            crc ^= b
            for _ in range(8):
                crc = (crc >> 1) ^ (0xEDB88320 & -(crc & 1))
        return crc ^ 0xFFFFFFFF


FLAG = 0x7E
END = 0x0A
ESC = 0x7D
MAX_PAYLOAD = 1024

# Channels (one printable byte each).
LOG = 0x4C  # "L" device -> host: one log line (UTF-8), session 0
OPEN = 0x43  # "C" device -> host: open session `session` (a fresh TCP connection)
ACCEPT = 0x4F  # "O" host -> device: session `session` is connected to the broker
DATA = 0x44  # "D" both ways: MQTT bytes of session `session`, sequence 0, 1, ... 255, 0, ...
CLOSE = 0x58  # "X" both ways: session `session` is over; payload: the reason (UTF-8)

# Decoder events that are not frames (their "channel" is below any valid channel byte).
TEXT = 0  # a line that was not a frame: (TEXT, 0, 0, line without its line ending)
BAD = 1  # a frame that failed its checks and was dropped: (BAD, 0, 0, reason)


def _escaped(b):
    return b < 0x20 or 0x7D <= b <= 0x7F


def write(tx, channel, session, seq, payload=b"", scratch=None):
    """Write one frame to tx (anything with write(buffer)), escaped through `scratch`: a
    bytearray of at least 8 bytes (the header goes in whole), flushed to tx whenever it
    fills. A device passes one it allocated at boot, so sending a frame allocates nothing of
    the frame's size (the Cortex-M3 node sends ~11 frames per 2.7 KB update: blocks of
    their size, allocated and dropped, fragmented its 64 KB heap)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("frame payload longer than %d bytes" % MAX_PAYLOAD)
    if not 0x20 <= channel < 0x7F:
        raise ValueError("channel must be a printable byte")
    if scratch is None:
        scratch = bytearray(2 * len(payload) + 24)  # any frame fits: one write
    buf = scratch
    # The CRC first: the three header bytes, put where the frame is about to be built.
    session &= 0xFF
    seq &= 0xFF
    buf[0] = channel
    buf[1] = session
    buf[2] = seq
    crc = crc32(payload, crc32(memoryview(buf)[:3])) & 0xFFFFFFFF
    lim = len(buf) - 2  # an escaped byte goes at k and k + 1: flush first when k > lim
    buf[0] = FLAG
    k = _put(buf, 1, channel)  # printable: never escaped
    k = _put(buf, k, session)
    k = _put(buf, k, seq)
    for b in payload:
        if k > lim:
            tx.write(memoryview(buf)[:k])
            k = 0
        if b < 0x20 or 0x7D <= b <= 0x7F:
            buf[k] = ESC
            buf[k + 1] = b ^ 0x20
            k += 2
        else:
            buf[k] = b
            k += 1
    for sh in (24, 16, 8, 0):
        if k > lim:
            tx.write(memoryview(buf)[:k])
            k = 0
        k = _put(buf, k, (crc >> sh) & 0xFF)
    if k > lim:
        tx.write(memoryview(buf)[:k])
        k = 0
    buf[k] = END
    tx.write(memoryview(buf)[:k + 1])


def _put(buf, k, b):
    if _escaped(b):
        buf[k] = ESC
        buf[k + 1] = b ^ 0x20
        return k + 2
    buf[k] = b
    return k + 1


class _Collect:
    def __init__(self):
        self.out = bytearray()

    def write(self, data):
        self.out += data


def encode(channel, session, seq, payload=b""):
    """One frame as bytes (the host's side; a device writes with write() and a scratch)."""
    c = _Collect()
    write(c, channel, session, seq, payload)
    return bytes(c.out)


class Decoder:
    """Bytes in, events out: (channel, session, seq, payload) for a good frame, (TEXT, 0, 0,
    line) for an unframed line, (BAD, 0, 0, reason) for a dropped frame."""

    def __init__(self, max_text=512, view=False, max_payload=MAX_PAYLOAD):
        """view=True: a frame's payload is a memoryview into the decoder's own buffer, valid
        until the next byte is fed (a device copies it where it goes: no block per frame);
        else bytes of its own. A frame with more than max_payload bytes of payload is BAD
        (a device that knows its peer's frame size need not hold MAX_PAYLOAD)."""
        self.max_text = max_text
        self.view = view
        self.body = bytearray(max_payload + 7)  # one frame's body, allocated once
        self.n = 0  # bytes of it in use
        self.text = bytearray()
        self.mode = 0  # 0 text, 1 frame, 2 frame after ESC, 3 skipping a bad frame
        self.frames = 0
        self.bad = 0
        self.lines = 0

    def feed(self, data):
        """Every event that the bytes in data complete, in order."""
        out = []
        for b in data:
            ev = self.byte(b)
            if ev is not None:
                out.append(ev)
        return out

    def _bad(self, why):
        self.bad += 1
        self.n = 0
        return (BAD, 0, 0, why)

    def byte(self, b):
        """Feed one byte; returns the event it completes, or None."""
        mode = self.mode
        if b == FLAG:
            ev = None
            if mode == 1 or mode == 2:
                ev = self._bad(b"truncated frame")
            elif mode == 0 and self.text:
                ev = self._line()
            self.n = 0
            self.mode = 1
            return ev
        if mode == 0:
            if b == END:
                if self.text:
                    return self._line()
                return None
            self.text.append(b)
            if len(self.text) >= self.max_text:
                return self._line()
            return None
        if mode == 3:
            if b == END:
                self.mode = 0
            return None
        if b == END:
            self.mode = 0
            if mode == 2:
                return self._bad(b"frame ends in an escape")
            return self._frame()
        if b == 0x0D and mode == 1:
            return None  # a tty that turns "\n" into "\r\n": never a body byte (escaped)
        if mode == 2:
            b ^= 0x20
            if not _escaped(b):
                self.mode = 3
                return self._bad(b"bad escape")
            self.mode = 1
        elif b == ESC:
            self.mode = 2
            return None
        elif _escaped(b):
            self.mode = 3
            return self._bad(b"raw control byte in a frame")
        n = self.n
        if n >= len(self.body):
            self.mode = 3
            return self._bad(b"frame too long")
        self.body[n] = b
        self.n = n + 1
        return None

    def _line(self):
        t = self.text
        self.text = bytearray()
        if t and t[-1] == 0x0D:
            t = t[:-1]
        self.lines += 1
        return (TEXT, 0, 0, bytes(t))

    def _frame(self):
        body = self.body
        n = self.n
        self.n = 0
        if n < 7:
            return self._bad(b"frame too short")
        want = body[n - 4] << 24 | body[n - 3] << 16 | body[n - 2] << 8 | body[n - 1]
        mv = memoryview(body)
        if crc32(mv[:n - 4]) & 0xFFFFFFFF != want:
            return self._bad(b"CRC mismatch")
        if not 0x20 <= body[0] < 0x7F:
            return self._bad(b"bad channel")
        self.frames += 1
        payload = mv[3:n - 4]
        return (body[0], body[1], body[2], payload if self.view else bytes(payload))
