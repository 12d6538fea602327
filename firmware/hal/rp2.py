# RP2040 / RP2350 (Raspberry Pi Pico W / Pico 2 W): Wi-Fi through the CYW43 chip.
import gc

from hal import _wlan

NAME = "rp2"
_PM_NONE = 0xA11140  # CYW43 "performance" power mode: no sleep between beacons


def connect(wifi, timeout_ms, log):
    try:
        import network  # noqa: F401
    except ImportError:
        log("rp2: this board has no network module (a Pico without W cannot join a mesh)")
        return False
    return _wlan.connect(wifi, timeout_ms, log, _PM_NONE)


def free_heap():
    return gc.mem_free()


def reset():
    import machine

    machine.reset()
