"""`microfed mesh run`: a whole mesh on one machine, under attack, and its report.

Two transports run the same protocol code:

- `mqtt` (default): an MQTT broker (mosquitto, else embedded amqtt, or $MICROFED_BROKER),
  the coordinator as its own process (`python -m microfed_host.coordinator`), one
  MicroPython unix-port process per honest node (firmware/main.py, exactly what a board
  runs), and the adversary (a host thread with the compromised nodes' registered keys).
- `inproc`: one CPython process, no broker, no MicroPython: the same Coordinator object,
  the same Adversary, and simulated nodes that call the same portable functions the
  firmware calls (model.train with the same seeds, wire frames, microfed.verify,
  microfed.audit aggregation). By the determinism contract it reaches the same final model
  digest as the real mesh with the same seed (tests/test_mesh.py checks it); it is what
  the results sweep (`microfed mesh sweep`) runs.

Run directory (--out):
    scenario.json        the effective scenario (file + flags)
    mesh/                provisioned keys, signed registry, device bundles
    data/                test.mfds (held-out split) and one shard per node
    nodes/<id>/          honest nodes: bundle.json, shard.bin, config.json, state/, node.log
    coordinator.json     coordinator settings;  coordinator.sqlite  its persistent state
    coordinator.log      its JSON event lines;   adversary.json     what the adversary did
    summary.json, rounds.csv, accuracy.png, reputation.png
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfed import audit, model, wire
from microfed.replay import MemoryStore, ReplayGuard
from microfed.verify import Limits, Rejected, Verifier
from microfed_host import adversary as advmod
from microfed_host import coordinator as coordmod
from microfed_host import data, keys, upy
from microfed_host.coordinator import Coordinator, CoordinatorConfig, announce
from microfed_host.rounds_store import RoundsStore

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
SCENARIOS = REPO / "scenarios"
DEFAULT_SCENARIO = SCENARIOS / "default.toml"
SPLITS = ("iid", "dirichlet")
TRANSPORTS = ("mqtt", "inproc")


class MeshError(RuntimeError):
    """Bad scenario, flags or run directory, or a mesh process that failed: says which."""


# ------------------------------------------------------------------ scenario
@dataclass
class AttackGroup:
    attack: str
    count: int
    params: dict[str, float] = field(default_factory=dict)


@dataclass
class Scenario:
    name: str = "custom"
    description: str = ""
    honest: int = 10
    attackers: list[AttackGroup] = field(default_factory=list)
    rule: str = "krum"
    f: int = 3
    m: int = 0
    trim: int = -1
    rounds: int = 10
    mode: str = "coordinated"
    split: str = "iid"
    alpha: float = 0.5
    seed: int = 1
    max_samples: int = 0
    lr: int = 32768
    epochs: int = 1
    batch: int = 10
    crosscheck: str = "always"
    deadline_s: float = 60.0
    reputation: dict[str, int] = field(default_factory=dict)

    @property
    def byzantine(self) -> int:
        return sum(g.count for g in self.attackers)

    @property
    def attack_label(self) -> str:
        if not self.attackers:
            return "none"
        return "+".join(f"{g.attack}x{g.count}" if len(self.attackers) > 1 else g.attack
                        for g in self.attackers)

    def node_ids(self) -> list[str]:
        from microfed_tools.cmd_provision import node_ids

        return node_ids(self.honest + self.byzantine)

    def honest_ids(self) -> list[str]:
        return self.node_ids()[: self.honest]

    def byzantine_ids(self) -> list[str]:
        return self.node_ids()[self.honest:]

    def check(self) -> None:
        if not 1 <= self.honest <= 200:
            raise MeshError("honest must be in 1..200")
        for g in self.attackers:
            try:
                g.attack = advmod.canonical_attack(g.attack)
            except advmod.AdversaryError as e:
                raise MeshError(str(e)) from None
            if not 0 <= g.count <= 200:
                raise MeshError("attacker count must be in 0..200")
            for k in g.params:
                if k not in advmod.DEFAULTS:
                    raise MeshError(f"unknown attack parameter {k!r} (known: {', '.join(advmod.DEFAULTS)})")
        self.attackers = [g for g in self.attackers if g.count > 0]
        if self.rule not in coordmod.RULES:
            raise MeshError(f"unknown rule {self.rule!r}; one of {', '.join(coordmod.RULES)}")
        if self.mode not in coordmod.MODES:
            raise MeshError(f"mode must be one of {', '.join(coordmod.MODES)}")
        if self.split not in SPLITS:
            raise MeshError(f"split must be one of {', '.join(SPLITS)}")
        if not self.alpha > 0:
            raise MeshError("alpha must be > 0")
        if not 1 <= self.rounds <= 10000:
            raise MeshError("rounds must be in 1..10000")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise MeshError("seed must be in 0..2^32-1")
        if self.max_samples < 0 or not 1 <= self.lr <= 0x7FFFFFFF or self.epochs < 1 or self.batch < 1:
            raise MeshError("max_samples >= 0, lr in 1..2^31-1 (raw Q16.16), epochs >= 1, batch >= 1")
        if not self.deadline_s > 0:
            raise MeshError("deadline must be > 0 seconds")
        if not 0 <= self.f <= 255 or not 0 <= self.m <= 255 or not -1 <= self.trim <= 255:
            raise MeshError("f, m and trim must be in 0..255")
        need = coordmod.rule_min_nodes(self.rule, self.f, self.f if self.trim < 0 else self.trim)
        # Bans may remove every attacker: the honest nodes alone must still satisfy the rule.
        if self.honest < need:
            raise MeshError(f"rule {self.rule} with f={self.f} needs at least {need} honest nodes "
                            f"(bans can leave only those), got {self.honest}")
        try:
            CoordinatorConfig(mesh_dir="", rule=self.rule, f=self.f, m=self.m, trim=self.trim,
                              rounds=self.rounds, crosscheck=self.crosscheck,
                              reputation=self.reputation).check()
        except (coordmod.CoordinatorError, ValueError) as e:
            raise MeshError(str(e)) from None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["byzantine"] = self.byzantine
        return d


_TOP = {"name", "description", "honest", "rule", "f", "m", "trim", "rounds", "mode", "seed",
        "crosscheck", "deadline_s", "split", "alpha", "max_samples", "attackers", "train",
        "data", "reputation"}


def load_scenario(path: Path) -> Scenario:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise MeshError(f"cannot read scenario {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise MeshError(f"scenario {path}: not valid TOML: {e}") from None
    bad = sorted(set(doc) - _TOP)
    if bad:
        raise MeshError(f"scenario {path}: unknown key(s) {', '.join(bad)}")
    sc = Scenario(name=Path(path).stem)
    try:
        for k in ("name", "description", "honest", "rule", "f", "m", "trim", "rounds", "mode",
                  "seed", "crosscheck", "deadline_s", "split", "alpha", "max_samples"):
            if k in doc:
                setattr(sc, k, doc[k])
        for section, keys_ in (("train", ("lr", "epochs", "batch")),
                               ("data", ("split", "alpha", "max_samples"))):
            sub = doc.get(section, {})
            if not isinstance(sub, dict):
                raise MeshError(f"scenario {path}: [{section}] must be a table")
            for k in sub:
                if k not in keys_:
                    raise MeshError(f"scenario {path}: unknown key {section}.{k}")
                setattr(sc, k, sub[k])
        sc.reputation = dict(doc.get("reputation", {}))
        groups = doc.get("attackers", [])
        if not isinstance(groups, list):
            raise MeshError(f"scenario {path}: attackers must be an array of tables [[attackers]]")
        for g in groups:
            if not isinstance(g, dict) or "attack" not in g:
                raise MeshError(f"scenario {path}: every [[attackers]] needs attack = \"NAME\"")
            params = {k: float(v) for k, v in g.items() if k not in ("attack", "count")}
            sc.attackers.append(AttackGroup(str(g["attack"]), int(g.get("count", 1)), params))
    except (TypeError, ValueError) as e:
        raise MeshError(f"scenario {path}: {e}") from None
    for k, typ in (("honest", int), ("f", int), ("rounds", int), ("seed", int), ("lr", int),
                   ("epochs", int), ("batch", int), ("max_samples", int), ("m", int), ("trim", int)):
        if type(getattr(sc, k)) is not typ:
            raise MeshError(f"scenario {path}: {k} must be an integer")
    sc.alpha = float(sc.alpha)
    sc.deadline_s = float(sc.deadline_s)
    return sc


def apply_overrides(sc: Scenario, a: Any) -> Scenario:
    """Flags win over the scenario file."""
    for k in ("honest", "rule", "f", "rounds", "mode", "split", "alpha", "seed", "crosscheck",
              "max_samples"):
        v = getattr(a, k, None)
        if v is not None:
            setattr(sc, k, v)
    if getattr(a, "deadline", None) is not None:
        sc.deadline_s = float(a.deadline)
    byz, attack = getattr(a, "byzantine", None), getattr(a, "attack", None)
    if attack is not None or byz is not None:
        params: dict[str, float] = {}
        for name in ("tau", "sigma", "scale"):
            if getattr(a, name, None) is not None:
                params[name] = float(getattr(a, name))
        if attack is None:
            attack = sc.attackers[0].attack if sc.attackers else "sign-flip"
            if sc.attackers:
                params = {**sc.attackers[0].params, **params}
        if byz is None:
            byz = sc.byzantine if sc.attackers else 3
        sc.attackers = [AttackGroup(attack, byz, params)] if byz > 0 else []
    else:
        for name in ("tau", "sigma", "scale"):
            if getattr(a, name, None) is not None:
                for g in sc.attackers:
                    g.params[name] = float(getattr(a, name))
    return sc


# ------------------------------------------------------------------ run directory
def prepare(sc: Scenario, out: Path, force: bool = False) -> dict[str, Any]:
    """Provision the mesh, write shards, node directories and the coordinator settings."""
    from microfed_tools import cmd_provision

    sc.check()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MeshError(f"{out} is not empty; pick another --out or add --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = sc.node_ids()
    mesh_name = f"mesh-{sc.seed}-{os.urandom(3).hex()}"
    args = type("A", (), {"out": str(out / "mesh"), "nodes": len(ids), "mesh": mesh_name,
                          "broker": "127.0.0.1:1883", "force": False})()
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cmd_provision.cmd_init(args)  # type: ignore[arg-type]
        except cmd_provision.ProvisionError as e:
            raise MeshError(f"provisioning failed: {e}") from None
    split = data.train_test_split(sc.seed)
    shards = data.shard(split.train, len(ids), sc.split, sc.seed, sc.alpha)
    if sc.max_samples:
        shards = [s.subset(np.arange(min(len(s), sc.max_samples))) for s in shards]
    ddir = out / "data"
    ddir.mkdir()
    data.write_shard(ddir / "test.mfds", split.test)
    for i, (nid, s) in enumerate(zip(ids, shards, strict=True)):
        data.write_shard(ddir / f"{nid}.mfds", s, i, len(ids))
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    for nid in sc.honest_ids():
        nd = out / "nodes" / nid
        (nd / "state").mkdir(parents=True)
        shutil.copy(out / "mesh" / "bundles" / f"{nid}.json", nd / "bundle.json")
        os.chmod(nd / "bundle.json", 0o600)
        shutil.copy(ddir / f"{nid}.mfds", nd / "shard.bin")
        write_node_config(nd, sc, None)
    cfg = CoordinatorConfig(mesh_dir=str(out / "mesh"), rule=sc.rule, f=sc.f, m=sc.m,
                            trim=sc.trim, rounds=sc.rounds, mode=sc.mode,
                            crosscheck=sc.crosscheck, deadline_s=sc.deadline_s,
                            init_seed=sc.seed, test_shard=str(ddir / "test.mfds"),
                            reputation=dict(sc.reputation), expected=ids,
                            wait_hello_s=min(30.0, sc.deadline_s))
    (out / coordmod.CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    doc = sc.to_json()
    doc.update({"mesh": mesh_name, "honest_ids": sc.honest_ids(),
                "byzantine_ids": sc.byzantine_ids(), "train": train,
                "test_samples": len(split.test), "shard_sizes": [len(s) for s in shards]})
    (out / "scenario.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def write_node_config(nd: Path, sc: Scenario, broker: tuple[str, int] | None) -> None:
    conf: dict[str, Any] = {
        "mode": sc.mode,
        "train": {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed},
        # A node whose runner died must not linger: no GLOBAL_MODEL for this long -> exit.
        "idle_exit_s": int(max(120, 3 * sc.deadline_s)),
        "status_interval_ms": 100,
    }
    if broker is not None:
        conf["broker"] = {"host": broker[0], "port": broker[1]}
    (nd / "config.json").write_text(json.dumps(conf, indent=2) + "\n")


def make_adversary(sc: Scenario, out: Path, mesh: str) -> advmod.Adversary | None:
    if not sc.attackers:
        return None
    md = out / "mesh"
    coord_pub = keys.read_public_key(md / "coordinator.pub")
    nodes: list[advmod.Compromised] = []
    byz = iter(sc.byzantine_ids())
    for g in sc.attackers:
        for _ in range(g.count):
            nid = next(byz)
            ds, _i, _n = data.decode_shard((out / "data" / f"{nid}.mfds").read_bytes())
            xs, ys = ds.as_lists()
            nodes.append(advmod.Compromised(nid, keys.read_private_key(md / "nodes" / f"{nid}.key"),
                                            g.attack, xs, ys, dict(g.params)))
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    return advmod.Adversary(mesh, coord_pub, nodes, sc.honest_ids(), sc.rounds, train,
                            sc.mode, sc.seed)


# ------------------------------------------------------------------ progress output
class Progress:
    def __init__(self, sc: Scenario, out: Callable[[str], None] | None = print) -> None:
        self.sc = sc
        self.out = out
        self.t0 = time.monotonic()
        self.last_round_at = self.t0
        self.flagged: set[str] = set()

    def say(self, text: str) -> None:
        if self.out is not None:
            self.out(text)

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "start":
            acc = ev.get("accuracy")
            self.say(f"  round  0/{self.sc.rounds}  acc {_pct(acc)}  (initial model)")
        elif kind == "round":
            now = time.monotonic()
            rej = ev.get("rejected") or {}
            rtxt = ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "0"
            banned = ev.get("banned") or []
            self.say(f"  round {ev['round']:>2}/{self.sc.rounds}  acc {_pct(ev.get('accuracy'))}"
                     f"  accepted {len(ev.get('accepted', []))}  rejected {rtxt}"
                     f"  banned {', '.join(banned) if banned else '-'}"
                     f"  ({now - self.last_round_at:.1f} s)")
            self.last_round_at = now
        elif kind == "flagged":
            if ev["node"] not in self.flagged:
                self.flagged.add(ev["node"])
                self.say(f"  ! {ev['node']} flagged: its gossip digest for round {ev['round']} "
                         "differs from the coordinator's aggregate")
        elif kind == "resume":
            self.say(f"  coordinator resumed round {ev['round']} from SQLite with "
                     f"{len(ev.get('accepted', []))} accepted update(s)")
        elif kind == "waiting":
            self.say(f"  round {ev['round']}: deadline passed, waiting for "
                     f"{sorted(set(ev.get('want', [])) - set(ev.get('have', [])))}")
        elif kind == "crosscheck_mismatch":
            self.say(f"  ! round {ev['round']}: fast path and reference disagree (reference used)")
        elif kind == "fatal":
            self.say(f"  coordinator error: {ev.get('error')}")


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


# ------------------------------------------------------------------ real mesh (MQTT)
class _Coord:
    """The coordinator child process and a thread that turns its stdout into events."""

    def __init__(self, out: Path, broker: str, events: queue.Queue[dict[str, Any]]) -> None:
        env = dict(os.environ)
        parts = [str(REPO / "shared"), str(REPO / "host"), str(REPO / "tools")]
        env["PYTHONPATH"] = os.pathsep.join(parts + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.log = open(out / "coordinator.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microfed_host.coordinator", str(out), "--broker", broker],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL, env=env)
        self.events = events
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.events.put(ev)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.thread.join(5)

    def stop(self) -> None:
        _stop_proc(self.proc)
        self.thread.join(5)
        self.log.close()


def _stop_proc(p: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        p.wait(10)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_mqtt(sc: Scenario, out: Path, doc: dict[str, Any], broker_arg: str | None = None,
             progress: Progress | None = None, kill_coordinator_at: int = 0,
             timeout: float = 1800.0) -> dict[str, Any]:
    from microfed_host.broker import BrokerError, broker_from_arg

    exe = upy.find_micropython()
    if exe is None:
        raise MeshError(f"MicroPython unix port missing: {upy.INSTALL_HINT}")
    prog = progress or Progress(sc, None)
    info: dict[str, Any] = {"transport": "mqtt", "coordinator_restarts": 0}
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    node_logs: list[Any] = []
    coord: _Coord | None = None
    adv_thread: advmod.AdversaryThread | None = None
    try:
        broker = broker_from_arg(broker_arg, workdir=out / "broker")
    except BrokerError as e:
        raise MeshError(str(e)) from None
    try:
        try:
            broker.start()
        except BrokerError as e:
            raise MeshError(str(e)) from None
        info["broker"] = {"kind": broker.kind, "address": broker.address}
        prog.say(f"  broker: {broker.kind} on {broker.address}")
        addr = (broker.host, broker.port)
        for nid in sc.honest_ids():
            write_node_config(out / "nodes" / nid, sc, addr)
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        coord = _Coord(out, broker.address, events)
        # Nodes start once the coordinator's session is subscribed (it says "ready"): from
        # then on the broker keeps their messages for it, even across a coordinator restart.
        ready_by = time.monotonic() + 60
        while True:
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                ev = None
            if ev is not None and ev.get("ev") == "ready":
                break
            if ev is not None and ev.get("ev") == "fatal":
                raise MeshError(f"coordinator failed: {ev.get('error')}")
            if coord.proc.poll() is not None and events.empty():
                coord.thread.join(2)
                if events.empty():
                    raise MeshError(f"the coordinator exited with code {coord.proc.returncode}:\n"
                                    + _tail(out / "coordinator.log"))
            if time.monotonic() > ready_by:
                raise MeshError("the coordinator did not get ready within 60 s:\n"
                                + _tail(out / "coordinator.log"))
        adv = make_adversary(sc, out, doc["mesh"])
        if adv is not None:
            adv_thread = advmod.AdversaryThread(adv, broker.host, broker.port,
                                                wait_s=max(5.0, sc.deadline_s / 2))
            adv_thread.start_client()
            adv_thread.start()
        env = dict(os.environ)
        env["MICROPYPATH"] = os.pathsep.join(
            [str(REPO / "shared"), str(FIRMWARE), str(FIRMWARE / "lib")])
        for nid in sc.honest_ids():
            nd = out / "nodes" / nid
            lf = open(nd / "node.log", "ab")
            node_logs.append(lf)
            nodes[nid] = subprocess.Popen(
                [exe, "-X", "heapsize=4m", str(FIRMWARE / "main.py"), str(nd)],
                stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        prog.say(f"  started the coordinator, {len(nodes)} MicroPython nodes"
                 + (f" and the adversary ({len(adv.nodes)} compromised)" if adv else ""))
        deadline = time.monotonic() + timeout
        done: dict[str, Any] | None = None
        killed = False
        while done is None:
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                ev = None
            if ev is not None:
                prog.event(ev)
                k = ev.get("ev")
                if k == "done":
                    done = ev
                    break
                if k == "fatal":
                    raise MeshError(f"coordinator failed: {ev.get('error')}")
                if (k == "accepted" and kill_coordinator_at and not killed
                        and ev.get("round") == kill_coordinator_at
                        and ev.get("have", 0) >= max(1, ev.get("want", 2) // 2)
                        and ev.get("have", 0) < ev.get("want", 0)):
                    coord.kill9()
                    killed = True
                    info["coordinator_restarts"] += 1
                    prog.say(f"  *** SIGKILL to the coordinator in round {ev['round']} "
                             f"({ev['have']}/{ev['want']} updates accepted); restarting it")
                    coord.log.close()
                    coord = _Coord(out, broker.address, events)
                    continue
            if coord.proc.poll() is not None and events.empty():
                coord.thread.join(2)
                if events.empty():
                    raise MeshError(f"the coordinator exited with code {coord.proc.returncode}:\n"
                                    + _tail(out / "coordinator.log"))
            for nid, p in nodes.items():
                rc = p.poll()
                if rc is not None and rc != 0:
                    raise MeshError(f"node {nid} exited with code {rc}:\n"
                                    + _tail(out / "nodes" / nid / "node.log"))
            if adv_thread is not None and adv_thread.error:
                raise MeshError(f"adversary failed: {adv_thread.error}")
            if time.monotonic() > deadline:
                raise MeshError(f"the run did not finish within {timeout:.0f} s")
        info["coordinator_done"] = done
        # Nodes exit by themselves on the final GLOBAL_MODEL (after their last digest).
        end = time.monotonic() + 15
        for p in nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, end - time.monotonic()))
        info["node_exit_codes"] = {nid: p.poll() for nid, p in nodes.items()}
        coord.proc.wait(10)
        if adv is not None:
            (out / "adversary.json").write_text(json.dumps(adv.report(), indent=2) + "\n")
        return info
    finally:
        # Every child goes, whatever happened (Ctrl-C, an error, a failed node).
        for p in nodes.values():
            _stop_proc(p)
        for lf in node_logs:
            lf.close()
        if coord is not None:
            coord.stop()
        if adv_thread is not None:
            adv_thread.stop()
        broker.close()


# ------------------------------------------------------------------ in-process engine
class Bus:
    """An in-memory broker: FIFO delivery, MQTT topic filters, retained messages."""

    def __init__(self) -> None:
        self.q: deque[tuple[str, bytes]] = deque()
        self.subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.retained: dict[str, bytes] = {}
        self.delivered = 0

    def subscribe(self, flt: str, handler: Callable[[str, bytes], None]) -> None:
        self.subs.append((flt, handler))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if retain:
            self.retained[topic] = payload
        self.q.append((topic, payload))

    def pump(self, stop: Callable[[], bool], limit: int = 10_000_000) -> None:
        while self.q and not stop():
            topic, payload = self.q.popleft()
            self.delivered += 1
            if self.delivered > limit:
                raise MeshError("in-process bus: message limit reached (a loop?)")
            for flt, h in self.subs:
                if _match(flt, topic):
                    h(topic, payload)


def _match(flt: str, topic: str) -> bool:
    fp, tp = flt.split("/"), topic.split("/")
    for i, f in enumerate(fp):
        if f == "#":
            return True
        if i >= len(tp) or (f != "+" and f != tp[i]):
            return False
    return len(fp) == len(tp)


class SimNode:
    """What firmware/node.py does on a GLOBAL_MODEL, with the same portable calls (model.train
    with derive_seed, wire frames, microfed.verify for peers, microfed.audit for the gossip
    aggregate), signing with `cryptography` instead of the pure-Python Ed25519 for speed."""

    def __init__(self, bundle: dict[str, Any], xs: list[list[int]], ys: list[int], sc: Scenario,
                 registry: Any, bus: Bus, max_abs: int = coordmod.DEFAULT_MAX_ABS) -> None:
        self.id = bundle["node_id"]
        self.mesh = bundle["mesh"]
        self.mesh_id = wire.mesh_id(self.mesh)
        self.seed = bytes.fromhex(bundle["seed"])
        self.sign = keys.signer(self.seed)
        self.coord_pub = bytes.fromhex(bundle["coordinator_public_key"])
        self.data = (xs, ys)
        self.m = model.get("softmax")
        self.train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
        self.gossip = sc.mode == "gossip"
        self.bus = bus
        self.last_round = 0
        self.seq = 0
        self.done = False
        self.buffers: dict[int, dict[bytes, tuple[str, int, list[int]]]] = {}
        self.peers = Verifier(self.mesh_id, registry, ReplayGuard(MemoryStore()),
                              keys.check_signature, limits=Limits(self.m.n_params, max_abs),
                              kinds=(wire.MODEL_UPDATE,))
        self.base = f"microfed/{self.mesh}/"
        self.digests: dict[int, str] = {}
        self.rejected: dict[str, int] = {}

    def hello(self) -> None:
        payload = wire.encode_status(0, 0, 0, 0, "boot inproc " + ("gossip" if self.gossip else "coordinated"))
        self.bus.publish(self.base + "hello/" + self.id, self._frame(wire.HELLO, 0, payload))

    def _frame(self, kind: int, r: int, payload: bytes) -> bytes:
        self.seq += 1
        return wire.encode(kind, self.mesh_id, self.id, r, self.seq, int(time.time()), payload,
                           self.sign)

    def on_global(self, topic: str, raw: bytes) -> None:
        try:
            fr = announce.decode_frame(raw)
        except wire.WireError:
            return
        if (fr.kind != wire.GLOBAL_MODEL or fr.sender != wire.COORDINATOR
                or fr.round <= self.last_round
                or not keys.check_signature(self.coord_pub, fr.signing_digest(), fr.signature)):
            return
        r, b = fr.round, fr.body
        if self.gossip and b["rule"] is not None and r > 1:
            self._digest(r - 1, b)
        for k in [k for k in self.buffers if k < r]:
            del self.buffers[k]
        self.last_round = r
        if b["final"] or r > 0xFFFFFFFE:
            self.done = True
            return
        g = b["values"]
        tr = self.train
        cfg = model.TrainConfig(tr["lr"], tr["epochs"], tr["batch"],
                                model.derive_seed(tr["seed"], r, self.id))
        delta = self.m.delta(g, self.m.train(g, self.data, cfg))
        frame = self._frame(wire.MODEL_UPDATE, r, wire.encode_model_update(len(self.data[1]), delta))
        if self.gossip:
            self.buffers.setdefault(r, {})[wire.sha256(frame)] = (self.id, len(self.data[1]), delta)
        self.bus.publish(self.base + "update/" + self.id, frame)

    def on_update(self, topic: str, raw: bytes) -> None:
        h = wire.sha256(raw)
        if any(h in b for b in self.buffers.values()):
            return
        cur = self.last_round
        try:
            fr = self.peers.verify(raw, int(time.time()), cur if cur > 0 else 1, cur + 1)
        except Rejected as e:
            self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            return
        self.buffers.setdefault(fr.round, {})[h] = (fr.sender, fr.body["samples"], fr.body["values"])

    def _digest(self, rr: int, b: dict[str, Any]) -> None:
        buf = self.buffers.get(rr, {})
        ids, vecs, weights = [], [], []
        for node_id, fh in b["accepted"]:
            e = buf.get(fh)
            if e is None or e[0] != node_id:
                return  # a missing frame: no digest for this round (the firmware does the same)
            ids.append(node_id)
            vecs.append(e[2])
            weights.append(e[1])
        res = audit.run(b["rule"], ids, vecs, announce.rule_params(b["rule"], b["p1"], b["p2"],
                                                                   weights))
        self.digests[rr] = res["digest"]
        payload = wire.encode_gossip_digest(bytes.fromhex(res["digest"]), b["rule"], b["p1"],
                                            b["p2"], len(ids))
        self.bus.publish(self.base + "digest/" + self.id, self._frame(wire.GOSSIP_DIGEST, rr, payload))


def run_inproc(sc: Scenario, out: Path, doc: dict[str, Any],
               progress: Progress | None = None) -> dict[str, Any]:
    prog = progress or Progress(sc, None)
    cfg = coordmod.load_config(out)
    bus = Bus()
    store = RoundsStore(out / coordmod.STORE_NAME)
    try:
        coord = Coordinator(cfg, store, bus.publish, log=prog.event)
        reg = coord.registry
        sims: list[SimNode] = []
        for nid in sc.honest_ids():
            nd = out / "nodes" / nid
            bundle = json.loads((nd / "bundle.json").read_text())
            xs, ys, _info = model.decode_shard((nd / "shard.bin").read_bytes())
            sims.append(SimNode(bundle, xs, ys, sc, reg, bus))
        base = f"microfed/{doc['mesh']}/"
        for s in sims:
            bus.subscribe(base + "global", s.on_global)
            if s.gossip:
                bus.subscribe(base + "update/+", s.on_update)
        adv = make_adversary(sc, out, doc["mesh"])
        if adv is not None:
            def adv_global(t: str, p: bytes) -> None:
                outp = adv.on_global(p)
                adv.remember_own(outp)
                for tp, fr in outp:
                    bus.publish(tp, fr)

            def adv_update(t: str, p: bytes) -> None:
                outp = adv.on_update(p)
                adv.remember_own(outp)
                for tp, fr in outp:
                    bus.publish(tp, fr)

            bus.subscribe(base + "global", adv_global)
            bus.subscribe(base + "update/+", adv_update)
        for sub in ("update/+", "digest/+", "hello/+"):
            bus.subscribe(base + sub, coord.handle)
        coord.start()
        for s in sims:
            s.hello()
        if adv is not None:
            for tp, fr in adv.hello_frames():
                bus.publish(tp, fr)
        bus.pump(lambda: coord.done)
        if not coord.done:
            # Only a deadline can move things on now (e.g. a rule minimum not met).
            raise MeshError("in-process run stalled: no messages left and the run is not over")
        if adv is not None:
            (out / "adversary.json").write_text(json.dumps(adv.report(), indent=2) + "\n")
        return {"transport": "inproc", "coordinator_restarts": 0,
                "node_rejections": {s.id: s.rejected for s in sims if s.rejected}}
    finally:
        store.close()


# ------------------------------------------------------------------ report
def summarize(out: Path, doc: dict[str, Any], info: dict[str, Any], duration: float) -> dict[str, Any]:
    store = RoundsStore(out / coordmod.STORE_NAME)
    try:
        rows = store.rounds()
        st = store.load_state()
        rej = store.rejection_counts()
        rep = store.reputation_history()
        dig = store.digests()
        sec = store.security_events()
        rejected_hashes = store.rejected_hashes()
    finally:
        store.close()
    if st is None:
        raise MeshError(f"{out}: the coordinator never started (no state in the store)")
    final_params = coordmod._unpack(st["params"])
    honest = set(doc["honest_ids"])
    byz = set(doc["byzantine_ids"])
    last_rep: dict[str, tuple[int, bool]] = {}
    for _r, n, v, b, _vd in rep:
        last_rep[n] = (v, b)
    banned = sorted(n for n, (_v, b) in last_rep.items() if b)
    acc = [r["accuracy"] for r in rows]
    agreement = None
    if doc["mode"] == "gossip":
        by_round: dict[int, dict[str, bool]] = {}
        for r, n, _d, a in dig:
            by_round.setdefault(r, {})[n] = a
        agreed = 0
        for row in rows:
            got = by_round.get(row["round"], {})
            want = [n for n in honest if n not in banned]
            if want and all(got.get(n) is True for n in want):
                agreed += 1
        agreement = {"rounds_agreed": agreed, "rounds": len(rows),
                     "honest_mismatches": sum(1 for r, n, _d, a in dig if n in honest and not a),
                     "flagged": sorted({n for r, n, _d, a in dig if not a})}
    injected: dict[str, Any] | None = None
    adv_path = out / "adversary.json"
    if adv_path.exists():
        adv = json.loads(adv_path.read_text())
        ok = sum(1 for e in adv["injected"] if rejected_hashes.get(e["sha256"]) == e["expect"])
        injected = {"by_reason": adv["injected_by_reason"], "total": len(adv["injected"]),
                    "rejected_with_expected_reason": ok}
    summary = {
        "scenario": doc["name"],
        "seed": doc["seed"],
        "transport": info.get("transport"),
        "mode": doc["mode"],
        "split": doc["split"] + (f"(alpha={doc['alpha']})" if doc["split"] == "dirichlet" else ""),
        "rule": doc["rule"],
        "f": doc["f"],
        "honest": doc["honest"],
        "byzantine": doc["byzantine"],
        "attack": "+".join(sorted({g["attack"] for g in doc["attackers"]})) or "none",
        "rounds": len(rows),
        "rounds_planned": doc["rounds"],
        "accuracy": acc,
        "final_accuracy": acc[-1] if acc else None,
        "rejected": dict(sorted(rej.items())),
        "banned": banned,
        "honest_banned": [n for n in banned if n in honest],
        "byzantine_banned": [n for n in banned if n in byz],
        "crosscheck": {"checked": sum(1 for r in rows if r["crosschecked"]),
                       "mismatches": sum(1 for e in sec if e["kind"] == "crosscheck_mismatch")},
        "digest_agreement": agreement,
        "final_digest": model.params_digest(final_params).hex(),
        "injected": injected,
        "coordinator_restarts": info.get("coordinator_restarts", 0),
        "security_events": {k: sum(1 for e in sec if e["kind"] == k)
                            for k in sorted({e["kind"] for e in sec})},
        "duration_s": round(duration, 2),
    }
    if "broker" in info:
        summary["broker"] = info["broker"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "accuracy", "accepted", "selected", "close_reason", "crosschecked",
                    "agg_digest", "model_digest", "banned_after"])
        bans_by_round: dict[int, list[str]] = {}
        for r, n, _v, b, _vd in rep:
            if b:
                bans_by_round.setdefault(r, []).append(n)
        for row in rows:
            sel = json.loads(row["selected"]) if row["selected"] else []
            w.writerow([row["round"], f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "",
                        row["n_accepted"], " ".join(sel), row["close_reason"], row["crosschecked"],
                        row["agg_digest"], row["model_digest"],
                        " ".join(bans_by_round.get(row["round"], []))])
    summary["plots"] = plot(out, doc, rows, rep)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot(out: Path, doc: dict[str, Any], rows: list[dict[str, Any]],
         rep: list[tuple[int, str, int, bool, str | None]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [r["round"] for r in rows]
    ys = [100 * (r["accuracy"] or 0) for r in rows]
    ax.plot(xs, ys, marker="o", label=f"{doc['rule']} ({doc['mode']})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    attack = "+".join(sorted({g["attack"] for g in doc["attackers"]})) or "none"
    ax.set_title(f"{doc['honest']} honest + {doc['byzantine']} Byzantine ({attack}), {doc['split']}")
    ax.legend()
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    byz = set(doc["byzantine_ids"])
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r, n, v, _b, _vd in rep:
        s = series.setdefault(n, ([], []))
        s[0].append(r)
        s[1].append(v / 65536)
    for n in sorted(series):
        s = series[n]
        ax.plot(s[0], s[1], linestyle="--" if n in byz else "-", label=n + (" (byz)" if n in byz else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("reputation")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if len(series) <= 16:
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("reputation per node (dashed: Byzantine)")
    fig.tight_layout()
    p = out / "reputation.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    return paths


def table(summary: dict[str, Any]) -> str:
    s = summary
    rej = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "none"
    da = s["digest_agreement"]
    rows = [
        ("rule", f"{s['rule']} (f={s['f']})"),
        ("nodes", f"{s['honest']} honest + {s['byzantine']} Byzantine ({s['attack']})"),
        ("mode / split", f"{s['mode']} / {s['split']}"),
        ("rounds", str(s["rounds"])),
        ("accuracy", f"{_pct(s['accuracy'][0]).strip()} after round 1 -> "
                     f"{_pct(s['final_accuracy']).strip()} final" if s["accuracy"] else "-"),
        ("rejected", rej),
        ("banned", ", ".join(s["banned"]) or "none"),
        ("honest banned", ", ".join(s["honest_banned"]) or "none"),
        ("cross-check", f"{s['crosscheck']['checked']} rounds checked, "
                        f"{s['crosscheck']['mismatches']} mismatches"),
        ("digest agreement", "n/a (coordinated)" if da is None else
         f"{da['rounds_agreed']}/{da['rounds']} rounds, flagged: {', '.join(da['flagged']) or 'none'}"),
        ("final digest", s["final_digest"]),
        ("time", f"{s['duration_s']:.1f} s ({s['transport']})"),
    ]
    if s.get("injected") and s["injected"]["total"]:
        inj = s["injected"]
        rows.insert(6, ("injected frames", f"{inj['total']} ({', '.join(f'{k} {v}' for k, v in inj['by_reason'].items())}), "
                        f"{inj['rejected_with_expected_reason']} rejected with the expected reason"))
    if s.get("coordinator_restarts"):
        rows.append(("coordinator restarts", str(s["coordinator_restarts"])))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


# ------------------------------------------------------------------ entry points
def run(sc: Scenario, out: Path, transport: str = "mqtt", broker: str | None = None,
        force: bool = False, say: Callable[[str], None] | None = print,
        kill_coordinator_at: int = 0, timeout: float = 1800.0) -> dict[str, Any]:
    if transport not in TRANSPORTS:
        raise MeshError(f"transport must be one of {', '.join(TRANSPORTS)}")
    t0 = time.monotonic()
    doc = prepare(sc, out, force)
    prog = Progress(sc, say)
    prog.say(f"microfed mesh: {sc.name}: {sc.honest} honest + {sc.byzantine} Byzantine "
             f"({sc.attack_label}), rule {sc.rule} f={sc.f}, {sc.rounds} rounds, {sc.mode}, "
             f"{sc.split}, seed {sc.seed}, transport {transport}")
    prog.say(f"  run directory: {out}")
    if transport == "mqtt":
        info = run_mqtt(sc, out, doc, broker, prog, kill_coordinator_at, timeout)
    else:
        if kill_coordinator_at:
            raise MeshError("--kill-coordinator-at needs the mqtt transport")
        info = run_inproc(sc, out, doc, prog)
    return summarize(out, doc, info, time.monotonic() - t0)


# ------------------------------------------------------------------ results sweep
SWEEP_ATTACKS = ("none", "sign-flip", "ipm", "alie", "gaussian", "scaling", "label-flip", "sleeper")
TARGETS = (
    ("iid", "krum", "sign-flip", ">=", 0.90),
    ("iid", "krum", "ipm", ">=", 0.90),
    ("iid", "krum", "gaussian", ">=", 0.90),
    ("iid", "krum", "label-flip", ">=", 0.90),
    ("iid", "fedavg", "ipm", "<=", 0.15),
)


def _sweep_one(job: tuple[str, str, str, int, int, str, bool]) -> dict[str, Any]:
    split, rule, attack, rounds, seed, out, bans = job
    # ban_below = 0: reputation still scored, nobody ever banned (the rule alone defends).
    sc = Scenario(name=f"{split}-{rule}-{attack}", honest=10,
                  attackers=[AttackGroup(attack, 3)], rule=rule, f=3, rounds=rounds,
                  mode="coordinated", split=split, alpha=0.5, seed=seed, crosscheck="always",
                  reputation={} if bans else {"ban_below": 0})
    s = run(sc, Path(out), transport="inproc", force=True, say=None)
    return {"split": split, "rule": rule, "attack": attack, "final_accuracy": s["final_accuracy"],
            "accuracy": s["accuracy"], "banned": s["banned"], "honest_banned": s["honest_banned"],
            "byzantine_banned": s["byzantine_banned"], "crosscheck": s["crosscheck"],
            "final_digest": s["final_digest"], "duration_s": s["duration_s"], "run_dir": out}


def float_reference(split_name: str, rule: str, rounds: int, seed: int, n_nodes: int = 13,
                    f: int = 3) -> dict[str, Any]:
    """The no-attack federated run in float64 (host/microfed_host/float_baseline.py): same
    shards, init, sample order, batches, learning rate and rule as the Q16.16 mesh."""
    from microfed_host import float_baseline as fb
    from microfed_tools.cmd_provision import node_ids

    sp = data.train_test_split(seed)
    shards = data.shard(sp.train, n_nodes, split_name, seed, 0.5)
    ids = node_ids(n_nodes)
    fm = fb.FloatSoftmax()
    g = fm.init(seed)
    xt = fb.features(sp.test.x)
    feats = [fb.features(s.x) for s in shards]
    sizes = np.asarray([len(s) for s in shards], dtype=np.float64)
    acc = []
    for r in range(1, rounds + 1):
        deltas = np.stack([fm.train(g, feats[i], shards[i].y, 32768 / 65536, 1, 10,
                                    model.derive_seed(seed, r, ids[i])) - g
                           for i in range(n_nodes)])
        if rule == "krum":
            d2 = ((deltas[:, None, :] - deltas[None, :, :]) ** 2).sum(axis=2)
            scores = [np.sort(np.delete(d2[i], i))[: n_nodes - f - 2].sum() for i in range(n_nodes)]
            agg = deltas[min(range(n_nodes), key=lambda i: (scores[i], ids[i]))]
        else:
            agg = np.average(deltas, axis=0, weights=sizes)
        g = g + agg
        acc.append(fm.accuracy(g, xt, sp.test.y))
    return {"split": split_name, "rule": rule, "accuracy": acc, "final_accuracy": acc[-1]}


def sweep(rules: list[str], attacks: list[str], splits: list[str], rounds: int, seed: int,
          out: Path, jobs: int = 2, say: Callable[[str], None] = print,
          bans: bool = True) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out.mkdir(parents=True, exist_ok=True)
    todo = [(sp, ru, at, rounds, seed, str(out / f"{sp}-{ru}-{at}"), bans)
            for sp in splits for ru in rules for at in attacks]
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {ex.submit(_sweep_one, j): j for j in todo}
        for fut in as_completed(futs):
            r = fut.result()
            results.append(r)
            say(f"  [{len(results):>3}/{len(todo)}] {r['split']:9} {r['rule']:12} {r['attack']:10} "
                f"final {100 * r['final_accuracy']:5.1f}%  banned {','.join(r['banned']) or '-'}"
                f"  ({r['duration_s']:.0f} s)")
    floats = []
    for sp in splits:
        for ru in ("fedavg", "krum"):
            if ru in rules and "none" in attacks:
                fr = float_reference(sp, ru, rounds, seed)
                q = next(x for x in results if x["split"] == sp and x["rule"] == ru and x["attack"] == "none")
                fr["q16_final_accuracy"] = q["final_accuracy"]
                fr["gap_points"] = 100 * (q["final_accuracy"] - fr["final_accuracy"])
                floats.append(fr)
    doc = {"rounds": rounds, "seed": seed, "honest": 10, "byzantine": 3, "f": 3, "bans": bans,
           "results": sorted(results, key=lambda x: (x["split"], x["rule"], x["attack"])),
           "float64": floats, "elapsed_s": round(time.monotonic() - t0, 1)}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def results_markdown(doc: dict[str, Any], rules: list[str], attacks: list[str],
                     splits: list[str]) -> str:
    res = {(r["split"], r["rule"], r["attack"]): r for r in doc["results"]}
    lines = []
    checks = []
    for sp, ru, at, op, thr in TARGETS:
        r = res.get((sp, ru, at))
        if r is None:
            continue
        v = r["final_accuracy"]
        ok = v >= thr if op == ">=" else v <= thr
        checks.append((f"{ru} under {at} ({sp})", f"{op} {100 * thr:.0f}%", f"{100 * v:.1f}%", ok))
    for fr in doc["float64"]:
        ok = abs(fr["gap_points"]) <= 1.0
        checks.append((f"Q16.16 vs float64, {fr['rule']}, no attack ({fr['split']})",
                       "within 1 point", f"{100 * fr['q16_final_accuracy']:.2f}% vs "
                       f"{100 * fr['final_accuracy']:.2f}% ({fr['gap_points']:+.2f})", ok))
    honest_banned = sorted({n for r in doc["results"] for n in r["honest_banned"]})
    checks.append(("honest nodes never banned", "none", ", ".join(honest_banned) or "none",
                   not honest_banned))
    lines.append("| target | wanted | measured | met |")
    lines.append("| --- | --- | --- | --- |")
    for name, want, got, ok in checks:
        lines.append(f"| {name} | {want} | {got} | {'yes' if ok else '**NO**'} |")
    tables = []
    for sp in splits:
        t = [f"{'IID' if sp == 'iid' else 'Dirichlet(0.5) non-IID'}:", "",
             "| rule \\ attack | " + " | ".join(attacks) + " |",
             "| --- |" + " --- |" * len(attacks)]
        for ru in rules:
            cells = []
            for at in attacks:
                r = res.get((sp, ru, at))
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{100 * r['final_accuracy']:.1f}"
                if r["byzantine_banned"]:
                    cell += f" (b{len(r['byzantine_banned'])})"
                if r["honest_banned"]:
                    cell += f" **H{len(r['honest_banned'])}**"
                cells.append(cell)
            t.append(f"| {ru} | " + " | ".join(cells) + " |")
        tables.append("\n".join(t))
    return "\n".join(lines), "\n\n".join(tables)


def main_sweep(a: Any) -> None:
    rules = [x.strip() for x in a.rules.split(",") if x.strip()]
    attacks = [advmod.canonical_attack(x) for x in a.attacks.split(",") if x.strip()]
    splits = [x.strip() for x in a.splits.split(",") if x.strip()]
    for r in rules:
        if r not in coordmod.RULES:
            raise MeshError(f"unknown rule {r!r}")
    for s in splits:
        if s not in SPLITS:
            raise MeshError(f"unknown split {s!r}")
    print(f"microfed mesh sweep: {len(rules)} rules x {len(attacks)} attacks x {len(splits)} "
          f"splits, {a.rounds} rounds, in-process engine, {a.jobs} jobs")
    bans = not a.no_bans
    if getattr(a, "render_only", False):
        try:
            doc = json.loads((Path(a.out) / "results.json").read_text())
        except (OSError, ValueError) as e:
            raise MeshError(f"--render-only needs {Path(a.out) / 'results.json'}: {e}") from None
        bans = doc.get("bans", True)
    else:
        doc = sweep(rules, attacks, splits, a.rounds, a.seed, Path(a.out), a.jobs, bans=bans)
    checks, tables = results_markdown(doc, rules, attacks, splits)
    md = Path(a.md)
    text = md.read_text() if md.exists() else ""
    tag = "sweep" if bans else "sweep-nobans"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    how = ("reputation bans on (the default)" if bans else
           "reputation bans OFF (`ban_below = 0`): the aggregation rule alone defends")
    flags = "" if bans else " --no-bans"
    block = (f"{begin}\n_Generated by `microfed mesh sweep --rounds {a.rounds} --seed {a.seed}{flags}` "
             f"({doc['elapsed_s']:.0f} s with {a.jobs} jobs); raw numbers in "
             f"`{Path(a.out) / 'results.json'}`._\n\n"
             f"#### Targets ({how})\n\n{checks}\n\n#### Final test accuracy (%) after {a.rounds} rounds, {how}\n\n"
             f"10 honest + 3 Byzantine nodes, f = 3, coordinated mode. `(bK)`: K Byzantine "
             f"nodes banned by reputation; `**Hk**`: k honest nodes banned.\n\n{tables}\n{end}")
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Results\n\n") + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"\n{checks}\n\n{tables}\n\nwrote {md} and {Path(a.out) / 'results.json'}")
