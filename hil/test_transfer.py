"""A corrupted upload is detected and never executed (or written).

A transport wrapper corrupts the byte stream in transit, the way the emulated UART does when
written too fast: one byte flipped or dropped at a chosen place. The device's own length +
checksum check must refuse it with TransferError, and the code must not have run.
"""

from __future__ import annotations

import pytest

from microfed_tools import rawrepl


class Mangler(rawrepl.Transport):
    """Corrupts the byte at `offset` after the end of `needle` in the written stream, at most
    `limit` times: mode "flip" xors it with 0x01 (a digit stays a digit), "drop" removes it."""

    def __init__(self, inner: rawrepl.Transport, needle: bytes, mode: str,
                 offset: int = -1, limit: int = 1) -> None:
        self.inner = inner
        self.name = inner.name
        self.needle = needle
        self.mode = mode
        self.offset = offset
        self.limit = limit
        self.hits = 0
        self._tail = b""
        self._due = -1  # stream bytes still to pass before the target byte

    def write(self, data: bytes) -> None:
        buf = bytearray(data)
        if self.hits < self.limit:
            if self._due < 0:
                window = self._tail + bytes(buf)
                i = window.find(self.needle)
                if i >= 0:
                    # index of the target byte within `buf`
                    self._due = i + len(self.needle) + self.offset - len(self._tail)
            if 0 <= self._due < len(buf):
                j = self._due
                if self.mode == "flip":
                    buf[j] ^= 0x01
                else:
                    del buf[j]
                self.hits += 1
                self._due = -1
            elif self._due >= len(buf):
                self._due -= len(buf)
        self._tail = (self._tail + data)[-len(self.needle):]
        self.inner.write(bytes(buf))

    def read(self, timeout: float) -> bytes:
        return self.inner.read(timeout)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def repl(device):
    r = device.repl
    # Helpers installed (and retried) before a test sets retries=0: a transient upset of the
    # install under host load must not pass for the corruption the test injects.
    r.exec_verified("pass")
    saved = (r.transport, r.retries, r.slowdown)
    yield r
    r.transport, r.retries, r.slowdown = saved


def ran(repl, name):
    out = repl.exec("try:\n print(%s)\nexcept NameError:\n print('NOT RUN')" % name)
    return out.strip()


def mangle(repl, needle, mode, offset=-1, limit=1):
    m = Mangler(repl.transport, needle, mode, offset, limit)
    repl.transport = m
    return m


@pytest.mark.parametrize("mode", ["flip", "drop"])
def test_corrupted_code_block_is_refused_and_not_run(repl, mode):
    repl.exec("_mfcanary=None\ndel _mfcanary")
    repl.retries = 0
    m = mangle(repl, b"CANARY", mode)
    with pytest.raises(rawrepl.TransferError) as err:
        repl.exec_verified("_mfcanary='RAN' # CANARY\n", what="canary")
    assert "canary" in str(err.value), err.value
    assert m.hits == 1, "the corruption was never injected"
    assert ran(repl, "_mfcanary") == "NOT RUN"


def test_corrupted_whole_upload_check_is_refused_and_not_run(repl):
    """The blocks arrive intact but the final (length, checksum) call is hit in transit."""
    repl.exec("_mfcanary2=None\ndel _mfcanary2")
    repl.retries = 0
    m = mangle(repl, b"_mfx(", "flip", offset=0)
    with pytest.raises(rawrepl.TransferError):
        repl.exec_verified("_mfcanary2='RAN'\n", what="canary2")
    assert m.hits == 1
    assert ran(repl, "_mfcanary2") == "NOT RUN"


def test_one_corrupted_block_is_retried_and_runs_exactly_once(repl):
    repl.exec("_mfcount=0")
    repl.retries = 2
    m = mangle(repl, b"COUNTER", "drop")
    repl.exec_verified("_mfcount=_mfcount+1 # COUNTER\n", what="counter")
    assert m.hits == 1
    assert ran(repl, "_mfcount") == "1"


def test_corrupted_data_upload_is_refused(repl):
    repl.retries = 0
    data = bytes(range(40)) + b"DATAMARK" + bytes(range(200, 256))
    m = mangle(repl, b"DATAMARK", "flip")
    with pytest.raises(rawrepl.TransferError):
        repl.upload_data(data, what="probe data")
    assert m.hits == 1
    assert repl.exec("print(_mfD)").strip() == "None"
    repl.transport = m.inner
    repl.upload_data(data, what="probe data")  # and the clean path works
    assert repl.exec("print(len(_mfD), _mfD[40:48])").split() == ["104", "b'DATAMARK'"]


def test_corrupted_file_write_is_refused_and_leaves_no_file(repl, device):
    if not device.cap("filesystem", True):
        pytest.skip("board %s has no filesystem to write to" % device.name)
    path = device.root + "mfhil_bad.txt"
    repl.retries = 0
    m = mangle(repl, b"FILEMARK", "flip")
    with pytest.raises(rawrepl.TransferError) as err:
        repl.write_file(path, b"0123456789FILEMARK" * 4, use_temp=False)
    assert m.hits == 1
    assert path in str(err.value)
    repl.transport = m.inner
    assert repl.file_checksum(path) is None
