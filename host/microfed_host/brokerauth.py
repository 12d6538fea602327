"""Broker authentication for a provisioned mesh: MQTT passwords, a mosquitto password file,
a topic ACL and a small TLS PKI, all kept in the mesh directory (docs/security.md, "Broker
authentication"). provision.py calls write_broker_files() after every init/add/revoke.

    broker/passwd         mosquitto 2.0 password file ($7$: PBKDF2-SHA512), active users only
    broker/acl            mosquitto ACL: who may publish/subscribe what
    broker/mosquitto.conf a ready-to-run example (plain listener + TLS listener)
    broker/ca.crt, ca.key       the mesh's CA (key 0600; ca.crt goes to every client)
    broker/broker.crt, .key     the broker's certificate (SAN localhost, 127.0.0.1, --broker host)
    coordinator.mqtt      {"username", "password"} of the coordinator (0600)
    nodes/ID.mqtt         {"username", "password"} of one node (0600; copied into its bundle)

The Ed25519 signatures stay the mesh's real security; broker auth keeps strangers off the
broker (no anonymous flooding, no publishing on a node's topic, no reading the global model)
and makes revocation reach the broker too.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
from pathlib import Path
from typing import Any

from microfed import wire
from microfed_host import keys

COORDINATOR_USER = wire.COORDINATOR  # reserved: no node may take this id
# Read-only login for operators' tools: the alerts topic and nothing else (also reserved).
MONITOR_USER = "monitor"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes
SALT_BYTES = 12
BROKER_DIR = "broker"
TLS_PORT = 8883


class BrokerAuthError(Exception):
    pass


def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """The mosquitto 2.0 `$7$` hash: $7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return "$7$%d$%s$%s" % (iterations, base64.b64encode(salt).decode(), base64.b64encode(dk).decode())


def check_password(password: str, hashed: str) -> bool:
    """Verify a `$7$` hash (used by the embedded amqtt broker's auth plugin)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(want))
    return secrets.compare_digest(got, want)


def read_password_file(path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            user, sep, h = line.partition(":")
            if sep:
                users[user] = h
    return users


def new_password() -> str:
    return secrets.token_urlsafe(24)  # 192 bits; URL-safe: no ':' or whitespace


def topic_base(mesh: str) -> str:
    return f"microfed/{mesh}/"


def node_acl(mesh: str, node_id: str) -> list[tuple[str, str]]:
    """(access, topic) pairs of one node: publish its own update/digest/hello/secagg frames,
    read the coordinator's global, registry and secagg-round, its own notices and the peers'
    updates (gossip)."""
    b = topic_base(mesh)
    return [("write", b + "update/" + node_id), ("write", b + "digest/" + node_id),
            ("write", b + "hello/" + node_id), ("read", b + "global"), ("read", b + "registry"),
            ("read", b + "notice/" + node_id), ("read", b + "update/+"),
            ("write", b + "secagg/" + node_id), ("read", b + "secagg-round")]


def coordinator_acl(mesh: str) -> list[tuple[str, str]]:
    b = topic_base(mesh)
    return [("readwrite", b + "global"), ("readwrite", b + "registry"), ("read", b + "update/+"),
            ("read", b + "digest/+"), ("read", b + "hello/+"), ("write", b + "notice/+"),
            ("read", b + "secagg/+"), ("readwrite", b + "secagg-round"),
            ("write", b + "alerts")]


def monitor_acl(mesh: str) -> list[tuple[str, str]]:
    """What an operator's tool may do: read the alerts (`--alerts mqtt`)."""
    return [("read", topic_base(mesh) + "alerts")]


def acl_text(mesh: str, node_ids: list[str]) -> str:
    users = [(COORDINATOR_USER, coordinator_acl(mesh)), (MONITOR_USER, monitor_acl(mesh))]
    users += [(nid, node_acl(mesh, nid)) for nid in node_ids]
    return users_acl_text(mesh, users, "`microfed provision`; do not edit: init/add/revoke "
                          "rewrite it")


def users_acl_text(mesh: str, users: list[tuple[str, list[tuple[str, str]]]], by: str) -> str:
    """A mosquitto ACL file: one `user` block of `topic ACCESS TOPIC` lines per user."""
    out = [f"# microfed broker ACL for mesh {mesh!r} (written by {by}).",
           "# Anything not listed is denied."]
    for user, rules in users:
        out += ["", f"user {user}"]
        out += [f"topic {a} {t}" for a, t in rules]
    return "\n".join(out) + "\n"


