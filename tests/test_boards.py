"""Board profiles load, validate, and reject broken or overclaiming profiles with a reason."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from microfed_tools import cmd_boards
from microfed_tools.boards import BoardError, board_names, list_boards, load_board

REQUIRED = {"esp32", "esp32s3", "esp32c3", "pico_w", "stm32f4disc", "nrf52840dk",
            "microbit-qemu", "unix"}


def test_all_required_profiles_load():
    boards = {b.name: b for b in list_boards()}
    assert REQUIRED <= set(boards)
    assert boards["esp32"].flash_offset == 0x1000
    assert boards["esp32s3"].flash_offset == 0 and boards["esp32c3"].flash_offset == 0
    assert boards["esp32c3"].esptool_chip == "ESP32-C3"
    mb = boards["microbit-qemu"]
    assert mb.micropython_version == (1, 9, 2)
    assert not mb.capabilities.hashlib_sha256 and not mb.capabilities.ed25519_on_device
    assert mb.heap_bytes < 16 * 1024 and mb.emulator["machine"] == "microbit"
    assert (mb.transfer.chunk_size, mb.transfer.chunk_delay_ms) == (32, 2)


def test_unknown_board_lists_known_ones():
    with pytest.raises(BoardError) as err:
        load_board("esp8266")
    msg = str(err.value)
    assert "unknown board 'esp8266'" in msg
    for name in board_names():
        assert name in msg


@pytest.fixture
def boards_copy(tmp_path, monkeypatch):
    d = tmp_path / "boards"
    shutil.copytree(load_board("esp32").path.parent, d)
    monkeypatch.setenv("MICROFED_BOARDS_DIR", str(d))
    return d


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("flash_offset = 0x1000", "flash_offset = 0x0", "start at 0x1000"),
        ("heap_bytes = 100_000", "heap_bytes = true", "heap_bytes' must be int"),
        ("max_model_params = 1024", "max_model_params = 4096", "more than half of heap_bytes"),
        ("hashlib_sha256 = true", "hashlib_sha256 = false", "needs hashlib_sha256"),
        ('flasher = "esptool"', 'flasher = "jtag"', "flasher 'jtag' is not one of"),
        ('chip = "esp32"', 'chip = "esp32"\nchips = 2', "unknown field(s) chips"),
        ('name = "esp32"', 'name = "esp-32"', "must equal the file name"),
        ("[transfer]", "[transfer", "not valid TOML"),
        ('chip = "esp32"', 'chip = "esp32"\nfs_mount = "import ramdisk"',
         "fs_mount needs capabilities.filesystem = true"),
    ],
)
def test_bad_profile_is_rejected_with_reason(boards_copy, old, new, needle):
    path = boards_copy / "esp32.toml"
    text = path.read_text()
    if "fs_mount" in new:
        text = text.replace("[capabilities]", "[capabilities]\nfilesystem = false")
    assert old in text
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(BoardError) as err:
        load_board("esp32")
    assert needle in str(err.value)
    assert "esp32.toml" in str(err.value)


def test_microfed_boards_command(capsys):
    assert cmd_boards.run(argparse.Namespace(name=None, json=False)) == 0
    out = capsys.readouterr().out
    for name in REQUIRED:
        assert name in out
    assert cmd_boards.run(argparse.Namespace(name="esp32c3", json=True)) == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert only["name"] == "esp32c3" and only["flash_offset"] == 0
    assert cmd_boards.run(argparse.Namespace(name="nope", json=False)) == 2
    err = capsys.readouterr().err
    assert err.startswith("microfed boards: unknown board 'nope'") and err.count("\n") == 1
