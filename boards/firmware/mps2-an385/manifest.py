# The mps2-an385 firmware: everything every build freezes, plus the RAM disk that plays the
# board's flash (ramdisk.py; the build enables littlefs with MICROPY_VFS_LFS2=1).
include("../manifest.py")
module("ramdisk.py")