# -- hierarchical meshes (microfed_host.hier, docs/hierarchy.md) -------------------------
# An edge coordinator publishes its signed edge update on microfed/<mesh>/up/<edge> at its
# site's broker; the site's bridge carries exactly that topic to the root broker, renamed
# microfed/<mesh>/update/<edge>, and carries the root's global and registry down.
EDGE_UP = "up/"


def edge_bridge_acl(mesh: str, edge: str) -> list[tuple[str, str]]:
    """At the root broker, an edge's bridge login: its own edge update up, the root's
    global and registry down; nothing else crosses."""
    b = topic_base(mesh)
    return [("write", b + "update/" + edge), ("read", b + "global"), ("read", b + "registry")]


def edge_site_acl(mesh: str, edge: str) -> list[tuple[str, str]]:
    """At a site's broker, the edge coordinator: its nodes' updates, hellos and digests, its
    notices, its own edge-update topic; it only reads the global (the bridge writes the
    root's there: an edge cannot even try to hand its nodes a global of its own)."""
    b = topic_base(mesh)
    return [("read", b + "global"), ("readwrite", b + "registry"), ("read", b + "update/+"),
            ("read", b + "digest/+"), ("read", b + "hello/+"), ("write", b + "notice/+"),
            ("readwrite", b + EDGE_UP + edge)]


def write_auth_files(bd: Path, creds: list[dict[str, str]], acl: str) -> None:
    """passwd (mosquitto $7$ hashes of `creds`) and acl in broker directory `bd`, 0600."""
    bd = Path(bd)
    bd.mkdir(parents=True, exist_ok=True)
    lines = [f"{c['username']}:{hash_password(c['password'])}" for c in creds]
    keys.write_secret_file(bd / "passwd", "\n".join(lines) + "\n")
    keys.write_secret_file(bd / "acl", acl)


def bridge_lines(mesh: str, edge: str, root: tuple[str, int], login: dict[str, str]) -> list[str]:
    """mosquitto.conf lines of a site broker's bridge to the root broker (mosquitto 2.0):
    the root's retained global and registry in, the edge's update out (renamed from up/ to
    update/ and sent without the retain flag); `login`: the edge's credentials at the root.
    Nothing else crosses in either direction."""
    b = topic_base(mesh)
    if any(c.isspace() for c in mesh + edge):
        raise BrokerAuthError(f"mesh {mesh!r} / edge {edge!r}: no whitespace in a bridge topic")
    return [f"connection microfed-bridge-{edge}", f"address {root[0]}:{root[1]}",
            "bridge_protocol_version mqttv311", f"remote_clientid microfed-bridge-{edge}",
            f"remote_username {login['username']}", f"remote_password {login['password']}",
            "cleansession false", "try_private true", "notifications false",
            "bridge_outgoing_retain false", "restart_timeout 1 5", "start_type automatic",
            f"topic {b}global in 1", f"topic {b}registry in 1",
            f"topic {edge} out 1 {b}{EDGE_UP} {b}update/"]


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    """The `user` / `topic ACCESS TOPIC` lines of a mosquitto ACL file (what acl_text
    writes): user -> [(access, topic)]."""
    rules: dict[str, list[tuple[str, str]]] = {}
    user: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            user = rest.strip()
            rules.setdefault(user, [])
        elif word == "topic" and user is not None:
            access, _, topic = rest.strip().partition(" ")
            if access in ("read", "write", "readwrite") and topic:
                rules[user].append((access, topic.strip()))
    return rules


# -- the mesh directory's files ---------------------------------------------------------
def broker_dir(root: Path) -> Path:
    return Path(root) / BROKER_DIR


def cred_path(root: Path, user: str) -> Path:
    if user == COORDINATOR_USER:
        return Path(root) / "coordinator.mqtt"
    if user == MONITOR_USER:
        return Path(root) / "monitor.mqtt"
    return Path(root) / "nodes" / f"{user}.mqtt"


