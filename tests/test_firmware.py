"""`microfed firmware build`: MicroPython 1.29 from the vendored source with microfed frozen
in. The 32-bit unix build is made for real (or reused from the cache) and run: it has an
MCU's 31-bit small ints and imports the frozen core without any file on its path. The
rebuild rule is checked without compiling: same inputs -> no make; a changed frozen file ->
make runs again. pytest hil --board mps2-an385 | virt-rv32 | unix32 runs the vectors on them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from microfed_tools import firmware


def _need(target: str) -> None:
    why = firmware.missing_tools(firmware.TARGETS[target])
    if why:
        pytest.skip(why)
    try:
        firmware.find_tarball()
    except firmware.FirmwareError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def unix32() -> Path:
    _need("unix32")
    return firmware.build("unix32", say=lambda _m: None)


def test_unix32_is_32_bit_and_has_microfed_frozen_in(unix32: Path, tmp_path: Path) -> None:
    code = ("import sys, gc\n"
            "import microfed.wire, microfed.ed25519, microfed.q16, node\n"
            "print(sys.maxsize, microfed.q16.mul(3 << 16, 5 << 16) >> 16, "
            "microfed.wire.mesh_id('lab').hex())\n")
    # An empty working directory and no MICROPYPATH: the modules can only come from the image.
    out = subprocess.run([str(unix32), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    from microfed import wire

    assert out.stdout.split() == [str(2**31 - 1), "15", wire.mesh_id("lab").hex()]


def test_same_inputs_do_not_rebuild(unix32: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_make(*a: Any, **k: Any) -> None:
        raise AssertionError("make ran although no input changed")

    monkeypatch.setattr(firmware, "_make", no_make)
    assert firmware.build("unix32", say=lambda _m: None) == unix32


def test_a_changed_frozen_file_rebuilds(unix32: Path, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    extra = tmp_path / "extra.py"
    extra.write_text("X = 1\n")
    real = firmware.frozen_files
    monkeypatch.setattr(firmware, "frozen_files", lambda: [*real(), extra])
    calls: list[list[str]] = []

    def fake_make(args: list[str], log: Path, say: Any, what: str) -> None:
        calls.append(args)

    monkeypatch.setattr(firmware, "_make", fake_make)
    stamp_file = firmware.build_dir("unix32") / ".microfed-stamp"
    before = stamp_file.read_text()
    try:
        firmware.build("unix32", say=lambda _m: None)
        assert len(calls) == 1 and "FROZEN_MANIFEST=%s" % firmware.MANIFEST in calls[0]
        assert stamp_file.read_text() != before
    finally:
        stamp_file.write_text(before)  # the image on disk is still the real build's


def test_unknown_target_and_missing_tools_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(firmware.FirmwareError, match="unknown firmware target 'esp8266'"):
        firmware.build("esp8266")
    monkeypatch.setattr(firmware.shutil, "which", lambda _c: None)
    why = firmware.missing_tools(firmware.TARGETS["mps2-an385"])
    assert why is not None and "apt-get install -y" in why and "gcc-arm-none-eabi" in why


def test_the_manifest_freezes_the_core_and_the_node() -> None:
    text = firmware.MANIFEST.read_text()
    assert 'package("microfed", base_path="../../shared")' in text
    assert 'module("node.py", base_path="../../firmware")' in text
    files = {p.relative_to(firmware.REPO).as_posix() for p in firmware.frozen_files()}
    assert "shared/microfed/wire.py" in files and "firmware/node.py" in files


def test_the_packed_range_check_equals_the_list_rule_on_31_bit_ints(unix32: Path,
                                                                     tmp_path: Path) -> None:
    """verify._packed_out_of_range reads the top byte first and assembles only doubtful
    values, which on a 31-bit port may become long ints: the frozen code on unix32 gives the
    list rule's answer (reason and message) on values at every edge of several ranges; and
    wire.i32_at, which reads packed values in place, reads each of them back."""
    import json
    import random
    import struct

    rng = random.Random(11)
    cases = []
    for m in (1, 255, 2**23, 2**24 - 1, 2**24, 2**24 + 1, 2**30, 2**31 - 1, 123_456_789):
        for _ in range(12):
            dim = rng.randrange(1, 40)
            edge = [0, 1, -1, m, -m, m + 1, -m - 1, 2**30, -(2**30) - 1, 2**31 - 1, -(2**31)]
            # A case's values within about +-2**shift: every range gets in-range cases.
            shift = rng.randrange(32)
            vals = [max(-(2**31), min(2**31 - 1, rng.choice(edge) if rng.random() < 0.03
                                      else rng.randrange(-(2**31), 2**31) >> (31 - shift)))
                    for _ in range(dim)]
            cases.append([m, vals, struct.pack("<%di" % dim, *vals).hex()])
    code = ("import sys, json, binascii\nfrom microfed import verify, wire\n"
            "for m, vals, h in json.loads(sys.stdin.read()):\n"
            "    p = b'ab' + binascii.unhexlify(h)\n"
            "    print(json.dumps([verify._packed_out_of_range(memoryview(p), 2, len(vals), m),\n"
            "                      [wire.i32_at(p, 2 + 4 * i) for i in range(len(vals))]]))\n")
    out = subprocess.run([str(unix32), "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, input=json.dumps(cases),
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]

    def list_rule(vals: list[int], m: int) -> list[str] | None:
        for i, v in enumerate(vals):
            if v > m or v < -m:
                return ["out_of_range", "value[%d] = %d outside +-%d" % (i, v, m)]
        return None

    want = [[list_rule(vals, m), vals] for m, vals, _h in cases]
    assert got == want  # and wire.i32_at reads every value back, long ints included
    assert 20 < sum(w[0] is None for w in want) < len(want) - 20  # both answers exercised


# An out-of-memory report on a split heap: a MemoryError raised 25 calls deep, then the heap
# filled with 80-byte pieces and every other one freed, so that no free block is larger than
# a piece; node._where must still name the line (the traceback's text, ~1 KB, fits nowhere).
SPLIT_HEAP_WHERE = """import gc, node
def deep(n):
    if n == 0:
        raise MemoryError()
    return deep(n - 1)
try:
    deep(25)
except MemoryError as e:
    err = e
keep = [None] * 600
n = 0
i = 0  # every global bound before the heap is filled: a growing globals dict needs a block
try:
    while n < 600:
        keep[n] = bytearray(64)
        n += 1
except MemoryError:
    n -= 1
    keep[n] = None  # room for the loop below
while i < n:
    keep[i] = None
    i += 2
gc.collect()
print(n, repr(node._where(err)))
"""


def test_an_out_of_memory_report_names_its_line_on_a_split_heap(unix32: Path,
                                                                tmp_path: Path) -> None:
    out = subprocess.run([str(unix32), "-X", "heapsize=32k", "-c", SPLIT_HEAP_WHERE],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    filled, where = out.stdout.split(" ", 1)
    assert 100 < int(filled) < 599  # the heap really was filled before the report
    assert where.strip() == repr(" at <stdin>:4 in deep"), out.stdout
