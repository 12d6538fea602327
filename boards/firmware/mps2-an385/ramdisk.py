# The emulated MPS2-AN385's "flash": a littlefs filesystem on a RAM region outside the
# MicroPython heap, so it costs the heap only the littlefs caches (~100 bytes), not its size.
#
#     import ramdisk; ramdisk.mount()      # after every reset: mounts at /, formats if blank
#
# Where: QEMU's mps2-an385 has three RAMs. The port's linker script (ports/qemu/mcu/arm/mps2.ld)
# puts code, data, BSS, the heap and the stack in ZBT SSRAM1 (0x00000000, 4 MB) and nothing
# anywhere else; the board file reserves the 16 MB PSRAM at 0x21000000 for a ROMFS image
# (MICROPY_HW_ROMFS_PART0_START). ZBT SSRAM2&3 at 0x20000000 (4 MB) is unused: the first MB of it
# is the disk. QEMU clears RAM only when it starts, not on a soft reset (Ctrl-D,
# machine.soft_reset()), so files survive a node restart the way they survive on flash, and a
# fresh QEMU starts with a blank disk (mount() formats it).

import uctypes
import vfs

ADDR = 0x20000000  # ZBT SSRAM2&3, unused by the linker script (see above)
SIZE = 0x100000  # 1 MB of its 4 MB
BLOCK = 512
# littlefs's read/program granularity and lookahead (bytes of allocation bitmap: 8 blocks
# each). The defaults (32, 32, 32) make littlefs call readblocks/writeblocks (Python here) 32
# bytes at a time: a 2.6 KB write cost 14 M instructions. 128 cut that several times; 512 was
# faster again. But the filesystem holds two caches of 4 x that size (at most a block) and
# every open file one more, inside its object on the heap: with 128, 512 bytes each. A
# complete gossip node's 64 KB heap then failed to open files mid-run with 15-17 KB free,
# and later, with the serial link's buffers allocated at boot, had no 2.7 KB block left for
# its round buffers at boot (3 of 3 runs, 2026-11-27: docs/boards.md). 64 halves them.
LFS = {"readsize": 64, "progsize": 64, "lookahead": 64}


class RamBlockDev:
    """A block device (MicroPython's extended interface) over memory at `addr`."""

    def __init__(self, addr=ADDR, size=SIZE, block=BLOCK):
        self.mem = memoryview(uctypes.bytearray_at(addr, size))
        self.block = block
        self.count = size // block

    def readblocks(self, n, buf, off=0):
        a = n * self.block + off
        buf[:] = self.mem[a:a + len(buf)]

    def writeblocks(self, n, buf, off=0):
        a = n * self.block + off
        self.mem[a:a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self.count
        if op == 5:  # block size
            return self.block
        return 0  # init, deinit, sync, erase: nothing to do in RAM


def mount(path="/", fresh=False):
    """Mount the RAM disk at `path` (formatting it if it holds no filesystem, or if `fresh`);
    return True if it was formatted. Mounting it again is harmless."""
    for _fs, where in vfs.mount():
        if where == path:
            if not fresh:
                return False
            vfs.umount(path)
    bdev = RamBlockDev()
    if not fresh:
        try:
            vfs.mount(vfs.VfsLfs2(bdev, mtime=False, **LFS), path)
            return False
        except OSError:
            pass  # blank RAM (a fresh QEMU) or damaged: format
    vfs.VfsLfs2.mkfs(bdev, **LFS)
    vfs.mount(vfs.VfsLfs2(bdev, mtime=False, **LFS), path)
    return True
