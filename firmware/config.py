# Node configuration: bundle.json (identity, from `microfed provision`) and config.json (how
# this node runs), both read from the node's directory. Every field is checked here, once,
# so the node loop never sees a malformed value: a bad file stops the boot with a
# ConfigError naming the file and the field. Portable (MicroPython and CPython).

import json

BUNDLE_FORMAT = "microfed-bundle/1"
MODES = ("coordinated", "gossip")
PEER_CHECKS = ("announce", "signature")  # microfed.gossip.PEER_CHECKS
VECTOR_STORES = ("flash", "ram")
LINKS = ("tcp", "serial")
PRIVACY = ("none", "secagg")  # microfed_host.coordinator.PRIVACY (docs/privacy.md)

# config.json keys and their defaults (firmware/README.md documents each).
DEFAULTS = {
    "mode": "coordinated",
    "model": "softmax",
    "shard": "shard.bin",
    "state_dir": "state",
    "train": None,              # {"lr": raw Q16.16, "epochs", "batch", "seed": base seed}
    "max_rounds": 0,            # 0: run until a final GLOBAL_MODEL
    "broker": None,             # {"host", "port"[, "tls"]}: overrides the bundle's broker
    "link": "tcp",              # "tcp": the board's network; "serial": via `microfed bridge`
    "wifi": None,               # {"ssid", "password"}: overrides the bundle's wifi
    "wifi_timeout_ms": 20000,
    "keepalive": 30,
    "publish_timeout_ms": 5000,
    "io_timeout_ms": 5000,
    "max_msg": 16384,           # largest MQTT message kept (bytes); a 650-param global is ~3.3 KB
    "gossip_buffer": 0,         # peer updates buffered (two rounds); 0: 2 * per_sender * nodes
    "per_sender": 2,            # distinct verified updates kept per sender and round
    "max_abs": 256 * 65536,     # value range of a peer update (must equal the coordinator's)
    "peer_check": "announce",   # how peers' updates are trusted (microfed.gossip.PEER_CHECKS)
    "vectors": "flash",         # where peers' update vectors wait: "flash" (state_dir) or "ram"
    "status_interval_ms": 250,  # minimum gap between two STATUS frames
    "idle_exit_s": 0,           # exit (code 4) after this long without a GLOBAL_MODEL; 0: never
    "log": "",                  # "": stdout; else a file name in the node directory
    "seq_block": 64,            # sequence counters leased per flash write
    "dp": None,                 # DP: {"clip", "sigma2": [num, den], "noise", "nodes"} (microfed.dp);
                                # with privacy secagg: distributed DP, dp.clip the clip
    "privacy": "none",          # "secagg": secure aggregation (coordinated mode, FedAvg)
    "clip_l2": 16 << 16,        # secagg: exact L2 clip bound of the delta, raw Q16.16
}


def default_train():
    # microfed.model's TrainConfig defaults, so node and host agree unless told otherwise.
    from microfed.model import TrainConfig

    return TrainConfig().as_dict()


class ConfigError(Exception):
    pass


def _read_json(path, what):
    try:
        f = open(path)
    except OSError:
        raise ConfigError("%s: cannot open %s" % (path, what))
    try:
        try:
            doc = json.loads(f.read())
        except ValueError as e:  # incl. a UnicodeError while reading
            raise ConfigError("%s: not valid JSON (%s)" % (path, e))
        except (RuntimeError, MemoryError) as e:
            # Nesting deeper than the parser's recursion limit (RecursionError on CPython) or
            # than the heap: a malformed file like any other.
            raise ConfigError("%s: not valid JSON (%s)" % (path, type(e).__name__))
    finally:
        f.close()
    if not isinstance(doc, dict):
        raise ConfigError("%s: must be a JSON object" % path)
    return doc


def _int(doc, key, lo, hi, where):
    v = doc[key]
    if type(v) is not int or v < lo or v > hi:
        raise ConfigError("%s: '%s' must be an integer in %d..%d, got %r" % (where, key, lo, hi, v))
    return v


def _hex(doc, key, n, where):
    v = doc.get(key)
    if not isinstance(v, str) or len(v) != 2 * n:
        raise ConfigError("%s: '%s' must be %d hex characters" % (where, key, 2 * n))
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise ConfigError("%s: '%s' is not hex" % (where, key))


def _broker(v, where):
    if not isinstance(v, dict) or not isinstance(v.get("host"), str) or not v["host"]:
        raise ConfigError("%s: 'broker' must be {\"host\": str, \"port\": int}" % where)
    port = v.get("port", 1883)
    if type(port) is not int or not 0 < port < 65536:
        raise ConfigError("%s: broker port must be 1..65535" % where)
    tls = v.get("tls", False)
    if tls is not True and tls is not False:
        raise ConfigError("%s: broker 'tls' must be true or false" % where)
    return {"host": v["host"], "port": port, "tls": tls}


