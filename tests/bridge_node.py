# A node on a serial line (MicroPython; run by tests/test_bridge.py on the unix port over a pty
# and by hil/test_bridge.py on the emulated board through its raw REPL). The host appends
# the call main(client id, topic prefix). It connects through the bridge, subscribes
# to BASE/down, echoes every message to BASE/echo, logs JSON lines as L frames, and stops on
# the message b"quit". Between the two ready lines it writes an unframed text line and a
# corrupt frame on purpose: the bridge must count it and carry on.
import json
import sys
import time

import mqtt
import serialstream


def main(CID, BASE):  # noqa: N803
    link = serialstream.Link()

    def log(d):
        link.log(json.dumps(d))

    t = mqtt.Transport(CID, "bridge", 1883, keepalive=10, io_timeout_ms=4000,
                       publish_timeout_ms=4000, backoff_min_ms=100, backoff_max_ms=400,
                       max_msg=8192, stream=link.open,
                       log=lambda m: log({"ev": "mqtt", "msg": m}))
    box = []
    t.set_handler(lambda tp, m: box.append(m))
    t.subscribe(BASE + "/down", 1)
    ok = t.connect(20000)
    log({"ev": "up", "ok": ok, "err": t.last_error})
    sys.stdout.write("plain text between frames\n")
    sys.stdout.buffer.write(b"~corrupt\n")
    log({"ev": "ready", "stats": t.stats()})
    up = t.connected
    end = time.ticks_add(time.ticks_ms(), 120000)
    while time.ticks_diff(end, time.ticks_ms()) > 0:
        t.poll(50)
        if t.connected != up:
            up = t.connected
            log({"ev": "up" if up else "down", "stats": t.stats(), "err": t.last_error})
        while box:
            m = box.pop(0)
            if m == b"quit":
                log({"ev": "bye", "stats": t.stats(), "link": link.stats()})
                t.close()
                return
            okp = t.publish(BASE + "/echo", m, False, 1)
            log({"ev": "echo", "n": len(m), "ok": okp})
    log({"ev": "timeout", "stats": t.stats(), "link": link.stats()})
    t.close()

