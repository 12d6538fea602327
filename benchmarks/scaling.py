"""The scale model's measurements (docs/scaling.md): round time and the coordinator's and the
broker's load at growing mesh sizes, on both engines, and what one broker can carry.

    python benchmarks/scaling.py --sizes 10,50,200 --rounds 5 --engines inproc,mqtt \\
        [--mode coordinated|gossip] [--f F] [--rabbitmq NODE:MQTT_PORT:PIDFILE] \\
        [--json FILE] [--write docs/scaling.md [--label sizes]]
    python benchmarks/scaling.py --load-test [--publishers 1,2,4] [--seconds 5] \\
        [--size 2700] [--broker mosquitto|HOST:PORT] [--write docs/scaling.md]
    python benchmarks/scaling.py --quorum 10,50,200,1000 [--write docs/scaling.md]
    python benchmarks/scaling.py --acl-probe [--rabbitmq NODE:MQTT_PORT:PIDFILE]
    python benchmarks/scaling.py --model SIZES.jsonl,LOAD.jsonl,QUORUM.jsonl \\
        [--write docs/scaling.md]

--load-test measures mosquitto alone (publishers -> one subscriber: its CPU per message);
--quorum times the coordinator's quorum check (quorum_check()); --acl-probe asks a broker
what it does with a mesh's logins and ACL (acl_probe()); --model fits the records of earlier
runs and extrapolates per tier (model()), running nothing; --rabbitmq runs the mqtt engine
against a running RabbitMQ node with the MQTT plugin instead of mosquitto (Rabbit).

Each size is one `mesh.run` of `--honest N --byzantine 0 --rule krum --f F` (F = --f, else
(N - 3) // 4, at least 1) over R rounds, coordinated mode by default: `inproc` is the
in-process engine, `mqtt` mosquitto + the coordinator process + N MicroPython unix-port node
processes, as `microfed mesh run` starts them. Every figure per round is the mean over
rounds 2..R (round 1 carries start-up: imports, keys, the nodes' HELLOs), so R >= 2:

- round_s: wall time per round, from the store's round close times;
- coord_cpu_s: the coordinator's CPU seconds per round (user + system): its process's
  (mqtt; what the coordinator reports in its round events, `Coordinator.cost()`), or the
  thread CPU inside its handle() and tick() (inproc, where the simulated nodes share the
  process); busy_share: the wall time inside handle() and tick() over round_s;
- fast_ms / ref_ms: the aggregation's CPU time on the numpy fast path and on the reference
  beside it (cross-check `always`; the coordinator thread's CPU time);
- coord_rss_mb: the coordinator's peak RSS (the in-process engine's includes every node);
- broker_cpu_s, broker_in_kb, broker_out_kb (mqtt): the mosquitto process's CPU seconds
  (schedstat, ns) and the bytes it read and wrote (/proc/PID/stat and /proc/PID/io, sampled every 50 ms and
  interpolated at the round close times): every PUBLISH, PUBACK and fan-out copy;
  broker_cpu_run_s: its CPU seconds over the whole run (from the coordinator's start);
  broker_run_in_kb / broker_run_out_kb: its bytes over the whole run (no interpolation);
- msgs, kb: messages and payload bytes published per round, by kind (update, digest,
  global), counted by a subscriber with the coordinator's login (mqtt; it adds one delivery
  per message to the broker's work) or, in-process, from the store (updates and digests)
  plus the one global; store_updates: the store's update rows per round (the counter must
  match them);
- node_rss_mb (mqtt): mean and largest peak RSS of the node processes (a CPython wrapper
  around the MicroPython unix port with a 4 MB heap).

--write replaces the text between `<!-- benchmarks/scaling.py LABEL -->` and
`<!-- end benchmarks/scaling.py LABEL -->` (LABEL: --label, else sizes, load, quorum or model) with the table, the date, the command and the load
average at start and end. Nothing is asserted here: tests/test_scaling.py runs this code
at a tiny size and checks the record.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _d in ("shared", "host", "tools"):
    if str(REPO / _d) not in sys.path:
        sys.path.insert(0, str(REPO / _d))

from microfed import wire  # noqa: E402
from microfed_host import brokerauth, mesh  # noqa: E402
from microfed_host.coordinator import peak_rss_kb  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markers import write_between  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PER_ROUND_KINDS = ("update", "digest", "global")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------ /proc sampling


def proc_cpu(pid: int) -> float | None:
    """CPU seconds of a process (None once it is gone): a one-thread process's (mosquitto's)
    time on a CPU in nanoseconds (/proc/PID/schedstat), else user + system of all its
    threads in clock ticks (/proc/PID/stat: 10 ms steps; RabbitMQ's Erlang VM)."""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) == 1:
            return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat.rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def proc_io(pid: int) -> tuple[int, int] | None:
    """(rchar, wchar): bytes the process passed to read() and write() (sockets included)."""
    try:
        d = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return None
    return int(d["rchar"]), int(d["wchar"])


def pids_of(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (this run's directory)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmd:
            out.append(int(d.name))
    return out


class Sampler(threading.Thread):
    """Samples one process (the broker) every `every` s: (time, cpu s, rchar, wchar); and
    the peak RSS of others (the nodes) as they come and go."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, float, int, int]] = []
        self.watch: dict[int, int] = {}  # pid -> peak RSS KB seen
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            for p in list(self.watch):
                self.watch[p] = max(self.watch[p], peak_rss_kb(p))
            self.halt.wait(self.every)

    def sample(self) -> None:
        cpu, io = proc_cpu(self.pid), proc_io(self.pid)
        if cpu is not None and io is not None:
            self.samples.append((time.time(), cpu, io[0], io[1]))

    def at(self, t: float) -> tuple[float, float, float]:
        """(cpu, rchar, wchar) at time t, interpolated between the samples around it."""
        s = self.samples
        if not s:
            raise RuntimeError("no samples of the broker process")
        if t <= s[0][0]:
            return s[0][1:]
        for a, b in zip(s, s[1:], strict=False):
            if a[0] <= t <= b[0]:
                w = (t - a[0]) / (b[0] - a[0]) if b[0] > a[0] else 0.0
                return tuple(x + w * (y - x) for x, y in zip(a[1:], b[1:], strict=True))  # type: ignore[return-value]
        return s[-1][1:]


# ------------------------------------------------------------------ counting subscriber


class Counter:
    """A subscriber with the coordinator's login on every topic that login may read: one
    (kind, round, payload bytes, topic bytes) per message it sees."""

    def __init__(self, host: str, port: int, mesh_name: str, mesh_dir: Path) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.seen: list[tuple[str, int, int, int]] = []
        self.subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"scaling-counter-{os.getpid()}")
        brokerauth.apply_paho(c, brokerauth.client_auth(mesh_dir))
        base = brokerauth.topic_base(mesh_name)
        subs = [(base + t, 0) for t in ("update/+", "digest/+", "hello/+", "global",
                                        "registry", "secagg/+", "secagg-round")]

        def on_connect(cl: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            cl.subscribe(subs)

        def on_subscribe(_c: Any, _u: Any, _mid: Any, _rc: Any, _p: Any = None) -> None:
            self.subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            p = msg.payload
            kind, rnd = (p[3], struct.unpack_from("<I", p, 12)[0]) if len(p) >= 16 else (0, 0)
            self.seen.append((wire.KIND_NAMES.get(kind, str(kind)).lower(), rnd, len(p),
                              len(msg.topic)))

        c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
        c.connect(host, port, 60)
        c.loop_start()
        self.client = c
        if not self.subscribed.wait(10):
            raise RuntimeError("the counting subscriber got no SUBACK within 10 s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def per_round(self, r0: int, r1: int) -> tuple[dict[str, float], dict[str, float]]:
        """Messages and payload KB per round over rounds r0..r1, by kind: a round's updates
        and digests carry its number; the GLOBAL_MODEL that closes round r carries r + 1."""
        return per_round_of(self.seen, r0, r1)


def per_round_of(seen: list[tuple[str, int, int, int]], r0: int, r1: int
                 ) -> tuple[dict[str, float], dict[str, float]]:
    k = r1 - r0 + 1
    msgs = {x: 0.0 for x in PER_ROUND_KINDS}
    kb = {x: 0.0 for x in PER_ROUND_KINDS}
    for kind, rnd, size, _t in seen:
        key = {"model_update": "update", "gossip_digest": "digest",
               "global_model": "global"}.get(kind)
        if key is None:
            continue
        rr = rnd - 1 if key == "global" else rnd
        if r0 <= rr <= r1:
            msgs[key] += 1 / k
            kb[key] += size / 1024 / k
    return msgs, kb


# ------------------------------------------------------------------ one size


def scenario(n: int, rounds: int, mode: str, f: int | None, seed: int) -> mesh.Scenario:
    sc = mesh.load_scenario(mesh.DEFAULT_SCENARIO)
    sc.name = f"scaling-{n}"
    sc.honest, sc.attackers, sc.rounds, sc.mode, sc.seed = n, [], rounds, mode, seed
    sc.rule, sc.f = "krum", f if f is not None else max(1, (n - 3) // 4)
    sc.crosscheck = "always"
    sc.deadline_s = max(60.0, 0.5 * n)  # a slow machine must not close rounds early
    sc.check()
    return sc


def coordinator_events(out: Path) -> list[dict[str, Any]]:
    evs = []
    for line in (out / "coordinator.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                evs.append(json.loads(line))
            except ValueError:
                continue
    return evs


def store_figures(out: Path, r0: int, r1: int) -> dict[str, Any]:
    db = sqlite3.connect(out / "coordinator.sqlite")
    try:
        closed = dict(db.execute("SELECT round, closed FROM rounds"))
        updates = db.execute("SELECT COUNT(*) FROM updates WHERE round BETWEEN ? AND ?",
                             (r0, r1)).fetchone()[0]
        ukb = db.execute("SELECT COALESCE(SUM(LENGTH(frame)), 0) FROM updates WHERE round "
                         "BETWEEN ? AND ? AND verdict = 'accepted'", (r0, r1)).fetchone()[0]
        digests = db.execute("SELECT COUNT(*) FROM digests WHERE round BETWEEN ? AND ?",
                             (r0, r1)).fetchone()[0]
        gframe = db.execute("SELECT global_frame FROM state").fetchone()[0]
    finally:
        db.close()
    return {"closed": closed, "updates": updates, "update_bytes": ukb, "digests": digests,
            "global_bytes": len(gframe)}


def measure(n: int, rounds: int, engine: str, mode: str = "coordinated", f: int | None = None,
            seed: int = 1, work: Path | None = None, broker: str = "mosquitto",
            rabbit: Rabbit | None = None) -> dict[str, Any]:
    """One mesh of n honest nodes on `engine` ("inproc" or "mqtt"): the record described in
    the module docstring. rabbit (mqtt): a running RabbitMQ instead of mosquitto."""
    if rounds < 2:
        raise ValueError("rounds must be >= 2 (round 1 carries start-up)")
    sc = scenario(n, rounds, mode, f, seed)
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="scaling-")
        work = Path(tmp.name)
    out = Path(work) / f"{engine}-{n}"
    rec: dict[str, Any] = {"engine": engine, "n": n, "rounds": rounds, "mode": mode,
                           "rule": sc.rule, "f": sc.f, "load_start": loadavg(),
                           "broker": None if engine != "mqtt" else
                           "rabbitmq" if rabbit is not None else broker}
    hooks: dict[str, Any] = {"rabbit": rabbit is not None}

    def on_ready(host: str, port: int, mesh_name: str) -> None:
        pids = [rabbit.pid()] if rabbit is not None else pids_of(str(out / "broker"))
        if len(pids) != 1:
            raise mesh.MeshError(f"expected one broker process for {out}, found {pids}")
        hooks["sampler"] = Sampler(pids[0])
        hooks["sampler"].start()
        hooks["counter"] = Counter(host, port, mesh_name, out / "mesh")

        def find_nodes() -> None:  # the nodes start right after this hook returns
            end = time.monotonic() + 60
            while time.monotonic() < end and len(hooks["sampler"].watch) < n:
                for p in pids_of(str(out / "nodes")):
                    hooks["sampler"].watch.setdefault(p, 0)
                time.sleep(0.2)

        threading.Thread(target=find_nodes, daemon=True).start()

    def on_done() -> None:
        hooks["sampler"].sample()
        hooks["sampler"].halt.set()
        hooks["counter"].stop()

    t0 = time.monotonic()
    try:
        if engine == "mqtt" and rabbit is not None:
            summary = rabbit.run(sc, out, on_ready, on_done, timeout=max(300.0, 3.0 * n))
        elif engine == "mqtt":
            summary = mesh.run(sc, out, transport="mqtt", broker=broker, force=True, say=None,
                               on_ready=on_ready, on_done=on_done,
                               timeout=max(600.0, 30.0 * rounds + 3.0 * n))
        else:
            summary = mesh.run(sc, out, transport="inproc", force=True, say=None)
        rec["wall_s"] = round(time.monotonic() - t0, 2)
        rec["load_end"] = loadavg()
        rec.update(figures(out, engine, n, rounds, hooks))
        rec["final_digest"] = summary["final_digest"]
        rec["final_accuracy"] = summary["final_accuracy"]
        rec["rounds_done"] = summary["rounds"]
        rec["samples_per_node"] = json.loads((out / "scenario.json").read_text())["shard_sizes"][0]
    finally:
        if "sampler" in hooks:
            hooks["sampler"].halt.set()
        if tmp is not None:
            tmp.cleanup()
    return rec


def figures(out: Path, engine: str, n: int, rounds: int, hooks: dict[str, Any]) -> dict[str, Any]:
    r0, r1 = 2, rounds
    k = r1 - r0 + 1
    evs = {e["round"]: e for e in coordinator_events(out) if e.get("ev") == "round"}
    done = next(e for e in coordinator_events(out) if e.get("ev") == "done")
    a, b = evs[r0 - 1]["cost"], evs[r1]["cost"]
    st = store_figures(out, r0, r1)
    round_s = (st["closed"][r1] - st["closed"][r0 - 1]) / k
    busy_cpu = (b["busy_cpu_s"] - a["busy_cpu_s"]) / k
    busy_wall = (b["busy_wall_s"] - a["busy_wall_s"]) / k
    rec: dict[str, Any] = {
        "round_s": round(round_s, 4),
        "coord_cpu_s": round((b["cpu_s"] - a["cpu_s"]) / k if engine == "mqtt" else busy_cpu, 4),
        "coord_busy_cpu_s": round(busy_cpu, 4),
        "busy_share": round(busy_wall / round_s, 3) if round_s > 0 else None,
        "fast_ms": round(1000 * sum(evs[r]["cost"]["fast_s"] for r in range(r0, r1 + 1)) / k, 3),
        "ref_ms": round(1000 * sum(evs[r]["cost"]["ref_s"] for r in range(r0, r1 + 1)) / k, 3),
        "coord_rss_mb": round(done["cost"]["maxrss_kb"] / 1024, 1),
        "store_updates": round(st["updates"] / k, 3),
        "store_digests": round(st["digests"] / k, 3),
        "global_bytes": st["global_bytes"],
    }
    if engine == "mqtt":
        s: Sampler = hooks["sampler"]
        ca, cb = s.at(st["closed"][r0 - 1]), s.at(st["closed"][r1])
        rec["broker_cpu_s"] = round((cb[0] - ca[0]) / k, 4)
        rec["broker_cpu_run_s"] = round(s.samples[-1][1] - s.samples[0][1], 3)
        # mosquitto reads and writes its sockets with read() and write(), which /proc/PID/io
        # counts; Erlang (RabbitMQ) receives with recvfrom(), which it does not.
        rabbit = hooks.get("rabbit", False)
        rec["broker_in_kb"] = None if rabbit else round((cb[1] - ca[1]) / 1024 / k, 1)
        rec["broker_out_kb"] = None if rabbit else round((cb[2] - ca[2]) / 1024 / k, 1)
        # The whole run, first sample to the one on_done takes: no interpolation, so a lower
        # bound a test can hold exactly (the per-round figures above move with sampling delay).
        first, last = s.samples[0], s.samples[-1]
        rec["broker_run_in_kb"] = None if rabbit else round((last[2] - first[2]) / 1024, 1)
        rec["broker_run_out_kb"] = None if rabbit else round((last[3] - first[3]) / 1024, 1)
        rec["rounds_measured"] = k
        msgs, kb = hooks["counter"].per_round(r0, r1)
        seen = hooks["counter"].seen
        rec["startup_msgs"] = {x: sum(1 for m in seen if m[0] == x)
                               for x in ("hello", "status", "registry")}
        rss = [v for v in s.watch.values() if v]
        rec["node_rss_mb"] = {"mean": round(sum(rss) / len(rss) / 1024, 1) if rss else None,
                              "max": round(max(rss) / 1024, 1) if rss else None,
                              "processes": len(rss)}
    else:
        msgs = {"update": st["updates"] / k, "digest": st["digests"] / k, "global": 1.0}
        kb = {"update": st["update_bytes"] / 1024 / k, "digest": 0.0,
              "global": st["global_bytes"] / 1024}
        rec["broker_cpu_s"] = rec["broker_in_kb"] = rec["broker_out_kb"] = None
    rec["msgs"] = {x: round(v, 3) for x, v in msgs.items()}
    rec["kb"] = {x: round(v, 1) for x, v in kb.items()}
    return rec


# ------------------------------------------------------------------ RabbitMQ


class Rabbit:
    """A RabbitMQ node with the MQTT plugin (Debian's rabbitmq-server 3.10), started by the
    operator (docs/scaling.md says how). For each run it imports the run's logins (the
    same passwords mosquitto gets) and the ACL as topic permissions on amq.topic (MQTT's
    "/" is AMQP's "."), then runs the mesh against it as an external broker."""

    def __init__(self, node: str, port: int, pidfile: Path) -> None:
        self.node, self.port, self.pidfile = node, port, pidfile

    def pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    @staticmethod
    def definitions(mesh_dir: Path) -> dict[str, Any]:
        import base64
        import hashlib
        import re

        def rx(topic: str, binding: bool) -> str:
            levels = topic.split("/")
            plus = r"(\*|[^.]+)" if binding else r"[^.]+"
            return r"\.".join(plus if x == "+" else re.escape(x) for x in levels)

        acl = brokerauth.parse_acl((mesh_dir / "broker" / "acl").read_text())
        users, perms, tperms = [], [], []
        for user, rules in acl.items():
            cred = brokerauth.read_credentials(mesh_dir, user)
            if cred is None:
                continue
            salt = os.urandom(4)
            h = base64.b64encode(salt + hashlib.sha256(salt + cred["password"].encode()).digest())
            users.append({"name": user, "password_hash": h.decode(), "tags": "",
                          "hashing_algorithm": "rabbit_password_hashing_sha256"})
            perms.append({"user": user, "vhost": "/", "configure": ".*", "write": ".*",
                          "read": ".*"})
            w = [rx(t, False) for a, t in rules if a in ("write", "readwrite")]
            r = [rx(t, True) for a, t in rules if a in ("read", "readwrite")]
            tperms.append({"user": user, "vhost": "/", "exchange": "amq.topic",
                           "write": "^(" + "|".join(w) + ")$" if w else "^$",
                           "read": "^(" + "|".join(r) + ")$" if r else "^$"})
        return {"vhosts": [{"name": "/"}], "users": users, "permissions": perms,
                "topic_permissions": tperms}

    def import_logins(self, mesh_dir: Path) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(self.definitions(mesh_dir), fh)
        os.chmod(fh.name, 0o644)  # rabbitmqctl runs as the rabbitmq user
        try:
            subprocess.run(["rabbitmqctl", "-n", self.node, "import_definitions", fh.name],
                           check=True, capture_output=True, text=True, timeout=120)
        finally:
            os.unlink(fh.name)

    def run(self, sc: mesh.Scenario, out: Path, on_ready: Any, on_done: Any,
            timeout: float) -> dict[str, Any]:
        """mesh.run's steps (prepare, run_mqtt, summarize) with the logins imported between
        provisioning and the coordinator's connection."""
        from microfed_host.mesh import run_mqtt
        from microfed_host.report import summarize
        from microfed_host.scenario import prepare

        t0 = time.monotonic()
        doc = prepare(sc, out, force=True)
        self.import_logins(out / "mesh")
        info = run_mqtt(sc, out, doc, f"127.0.0.1:{self.port}", None, timeout=timeout,
                        on_ready=on_ready, on_done=on_done)
        return summarize(out, doc, info, time.monotonic() - t0)


def acl_probe(host: str, port: int, mesh_dir: Path) -> dict[str, str]:
    """What a broker does with the mesh's logins and ACL (docs/scaling.md, "Tried"): an
    anonymous client; node A's QoS 1 update on its own topic and on node B's, as the
    coordinator's login sees them; node A subscribing to a topic its ACL does not list
    (digest/+), and whether node B's digest then reaches it; a retained global published by the coordinator's login, read by a node that connects
    afterwards. Each outcome in words."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    mesh_name = json.loads((mesh_dir / "mesh.json").read_text())["mesh"]
    base = brokerauth.topic_base(mesh_name)
    nodes = sorted(p.stem for p in (mesh_dir / "nodes").glob("*.mqtt"))
    a, b = nodes[0], nodes[1]
    out: dict[str, str] = {}

    def client(user: str | None, name: str) -> tuple[Any, dict[str, Any]]:
        st: dict[str, Any] = {"rc": None, "msgs": [], "granted": None, "closed": False}
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{name}-{os.getpid()}")
        if user is not None:
            brokerauth.apply_paho(c, brokerauth.client_auth(mesh_dir, user))
        c.on_connect = lambda _c, _u, _f, rc, _p=None: st.update(rc=str(rc))
        c.on_message = lambda _c, _u, m: st["msgs"].append((m.topic, bytes(m.payload), m.retain))
        c.on_subscribe = lambda _c, _u, _m, rcs, _p=None: st.update(granted=[str(x) for x in rcs])
        c.on_disconnect = lambda _c, _u, _f, rc, _p=None: st.update(closed=str(rc))
        c.connect(host, port, 30)
        c.loop_start()
        end = time.monotonic() + 5
        while st["rc"] is None and time.monotonic() < end:
            time.sleep(0.02)
        return c, st

    def settle() -> None:
        time.sleep(1.0)

    anon, st = client(None, "anon")
    out["anonymous client"] = f"CONNACK {st['rc']}"
    anon.loop_stop()
    coord, cs = client(brokerauth.COORDINATOR_USER, "coord")
    coord.subscribe(base + "update/+", 1)
    settle()
    node, ns = client(a, "a")
    info = node.publish(base + "update/" + a, b"own", qos=1)
    info.wait_for_publish(5)
    node.publish(base + "update/" + b, b"spoof", qos=1)
    settle()
    got = [m[1] for m in cs["msgs"]]
    out["QoS 1 update on its own topic"] = ("delivered to the coordinator" if b"own" in got
                                            else "not delivered")
    out["update on another node's topic"] = (
        "DELIVERED (no per-topic ACL)" if b"spoof" in got else
        "dropped" + (f", connection closed ({ns['closed']})" if ns["closed"] else
                     " (connection kept)"))
    node.disconnect()
    node.loop_stop()
    node, ns = client(a, "a2")
    node.subscribe(base + "digest/+", 1)
    settle()
    other, _os = client(b, "b")
    other.publish(base + "digest/" + b, b"b-digest", qos=1).wait_for_publish(5)
    settle()
    seen = any(m[1] == b"b-digest" for m in ns["msgs"])
    out["subscribe outside its ACL"] = (f"SUBACK {ns['granted']}" if ns["granted"] is not None
                                        else "no SUBACK") + (
        f", connection closed ({ns['closed']})" if ns["closed"] else "") + (
        "; node B's digest then DELIVERED to it" if seen else "; node B's digest not delivered to it")
    for c in (node, other):
        c.disconnect()
        c.loop_stop()
    coord.publish(base + "global", b"retained-global", qos=1, retain=True).wait_for_publish(5)
    settle()
    node, ns = client(a, "a3")
    node.subscribe(base + "global", 1)
    settle()
    ret = [m for m in ns["msgs"] if m[1] == b"retained-global"]
    out["retained global to a later subscriber"] = (
        f"delivered (retain flag {ret[0][2]})" if ret else "not delivered")
    for c in (node, coord):
        c.disconnect()
        c.loop_stop()
    return out


# ------------------------------------------------------------------ broker load test

LOAD_PUBLISHER = r'''
import sys, time, paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic, size, seconds, window = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
c = paho.Client(CallbackAPIVersion.VERSION2, client_id=topic.replace("/", "-"))
c.max_inflight_messages_set(window)
c.connect(host, port, 60)
c.loop_start()
payload = bytes(size)
end = time.monotonic() + seconds
sent = 0
pending = []
while time.monotonic() < end:
    pending.append(c.publish(topic, payload, qos=1))
    sent += 1
    if len(pending) >= window:
        pending.pop(0).wait_for_publish(10)
for p in pending:
    p.wait_for_publish(10)
c.disconnect()
c.loop_stop()
print(sent)
'''


def probe(broker: str, rabbit: Rabbit | None) -> dict[str, Any]:
    """acl_probe() against mosquitto as microfed starts it (the mesh's passwd and acl), or
    against a RabbitMQ node with the mesh's logins imported."""
    from microfed_host.broker import broker_from_arg
    from microfed_host.provision import init_mesh

    with tempfile.TemporaryDirectory(prefix="scaling-acl-") as tmp:
        md = Path(tmp) / "mesh"
        init_mesh(md, "mesh-probe", 3, "127.0.0.1:1883")
        if rabbit is not None:
            rabbit.import_logins(md)
            return {"broker": "rabbitmq", **acl_probe("127.0.0.1", rabbit.port, md)}
        b = broker_from_arg(broker, workdir=Path(tmp) / "broker", auth_dir=md / "broker")
        b.start()
        try:
            return {"broker": b.kind, **acl_probe(b.host, b.port, md)}
        finally:
            b.close()


def load_test(publishers: list[int], seconds: float, size: int, broker: str) -> list[dict[str, Any]]:
    """P publisher processes (paho, QoS 1, 20 in flight each) send `size`-byte messages on
    their own topics for `seconds`; one subscriber (QoS 1, as the coordinator's durable
    session) receives them all. Per P: messages per second through the broker and its CPU
    seconds per message (in + one delivery out)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from microfed_host.broker import broker_from_arg

    rows = []
    script = Path(tempfile.gettempdir()) / f"scaling_pub_{os.getpid()}.py"
    script.write_text(LOAD_PUBLISHER)
    try:
        for p in publishers:
            b = broker_from_arg(broker)
            b.start()
            try:
                got = [0]
                sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="scaling-sub",
                                  clean_session=False)

                def on_msg(_c: Any, _u: Any, _m: Any, got: list[int] = got) -> None:
                    got[0] += 1

                sub.on_message = on_msg
                sub.connect(b.host, b.port, 60)
                sub.subscribe("load/#", 1)
                sub.loop_start()
                time.sleep(0.5)
                pid = b.pid
                c0 = proc_cpu(pid) if pid else None
                t0 = time.monotonic()
                la0 = loadavg()
                procs = [subprocess.Popen([sys.executable, str(script), b.host, str(b.port),
                                           f"load/p{i}", str(size), str(seconds), "20"],
                                          stdout=subprocess.PIPE, text=True)
                         for i in range(p)]
                sent = sum(int(pr.communicate(timeout=seconds + 60)[0].strip() or 0)
                           for pr in procs)
                end = time.monotonic() + 10
                while got[0] < sent and time.monotonic() < end:
                    time.sleep(0.05)
                dt = time.monotonic() - t0
                c1 = proc_cpu(pid) if pid else None
                sub.disconnect()
                sub.loop_stop()
                cpu = (c1 - c0) if c0 is not None and c1 is not None else None
                rows.append({"publishers": p, "size": size, "sent": sent, "received": got[0],
                             "seconds": round(dt, 2), "msgs_per_s": round(got[0] / dt),
                             "broker": b.kind,
                             "broker_cpu_s": None if cpu is None else round(cpu, 4),
                             "broker_cpu_ms_per_msg": None if not cpu or not got[0]
                             else round(1000 * cpu / got[0], 4),
                             "load_start": la0, "load_end": loadavg()})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                b.close()
    finally:
        script.unlink(missing_ok=True)
    return rows


# ------------------------------------------------------------------ a per-update O(n) step


def quorum_check(sizes: list[int], calls: int = 200) -> list[dict[str, Any]]:
    """The coordinator's quorum check, `Coordinator.expected_now()`, which every accepted
    update runs twice (the "accepted" event's `want` and maybe_close()): it walks every
    expected node, so a round of n updates costs 2 n^2 of its steps. Timed here on a real
    Coordinator of a freshly provisioned mesh of n nodes (thread CPU per call)."""
    from microfed_host.coordinator import Coordinator, CoordinatorConfig
    from microfed_host.provision import init_mesh
    from microfed_host.rounds_store import RoundsStore

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="scaling-quorum-") as tmp:
            init_mesh(Path(tmp) / "mesh", "mesh-q", n, "127.0.0.1:1883")
            store = RoundsStore(Path(tmp) / "c.sqlite")
            try:
                c = Coordinator(CoordinatorConfig(mesh_dir=str(Path(tmp) / "mesh"), rule="fedavg",
                                                  f=0), store, lambda *_a: None,
                                log=lambda _e: None)
                assert len(c.expected_now()) == n
                t0 = time.thread_time()
                for _ in range(calls):
                    c.expected_now()
                per = (time.thread_time() - t0) / calls
            finally:
                store.close()
        rows.append({"quorum_n": n, "per_call_us": round(per * 1e6, 2),
                     "per_round_s": round(2 * n * per, 4), "q_us_per_pair": round(2 * per / n * 1e6, 4),
                     "load": loadavg()})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def quorum_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| n | expected_now() per call | 2 n calls per round | per pair of nodes | load |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['quorum_n']} | {r['per_call_us']} µs | {r['per_round_s']} s | "
                     f"{r['q_us_per_pair']} µs | {r['load']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the model


def fit_origin(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of y = c * x through the origin."""
    return sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = a + b * x, least squares."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2
                                                                            for x in xs)
    return my - b * mx, b


def n_within(budget: float, c0: float, lin: float, quad: float) -> int:
    """The largest n with c0 + lin * n + quad * n^2 <= budget."""
    room = budget - c0
    if quad <= 0:
        return int(room / lin)
    return int((-lin + (lin * lin + 4 * quad * room) ** 0.5) / (2 * quad))


def model(records: list[dict[str, Any]], load: list[dict[str, Any]],
          quorum: list[dict[str, Any]] | None = None,
          budgets: tuple[float, ...] = (1.0, 10.0, 60.0)) -> str:
    """The extrapolation, every number with its formula and its measured inputs."""
    mq = [r for r in records if r["engine"] == "mqtt" and r.get("broker") == "mosquitto"]
    if not mq:
        raise SystemExit("the model needs mqtt (mosquitto) records")
    ns = [float(r["n"]) for r in mq]
    a_ref = fit_origin([n * n for n in ns], [r["ref_ms"] / 1000 for r in mq])
    a_fast = fit_origin([n * n for n in ns], [r["fast_ms"] / 1000 for r in mq])
    # the quorum check's n^2 (quorum_check(), measured on its own at the largest n)
    q = (max(quorum, key=lambda r: r["quorum_n"])["q_us_per_pair"] / 1e6) if quorum else 0.0
    rest = [r["coord_cpu_s"] - (r["ref_ms"] + r["fast_ms"]) / 1000 - q * n * n
            for r, n in zip(mq, ns, strict=True)]
    c0, b_upd = fit_line(ns, rest)
    b_brk = fit_origin(ns, [r["broker_cpu_s"] for r in mq])
    g0, g1 = fit_line(ns, [float(r["global_bytes"]) for r in mq])
    upd = sum(r["kb"]["update"] * 1024 / r["n"] for r in mq) / len(mq)
    inputs = ", ".join(f"n={r['n']}: coord {r['coord_cpu_s']:.3f} s, ref {r['ref_ms']:.1f} ms, "
                       f"fast {r['fast_ms']:.2f} ms, broker {1000 * r['broker_cpu_s']:.1f} ms, "
                       f"global {r['global_bytes']} B" for r in mq)
    L = [f"Measured inputs (mqtt engine, mosquitto, per round): {inputs}.", "",
         "Fitted constants (least squares; d = 650 parameters):", "",
         "| constant | formula | value |", "| --- | --- | --- |",
         f"| a_ref | reference Krum CPU = a_ref * n^2 | {a_ref * 1e6:.2f} µs per pair "
         f"({a_ref * 1e9 / 650:.1f} ns per pair and coordinate) |",
         f"| a_fast | numpy Krum CPU = a_fast * n^2 | {a_fast * 1e6:.3f} µs per pair |",
         f"| q | the quorum check, Coordinator.expected_now(), twice per update = q * n^2 | "
         f"{q * 1e6:.3f} µs per pair (measured alone: table above) |",
         f"| c0, b_upd | coordinator CPU - aggregation - q n^2 = c0 + b_upd * n | "
         f"{c0 * 1000:.1f} ms per round + {b_upd * 1000:.2f} ms per update |",
         f"| b_brk | mosquitto CPU per round = b_brk * n | {b_brk * 1000:.3f} ms per node "
         "(update in, PUBACK, update to the coordinator and to the counter, global out) |",
         f"| g0, g1 | GLOBAL_MODEL bytes = g0 + g1 * n | {g0:.0f} B + {g1:.1f} B per accepted "
         "update (the announcement lists each: sender and SHA-256) |",
         f"| u | update bytes | {upd:.0f} B |", "",
         "**Extrapolation** (not measured): one coordinator's CPU per round, "
         "C(n) = c0 + b_upd * n + (q + a_fast + a_ref / N) * n^2 with the reference every N-th round "
         "(`--crosscheck always`: N = 1; `sampled:10`: N = 10; `off`: a_ref = 0); the largest "
         "n whose C(n) fits a round budget:", "",
         "| round budget | cross-check always | sampled:10 | off |", "| --- | --- | --- | --- |"]
    for bud in budgets:
        L.append(f"| {bud:g} s | {n_within(bud, c0, b_upd, q + a_fast + a_ref):,} | "
                 f"{n_within(bud, c0, b_upd, q + a_fast + a_ref / 10):,} | "
                 f"{n_within(bud, c0, b_upd, q + a_fast):,} |")
    per_msg = [r["broker_cpu_ms_per_msg"] / 1000 for r in load if r.get("broker_cpu_ms_per_msg")]
    L += ["", "**Extrapolation**: one mosquitto (one thread: it saturates at 1 CPU second per "
          "second):", ""]
    if per_msg:
        m = sum(per_msg) / len(per_msg)
        L.append(f"- load test: {m * 1e6:.1f} µs of broker CPU per {load[0]['size']}-byte QoS 1 "
                 f"message (in, PUBACK, one delivery out); saturation = 1 / that = "
                 f"**{1 / m:,.0f} messages per second**.")
    L.append(f"- in the mesh: b_brk = {b_brk * 1000:.3f} ms per node and round; one mosquitto "
             f"core saturates at n = T / b_brk = **{1 / b_brk:,.0f} nodes per second of round "
             "period T** (e.g. "
             + ", ".join(f"T = {t:g} s: {t / b_brk:,.0f} nodes" for t in budgets)
             + "), before the bytes below.")
    L += ["- bytes out per round (coordinated mode, no counter): n * (g0 + g1 * n) for the "
          "global's fan-out + n * u for the updates to the coordinator:", ""]
    L += ["| n | GLOBAL_MODEL | broker bytes out per round |", "| --- | --- | --- |"]
    for n in (200, 1000, 10000, 100000):
        gb = g0 + g1 * n
        L.append(f"| {n:,} | {gb / 1024:,.1f} KB | {(n * gb + n * upd) / 2**20:,.1f} MB |")
    L += ["", "Hard limits of today's format, from the fitted g0, g1 (computed, not measured "
          "at that size): a GLOBAL_MODEL with n accepted updates exceeds a node's default "
          f"`max_msg` of 16 384 bytes (firmware/config.py) above n = (16384 - g0) / g1 = "
          f"**{(16384 - g0) / g1:,.0f}**, and wire.MAX_FRAME (65 536) above n = "
          f"**{(65536 - g0) / g1:,.0f}**."]
    L += ["", "**Extrapolation**: an edge tier of sites of k nodes, one edge aggregator each "
          "(its own Krum over k updates, the same constants), one update per site to the top: "
          "C_edge = C(k), C_top = C(n / k) (cross-check always); the top's broker carries n / k "
          "updates and n / k global copies:", "",
          "| n | flat C(n) | k | sites n/k | C_edge(k) | C_top(n/k) | C_edge + C_top | "
          "top broker CPU per round |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def c_of(n: float) -> float:
        return c0 + b_upd * n + (q + a_fast + a_ref) * n * n

    for n in (1000, 10000, 100000):
        for k in (50, 200):
            L.append(f"| {n:,} | {c_of(n):,.1f} s | {k} | {n // k:,} | {c_of(k):.2f} s | "
                     f"{c_of(n / k):.2f} s | {c_of(k) + c_of(n / k):.2f} s | "
                     f"{1000 * b_brk * n / k:.1f} ms |")
    return "\n".join(L)


# ------------------------------------------------------------------ tables


def table(records: list[dict[str, Any]]) -> str:
    """One row per record; the digests' column only when some run had them (gossip)."""
    kinds = ("update", "digest", "global") if any(r["msgs"]["digest"] for r in records) \
        else ("update", "global")
    names = "+".join(kinds)
    head = ("| engine | n | f | round s | coord CPU s/round | busy share | fast ms | ref ms | "
            f"coord RSS MB | broker CPU s/round | broker in/out KB/round | msgs/round "
            f"({names}) | KB/round ({names}) | node RSS MB (mean/max) | load start→end |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in records:
        bro = "–" if r["broker_cpu_s"] is None else f"{r['broker_cpu_s']:.3f}"
        io = ("–" if r["broker_in_kb"] is None
              else f"{r['broker_in_kb']:.0f} / {r['broker_out_kb']:.0f}")
        nr = r.get("node_rss_mb") or {}
        nrs = f"{nr['mean']} / {nr['max']}" if nr.get("mean") is not None else "–"
        m, k = r["msgs"], r["kb"]
        eng = r["engine"] + (f" ({r['broker']})" if r.get("broker") else "")
        msgs = " + ".join(f"{m[x]:.0f}" for x in kinds)
        kb = " + ".join(f"{k[x]:.1f}" if x == "global" else f"{k[x]:.0f}" for x in kinds)
        lines.append(
            f"| {eng} | {r['n']} | {r['f']} | {r['round_s']:.2f} | "
            f"{r['coord_cpu_s']:.3f} | {r['busy_share']:.0%} | {r['fast_ms']:.1f} | "
            f"{r['ref_ms']:.0f} | {r['coord_rss_mb']:.0f} | {bro} | {io} | {msgs} | {kb} | "
            f"{nrs} | {r['load_start']} → {r['load_end']} |")
    return "\n".join(lines)


def load_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| broker | publishers | payload B | messages | seconds | msgs/s | broker CPU s | "
             "broker CPU ms/msg | load start→end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['broker']} | {r['publishers']} | {r['size']} | {r['received']} | "
                     f"{r['seconds']} | {r['msgs_per_s']} | {r['broker_cpu_s']} | "
                     f"{r['broker_cpu_ms_per_msg']} | {r['load_start']} → {r['load_end']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,200")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="inproc,mqtt")
    ap.add_argument("--mode", choices=("coordinated", "gossip"), default="coordinated")
    ap.add_argument("--f", type=int, default=None, help="Krum's f (default (n - 3) // 4)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--broker", default="mosquitto")
    ap.add_argument("--rabbitmq", default=None, metavar="NODE:MQTT_PORT:PIDFILE",
                    help="mqtt engine against a running RabbitMQ node instead of mosquitto "
                    "(e.g. scaling@localhost:18830:/tmp/rabbit.pid)")
    ap.add_argument("--quorum", default=None, metavar="SIZES",
                    help="time the coordinator's quorum check at these mesh sizes (e.g. "
                    "10,200,1000)")
    ap.add_argument("--acl-probe", dest="acl_probe", action="store_true",
                    help="provision a 3-node mesh and probe the broker's logins, ACL, QoS 1 "
                    "and retained messages (mosquitto, or --rabbitmq)")
    ap.add_argument("--load-test", dest="load_test", action="store_true",
                    help="measure the broker alone instead (publishers -> one subscriber)")
    ap.add_argument("--publishers", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=2700)
    ap.add_argument("--json", type=Path, default=None, help="append the records (JSON lines)")
    ap.add_argument("--model", default=None, metavar="SIZES.jsonl,LOAD.jsonl",
                    help="no run: fit the records of earlier runs and extrapolate")
    ap.add_argument("--label", default=None, help="the markers' label (default: sizes, load "
                    "or model)")
    ap.add_argument("--write", type=Path, default=None, help="a document with the markers")
    a = ap.parse_args()
    command = "python benchmarks/scaling.py " + " ".join(sys.argv[1:])
    la0 = loadavg()
    rabbit = None
    if a.rabbitmq:
        node, port, pidfile = a.rabbitmq.split(":", 2)
        rabbit = Rabbit(node, int(port), Path(pidfile))
    if a.model:
        files = [Path(x) for x in a.model.split(",")]
        recs = [json.loads(line) for f in files for line in f.read_text().splitlines() if line]
        text = model([r for r in recs if "engine" in r], [r for r in recs if "publishers" in r],
                     [r for r in recs if "quorum_n" in r])
        print(text)
        if a.write is not None:
            write_between(a.write, f"benchmarks/scaling.py {a.label or 'model'}", command, text)
        return 0
    if a.quorum:
        recs = quorum_check([int(x) for x in a.quorum.split(",")])
        text, marker = quorum_table(recs), f"benchmarks/scaling.py {a.label or 'quorum'}"
    elif a.acl_probe:
        print(json.dumps(probe(a.broker, rabbit), indent=2))
        return 0
    elif a.load_test:
        recs = load_test([int(x) for x in a.publishers.split(",")], a.seconds, a.size, a.broker)
        text, marker = load_table(recs), f"benchmarks/scaling.py {a.label or 'load'}"
    else:
        recs = []
        for engine in a.engines.split(","):
            for n in (int(x) for x in a.sizes.split(",")):
                r = measure(n, a.rounds, engine, a.mode, a.f, a.seed, broker=a.broker,
                            rabbit=rabbit)
                recs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                if a.json is not None:
                    with open(a.json, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
        text, marker = table(recs), f"benchmarks/scaling.py {a.label or 'sizes'}"
    if a.json is not None and (a.load_test or a.quorum):
        with open(a.json, "a") as fh:
            for r in recs:
                fh.write(json.dumps(r) + "\n")
    body = f"{text}\n\nLoad average (1, 5, 15 min) {la0} at the start, {loadavg()} at the end."
    print(body)
    if a.write is not None:
        write_between(a.write, marker, command, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
