"""`microfed flash` against a fake ESP ROM bootloader on a pty (no hardware).

The image is shaped like a real merged MicroPython ESP32 .bin (second-stage bootloader with a
valid header, checksum and SHA-256, then a partition table and a ~1 MB application), so
esptool's own image checks run on it exactly as on a download from micropython.org.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import struct
from functools import reduce
from pathlib import Path

import pytest
from fake_rom import DESTRUCTIVE, FakeRom

from microfed_tools import cmd_flash
from microfed_tools.boards import load_board
from microfed_tools.flash import FlashError, flash_board

APP_BYTES = 1_048_576


def _esp32_bootloader(rng: random.Random, chip_id: int = 0) -> bytes:
    segments = [(0x3FFF0000, rng.randbytes(0x1000)), (0x40078000, rng.randbytes(0x4000))]
    out = bytearray(struct.pack("<BBBBI", 0xE9, len(segments), 2, 0x20, 0x40080400))
    # Extended header: wp pin, drive strengths, chip id 0 (ESP32), revisions, hash appended.
    out += struct.pack("<BBBBHBHH4sB", 0xEE, 0, 0, 0, chip_id, 0, 0, 0, b"\0" * 4, 1)
    check = 0xEF
    for addr, data in segments:
        out += struct.pack("<II", addr, len(data)) + data
        check = reduce(lambda a, b: a ^ b, data, check)
    out += b"\0" * (15 - len(out) % 16)
    out.append(check)
    out += hashlib.sha256(out).digest()
    return bytes(out)


def micropython_like_image(seed: int = 5, app_bytes: int = APP_BYTES, chip_id: int = 0) -> bytes:
    """Bootloader at 0x1000, partition table at 0x8000, app at 0x10000 (offsets in flash)."""
    rng = random.Random(seed)
    image = bytearray(_esp32_bootloader(rng, chip_id))
    image += b"\xff" * (0x7000 - len(image))
    image += rng.randbytes(0xC00)
    image += b"\xff" * (0xF000 - len(image))
    image += rng.randbytes(app_bytes)
    return bytes(image)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "ESP32_GENERIC-test.bin"
    path.write_bytes(micropython_like_image())
    return path


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    """For tests about behaviour, not volume: keeps the suite fast."""
    path = tmp_path_factory.mktemp("img") / "ESP32_GENERIC-small.bin"
    path.write_bytes(micropython_like_image(seed=6, app_bytes=64 * 1024))
    return path


def _quiet(_: str) -> None:
    pass


def _received(rom: FakeRom, offset: int, length: int) -> tuple[bytes, bytes]:
    """The bytes that arrived in write commands, in address order, from `offset`."""
    blob = bytearray()
    pos = offset
    for at, data in sorted(rom.writes):
        if at + len(data) <= offset:
            continue
        assert at == pos, f"gap or overlap in writes at {at:#x} (expected {pos:#x})"
        blob += data
        pos += len(data)
    return bytes(blob[:length]), bytes(blob[length:])


@pytest.mark.parametrize("no_stub", [False, True], ids=["stub-compressed", "rom-no-stub"])
def test_flash_writes_image_at_board_offset(image_file, no_stub):
    image = image_file.read_bytes()
    assert len(image) >= 1_000_000
    board = load_board("esp32")
    with FakeRom("esp32") as rom:
        result = flash_board(rom.port, "esp32", image_file, no_stub=no_stub, before="no-reset",
                             after="no-reset", say=_quiet)
        assert rom.errors == []
        got, tail = _received(rom, board.flash_offset, len(image))
        assert got == image
        assert set(tail) <= {0xFF}  # only the ROM's block padding follows the image
        assert rom.read_flash(board.flash_offset, len(image)) == image
        assert rom.read_flash(0, board.flash_offset) == b"\xff" * board.flash_offset
        # erase came first and covered the whole chip
        first_erase = rom.commands.index("ERASE_FLASH" if not no_stub else "FLASH_BEGIN")
        first_write = min(i for i, c in enumerate(rom.commands) if c.startswith("FLASH_D"))
        assert first_erase < first_write
        assert (0, rom.flash_size) in rom.erases
        assert "SPI_FLASH_MD5" in rom.commands
        if no_stub:
            assert "MEM_BEGIN" not in rom.commands and "FLASH_DATA" in rom.commands
            assert "FLASH_DEFL_DATA" not in rom.commands
        else:
            assert "MEM_END" in rom.commands and rom.stub_running
            assert "FLASH_DEFL_DATA" in rom.commands and "FLASH_DATA" not in rom.commands
    assert result.md5 == hashlib.md5(image).hexdigest()
    assert (result.chip, result.offset, result.size, result.stub) == (
        "ESP32", 0x1000, len(image), not no_stub)


def test_corrupted_flash_fails_verification(small_image, monkeypatch):
    """If the flash does not hold what was sent, the MD5 check must fail the command."""
    real = FakeRom._data

    def flip_one_bit(self, op, data, chk, compressed):
        real(self, op, data, chk, compressed)
        if len(self.writes) == 3:
            pos = self.writes[-1][0]
            self.flash[pos] ^= 0x01

    monkeypatch.setattr(FakeRom, "_data", flip_one_bit)
    with FakeRom("esp32") as rom, pytest.raises(FlashError, match="MD5"):
        flash_board(rom.port, "esp32", small_image, before="no-reset", after="no-reset",
                    say=_quiet)


def test_chip_mismatch_refused_before_erase(image_file):
    with FakeRom("esp32c3") as rom:
        with pytest.raises(FlashError) as err:
            flash_board(rom.port, "esp32", image_file, before="no-reset", after="no-reset",
                        say=_quiet)
        assert rom.errors == []
        assert "GET_SECURITY_INFO" in rom.commands  # it did talk to the chip
        assert [c for c in rom.commands if c in DESTRUCTIVE] == []
        assert rom.erases == [] and rom.writes == []
        assert "MEM_BEGIN" not in rom.commands  # not even the stub was uploaded
    msg = str(err.value)
    assert err.value.code == 2
    assert "ESP32-C3" in msg and "ESP32" in msg and "esp32c3" in msg
    assert "\n" not in msg


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="microfed")
    cmd_flash.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_flash_end_to_end(small_image, capsys):
    with FakeRom("esp32") as rom:
        code = _cli(["flash", "--port", rom.port, "--board", "esp32", "--before", "no-reset",
                     "--after", "no-reset", str(small_image)])
        assert rom.read_flash(0x1000, small_image.stat().st_size) == small_image.read_bytes()
    assert code == 0
    assert "verified" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--board", "esp32", "/nonexistent/ESP32_GENERIC.bin"], "does not exist"),
        (["--board", "no-such-board", "IMAGE"], "unknown board 'no-such-board'; known boards:"),
        (["--board", "pico_w", "IMAGE"], "RPI-RP2"),
        (["--board", "stm32f4disc", "IMAGE"], "dfu-util"),
        (["--board", "esp32", "NOT_ESP"], "not an ESP firmware image"),
        (["--board", "esp32", "C3_IMAGE"], "built for ESP32-C3, but board 'esp32' is ESP32"),
        (["--board", "esp32c3", "IMAGE"], "built for ESP32, but board 'esp32c3' is ESP32-C3"),
    ],
)
def test_cli_bad_input_one_line_exit_2(argv, needle, image_file, tmp_path, capsys):
    not_esp = tmp_path / "fw.uf2"
    not_esp.write_bytes(b"UF2\n" + b"\0" * 508)
    c3_image = tmp_path / "ESP32_GENERIC_C3.bin"
    c3_image.write_bytes(micropython_like_image(app_bytes=4096, chip_id=5))
    files = {"IMAGE": image_file, "NOT_ESP": not_esp, "C3_IMAGE": c3_image}
    argv = [str(files[a]) if a in files else a for a in argv]
    # No fake ROM: these must be refused before the port is ever opened.
    code = _cli(["flash", "--port", "/dev/nonexistent-port", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.count("\n") == 1 and err.startswith("microfed flash: ")


def test_cli_no_bootloader_is_device_error(image_file, capsys):
    code = _cli(["flash", "--port", "/dev/nonexistent-port", "--board", "esp32",
                 "--before", "no-reset", str(image_file)])
    err = capsys.readouterr().err
    assert code == 1
    assert "/dev/nonexistent-port" in err and err.count("\n") == 1
