# Station-mode Wi-Fi shared by the boards that have network.WLAN (ESP32, Pico W).
import time


def connect(wifi, timeout_ms, log, power_save_off=None):
    import network

    if wifi is None:
        log("wifi: no 'wifi' settings in bundle.json or config.json")
        return False
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if power_save_off is not None:
        try:
            # Power save delays every received packet by up to a beacon interval.
            wlan.config(pm=power_save_off)
        except Exception:
            pass
    if wlan.isconnected():
        return True
    wlan.connect(wifi["ssid"], wifi["password"])
    start = time.ticks_ms()
    while not wlan.isconnected():
        if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
            log("wifi: no connection to %r within %d ms (status %r)"
                % (wifi["ssid"], timeout_ms, wlan.status()))
            try:
                wlan.disconnect()
            except Exception:
                pass
            return False
        time.sleep_ms(100)
    log("wifi: connected, address %s" % wlan.ifconfig()[0])
    return True
