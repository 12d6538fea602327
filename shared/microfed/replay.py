# Replay protection, as docs/security.md specifies it. Portable (CPython + MicroPython).
#
# Three independent rules; a frame must pass all of them:
#   1. counter: per (sender, kind) the sequence counter must be strictly greater than the last
#      one accepted. The sender keeps ONE counter for all kinds; the receiver tracks each kind
#      separately, so a subsequence of an increasing sequence stays increasing even when topics
#      are delivered out of order relative to each other.
#   2. round binding: the frame's round must lie in [min_round, max_round] (the caller says
#      which rounds it is collecting right now).
#   3. timestamp window: if BOTH the frame and the receiver have a clock (timestamp != 0),
#      -max_future <= now - ts <= max_age, computed on unbounded (signed) ints. A node without
#      a set clock sends 0 and the window is skipped; rules 1 and 2 still hold it to account.
#
# Pure logic (ReplayGuard) is separate from storage: a store only needs `last(sender, kind)`
# and an atomic compare-and-advance `advance(sender, kind, seq) -> bool`. MemoryStore and
# FileStore (device flash, atomic write-then-rename) live here; the host keeps counters in
# SQLite (microfed_host.store).

import gc
import os

try:
    import hashlib
except ImportError:
    hashlib = None

DEFAULT_MAX_AGE = 300      # seconds a frame may be older than the receiver's clock
DEFAULT_MAX_FUTURE = 60    # seconds a frame may be ahead of it

# Unix time of 2000-01-01: MicroPython's embedded ports count from there.
_EPOCH_2000 = 946684800
# A clock reading before this (2024-01-01) means "never set" (an RTC that booted at 2000).
_CLOCK_SET_AFTER = 1704067200


class StoreError(Exception):
    """The counter file is missing its checksum or unreadable: fail closed, never guess.
    The only error reading a counter file raises, whatever its bytes."""


_SEQ_LIMIT = 1 << 63  # = microfed.wire.SEQ_LIMIT (not imported: wire does not need replay)


def wall_clock():
    """Unix seconds if this machine's clock has been set, else 0 ("no clock")."""
    import time
    try:
        t = int(time.time())
        if time.gmtime(0)[0] == 2000:
            t += _EPOCH_2000
    except Exception:
        return 0
    return t if t >= _CLOCK_SET_AFTER else 0


class MemoryStore:
    def __init__(self):
        self.counters = {}

    def last(self, sender, kind):
        return self.counters.get((sender, kind), 0)

    def advance(self, sender, kind, seq):
        if seq <= self.counters.get((sender, kind), 0):
            return False
        self.counters[(sender, kind)] = seq
        return True


def _hexdigest(b):
    return "".join(["%02x" % x for x in hashlib.sha256(b).digest()])


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return -1


def atomic_write(path, data):
    """Write `data` to `path` so a power cut leaves either the old or the new content:
    write path.new, then rename it over path (POSIX rename, littlefs and MicroPython's FAT
    driver all replace the target)."""
    tmp = path + ".new"
    _write_closing(open(tmp, "wb"), data)
    _replace(tmp, path)


def _write_closing(f, data):
    try:
        f.write(data)
        try:
            f.flush()
            os.fsync(f.fileno())
        except Exception:
            pass  # MicroPython has neither fsync nor fileno; close() flushes the block device
    finally:
        f.close()


def _replace(tmp, path):
    try:
        os.rename(tmp, path)
    except OSError:
        # Some FAT builds refuse to rename onto an existing file: remove it first. A cut
        # between the two calls leaves only path.new, which _load_checked() then reads.
        os.remove(path)
        os.rename(tmp, path)


class AtomicFile:
    """atomic_write for one path written again and again (a node's state, every round), with
    path.new opened in advance: at construction, and after every write, once a collection
    has freed the last one's file object, whose block the new one can take. Opening a file
    needs a block of the heap (on littlefs the object and its cache, ~380 bytes with the
    emulated Cortex-M3's 256-byte cache), which a board's fragmented heap mid-run may not
    have: the emulated Cortex-M3 with 64 KB lost rounds to it with 14 KB free
    (docs/boards.md). The prepared path.new is empty until written: a loader treats an empty
    path.new as absent."""

    def __init__(self, path):
        self.path = path
        self.tmp = path + ".new"
        self.f = None
        if not _exists(path) and _size(self.tmp) > 0:
            # A replace cut between its remove and its rename (the FAT case above): the
            # loaders read path.new then; finish the replace before path.new is reopened.
            # (An empty one is a prepared file nothing was written to.)
            os.rename(self.tmp, path)
        self._prepare()

    def _prepare(self):
        try:
            self.f = open(self.tmp, "wb")
        except (OSError, MemoryError):
            self.f = None  # write() opens it then

    def write(self, data):
        f = self.f
        self.f = None
        if f is None:
            f = open(self.tmp, "wb")
        _write_closing(f, data)
        f = None
        _replace(self.tmp, self.path)
        gc.collect()
        self._prepare()


def _load_checked(path, magic):
    """Return the body lines of a checksummed file, None if absent, raise StoreError if bad."""
    f = open(path, "rb")
    try:
        raw = f.read()
    finally:
        f.close()
    cut = raw.rfind(b"\n#sha256 ")
    if cut < 0 or not raw.startswith(magic + b"\n"):
        raise StoreError("%s: not a counter file" % path)
    body = raw[:cut + 1]
    want = raw[cut + 9:].strip()
    if hashlib is not None and _hexdigest(body).encode() != want:
        raise StoreError("%s: checksum mismatch (torn or edited file)" % path)
    try:
        return body.decode().split("\n")[1:-1]
    except ValueError:  # UnicodeError is a ValueError on CPython and MicroPython
        raise StoreError("%s: not UTF-8" % path)


