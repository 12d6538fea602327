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
# The node's round on recorded inputs (tools/microfed_tools/roundcase.py): the program that
# stands in for node.py when a build is measured (hil/test_node_round.py, benchmarks/device.py).
# Frozen like node.py, its code sits in flash as the node's does; exec'd from source it would
# put ~2.6 KB of its own bytecode on the heap that no node has (docs/boards.md). It is imported
# only by the harness: a node never loads it, and it costs an image ~3 KB of flash.
module("roundprog.py", base_path="../../tools/microfed_tools")
# Ed25519 and SHA-512 in C (the `_ed25519` module, which microfed.ed25519 prefers): no heap
# for a verification, which a 32 KB node does not have to spare (docs/ed25519.md).
c_module("ed25519c")
