# microfed's mps2-an385 board directory (BOARD_DIR= for ports/qemu; the vendored tree is never
# edited): the upstream MPS2_AN385 board plus littlefs, for the RAM disk that plays the
# board's flash (ramdisk.py, frozen through manifest.py).
include $(TOP)/ports/qemu/boards/MPS2_AN385/mpconfigboard.mk

MICROPY_VFS_LFS2 = 1
# littlefs's file times need mp_hal_time_ns, which the qemu port does not define.
SRC_C += $(BOARD_DIR)/time_ns.c
