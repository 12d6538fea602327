"""`microfed deploy` on the device: copy a small file set, verify it, skip what is unchanged.

The micro:bit's filesystem is flat, so this set uses top-level names; the default set
(shared/ to /lib/microfed, firmware/ to /) needs a board with directories.
"""

from __future__ import annotations

import pytest

from microfed_tools import deploy as dp
from microfed_tools import rawrepl


@pytest.fixture
def fileset(tmp_path, device):
    if not device.cap("filesystem", True):
        pytest.skip("board %s has no filesystem: microfed is frozen into its firmware "
                    "(microfed firmware build), nothing is deployed" % device.name)
    a = tmp_path / "a.py"
    a.write_text("def f():\n    return 6 * 7\n")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) + bytes(range(255, -1, -1)) + b"\x00\x04\x03\x01")
    c = tmp_path / "c.py"
    c.write_text("NAME = 'microfed'\n")
    specs = [dp.FileSpec(a, device.root + "mfhil_a.py"),
             dp.FileSpec(blob, device.root + "mfhil_blob.bin"),
             dp.FileSpec(c, device.root + "mfhil_c.py")]
    yield specs
    for s in specs:
        try:
            device.repl.remove_file(s.device)
        except rawrepl.ReplError:
            pass


def quiet(_msg: str) -> None:
    pass


def test_deploy_copies_verifies_and_skips_unchanged(device, fileset):
    repl = device.repl
    for s in fileset:
        repl.remove_file(s.device)
    assert dp.deploy(repl, fileset, log=quiet) == (3, 0)
    for s in fileset:
        assert repl.file_checksum(s.device) == rawrepl.checksum(s.local.read_bytes()), s.device
    # The copy is real code the device runs, not just matching numbers.
    out = repl.exec("import mfhil_a\nprint(mfhil_a.f())\ndel mfhil_a")
    assert out.strip() == "42"

    assert dp.deploy(repl, fileset, log=quiet) == (0, 3)

    fileset[2].local.write_text("NAME = 'microfed-2'\n")
    lines: list[str] = []
    assert dp.deploy(repl, fileset, dry_run=True, log=lines.append) == (1, 2)
    assert any(ln.startswith("would copy") and "mfhil_c.py" in ln for ln in lines)
    assert repl.file_checksum(fileset[2].device) != rawrepl.checksum(fileset[2].local.read_bytes())

    assert dp.deploy(repl, fileset, log=quiet) == (1, 2)
    assert repl.file_checksum(fileset[2].device) == rawrepl.checksum(fileset[2].local.read_bytes())


def test_deploy_names_the_file_on_failure(device, fileset):
    class Broken(rawrepl.Transport):
        """Drops a byte from every file-data block (programs starting `_mfp(`), while the
        control programs around them pass: the write fails, the cleanup can still run."""

        def __init__(self, inner):
            self.inner, self.name, self.in_block = inner, inner.name, False

        def write(self, data):
            if data.startswith(b"_mfp("):
                self.in_block = True
            if self.in_block and len(data) > 8:
                data = data[:5] + data[6:]
            if data == b"\x04":
                self.in_block = False
            self.inner.write(data)

        def read(self, timeout):
            return self.inner.read(timeout)

    repl = device.repl
    for s in fileset:
        repl.remove_file(s.device)
    saved = repl.transport, repl.retries, repl.slowdown
    repl.retries = 0
    try:
        repl.transport = Broken(saved[0])
        with pytest.raises(dp.DeployError) as err:
            dp.apply(repl, [dp.PlanItem(fileset[1], fileset[1].local.read_bytes(), "copy", "new")],
                     log=quiet)
    finally:
        repl.transport, repl.retries, repl.slowdown = saved
        repl.enter()
    assert fileset[1].device in str(err.value)
    assert repl.file_checksum(fileset[1].device) is None
