# ESP32 family (ESP32, -S2, -S3, -C3, -C6): Wi-Fi station with a timeout.
import gc

from hal import _wlan

NAME = "esp32"
_PM_NONE = 0  # network.WLAN.PM_NONE on the ports that define it


def connect(wifi, timeout_ms, log):
    return _wlan.connect(wifi, timeout_ms, log, _PM_NONE)


def free_heap():
    return gc.mem_free()


def reset():
    import machine

    machine.reset()