def read_credentials(root: Path, user: str) -> dict[str, str] | None:
    """{"username", "password"} of `user` (COORDINATOR_USER or a node id), or None for a mesh
    provisioned before broker authentication existed."""
    p = cred_path(root, user)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BrokerAuthError(f"{p}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("username"), str) \
            or not isinstance(doc.get("password"), str):
        raise BrokerAuthError(f"{p}: must be {{\"username\": str, \"password\": str}}")
    return {"username": doc["username"], "password": doc["password"]}


def ensure_credentials(root: Path, user: str) -> dict[str, str]:
    c = read_credentials(root, user)
    if c is None:
        c = {"username": user, "password": new_password()}
        p = cred_path(root, user)
        p.parent.mkdir(parents=True, exist_ok=True)
        keys.write_secret_file(p, json.dumps(c) + "\n")
    return c


def client_auth(root: Path, user: str = COORDINATOR_USER) -> dict[str, Any]:
    """Keyword arguments for HostMQTT (username, password and, when mesh.json's broker says
    "tls": true, tls_ca): empty for a mesh provisioned without broker credentials."""
    root = Path(root)
    c = read_credentials(root, user)
    out: dict[str, Any] = {}
    if c is not None:
        out = {"username": c["username"], "password": c["password"]}
    try:
        broker = json.loads((root / "mesh.json").read_text()).get("broker", {})
    except (OSError, ValueError, AttributeError):
        broker = {}
    if isinstance(broker, dict) and broker.get("tls") is True:
        out["tls_ca"] = str(broker_dir(root) / "ca.crt")
    return out


def apply_paho(client: Any, auth: dict[str, Any]) -> None:
    """Set client_auth()'s login (and TLS) on a raw paho client before it connects."""
    if auth.get("username") is not None:
        client.username_pw_set(auth["username"], auth.get("password"))
    if auth.get("tls_ca"):
        client.tls_set(ca_certs=auth["tls_ca"])


def write_broker_files(root: Path, mesh: str, active: list[str], revoked: list[str],
                       broker_host: str) -> None:
    """(Re)write passwd, acl, TLS material (made once) and the example mosquitto.conf.
    Revoked nodes lose their credentials file, password line and ACL entries."""
    root = Path(root)
    bd = broker_dir(root)
    bd.mkdir(parents=True, exist_ok=True)
    for nid in revoked:
        cred_path(root, nid).unlink(missing_ok=True)
    creds = [ensure_credentials(root, user) for user in [COORDINATOR_USER, MONITOR_USER, *active]]
    write_auth_files(bd, creds, acl_text(mesh, active))
    if not (bd / "ca.crt").exists() or not (bd / "broker.crt").exists():
        make_tls(bd, broker_host)
    (bd / "mosquitto.conf").write_text(mosquitto_conf_example(bd))


def mosquitto_user_line() -> str:
    """mosquitto started as root switches to this user (the one running us), who owns the
    0600 files it reads and can write its log in our directories (ignored when not root)."""
    return f"user {pwd.getpwuid(os.getuid()).pw_name}"


def mosquitto_auth_lines(bd: Path) -> list[str]:
    bd = Path(bd).resolve()
    return ["allow_anonymous false", f"password_file {bd / 'passwd'}", f"acl_file {bd / 'acl'}"]


def mosquitto_tls_lines(bd: Path, port: int, host: str = "") -> list[str]:
    bd = Path(bd).resolve()
    return [f"listener {port}{' ' + host if host else ''}", f"cafile {bd / 'ca.crt'}",
            f"certfile {bd / 'broker.crt'}", f"keyfile {bd / 'broker.key'}", "tls_version tlsv1.2"]


def mosquitto_conf_example(bd: Path) -> str:
    lines = ["# mosquitto 2.0 configuration for this mesh (written by `microfed provision`).",
             "# Run: mosquitto -c " + str(Path(bd).resolve() / "mosquitto.conf"),
             "# per_listener_settings false: the auth lines below apply to every listener.",
             "per_listener_settings false", *mosquitto_auth_lines(bd),
             "# The files above are 0600 and belong to whoever ran `microfed provision`: mosquitto",
             "# started as root switches to this user (ignored when not started as root).",
             mosquitto_user_line(), "",
             "# Plain MQTT (password auth, traffic in clear: a trusted LAN only).",
             "listener 1883", "",
             "# MQTT over TLS: clients verify broker.crt against ca.crt.",
             *mosquitto_tls_lines(bd, TLS_PORT)]
    return "\n".join(lines) + "\n"


# -- TLS ------------------------------------------------------------------------------------
def _san(host: str) -> list[Any]:
    from cryptography import x509

    names: list[Any] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    if host and host not in ("localhost", "127.0.0.1"):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            # Also as text: TLS stacks that match only DNS names (older mbedTLS) then match.
            names.append(x509.DNSName(host))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_tls(bd: Path, broker_host: str, days: int = 3650) -> None:
    """A P-256 CA and a broker certificate signed by it (SAN: localhost, 127.0.0.1 and the
    mesh's broker host). Keys 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "microfed mesh CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, broker_host or "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_san(broker_host)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    def pem_key(k: ec.EllipticCurvePrivateKey) -> str:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()).decode()

    keys.write_secret_file(bd / "ca.key", pem_key(ca_key))
    keys.write_secret_file(bd / "broker.key", pem_key(key))
    (bd / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (bd / "broker.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def ca_der(bd: Path) -> bytes:
    """The CA certificate in DER (what MicroPython's SSLContext.load_verify_locations takes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((Path(bd) / "ca.crt").read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)