def _count(path, text):
    """A decimal counter in 0 .. 2**63 - 1, else StoreError (never ValueError)."""
    try:
        v = int(text)
    except ValueError:
        raise StoreError("%s: %r is not an integer" % (path, text))
    if v < 0 or v >= _SEQ_LIMIT:
        raise StoreError("%s: %d outside 0 .. 2**63-1" % (path, v))
    return v


def _read_any(path, magic):
    # Prefer the committed file; fall back to path.new only when the rename never happened
    # (an empty path.new is AtomicFile's, prepared and never written: absent).
    if _exists(path):
        return _load_checked(path, magic)
    if _size(path + ".new") > 0:
        return _load_checked(path + ".new", magic)
    return None


def _dump_checked(magic, lines):
    body = (magic + b"\n" + "".join([ln + "\n" for ln in lines]).encode())
    if hashlib is None:
        return body + b"#sha256 -\n"
    return body + b"#sha256 " + _hexdigest(body).encode() + b"\n"


class FileStore:
    """Receiver counters on device flash: one line `sender kind seq` per entry, a SHA-256
    trailer, rewritten atomically on every advance (so only accepted frames cost a write)."""

    MAGIC = b"microfed-counters 1"

    def __init__(self, path):
        self.path = path
        self.counters = {}
        lines = _read_any(path, self.MAGIC)
        for ln in lines or ():
            parts = ln.split(" ")
            if len(parts) != 3 or not parts[0]:
                raise StoreError("%s: bad line %r" % (path, ln))
            key = (parts[0], _count(path, parts[1]))
            if key[1] > 255 or key in self.counters:
                raise StoreError("%s: bad or repeated kind in line %r" % (path, ln))
            self.counters[key] = _count(path, parts[2])

    def last(self, sender, kind):
        return self.counters.get((sender, kind), 0)

    def advance(self, sender, kind, seq):
        if seq <= self.counters.get((sender, kind), 0):
            return False
        new = dict(self.counters)
        new[(sender, kind)] = seq
        keys = sorted(new.keys())
        atomic_write(self.path, _dump_checked(
            self.MAGIC, ["%s %d %d" % (k[0], k[1], new[k]) for k in keys]))
        # Only after the file is on flash does memory move, so a failed write changes nothing.
        self.counters = new
        return True


class SequenceSource:
    """The sender side: hands out strictly increasing counters that never repeat across
    reboots. Counters are leased from flash in blocks (`block`), so a node writes flash once
    per block instead of once per frame; a reboot skips the unused rest of the block."""

    MAGIC = b"microfed-seq 1"

    def __init__(self, path, block=64):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.path = path
        self.block = block
        lines = _read_any(path, self.MAGIC)
        if lines is not None and len(lines) > 1:
            raise StoreError("%s: %d lines, expected one lease" % (path, len(lines)))
        self.leased = _count(path, lines[0]) if lines else 0
        self.last = self.leased  # everything up to the lease may have been used before a reboot
        # Each lease's file opened in advance, at boot and after each lease (AtomicFile): the
        # first lease, at a node's first frame, once found no 380-byte block for its file on a
        # 64 KB Cortex-M3 and the node never sent anything (docs/boards.md).
        self.file = AtomicFile(path)

    def skip_past(self, seq):
        """Continue above `seq` (the receivers' last accepted counter, from a coordinator
        notice): the next counter handed out is max(last, seq) + 1. Never goes back."""
        if type(seq) is not int or seq < 0:
            raise ValueError("counter must be a non-negative int")
        if seq > self.last:
            self.last = seq

    def next(self):
        n = self.last + 1
        if n > self.leased:
            lease = n + self.block - 1
            self.file.write(_dump_checked(self.MAGIC, ["%d" % lease]))
            self.leased = lease
        self.last = n
        return n


class ReplayGuard:
    def __init__(self, store, max_age=DEFAULT_MAX_AGE, max_future=DEFAULT_MAX_FUTURE):
        self.store = store
        self.max_age = max_age
        self.max_future = max_future

    def check(self, sender, kind, seq, round_, timestamp, now=0, min_round=None,
              max_round=None):
        """Return None if acceptable, else (reason_code, message). Changes nothing."""
        last = self.store.last(sender, kind)
        if seq <= last:
            return ("replay", "counter %d <= last accepted %d from %s" % (seq, last, sender))
        if min_round is not None and round_ < min_round:
            return ("stale_round", "round %d < %d" % (round_, min_round))
        if max_round is not None and round_ > max_round:
            return ("future_round", "round %d > %d" % (round_, max_round))
        if timestamp != 0 and now != 0:
            # Python ints do not overflow, so this is the exact signed difference even for
            # timestamps near the i64 limits (C ports must widen before subtracting).
            age = now - timestamp
            if age > self.max_age:
                return ("clock_skew", "frame is %d s old (max %d)" % (age, self.max_age))
            if -age > self.max_future:
                return ("clock_skew", "frame is %d s in the future (max %d)"
                        % (-age, self.max_future))
        return None

    def commit(self, sender, kind, seq):
        """Atomically advance the counter; False if another frame got there first."""
        return self.store.advance(sender, kind, seq)
