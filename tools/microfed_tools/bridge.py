"""The serial bridge: a board without a network joins a real mesh through the host.

    b = Bridge("/dev/ttyACM0", "127.0.0.1", 1883, on_log=print)   # or a rawrepl.Transport
    b.start()          # a thread: serial <-> broker
    ...
    b.stop(); b.stats()

The device (firmware/serialstream.py) speaks microfed.serialframe frames on its one serial
line: log lines (channel L) go to on_log, and for every session it opens (channel C) the
bridge opens one TCP connection to the broker, answers O (or X with the reason when the
broker refuses), then pumps the session's DATA frames both ways until either side closes
(X). A new C closes the previous session first: the device reconnects, the bridge follows.
docs/bridge.md is the specification.

Whatever arrives on the serial line, the bridge keeps running: the decoder is total (bad
frames are dropped and counted), unframed text is handed to on_log as it is, a DATA frame
out of sequence ends its session (its bytes would have a hole), and a serial line that
vanishes is reopened (when the bridge opened it by path) once a second until stop().
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from microfed import serialframe as sf
from microfed_tools import rawrepl

CHUNK = 256  # payload bytes per DATA or CLOSE frame towards the device: its decoder holds no more


class BridgeError(Exception):
    """The bridge cannot start: the serial port cannot be opened, or bad arguments."""


class Line(Protocol):
    """What the bridge needs of a serial line (rawrepl.Transport has it)."""

    def write(self, data: bytes) -> None: ...

    def read(self, timeout: float) -> bytes: ...

    def close(self) -> None: ...


class _Session:
    def __init__(self, sess: int, sock: socket.socket) -> None:
        self.sess = sess
        self.sock = sock
        self.seq_in = 0
        self.seq_out = 0
        self.closed = False


class Bridge:
    def __init__(self, serial: str | Line, broker_host: str, broker_port: int,
                 on_log: Callable[[str], None] | None = None, *, baud: int = 115200,
                 connect_timeout: float = 5.0, say: Callable[[str], None] | None = None) -> None:
        if not 0 < broker_port < 65536:
            raise BridgeError("broker port must be 1..65535, not %r" % broker_port)
        self.path = serial if isinstance(serial, str) else None
        self.line: Line | None = None if isinstance(serial, str) else serial
        self.broker = (broker_host, broker_port)
        self.on_log = on_log or (lambda line: print(line, flush=True))
        self.say = say or (lambda m: print("microfed bridge: " + m, file=sys.stderr, flush=True))
        self.baud = baud
        self.connect_timeout = connect_timeout
        self.dec = sf.Decoder()
        self._wlock = threading.Lock()
        self._slock = threading.Lock()
        self._session: _Session | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.n = {"sessions": 0, "connect_failures": 0, "frames_in": 0, "frames_out": 0,
                  "bad_frames": 0, "gaps": 0, "stale": 0, "log_lines": 0, "text_lines": 0,
                  "bytes_to_broker": 0, "bytes_to_device": 0, "serial_errors": 0,
                  "handler_errors": 0}

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open the serial line now (start() does it too): BridgeError if it cannot."""
        if self.line is None:
            assert self.path is not None
            try:
                self.line = rawrepl.SerialTransport(self.path, self.baud)
            except rawrepl.ReplError as e:
                raise BridgeError(str(e)) from e

    def start(self) -> Bridge:
        self.open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="microfed-bridge", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._drop(self._session, None)
        if self.path is not None and self.line is not None:
            self.line.close()
            self.line = None

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.n)
        d["bad_frames"] = self.dec.bad
        d["connected"] = self._session is not None
        return d

    # ---------------------------------------------------------------- serial side

    def _run(self) -> None:
        while not self._stop.is_set():
            line = self.line
            if line is None:
                if not self._reopen():
                    continue
                line = self.line
                assert line is not None
            try:
                data = line.read(0.05)
            except rawrepl.ReplError as e:
                self._serial_lost(e)
                continue
            if data:
                self.feed(data)

    def _serial_lost(self, e: Exception) -> None:
        self.n["serial_errors"] += 1
        self.last_error = "serial: %s" % e
        self.say(self.last_error)
        self._drop(self._session, None)
        if self.path is None:
            self._stop.wait(0.5)  # a line we were given: it may come back, we cannot reopen
            return
        if self.line is not None:
            self.line.close()
        self.line = None

    def _reopen(self) -> bool:
        try:
            self.open()
        except BridgeError:
            self._stop.wait(1.0)
            return False
        self.say("serial line %s open again" % self.path)
        return True

    def feed(self, data: bytes) -> None:
        """Handle bytes from the device (the thread calls this; tests may too)."""
        for ev in self.dec.feed(data):
            try:
                self._handle(ev)
            except Exception as e:  # a bug here must not stop the bridge
                self.n["handler_errors"] += 1
                self.last_error = "handler: %r" % e
                self.say(self.last_error)

    def _log(self, text: bytes) -> None:
        try:
            self.on_log(text.decode("utf-8", "replace"))
        except Exception as e:
            self.n["handler_errors"] += 1
            self.last_error = "on_log: %r" % e

    def _handle(self, ev: tuple[int, int, int, bytes]) -> None:
        ch, sess, seq, payload = ev
        if ch == sf.TEXT:
            self.n["text_lines"] += 1
            self._log(payload)
            return
        if ch == sf.BAD:
            return  # counted by the decoder; a hole in a session shows as a sequence gap
        self.n["frames_in"] += 1
        if ch == sf.LOG:
            self.n["log_lines"] += 1
            self._log(payload)
        elif ch == sf.OPEN:
            self._open_session(sess)
        elif ch == sf.DATA:
            s = self._session
            if s is None or s.sess != sess:
                self.n["stale"] += 1
                self._send(sf.CLOSE, sess, 0, b"no such session")
                return
            if seq != s.seq_in:
                self.n["gaps"] += 1
                self._drop(s, b"frame missing (sequence gap)")
                return
            s.seq_in = (seq + 1) & 0xFF
            try:
                s.sock.sendall(payload)
                self.n["bytes_to_broker"] += len(payload)
            except OSError as e:
                self._drop(s, ("broker: %s" % e).encode())
        elif ch == sf.CLOSE:
            s = self._session
            if s is not None and s.sess == sess:
                self._drop(s, None)
            else:
                self.n["stale"] += 1
        else:
            self.n["stale"] += 1

    def _send(self, ch: int, sess: int, seq: int, payload: bytes = b"") -> None:
        frame = sf.encode(ch, sess, seq, payload)
        with self._wlock:
            line = self.line
            if line is None:
                return
            try:
                line.write(frame)
            except rawrepl.ReplError as e:
                self.n["serial_errors"] += 1
                self.last_error = "serial: %s" % e
                return
            self.n["frames_out"] += 1

    # ---------------------------------------------------------------- broker side

    def _open_session(self, sess: int) -> None:
        self._drop(self._session, None)
        try:
            sock = socket.create_connection(self.broker, timeout=self.connect_timeout)
        except OSError as e:
            self.n["connect_failures"] += 1
            why = "broker %s:%d refused or unreachable: %s" % (*self.broker, e.strerror or e)
            self.last_error = why
            self.say(why)
            self._send(sf.CLOSE, sess, 0, why.encode()[:CHUNK])
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        s = _Session(sess, sock)
        with self._slock:
            self._session = s
        self.n["sessions"] += 1
        self._send(sf.ACCEPT, sess, 0)
        threading.Thread(target=self._from_broker, args=(s,), name="microfed-bridge-tcp",
                         daemon=True).start()

    def _from_broker(self, s: _Session) -> None:
        while not s.closed:
            try:
                data = s.sock.recv(4096)
            except OSError as e:
                data = b""
                reason = ("broker connection: %s" % e).encode()
            else:
                reason = b"broker closed the connection"
            if not data:
                self._drop(s, reason)
                return
            self.n["bytes_to_device"] += len(data)
            for i in range(0, len(data), CHUNK):
                if s.closed:
                    return
                self._send(sf.DATA, s.sess, s.seq_out, data[i:i + CHUNK])
                s.seq_out = (s.seq_out + 1) & 0xFF

    def _drop(self, s: _Session | None, reason: bytes | None) -> None:
        """End session s; tell the device why unless it ended the session itself (None)."""
        if s is None:
            return
        with self._slock:
            if s.closed:
                return
            s.closed = True
            if self._session is s:
                self._session = None
        try:
            s.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.sock.close()
        if reason is not None:
            self._send(sf.CLOSE, s.sess, 0, reason[:CHUNK])


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BridgeError("--broker must be HOST:PORT, not %r" % text)
    return host, int(port)


class FdLine:
    """A serial line that is a file descriptor, e.g. the master side of os.openpty() whose
    slave is a unix-port node's stdin/stdout. The bridge does not close it: its owner does."""

    name = "fd"

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.name = "fd %d" % fd

    def write(self, data: bytes) -> None:
        import os

        view = memoryview(data)
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            raise rawrepl.TransportError("write to %s failed: %s" % (self.name, e)) from e

    def read(self, timeout: float) -> bytes:
        import os
        import select

        try:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
            if not ready:
                return b""
            data = os.read(self.fd, 4096)
        except OSError as e:
            raise rawrepl.TransportError("read from %s failed: %s" % (self.name, e)) from e
        if not data:
            raise rawrepl.TransportError("%s: end of file" % self.name)
        return data

    def close(self) -> None:
        pass
