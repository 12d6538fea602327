# The MicroPython unix port: the host's network is already up; nothing to connect.
import gc
import sys

NAME = "unix"


def connect(wifi, timeout_ms, log):
    return True


def free_heap():
    return gc.mem_free()


def reset():
    # A process cannot reboot its board: exit and let the runner restart it.
    sys.exit(3)
