"""On-device benchmark, Ed25519 vectors (where the board can) and a one-round mini-mesh (where
the board has a network and a broker was given)."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from microfed import aggregate as agg
from microfed import vecgen
from microfed_tools import devicevectors as dv
from microfed_tools import rawrepl

ROOT = dv.ROOT


def _core_files(repl, device, names):
    """Write shared/microfed/<names> to <root>lib/microfed/ (verified) and make it importable.
    Firmware with microfed frozen in has them already (and may have no filesystem)."""
    if device.cap("frozen_core", False):
        return
    for name in ("__init__",) + tuple(names):
        data = (ROOT / "shared" / "microfed" / (name + ".py")).read_bytes()
        path = device.root + "lib/microfed/%s.py" % name
        if repl.file_checksum(path) != rawrepl.checksum(data):
            repl.write_file(path, data)
    repl.exec("import sys\nif 'lib' not in sys.path:\n sys.path.insert(0,'lib')")


# ------------------------------------------------------------------ benchmark


def test_device_benchmark_krum(device):
    """Krum time and free heap on the device; the result must also match the reference."""
    n = 5
    d = max(2, min(64, (dv.case_budget(device.heap_bytes) - n * n) // n))
    ids = ["b%d" % i for i in range(n)]
    vecs = vecgen.vectors(2024, n, d, -(1 << 20), 1 << 20)
    want_vec, want_sel, want_scores = agg.krum(ids, vecs, 1)

    ns = dv.DeviceNamespace(device.repl, dv.core_library(), max(2000, device.heap_bytes // 3))
    ns.ensure(["krum"])
    flat = [x for v in vecs for x in v]
    device.repl.upload_data(struct.pack("<%di" % len(flat), *flat), what="benchmark inputs")
    device.repl.exec_verified(
        "def _mfb():\n"
        " import ustruct as s, time, gc\n"
        " global _mfD\n"
        " V=[list(s.unpack('<%di',_mfD[i*%d:(i+1)*%d])) for i in range(%d)]\n"
        " _mfD=None\n"
        " gc.collect()\n"
        " f0=gc.mem_free()\n"
        " t=time.ticks_ms()\n"
        " r=krum(%r,V,1)\n"
        " ms=time.ticks_diff(time.ticks_ms(),t)\n"
        " return ms,f0,gc.mem_free(),r[1],r[2]\n" % (d, 4 * d, 4 * d, n, ids),
        what="benchmark")
    ms, free_before, free_after, sel, scores = dv._literal(
        device.repl.exec("print(repr(_mfb()))\ndel _mfb", timeout=120), "benchmark")
    print("\n[hil benchmark] %s: krum n=%d d=%d f=1: %d ms, free heap %d B before, %d B after"
          % (device.name, n, d, ms, free_before, free_after))
    assert isinstance(ms, int) and ms >= 0
    assert free_before > 0 and free_after >= 0
    assert sel == want_sel and scores == want_scores


# -------------------------------------------------------------------- Ed25519

# RFC 8032 section 7.1, tests 1-3: (secret seed, message).
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60", ""),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb", "72"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7", "af82"),
]


def test_ed25519_vectors_on_device(device):
    if not device.cap("ed25519_on_device", False):
        pytest.skip("board %s: profile says ed25519_on_device = false (heap budget %d B)"
                    % (device.name, device.heap_bytes))
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    repl = device.repl
    _core_files(repl, device, ["sha512", "ed25519"])
    repl.exec("from microfed import ed25519 as _e", timeout=60)
    for seed_hex, msg_hex in RFC8032:
        seed, msg = bytes.fromhex(seed_hex), bytes.fromhex(msg_hex)
        key = Ed25519PrivateKey.from_private_bytes(seed)
        want_pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        want_sig = key.sign(msg)
        out = repl.exec_verified(
            "import time\n_s=%s\n_m=%s\n_t=time.ticks_ms()\n_p=_e.public_key(_s)\n"
            "_g=_e.sign(_s,_m)\n_t1=time.ticks_ms()\n_ok=_e.verify(_p,_m,_g)\n"
            "_t2=time.ticks_ms()\n_bad=_e.verify(_p,_m+b'x',_g)\n"
            "print(repr((_p,_g,_ok,_bad,time.ticks_diff(_t1,_t),time.ticks_diff(_t2,_t1))))\n"
            % (rawrepl.bytes_literal(seed), rawrepl.bytes_literal(msg)), timeout=120,
            what="ed25519 vector")
        pub, sig, ok, bad, sign_ms, verify_ms = dv._literal(out, "ed25519")
        print("\n[hil ed25519] %s: msg %d B: sign %d ms, verify %d ms"
              % (device.name, len(msg), sign_ms, verify_ms))
        assert pub == want_pub
        assert sig == want_sig
        assert ok is True and bad is False


# ------------------------------------------------------------------ mini-mesh


def test_one_round_mini_mesh(device, request):
    """The device joins the host's broker with firmware/mqttc.py, receives a global model,
    publishes its update; the host checks the bytes against the reference."""
    broker = request.config.getoption("--broker")
    network = device.cap("network", "none")
    if network == "none":
        pytest.skip("board %s has no network (profile: network = none)" % device.name)
    if not broker:
        pytest.skip("no --broker HOST:PORT given (an MQTT broker the board can reach)")
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        pytest.skip("paho-mqtt not installed: pip install paho-mqtt")
    host, _, port_s = broker.partition(":")
    port = int(port_s or 1883)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        pytest.fail("broker %s unreachable from the host: %s" % (broker, e))

    repl = device.repl
    client = (ROOT / "firmware" / "mqttc.py").read_bytes()
    if repl.exec("try:\n import mqttc\n print('FROZEN')\nexcept ImportError:\n print('NO')"
                 ).strip() != "FROZEN":
        repl.write_file(device.root + "lib/mqttc.py", client)
    _core_files(repl, device, ["q16"])

    tag = os.urandom(4).hex()
    t_global, t_update = "microfed/hil/%s/global" % tag, "microfed/hil/%s/update" % tag
    model = [65536, -32768, 98304, 7]
    local = [131072, 65536, -65536, 3]
    from microfed import q16
    want = struct.pack("<4i", *q16.vadd(model, local))

    got: list[bytes] = []
    cli = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hil-" + tag)
    cli.on_message = lambda c, u, m: got.append(m.payload)
    cli.connect(host, port)
    cli.subscribe(t_update, qos=0)
    cli.loop_start()
    try:
        # Retained, so the device gets it whenever it subscribes.
        cli.publish(t_global, struct.pack("<4i", *model), qos=1, retain=True).wait_for_publish(5)
        repl.exec_verified(
            "import sys\nif 'lib' not in sys.path:\n sys.path.insert(0,'lib')\n"
            "import socket, ustruct, mqttc\nfrom microfed import q16\n"
            "_box=[]\n_s=socket.socket()\n_s.settimeout(10)\n"
            "_s.connect(socket.getaddrinfo(%r,%d)[0][-1])\n"
            "_c=mqttc.Client(_s,16384,lambda t,m:_box.append(m))\n"
            "_c.connect(%r,0,True,None,None,None,10000)\n_c.subscribe(%r,0,10000)\n"
            "while not _box and _c.readable(10000):\n _c.packet()\n"
            "_g=list(ustruct.unpack('<4i',_box[0]))\n"
            "_c.publish(%r,ustruct.pack('<4i',*q16.vadd(_g,%r)))\n_c.disconnect()\n_s.close()\n"
            "print('SENT')\n"
            % (host, port, "dev-" + tag, t_global, t_update, local), timeout=60, what="mini-mesh")
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cli.publish(t_global, b"", retain=True)
        cli.loop_stop()
        cli.disconnect()
    assert got, "no update from the device within 10 s"
    assert got[0] == want
