"""The broker refuses strangers: `microfed provision` writes a mosquitto password file and ACL
(and a TLS CA + broker certificate); a real mosquitto started with them refuses anonymous
clients and wrong passwords, silently drops publishes outside a client's ACL, forgets a
revoked node after SIGHUP, and serves TLS to clients that hold the mesh CA."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from microfed_host import brokerauth, upy
from microfed_host.broker import Broker, BrokerError, amqtt_available, find_mosquitto
from microfed_host.mqtt import HostMQTT, MQTTError
from microfed_host.provision import init_mesh, revoke_node

REPO = Path(__file__).resolve().parents[1]
MESH = "lab"
BASE = f"microfed/{MESH}/"

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install mosquitto)")


@pytest.fixture
def mesh(tmp_path: Path) -> Path:
    out = tmp_path / "mesh"
    init_mesh(out, MESH, 3, "127.0.0.1:1883")
    return out


@pytest.fixture
def broker(mesh: Path, tmp_path: Path) -> Iterator[Broker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    b = Broker("mosquitto", workdir=tmp_path / "broker", auth_dir=mesh / "broker", tls_port=0)
    with b:
        yield b


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_broker(request: pytest.FixtureRequest, mesh: Path, tmp_path: Path) -> Iterator[Broker]:
    """Both local brokers, given the same mesh files."""
    if request.param == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    if request.param == "amqtt" and not amqtt_available():
        pytest.skip("amqtt not importable (pip install amqtt)")
    with Broker(request.param, workdir=tmp_path / "broker", auth_dir=mesh / "broker") as b:
        yield b


def login(mesh: Path, user: str) -> dict[str, str]:
    c = brokerauth.read_credentials(mesh, user)
    assert c is not None
    return dict(c)


def connack(b: Broker, cid: str, port: int | None = None, username: str | None = None,
            password: str | None = None, tls_ca: str | None = None) -> str:
    """The broker's CONNACK verdict for one CONNECT, as paho names it ("Success",
    "Not authorized", ...)."""
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid)
    if username is not None:
        c.username_pw_set(username, password)
    if tls_ca is not None:
        c.tls_set(ca_certs=tls_ca)
    got: list[str] = []
    c.on_connect = lambda cl, ud, fl, rc, pr: got.append(str(rc))
    c.connect(b.host, port or b.port, 5)
    end = time.monotonic() + 5
    while not got and time.monotonic() < end:
        c.loop(0.1)
    c.disconnect()
    assert got, "no CONNACK"
    return got[0]


def client(b: Broker, cid: str, port: int | None = None, **kw: str) -> HostMQTT:
    return HostMQTT(b.host, port or b.port, cid, reconnect_max=1.0, **kw)  # type: ignore[arg-type]


# -- the files ----------------------------------------------------------------------------
def test_password_file_is_mosquittos_format(mesh: Path) -> None:
    users = brokerauth.read_password_file(mesh / "broker" / "passwd")
    assert sorted(users) == ["coordinator", "monitor", "node-01", "node-02", "node-03"]
    for user, h in users.items():
        assert h.startswith("$7$101$")
        assert brokerauth.check_password(login(mesh, user)["password"], h)
        assert not brokerauth.check_password("wrong", h)
    for p in [mesh / "broker" / "passwd", mesh / "broker" / "acl", mesh / "coordinator.mqtt",
              mesh / "monitor.mqtt",
              mesh / "nodes" / "node-01.mqtt", mesh / "broker" / "ca.key", mesh / "broker" / "broker.key"]:
        assert p.stat().st_mode & 0o777 == 0o600, p
    bundle = json.loads((mesh / "bundles" / "node-02.json").read_text())
    assert bundle["mqtt"] == login(mesh, "node-02")
    assert bytes.fromhex(bundle["broker_ca"]) == brokerauth.ca_der(mesh / "broker")
    assert len({login(mesh, u)["password"] for u in users}) == 5  # every login its own password


@pytest.mark.skipif(not Path("/usr/bin/mosquitto_passwd").exists(), reason="mosquitto_passwd not installed")
def test_mosquitto_passwd_hashes_are_checked_the_same_way(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("")
    subprocess.run(["/usr/bin/mosquitto_passwd", "-b", str(f), "alice", "s3cret"], check=True)
    h = brokerauth.read_password_file(f)["alice"]
    assert brokerauth.check_password("s3cret", h) and not brokerauth.check_password("s3cres", h)


def test_revoke_removes_the_login(mesh: Path) -> None:
    revoke_node(mesh, "node-02")
    users = brokerauth.read_password_file(mesh / "broker" / "passwd")
    assert sorted(users) == ["coordinator", "monitor", "node-01", "node-03"]
    assert "node-02" not in (mesh / "broker" / "acl").read_text()
    assert not (mesh / "nodes" / "node-02.mqtt").exists()


# -- a real mosquitto -------------------------------------------------------------------------
def test_anonymous_and_wrong_password_are_refused(mesh: Path, any_broker: Broker) -> None:
    assert connack(any_broker, "stranger") == "Not authorized"
    bad = login(mesh, "node-01")
    assert connack(any_broker, "node-01", **bad) == "Success"
    bad["password"] += "x"
    assert connack(any_broker, "node-01", **bad) == "Not authorized"
    # A user the broker has never heard of, with some password.
    assert connack(any_broker, "x", username="intruder", password="guess") == "Not authorized"
    # HostMQTT turns the refusal into an MQTTError.
    with pytest.raises(MQTTError):
        client(any_broker, "stranger").connect(1)


def _received(c: HostMQTT, wait: float) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + wait
    while time.monotonic() < end:
        m = c.get(0.05)
        if m is not None:
            got.append(m.topic)
    return got


def test_acl_delivers_own_topics_and_drops_the_rest(mesh: Path, any_broker: Broker) -> None:
    coord = client(any_broker, "coord", **login(mesh, "coordinator"))
    node = client(any_broker, "node-01", **login(mesh, "node-01"))
    peer = client(any_broker, "node-02", **login(mesh, "node-02"))
    try:
        coord.connect(5)
        for sub in ("update/+", "digest/+", "hello/+", "global"):
            coord.subscribe(BASE + sub)
        peer.connect(5)
        peer.subscribe(BASE + "global")
        peer.subscribe(BASE + "update/+")
        # A node may not listen to other nodes' digests and hellos: mosquitto 2.0.11 grants
        # the subscription (SUBACK 0) and its read check delivers nothing; amqtt refuses it.
        for sub in ("hello/+", "digest/+"):
            try:
                peer.subscribe(BASE + sub)
                assert any_broker.kind == "mosquitto"
            except MQTTError as e:
                assert "refused subscription" in str(e) and any_broker.kind == "amqtt"
        node.connect(5)
        # Not allowed: another node's topics, the coordinator's global model. mosquitto
        # acknowledges (MQTT 3.1.1 has no way to say no) and drops them.
        for topic in ("update/node-02", "digest/node-03", "hello/node-02", "global", "registry",
                      "update/intruder"):
            node.publish(BASE + topic, b"not yours")
        # Allowed: its own topics.
        for topic in ("update/node-01", "digest/node-01", "hello/node-01"):
            node.publish(BASE + topic, b"mine")
        coord.publish(BASE + "global", b"model")
        got = _received(coord, 1.0)
        assert sorted(got) == sorted(BASE + t for t in ("update/node-01", "digest/node-01",
                                                        "hello/node-01", "global"))
        assert sorted(_received(peer, 0.3)) == [BASE + "global", BASE + "update/node-01"]
    finally:
        for c in (coord, node, peer):
            c.close()


def test_monitor_reads_the_alerts_and_nothing_else(mesh: Path, any_broker: Broker) -> None:
    coord = client(any_broker, "coord", **login(mesh, "coordinator"))
    monitor = client(any_broker, "ops", **login(mesh, "monitor"))
    node = client(any_broker, "node-01", **login(mesh, "node-01"))
    try:
        coord.connect(5)
        coord.subscribe(BASE + "global")
        monitor.connect(5)
        monitor.subscribe(BASE + "alerts")
        node.connect(5)
        try:  # a node may not read the alerts (mosquitto grants and delivers nothing)
            node.subscribe(BASE + "alerts")
            assert any_broker.kind == "mosquitto"
        except MQTTError as e:
            assert "refused subscription" in str(e) and any_broker.kind == "amqtt"
        for topic in ("global", "alerts"):  # the monitor writes nothing
            monitor.publish(BASE + topic, b"not yours")
        coord.publish(BASE + "alerts", b'{"kind": "ban"}')
        assert _received(monitor, 1.0) == [BASE + "alerts"]
        assert _received(coord, 0.3) == []
        assert _received(node, 0.3) == []
    finally:
        for c in (coord, monitor, node):
            c.close()


def test_revoked_node_is_refused_after_reload(mesh: Path, any_broker: Broker) -> None:
    creds = login(mesh, "node-03")
    assert connack(any_broker, "node-03", **creds) == "Success"
    revoke_node(mesh, "node-03")
    any_broker.reload()
    time.sleep(0.5)  # mosquitto handles the signal in its main loop
    assert connack(any_broker, "node-03", **creds) == "Not authorized"
    assert connack(any_broker, "node-01", **login(mesh, "node-01")) == "Success"
    # A restart reads the same files.
    any_broker.restart()
    assert connack(any_broker, "node-03", **creds) == "Not authorized"
    assert connack(any_broker, "node-01", **login(mesh, "node-01")) == "Success"


# -- TLS ---------------------------------------------------------------------------------------
@needs_mosquitto
def test_tls_with_the_mesh_ca(mesh: Path, broker: Broker) -> None:
    assert broker.tls_port
    ca = str(mesh / "broker" / "ca.crt")
    coord = client(broker, "coord", **login(mesh, "coordinator"))
    node = client(broker, "node-01", port=broker.tls_port, tls_ca=ca, **login(mesh, "node-01"))
    try:
        coord.connect(5)
        coord.subscribe(BASE + "update/+")
        node.connect(5)
        node.publish(BASE + "update/node-01", b"over tls")
        m = coord.get(5)
        assert m is not None and m.payload == b"over tls"
    finally:
        coord.close()
        node.close()
    # Without the mesh CA (the system's trust store only) the handshake fails.
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="no-ca")
    c.tls_set()
    with pytest.raises(ssl.SSLCertVerificationError):
        c.connect(broker.host, broker.tls_port, 5)
    # Password auth holds on the TLS listener too.
    assert connack(broker, "anon-tls", port=broker.tls_port, tls_ca=ca) == "Not authorized"


NODE_TLS = r"""
import config, main
from mqtt import Transport
b = config.read_bundle(%(bundle)r)
if not %(good)r:
    b.broker_ca = None
