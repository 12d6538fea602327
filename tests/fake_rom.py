"""A fake Espressif ROM bootloader (and flasher stub) on a pseudo-terminal.

esptool talks to it exactly as to a board on /dev/ttyUSB0: SLIP-framed commands, checksummed
data blocks, register reads for chip detection, SPI flash commands through the SPI peripheral
registers, plain and zlib-compressed flash writes, MD5 verification. The fake keeps a flash
array and a log of every command, so a test can check the bytes that arrived and that nothing
was erased or written when the tool should have refused.

Only what esptool 5.x sends for detect / stub upload / attach / erase / write / verify is
implemented; anything else gets the ROM's "invalid command" answer, which esptool handles.
"""

from __future__ import annotations

import hashlib
import os
import select
import struct
import threading
import tty
import zlib
from dataclasses import dataclass, field

OP_NAMES = {
    0x02: "FLASH_BEGIN", 0x03: "FLASH_DATA", 0x04: "FLASH_END", 0x05: "MEM_BEGIN",
    0x06: "MEM_END", 0x07: "MEM_DATA", 0x08: "SYNC", 0x09: "WRITE_REG", 0x0A: "READ_REG",
    0x0B: "SPI_SET_PARAMS", 0x0D: "SPI_ATTACH", 0x0F: "CHANGE_BAUDRATE",
    0x10: "FLASH_DEFL_BEGIN", 0x11: "FLASH_DEFL_DATA", 0x12: "FLASH_DEFL_END",
    0x13: "SPI_FLASH_MD5", 0x14: "GET_SECURITY_INFO", 0xD0: "ERASE_FLASH",
    0xD1: "ERASE_REGION",
}
# Commands that change flash contents: a refused flash must not have sent any of these.
DESTRUCTIVE = frozenset({"FLASH_BEGIN", "FLASH_DATA", "FLASH_DEFL_BEGIN", "FLASH_DEFL_DATA",
                         "ERASE_FLASH", "ERASE_REGION"})
STUB_ONLY = frozenset({0xD0, 0xD1})

CHIP_DETECT_MAGIC_REG = 0x40001000
SPI_CMD_USR = 1 << 18
CHECKSUM_MAGIC = 0xEF
ERR_INVALID = 0x05  # ROM: "received message is invalid" (also: unsupported command)
ERR_CHECKSUM = 0x07
ERR_SEQUENCE = 0x08


@dataclass(frozen=True)
class ChipModel:
    """What esptool reads to tell chips apart, and where the SPI flash controller lives."""

    name: str
    magic: int | None  # CHIP_DETECT_MAGIC_REG value (chips that use it)
    chip_id: int | None  # GET_SECURITY_INFO chip id (ESP32-C3 and later)
    spi_base: int
    usr2_offs: int
    w0_offs: int
    addr_msb: bool


CHIPS = {
    "esp32": ChipModel("ESP32", 0x00F01D83, None, 0x3FF42000, 0x24, 0x80, True),
    "esp32c3": ChipModel("ESP32-C3", None, 5, 0x60002000, 0x20, 0x58, False),
}

SFDP_SIGNATURE = 0x50444653
WINBOND_4MB_ID = 0x1640EF  # RDID bytes EF 40 16: Winbond, 4 MB (size id 0x16)


def checksum(data: bytes) -> int:
    state = CHECKSUM_MAGIC
    for b in data:
        state ^= b
    return state


