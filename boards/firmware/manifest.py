# What `microfed firmware build` freezes into every firmware it builds
# (tools/microfed_tools/firmware.py): the portable core and the node application, compiled to
# bytecode in flash, so importing them costs the heap only the objects they create. Paths are
# relative to this file; MicroPython's tools/manifestfile.py documents the calls.
# main.py is frozen too: `micropython -m main NODE_DIR` runs the node from the image alone (the
# mesh runner's unix32 nodes); the QEMU boards never run a main.py by themselves.
package("microfed", base_path="../../shared")
# Ed25519's comb table as constants: in flash here, built on the heap anywhere else.
module("microfed/ed25519_comb.py")
package("hal", base_path="../../firmware")
module("config.py", base_path="../../firmware")
module("main.py", base_path="../../firmware")
module("mqtt.py", base_path="../../firmware")
module("mqttc.py", base_path="../../firmware")
module("node.py", base_path="../../firmware")
module("serialstream.py", base_path="../../firmware")