try:
    ctx = main._tls(b, {"host": %(host)r, "port": %(port)d, "tls": True})
except main.BootError as e:
    print("BOOT_ERROR", e)
    import tls
    ctx = tls.SSLContext(tls.PROTOCOL_TLS_CLIENT)  # no CA at all: verification must fail
    ctx.verify_mode = tls.CERT_REQUIRED
t = Transport(b.node_id, %(host)r, %(port)d, user=b.mqtt["username"],
              password=b.mqtt["password"], ssl=ctx)
ok = t.connect(5000)
print("CONNECTED" if ok else "FAILED " + repr(t.last_error))
if ok:
    print("PUBLISHED" if t.publish(%(topic)r, b"from micropython", False, 1) else "NOPUB")
    t.close()
"""


@needs_mosquitto
@pytest.mark.parametrize("good", [True, False], ids=["mesh-ca", "no-ca"])
def test_micropython_node_over_tls(mesh: Path, broker: Broker, tmp_path: Path, good: bool) -> None:
    exe = upy.find_micropython()
    if exe is None:
        pytest.skip(f"MicroPython unix port missing: {upy.INSTALL_HINT}")
    probe = subprocess.run([exe, "-c", "import tls; print(tls.MBEDTLS_VERSION)"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"this MicroPython unix port has no tls module (built without mbedTLS): "
                    f"{probe.stderr.strip()[-200:]}")
    coord = client(broker, "coord", **login(mesh, "coordinator"))
    coord.connect(5)
    coord.subscribe(BASE + "update/+")
    script = tmp_path / "tls_node.py"
    paths = os.pathsep.join([str(REPO / "shared"), str(REPO / "firmware")])
    script.write_text(NODE_TLS % {"bundle": str(mesh / "bundles" / "node-01.json"),
                                  "host": "127.0.0.1", "port": broker.tls_port, "good": good,
                                  "topic": BASE + "update/node-01"})
    env = dict(os.environ, MICROPYPATH=paths)
    try:
        r = subprocess.run([exe, str(script)], capture_output=True, text=True, timeout=60, env=env)
        if good:
            assert "CONNECTED" in r.stdout and "PUBLISHED" in r.stdout, r.stdout + r.stderr
            m = coord.get(5)
            assert m is not None and m.payload == b"from micropython"
        else:
            assert "BOOT_ERROR" in r.stdout and "no 'broker_ca'" in r.stdout, r.stdout + r.stderr
            assert "FAILED" in r.stdout, r.stdout + r.stderr
            assert coord.get(0.5) is None
    finally:
        coord.close()


@needs_mosquitto
def test_the_example_mosquitto_conf_runs(mesh: Path, tmp_path: Path) -> None:
    """broker/mosquitto.conf as written (only its two ports moved to free ones on 127.0.0.1)."""
    from microfed_host.broker import free_port

    plain, tls = free_port(), free_port()
    text = (mesh / "broker" / "mosquitto.conf").read_text()
    text = text.replace("listener 1883\n", f"listener {plain} 127.0.0.1\n")
    text = text.replace(f"listener {brokerauth.TLS_PORT}\n", f"listener {tls} 127.0.0.1\n")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    exe = find_mosquitto()
    assert exe is not None
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        b = Broker("external", external=f"127.0.0.1:{plain}", auth_dir=mesh / "broker")
        for _ in range(100):  # until it answers (a refusal counts as up)
            try:
                b.start()
                break
            except BrokerError:
                time.sleep(0.1)
        else:
            pytest.fail("mosquitto did not start: " + (tmp_path / "mosquitto.log").read_text())
        node = login(mesh, "node-01")
        ca = str(mesh / "broker" / "ca.crt")
        assert connack(b, "n", **node) == "Success"
        assert connack(b, "anon") == "Not authorized"
        assert connack(b, "n", port=tls, tls_ca=ca, **node) == "Success"
        assert connack(b, "anon", port=tls, tls_ca=ca) == "Not authorized"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@needs_mosquitto
def test_a_tls_mesh_gives_the_coordinator_the_ca(tmp_path: Path) -> None:
    """provision init --tls: mesh.json and the bundles say tls; client_auth() (what the
    coordinator's serve() applies to its paho client) adds the CA; that client connects to
    the TLS listener."""
    mesh = tmp_path / "tlsmesh"
    init_mesh(mesh, MESH, 2, "127.0.0.1:8883", tls=True)
    assert json.loads((mesh / "bundles" / "node-01.json").read_text())["broker"]["tls"] is True
    auth = brokerauth.client_auth(mesh)
    assert auth["username"] == "coordinator" and auth["tls_ca"].endswith("broker/ca.crt")
    with Broker("mosquitto", workdir=tmp_path / "b", auth_dir=mesh / "broker", tls_port=0) as b:
        assert b.tls_port
        c = client(b, "coord", port=b.tls_port, **auth)
        try:
            c.connect(5)
            c.publish(BASE + "global", b"ok")
        finally:
            c.close()
        raw = paho.Client(CallbackAPIVersion.VERSION2, client_id="coord-raw")
        brokerauth.apply_paho(raw, auth)
        raw.connect(b.host, b.tls_port, 5)
        raw.disconnect()