@dataclass
class FakeRom:
    chip: str = "esp32"
    flash_size: int = 4 * 1024 * 1024
    commands: list[str] = field(default_factory=list)
    # (offset, bytes actually written) per FLASH_DATA / decompressed FLASH_DEFL_DATA block.
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    erases: list[tuple[int, int]] = field(default_factory=list)
    stub_running: bool = False
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model = CHIPS[self.chip]
        self.flash = bytearray(b"\xff" * self.flash_size)
        self.regs: dict[int, int] = {}
        if self.model.magic is not None:
            self.regs[CHIP_DETECT_MAGIC_REG] = self.model.magic
        self._master, self._slave = os.openpty()
        # Raw mode before esptool opens the port: no echo, no CR/LF rewriting of binary data.
        tty.setraw(self._slave)
        self.port = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-rom", daemon=True)
        self._write_state: dict[str, object] | None = None
        self._mem_blocks = 0

    # ---- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> FakeRom:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        os.close(self._master)
        os.close(self._slave)

    # ---- queries for tests ------------------------------------------------------------
    def destructive_commands(self) -> list[str]:
        return [c for c in self.commands if c in DESTRUCTIVE]

    def read_flash(self, offset: int, size: int) -> bytes:
        return bytes(self.flash[offset:offset + size])

    # ---- serial plumbing --------------------------------------------------------------
    def _serve(self) -> None:
        buf = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(self._master, 65536)
            except OSError:
                return
            buf += chunk
            while True:
                start = buf.find(b"\xc0")
                if start < 0:
                    buf.clear()
                    break
                end = buf.find(b"\xc0", start + 1)
                if end < 0:
                    del buf[:start]
                    break
                frame = bytes(buf[start + 1:end])
                del buf[:end + 1]
                if not frame:
                    # Two delimiters in a row: the second one may open the next frame.
                    buf[0:0] = b"\xc0"
                    continue
                packet = frame.replace(b"\xdb\xdc", b"\xc0").replace(b"\xdb\xdd", b"\xdb")
                try:
                    self._handle(packet)
                except Exception as exc:  # a bug here must show in the test, not hang it
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def _send(self, packet: bytes) -> None:
        frame = b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"
        view = memoryview(frame)
        while view:
            n = os.write(self._master, view)
            view = view[n:]

    def _reply(self, op: int, value: int = 0, data: bytes = b"", error: int = 0) -> None:
        # The stub appends 2 status bytes; ESP32-and-later ROMs 4 (2 reserved).
        status = bytes([1 if error else 0, error]) + (b"" if self.stub_running else b"\0\0")
        body = data + status
        self._send(struct.pack("<BBHI", 1, op, len(body), value) + body)

    # ---- protocol ---------------------------------------------------------------------
    def _handle(self, packet: bytes) -> None:
        if len(packet) < 8 or packet[0] != 0:
            return
        _, op, size, chk = struct.unpack("<BBHI", packet[:8])
        data = packet[8:8 + size]
        name = OP_NAMES.get(op, f"0x{op:02x}")
        self.commands.append(name)
        handler = getattr(self, "_cmd_" + name.lower(), None)
        if handler is None or (op in STUB_ONLY and not self.stub_running):
            self._reply(op, error=ERR_INVALID)
            return
        handler(op, data, chk)

    def _cmd_sync(self, op: int, data: bytes, chk: int) -> None:
        if data != b"\x07\x07\x12\x20" + b"\x55" * 32:
            self._reply(op, error=ERR_INVALID)
            return
        # The ROM answers SYNC eight times with a non-zero value; the stub with zero.
        for _ in range(8):
            self._reply(op, value=0 if self.stub_running else 0x20120707)

    def _cmd_get_security_info(self, op: int, data: bytes, chk: int) -> None:
        if self.model.chip_id is None:  # ESP32 ROM predates this command
            self._reply(op, error=ERR_INVALID)
            return
        info = struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0, self.model.chip_id, 0)
        self._reply(op, data=info)

    def _cmd_read_reg(self, op: int, data: bytes, chk: int) -> None:
        (addr,) = struct.unpack("<I", data[:4])
        self._reply(op, value=self.regs.get(addr, 0))

    def _cmd_write_reg(self, op: int, data: bytes, chk: int) -> None:
        addr, value, mask, _delay = struct.unpack("<IIII", data[:16])
        old = self.regs.get(addr, 0)
        self.regs[addr] = (old & ~mask) | (value & mask)
        if addr == self.model.spi_base and value & SPI_CMD_USR:
            self._run_spi_command()
        self._reply(op)

    def _run_spi_command(self) -> None:
        base = self.model.spi_base
        command = self.regs.get(base + self.model.usr2_offs, 0) & 0xFF
        addr = self.regs.get(base + 0x04, 0)
        if self.model.addr_msb:
            addr >>= 8
        if command == 0x9F:  # RDID
            result = WINBOND_4MB_ID
        elif command == 0x5A:  # read SFDP
            result = SFDP_SIGNATURE if addr == 0 else 0xEF  # not an XMC part
        else:
            result = 0
        self.regs[base + self.model.w0_offs] = result
        self.regs[base] = 0  # SPI_CMD_USR cleared: command done

    def _cmd_spi_attach(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _cmd_spi_set_params(self, op: int, data: bytes, chk: int) -> None:
        _fl_id, total, _blk, _sec, _page, _mask = struct.unpack("<IIIIII", data[:24])
        if total > self.flash_size:
            self._reply(op, error=ERR_INVALID)
            return
        self._reply(op)

    def _cmd_change_baudrate(self, op: int, data: bytes, chk: int) -> None:
        self._reply(op)

    def _cmd_mem_begin(self, op: int, data: bytes, chk: int) -> None:
        self._mem_blocks = 0
        self._reply(op)

    def _cmd_mem_data(self, op: int, data: bytes, chk: int) -> None:
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        block = data[16:16 + length]
        if len(block) != length or checksum(block) != chk:
            self._reply(op, error=ERR_CHECKSUM)
            return
        if seq != self._mem_blocks:
            self._reply(op, error=ERR_SEQUENCE)
            return
        self._mem_blocks += 1
        self._reply(op)

    def _cmd_mem_end(self, op: int, data: bytes, chk: int) -> None:
        no_entry, entry = struct.unpack("<II", data[:8])
        self._reply(op)
        if not no_entry and entry:
            # The uploaded stub starts and greets the host.
            self.stub_running = True
            self._send(b"OHAI")

    def _erase(self, offset: int, size: int) -> None:
        end = min(offset + size, self.flash_size)
        self.flash[offset:end] = b"\xff" * (end - offset)
        self.erases.append((offset, end - offset))

    def _cmd_erase_flash(self, op: int, data: bytes, chk: int) -> None:
        self._erase(0, self.flash_size)
        self._reply(op)

    def _cmd_erase_region(self, op: int, data: bytes, chk: int) -> None:
        offset, size = struct.unpack("<II", data[:8])
        self._erase(offset, size)
        self._reply(op)

    def _begin(self, op: int, data: bytes, compressed: bool) -> None:
        size, blocks, block_size, offset = struct.unpack("<IIII", data[:16])
        if offset + size > self.flash_size:
            self._reply(op, error=ERR_INVALID)
            return
        if size:
            self._erase(offset, size)
        self._write_state = {
            "offset": offset, "pos": offset, "blocks": blocks, "block_size": block_size,
            "seq": 0, "inflate": zlib.decompressobj() if compressed else None,
        }
        self._reply(op)

    def _cmd_flash_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, compressed=False)

    def _cmd_flash_defl_begin(self, op: int, data: bytes, chk: int) -> None:
        self._begin(op, data, compressed=True)

    def _data(self, op: int, data: bytes, chk: int, compressed: bool) -> None:
        st = self._write_state
        length, seq, _, _ = struct.unpack("<IIII", data[:16])
        block = data[16:16 + length]
        if st is None or (st["inflate"] is not None) != compressed:
            self._reply(op, error=ERR_INVALID)
            return
        if len(block) != length or checksum(block) != chk:
            self._reply(op, error=ERR_CHECKSUM)
            return
        if seq != st["seq"]:
            self._reply(op, error=ERR_SEQUENCE)
            return
        st["seq"] = seq + 1
        if compressed:
            inflate = st["inflate"]
            assert isinstance(inflate, type(zlib.decompressobj()))
            out = inflate.decompress(block)
        else:
            out = block
        pos = st["pos"]
        assert isinstance(pos, int)
        if pos + len(out) > self.flash_size:
            self._reply(op, error=ERR_INVALID)
            return
        # NOR flash programming can only clear bits: model it, so writing over unerased
        # flash shows up as corrupted data instead of silently succeeding.
        if out:
            end = pos + len(out)
            cleared = int.from_bytes(self.flash[pos:end], "big") & int.from_bytes(out, "big")
            self.flash[pos:end] = cleared.to_bytes(len(out), "big")
        self.writes.append((pos, bytes(out)))
        st["pos"] = pos + len(out)
        self._reply(op)

    def _cmd_flash_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, compressed=False)

    def _cmd_flash_defl_data(self, op: int, data: bytes, chk: int) -> None:
        self._data(op, data, chk, compressed=True)

    def _cmd_flash_end(self, op: int, data: bytes, chk: int) -> None:
        self._write_state = None
        self._reply(op)

    def _cmd_flash_defl_end(self, op: int, data: bytes, chk: int) -> None:
        self._write_state = None
        self._reply(op)

    def _cmd_spi_flash_md5(self, op: int, data: bytes, chk: int) -> None:
        addr, size, _, _ = struct.unpack("<IIII", data[:16])
        digest = hashlib.md5(self.flash[addr:addr + size]).digest()
        # The ROM answers in ASCII hex, the stub in raw bytes.
        self._reply(op, data=digest if self.stub_running else digest.hex().encode())
