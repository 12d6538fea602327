# Board HAL: one small module per board family, chosen by sys.platform. Each module has
#   NAME                         board family
#   connect(wifi, timeout_ms, log) -> bool   bring the network up (Wi-Fi where there is one)
#   free_heap() -> int           bytes free on the MicroPython heap
#   reset()                      restart the board (the unix port exits instead)
# The node never imports `network` or `machine` itself, so the same node.py runs everywhere.

import sys


def load():
    p = sys.platform
    if p == "esp32":
        from hal import esp32 as m
    elif p == "rp2":
        from hal import rp2 as m
    else:
        from hal import unix as m
    return m