def _mqtt(v, where):
    # The node's broker login (provision writes it); None: connect anonymously.
    if v is None:
        return None
    if (not isinstance(v, dict) or not isinstance(v.get("username"), str) or not v["username"]
            or not isinstance(v.get("password"), str)):
        raise ConfigError("%s: 'mqtt' must be {\"username\": str, \"password\": str}" % where)
    return {"username": v["username"], "password": v["password"]}


def _wifi(v, where):
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("ssid"), str) or not v["ssid"]:
        raise ConfigError("%s: 'wifi' must be {\"ssid\": str, \"password\": str}" % where)
    pw = v.get("password", "")
    if not isinstance(pw, str):
        raise ConfigError("%s: wifi password must be a string" % where)
    return {"ssid": v["ssid"], "password": pw}


class Bundle:
    """What `microfed provision` wrote for this node (read_bundle fills it). The registry frame
    is verified later, against the pinned coordinator key, by the node.
    Fields only, like Config: no method of this module stays referenced once the files are
    read, so main.boot can drop the module (its functions and tables: ~1 KB of a 32-bit node's
    heap, benchmarks/node_boot_heap.py)."""

    mesh: str
    node_id: str
    mesh_id: bytes
    seed: bytes
    public_key: bytes
    coordinator_key: bytes
    registry_frame: "bytes | None"  # the node drops it once checked
    registry_version: int
    broker: "dict | None"
    wifi: "dict | None"
    mqtt: "dict | None"
    broker_ca: "bytes | None"


class Config:
    """How this node runs: config.json over DEFAULTS (read_config fills it); fields only."""

    mode: str
    model: str
    shard: str
    state_dir: str
    train: dict
    max_rounds: int
    broker: "dict | None"
    link: str
    wifi: "dict | None"
    wifi_timeout_ms: int
    keepalive: int
    publish_timeout_ms: int
    io_timeout_ms: int
    max_msg: int
    gossip_buffer: int
    per_sender: int
    max_abs: int
    peer_check: str
    vectors: str
    status_interval_ms: int
    idle_exit_s: int
    log: str
    seq_block: int
    dp: "dict | None"
    privacy: str
    clip_l2: int


def read_bundle(path):
    """The Bundle in `path` (bundle.json), every field checked; raises ConfigError."""
    d = _read_json(path, "the node bundle (microfed provision ... bundles/ID.json)")
    b = Bundle()
    if d.get("format") != BUNDLE_FORMAT:
        raise ConfigError("%s: not a %s file" % (path, BUNDLE_FORMAT))
    for key in ("mesh", "node_id"):
        if not isinstance(d.get(key), str) or not d[key]:
            raise ConfigError("%s: '%s' missing" % (path, key))
    b.mesh = d["mesh"]
    b.node_id = d["node_id"]
    b.mesh_id = _hex(d, "mesh_id", 8, path)
    b.seed = _hex(d, "seed", 32, path)
    b.public_key = _hex(d, "public_key", 32, path)
    b.coordinator_key = _hex(d, "coordinator_public_key", 32, path)
    rf = d.get("registry_frame")
    if not isinstance(rf, str) or len(rf) % 2 or len(rf) > 2 * 65536:
        raise ConfigError("%s: 'registry_frame' must be the signed registry in hex" % path)
    try:
        b.registry_frame = bytes.fromhex(rf)
    except ValueError:
        raise ConfigError("%s: 'registry_frame' is not hex" % path)
    b.registry_version = d.get("registry_version", 0)
    if type(b.registry_version) is not int or b.registry_version < 0:
        raise ConfigError("%s: 'registry_version' must be an integer >= 0" % path)
    b.broker = _broker(d.get("broker"), path) if d.get("broker") is not None else None
    b.wifi = _wifi(d.get("wifi"), path)
    b.mqtt = _mqtt(d.get("mqtt"), path)
    ca = d.get("broker_ca")
    if ca is not None and (not isinstance(ca, str) or len(ca) % 2):
        raise ConfigError("%s: 'broker_ca' must be the mesh CA certificate (DER) in hex" % path)
    try:
        b.broker_ca = bytes.fromhex(ca) if ca else None
    except ValueError:
        raise ConfigError("%s: 'broker_ca' is not hex" % path)
    return b


