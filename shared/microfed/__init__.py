# microfed portable core: pure integer code shared by devices (MicroPython) and the host
# (CPython, where it is the x86 reference). Keep every module in the MicroPython subset.
VERSION = "0.1.0"
