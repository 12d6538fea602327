// mp_hal_time_ns for microfed's mps2-an385 board (see mpconfigboard.mk): the emulated board
// has no real-time clock, so "now" is the time since boot. littlefs stamps files with it when a
// VfsLfs2 is mounted with mtime=True (ramdisk.py mounts with mtime=False).
#include "py/mphal.h"

uint64_t mp_hal_time_ns(void) {
    return (uint64_t)mp_hal_ticks_ms() * 1000000ULL;
}