def read_config(path=None, doc=None):
    """The Config in `path` (config.json), or of `doc` (a dict) when path is None; every
    field checked; raises ConfigError."""
    where = path or "config"
    if doc is None:
        doc = _read_json(path, "the node config") if path else {}
    for key in doc:
        if key not in DEFAULTS:
            raise ConfigError("%s: unknown key '%s'" % (where, key))
    d = dict(DEFAULTS)
    d.update(doc)
    if d["mode"] not in MODES:
        raise ConfigError("%s: 'mode' must be one of %s" % (where, ", ".join(MODES)))
    for key, allowed in (("peer_check", PEER_CHECKS), ("vectors", VECTOR_STORES)):
        if d[key] not in allowed:
            raise ConfigError("%s: '%s' must be one of %s" % (where, key, ", ".join(allowed)))
    if d["privacy"] not in PRIVACY:
        raise ConfigError("%s: 'privacy' must be one of %s" % (where, ", ".join(PRIVACY)))
    if d["privacy"] == "secagg" and d["mode"] != "coordinated":
        raise ConfigError("%s: 'privacy' secagg needs 'mode' coordinated" % where)
    if d["link"] not in LINKS:
        raise ConfigError("%s: 'link' must be one of %s" % (where, ", ".join(LINKS)))
    for key in ("model", "shard", "state_dir", "log"):
        if not isinstance(d[key], str):
            raise ConfigError("%s: '%s' must be a string" % (where, key))
    if not d["model"] or not d["shard"] or not d["state_dir"]:
        raise ConfigError("%s: 'model', 'shard' and 'state_dir' must not be empty" % where)
    for key, lo, hi in (("max_rounds", 0, 0xFFFFFFFE), ("wifi_timeout_ms", 1, 600000),
                        ("keepalive", 0, 65535), ("publish_timeout_ms", 1, 600000),
                        ("io_timeout_ms", 1, 600000), ("max_msg", 256, 1 << 20),
                        ("gossip_buffer", 0, 4096),
                        ("per_sender", 1, 16), ("max_abs", 1, 0x7FFFFFFF),
                        ("status_interval_ms", 0, 600000), ("idle_exit_s", 0, 1 << 30),
                        ("seq_block", 1, 1 << 20), ("clip_l2", 1, 0x7FFFFFFF)):
        _int(d, key, lo, hi, where)
    tr = default_train()
    if d["train"] is not None:
        if not isinstance(d["train"], dict):
            raise ConfigError("%s: 'train' must be an object" % where)
        for key in d["train"]:
            if key not in tr:
                raise ConfigError("%s: unknown key 'train.%s'" % (where, key))
        tr.update(d["train"])
    for key, lo, hi in (("lr", 1, 0x7FFFFFFF), ("epochs", 1, 1000), ("batch", 1, 1 << 16),
                        ("seed", 0, 0xFFFFFFFF)):
        _int(tr, key, lo, hi, where + " train")
    d["train"] = tr
    if d["dp"] is not None:
        from microfed import dp

        try:
            nd = dp.node_dp(d["dp"], 0, "")  # checked here; the node builds its own
        except ValueError as e:
            raise ConfigError("%s: %s" % (where, e))
        shares = d["dp"].get("nodes", 1)
        if d["privacy"] == "secagg":
            # Distributed DP: dp.clip is the one clip (microfed.noderound.secagg_begin).
            if "clip_l2" in doc and doc["clip_l2"] != nd.clip:
                raise ConfigError("%s: with 'privacy' secagg and 'dp', 'dp.clip' is the "
                                  "clip: drop 'clip_l2' (or make it equal)" % where)
        elif shares != 1:
            raise ConfigError("%s: 'dp.nodes' %d (a share of distributed DP) needs "
                              "'privacy' secagg: alone, a share protects nothing"
                              % (where, shares))
    if d["broker"] is not None:
        d["broker"] = _broker(d["broker"], where)
    d["wifi"] = _wifi(d["wifi"], where)
    c = Config()
    c.mode = d["mode"]
    c.model = d["model"]
    c.shard = d["shard"]
    c.state_dir = d["state_dir"]
    c.train = d["train"]
    c.max_rounds = d["max_rounds"]
    c.broker = d["broker"]
    c.link = d["link"]
    c.wifi = d["wifi"]
    c.wifi_timeout_ms = d["wifi_timeout_ms"]
    c.keepalive = d["keepalive"]
    c.publish_timeout_ms = d["publish_timeout_ms"]
    c.io_timeout_ms = d["io_timeout_ms"]
    c.max_msg = d["max_msg"]
    c.gossip_buffer = d["gossip_buffer"]
    c.per_sender = d["per_sender"]
    c.max_abs = d["max_abs"]
    c.peer_check = d["peer_check"]
    c.vectors = d["vectors"]
    c.status_interval_ms = d["status_interval_ms"]
    c.idle_exit_s = d["idle_exit_s"]
    c.log = d["log"]
    c.seq_block = d["seq_block"]
    c.dp = d["dp"]
    c.privacy = d["privacy"]
    c.clip_l2 = d["clip_l2"]
    return c


def load(bundle_path="bundle.json", config_path="config.json"):
    """(Bundle, Config); a missing config.json means all defaults."""
    bundle = read_bundle(bundle_path)
    try:
        f = open(config_path)
        f.close()
        cfg = read_config(config_path)
    except OSError:
        cfg = read_config(None, {})
    return bundle, cfg
