"""MicroPython nodes in a Flower run: a ClientApp that fronts MQTT nodes (docs/flower.md,
"MicroPython nodes in a Flower run: the bridge").

Flower has no client for microcontrollers. ``app`` here is a Flower 1.42 ClientApp (Message API)
whose ``train`` handler relays the round to one MicroPython node over MQTT in microfed's signed
wire format, so a Flower ServerApp with ``ExactKrum`` (``microfed_host.flower``) trains on real
nodes running the unchanged firmware. Each train message (round r = its "server-round"):

1. map       the Flower node -> the MQTT node it fronts: its node_config "microfed-node" when
             set (a SuperNode started with --node-config), else the bridge's ``nodes`` list
             indexed by its "partition-id" (Flower's simulation engine);
2. edge      the message's float arrays -> one raw Q16.16 vector (microfed_host.floatedge: round
             half up, NaN, infinities and overflow refused); its length must be the model's;
3. sign      GLOBAL_MODEL r with the coordinator's key (coordinator.sign_global): counter r,
             timestamp the run's ``epoch``, no announcement. Ed25519 is deterministic, so every
             ClientApp of round r, in whatever process, signs the same bytes, and a node that
             gets a second copy treats it as the duplicate it is (and re-sends its update);
4. relay     subscribe update/<node>, publish the global (retained), wait ``timeout_s``;
5. verify    every frame on update/<node> goes through the coordinator's HostVerifier
             (structure, mesh, registered sender, signature, counter/round/clock: round [r, r],
             the counters in the bridge's SQLite store, shared by every process of the run); a
             frame whose sender is not <node> is refused before its counter is looked at. A
             rejected frame is recorded with its reason in the store, counted and logged, and
             the wait goes on;
6. reply     the node's model, global + delta (saturating, as the coordinator adds it), as
             floats of the dtypes and shapes it came in (exact: raw / 65536), num-examples (the
             samples the node signed), and a ConfigRecord "microfed" naming the MQTT node and
             the update frame's SHA-256. The global and the update frame are recorded under
             ``state_dir/rounds/round-NNNN/`` for the audit (``audit_request``).

A node that sends no valid update in ``timeout_s``, a model that cannot become Q16.16 or has the
wrong size, a Flower node with no MQTT node: an error reply (Flower's Error, code ERR_*), never
a hang and never a crash of the bridge.

``run()`` is ``microfed flower-bridge``: broker, provisioned mesh, unix-port nodes, and a
ServerApp with ExactKrum in Flower's simulation engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
except ImportError as e:  # flwr missing, or older than the Message API (1.42)
    raise ImportError(
        "microfed_host.flowerbridge needs Flower >= 1.42 (flwr.clientapp, flwr.app): "
        "pip install microfed[flower]"
    ) from e

from microfed import model, q16, wire
from microfed.verify import Limits, Rejected
from microfed_host import brokerauth, keys
from microfed_host.coordinator import DEFAULT_MAX_ABS, active_keys, sign_global, topics
from microfed_host.floatedge import Q16ConversionError, from_raw, to_raw
from microfed_host.flowerarrays import ArrayLayout
from microfed_host.mqtt import HostMQTT, MQTTError
from microfed_host.provision import MeshDir
from microfed_host.store import Store
from microfed_host.verifier import HostVerifier

if TYPE_CHECKING:
    from microfed_host.scenario import Scenario

__all__ = ["CONFIG_ENV", "BridgeConfig", "BridgeError", "app", "audit_request", "run"]

log = logging.getLogger("microfed.flowerbridge")

CONFIG_ENV = "MICROFED_BRIDGE"  # the bridge.json every ClientApp process reads
CONFIG_NAME = "bridge.json"
STORE_NAME = "bridge.sqlite"
NODE_KEY = "microfed-node"  # node_config key naming the MQTT node (deployment engine)
# Error codes of the replies the bridge turns into Flower errors.
ERR_NO_UPDATE = 4201  # the node sent no valid update in time
ERR_BAD_MODEL = 4202  # the ServerApp's arrays cannot be the node's Q16.16 model
ERR_MAPPING = 4203  # no MQTT node for this Flower node
ERR_TRANSPORT = 4204  # the broker cannot be reached
ERR_INTERNAL = 4200  # anything else that went wrong in the bridge (the reason names it)


class BridgeError(RuntimeError):
    """A train message the bridge cannot relay; ``code`` is the Flower error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BridgeConfig:
    """What every ClientApp process of a bridged run needs (bridge.json)."""

    mesh_dir: str  # the provisioned mesh: coordinator key, signed registry, broker logins
    broker: str  # HOST:PORT
    nodes: list[str]  # partition-id i -> nodes[i]
    epoch: int  # the timestamp of every GLOBAL_MODEL of the run (whole seconds)
    state_dir: str  # bridge.sqlite (counters, rejections) and rounds/ (the records)
    model: str = "softmax"
    n_features: int = 64
    n_classes: int = 10
    max_abs: int = DEFAULT_MAX_ABS  # must equal the nodes' config "max_abs"
    timeout_s: float = 60.0  # how long a train message waits for its node's update

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BridgeConfig:
        try:
            doc = json.loads(Path(path).read_text())
            return cls(**doc)
        except (OSError, ValueError, TypeError) as e:
            raise BridgeError(ERR_MAPPING, f"bridge config {path}: {e}") from None


@dataclass
class Relayed:
    """A node's accepted update of one round, and the frames rejected while waiting for it."""

    node: str
    round: int
    frame: bytes
    samples: int
    delta: list[int]
    rejected: dict[str, int]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.frame).hexdigest()

    @classmethod
    def of(cls, node: str, round_: int, raw: bytes, fr: wire.Frame,
           rejected: dict[str, int]) -> Relayed:
        """From the update frame `raw`, decoded as `fr`."""
        return cls(node, round_, bytes(raw), int(fr.body["samples"]),
                   [int(v) for v in fr.body["values"]], rejected)


class Bridge:
    """One process's side of the bridge: the coordinator's signer, the registry, the verifier
    over the run's shared store. ``relay`` is steps 3-5 for one node and round."""

    def __init__(self, cfg: BridgeConfig) -> None:
        from microfed_host.broker import parse_address

        self.cfg = cfg
        mesh, seed, reg = MeshDir(Path(cfg.mesh_dir)).load()
        self.mesh = str(mesh["mesh"])
        self.mesh_id = wire.mesh_id(self.mesh)
        self.sign = keys.signer(seed)
        self.registry = reg.portable()
        self.model = model.get(cfg.model, n_features=cfg.n_features, n_classes=cfg.n_classes)
        self.state = Path(cfg.state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state / STORE_NAME)
        self.store.adopt_keys(active_keys(self.registry))
        self.verifier = HostVerifier(self.registry, self.store,
                                     Limits(self.model.n_params, cfg.max_abs),
                                     kinds=(wire.MODEL_UPDATE,))
        self.t = topics(self.mesh)
        self.address = parse_address(cfg.broker)
        self.auth = brokerauth.client_auth(Path(cfg.mesh_dir))

    # -- 1: the mapping ------------------------------------------------------------------
    def node_for(self, node_config: dict[str, Any]) -> str:
        """The MQTT node a Flower node fronts (docs/flower.md, "Mapping")."""
        named = node_config.get(NODE_KEY)
        if named is not None:
            node = str(named)
        else:
            pid = node_config.get("partition-id")
            if not isinstance(pid, int) or not 0 <= pid < len(self.cfg.nodes):
                raise BridgeError(ERR_MAPPING, f"no MQTT node for partition-id {pid!r}: the "
                                  f"bridge fronts {len(self.cfg.nodes)} nodes (0.."
                                  f"{len(self.cfg.nodes) - 1}); or set node_config {NODE_KEY}")
            node = self.cfg.nodes[pid]
        e = self.registry.nodes.get(node)
        if e is None or not e[1]:
            raise BridgeError(ERR_MAPPING, f"MQTT node {node!r} is not an active node of mesh "
                              f"{self.mesh}")
        return node

    # -- 3: the global -------------------------------------------------------------------
    def global_frame(self, round_: int, params: list[int], final: bool = False) -> bytes:
        """GLOBAL_MODEL `round_`, byte-identical in every process: counter = round,
        timestamp = the run's epoch. `final` tells the nodes the run is over."""
        return sign_global(self.mesh_id, self.sign, round_, round_, self.cfg.epoch, params,
                           {"final": True} if final else {})

    def publish_global(self, frame: bytes) -> None:
        """Publish a global (retained) and return once the broker has it (the final one)."""
        client = self._client("final")
        try:
            client.connect(10.0)
            client.publish(self.t["global"], frame, qos=1, retain=True)
        except MQTTError as e:
            raise BridgeError(ERR_TRANSPORT, str(e)) from None
        finally:
            client.close()

    def _client(self, who: str) -> HostMQTT:
        host, port = self.address
        return HostMQTT(host, port, f"microfed-bridge-{who}-{os.getpid()}"[:64],
                        max_message=wire.MAX_FRAME, **self.auth)

    # -- 4, 5: relay and verify ----------------------------------------------------------------
    def relay(self, node: str, round_: int, frame: bytes) -> Relayed:
        """Publish `frame` (GLOBAL_MODEL round_) and wait for `node`'s verified update."""
        rejected: dict[str, int] = {}
        client = self._client(node)
        try:
            try:
                client.connect(10.0)
                # Subscribed before the global goes out: the update cannot slip past.
                client.subscribe(self.t["update"] + node)
                client.publish(self.t["global"], frame, qos=1, retain=True)
            except MQTTError as e:
                raise BridgeError(ERR_TRANSPORT, f"node {node}, round {round_}: {e}") from None
            end = time.monotonic() + self.cfg.timeout_s
            while (left := end - time.monotonic()) > 0:
                msg = client.get(min(left, 0.5))
                if msg is None:
                    continue
                got = self._check(node, round_, msg.payload, rejected)
                if got is not None:
                    return got
            seen = ", ".join(f"{k} x{v}" for k, v in sorted(rejected.items())) or "none"
            raise BridgeError(ERR_NO_UPDATE, f"node {node} sent no valid update for round "
                              f"{round_} within {self.cfg.timeout_s:g} s (frames rejected: "
                              f"{seen})")
        finally:
            client.close()

    def _check(self, node: str, round_: int, raw: bytes, rejected: dict[str, int]
               ) -> Relayed | None:
        sha = hashlib.sha256(raw).hexdigest()
        if self._recorded(node, round_) == raw:
            # The update this bridge accepted and recorded for this round, sent again (the
            # node answers every copy of the global): the same answer, not a replay. A train
            # message for a round asked again (Flower retrying) gets it too.
            return Relayed.of(node, round_, raw, wire.decode(raw), rejected)
        try:
            claimed = wire.decode(raw, values=False).sender
        except Exception:  # undecodable: the verifier below names what is wrong with it
            claimed = node
        try:
            if claimed != node:
                # Before the verifier: a frame of another node must not use up its counter.
                why = Rejected("topic_sender_mismatch", f"{claimed[:64]} on update/{node}")
                self.store.record_rejection(why.reason, why.message, len(raw), sha, claimed,
                                            None, None, None)
                raise why
            fr = self.verifier.verify(raw, None, round_, round_)  # records its rejections
        except Rejected as e:
            rejected[e.reason] = rejected.get(e.reason, 0) + 1
            self.store.flush()
            log.warning("round %d: rejected a frame on update/%s: %s: %s (sha256 %s)",
                        round_, node, e.reason, e.message, sha[:16])
            return None
        return Relayed.of(node, round_, raw, fr, rejected)

    # -- the records ---------------------------------------------------------------------
    def _dir(self, round_: int) -> Path:
        return self.state / "rounds" / ("round-%04d" % round_)

    def _recorded(self, node: str, round_: int) -> bytes | None:
        try:
            return (self._dir(round_) / f"{node}.bin").read_bytes()
        except OSError:
            return None

    def record(self, got: Relayed, global_frame: bytes, flower_node: int) -> None:
        """state_dir/rounds/round-NNNN/: global.bin, <node>.bin (the update frame as it came)
        and <node>.json (Flower node id, SHA-256, samples, rejections)."""
        d = self._dir(got.round)
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "global.bin", global_frame)
        _write(d / f"{got.node}.bin", got.frame)
        doc = {"node": got.node, "round": got.round, "flower_node": flower_node,
               "sha256": got.sha256, "samples": got.samples, "rejected": got.rejected}
        _write(d / f"{got.node}.json", (json.dumps(doc, indent=2) + "\n").encode())


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # several processes write the same global: atomically, whole


@lru_cache(maxsize=16)
def _bridge(path: str, thread: int) -> Bridge:
    """One Bridge per process and thread (an SQLite connection stays in its thread)."""
    return Bridge(BridgeConfig.load(path))


# ---------------------------------------------------------------- the ClientApp

def _round_of(content: RecordDict) -> int:
    for rec in content.config_records.values():
        r = rec.get("server-round")
        if isinstance(r, int) and not isinstance(r, bool):
            if not 1 <= r <= wire.U32_MAX:
                break
            return r
    raise BridgeError(ERR_BAD_MODEL, "the train message has no ConfigRecord with an integer "
                      "'server-round' in 1..2^32-1 (Flower's strategies send one)")


def train_reply(bridge: Bridge, msg: Message, node_config: dict[str, Any]) -> RecordDict:
    """Steps 1-6 for one train message; BridgeError for what becomes an error reply."""
    node = bridge.node_for(node_config)
    r = _round_of(msg.content)
    if len(msg.content.array_records) != 1:
        raise BridgeError(ERR_BAD_MODEL, f"{len(msg.content.array_records)} ArrayRecords in "
                          "the train message, expected 1")
    rec = next(iter(msg.content.array_records.values()))
    layout = ArrayLayout.of(rec)
    try:
        g = layout.raw(rec)
    except Q16ConversionError as e:
        raise BridgeError(ERR_BAD_MODEL, f"round {r}: {e}") from None
    if g.size != bridge.model.n_params:
        raise BridgeError(ERR_BAD_MODEL, f"round {r}: the arrays hold {g.size} values, the "
                          f"nodes' model {bridge.cfg.model} has {bridge.model.n_params}")
    params = [int(v) for v in g]
    frame = bridge.global_frame(r, params)
    got = bridge.relay(node, r, frame)
    bridge.record(got, frame, msg.metadata.dst_node_id)
    new = np.clip(g + np.asarray(got.delta, dtype=np.int64), q16.MIN_RAW, q16.MAX_RAW)
    log.info("round %d: node %s update %s (%d samples, %d frames rejected)", r, node,
             got.sha256[:16], got.samples, sum(got.rejected.values()))
    return RecordDict({
        "arrays": layout.arrays(new),
        "metrics": MetricRecord({"num-examples": got.samples,
                                 "microfed-rejected-frames": sum(got.rejected.values())}),
        "microfed": ConfigRecord({"node": node, "update-sha256": got.sha256, "round": r}),
    })


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's entry point: relay the round to the MQTT node this Flower node fronts."""
    path = os.environ.get(CONFIG_ENV)
    try:
        if not path:
            raise BridgeError(ERR_MAPPING, f"${CONFIG_ENV} is not set: it names the bridge's "
                              f"{CONFIG_NAME} (microfed flower-bridge writes it)")
        bridge = _bridge(path, threading.get_ident())
        content = train_reply(bridge, msg, dict(context.node_config))
    except BridgeError as e:
        log.error("%s", e)
        return Message(error=Error(code=e.code, reason=str(e)), reply_to=msg)
    except Exception as e:  # a fault of the bridge itself: an error reply, not a dead actor
        log.exception("the bridge failed on a train message")
        return Message(error=Error(code=ERR_INTERNAL, reason=f"{type(e).__name__}: {e}"),
                       reply_to=msg)
    return Message(content=content, reply_to=msg)


# ---------------------------------------------------------------- the audit

def audit_request(state_dir: Path, round_: int, rule: str, params: dict[str, Any],
                  name: Callable[[dict[str, Any]], str] = lambda d: "%020d" % d["flower_node"]
                  ) -> dict[str, Any]:
    """Round `round_`'s aggregation as `microfed aggregate` takes it, rebuilt from what the
    bridge recorded: the global and every update frame verified again against the registry's
    keys (no counters: the record is the past), each delta added to the global. `name` gives
    each update's node id as the strategy named it (ExactKrum: the Flower node id)."""
    from microfed_host.keys import check_signature

    d = Path(state_dir) / "rounds" / ("round-%04d" % round_)
    mesh_dir = Path(BridgeConfig.load(Path(state_dir).parent / CONFIG_NAME).mesh_dir)
    reg = MeshDir(mesh_dir).load()[2].portable()
    g = wire.decode((d / "global.bin").read_bytes())
    if (g.kind != wire.GLOBAL_MODEL or g.sender != wire.COORDINATOR or g.round != round_
            or not check_signature(reg.coordinator, g.signing_digest(), g.signature)):
        raise ValueError(f"{d / 'global.bin'}: not the coordinator's GLOBAL_MODEL of round "
                         f"{round_}")
    ups = []
    for meta in sorted(d.glob("*.json")):
        doc = json.loads(meta.read_text())
        raw = (d / f"{doc['node']}.bin").read_bytes()
        fr = wire.decode(raw)
        entry = reg.lookup(fr.sender)
        if (entry is None or fr.sender != doc["node"] or fr.round != round_
                or fr.kind != wire.MODEL_UPDATE
                or not check_signature(entry[0], fr.signing_digest(), fr.signature)
                or hashlib.sha256(raw).hexdigest() != doc["sha256"]):
            raise ValueError(f"{meta}: the recorded update frame does not verify as "
                             f"{doc['node']}'s MODEL_UPDATE of round {round_}")
        vec = [q16.sat(a + b) for a, b in zip(g.body["values"], fr.body["values"], strict=True)]
        ups.append({"node": name(doc), "vector": vec})
    ups.sort(key=lambda u: u["node"])
    return {"rule": rule, **params, "updates": ups}


# ---------------------------------------------------------------- microfed flower-bridge

def run(out: Path, nodes: int = 4, rounds: int = 3, f: int = 0, seed: int = 1,
        max_samples: int = 0, timeout_s: float = 60.0, broker: str | None = None,
        force: bool = False, say: Callable[[str], None] = print,
        on_ready: Callable[[str, int, str], None] | None = None) -> dict[str, Any]:
    """Provision a mesh of `nodes` MicroPython unix-port nodes, start the broker and the nodes,
    and run a ServerApp with ExactKrum(f) for `rounds` rounds in Flower's simulation engine,
    one virtual SuperNode per MQTT node (partition-id i fronts node i). on_ready(host, port,
    mesh): once the broker is up, before the nodes start (tests). Returns the summary, also
    written to OUT/flower-bridge.json."""
    from microfed_host import mesh as meshmod
    from microfed_host.broker import BrokerError, broker_from_arg
    from microfed_host.scenario import MeshError, Scenario, prepare, write_node_config

    t0 = time.monotonic()
    sc = Scenario(name="flower-bridge", honest=nodes, rule="krum", f=f, rounds=rounds,
                  seed=seed, max_samples=max_samples, deadline_s=timeout_s)
    doc = prepare(sc, out, force)
    (out / "coordinator.json").unlink()  # the bridge signs the globals: no coordinator runs
    say(f"microfed flower-bridge: {nodes} MicroPython nodes, ExactKrum f={f}, {rounds} rounds, "
        f"seed {seed}, Flower simulation engine")
    say(f"  run directory: {out}")
    try:
        brk = broker_from_arg(broker, workdir=out / "broker",
                              auth_dir=out / "mesh" / brokerauth.BROKER_DIR)
        brk.start()
    except BrokerError as e:
        raise MeshError(str(e)) from None
    procs: dict[str, Any] = {}
    try:
        say(f"  broker: {brk.kind} on {brk.address}")
        ids = sc.honest_ids()
        for nid in ids:
            write_node_config(out / "nodes" / nid, sc, (brk.host, brk.port))
        cfg = BridgeConfig(mesh_dir=str(out / "mesh"), broker=brk.address, nodes=ids,
                           epoch=int(time.time()), state_dir=str(out / "bridge"),
                           model=sc.model, timeout_s=timeout_s)
        cfg.save(out / CONFIG_NAME)
        if on_ready is not None:
            on_ready(brk.host, brk.port, str(doc["mesh"]))
        launch = meshmod.node_launchers(sc, None)["unix"]
        for nid in ids:
            procs[nid] = launch(nid, out / "nodes" / nid, (brk.host, brk.port))
            procs[nid].start()
        say(f"  started {len(ids)} MicroPython nodes; partition-id i -> "
            + ", ".join(f"{i}: {n}" for i, n in enumerate(ids)))
        # The ClientApps run in Ray's worker processes: they find the bridge and microfed
        # through the environment they inherit (set for the simulation, then put back).
        env = {CONFIG_ENV: str(out / CONFIG_NAME),
               "PYTHONPATH": meshmod.child_pythonpath(),
               "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
               "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}  # else Ray warns about GPUs
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            result = _simulate(cfg, sc, out, say)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        bridge = Bridge(cfg)
        final = bridge.global_frame(rounds + 1, result["final_raw"], final=True)
        bridge.publish_global(final)
        end = time.monotonic() + 15
        codes = {nid: p.wait(max(0.1, end - time.monotonic())) for nid, p in procs.items()}
        summary = {"nodes": ids, "rounds": rounds, "f": f, "seed": seed,
                   "digests": result["digests"], "accuracy": result["accuracy"],
                   "n": result["n"], "rejected": bridge.store.rejection_counts(),
                   "node_exit_codes": codes, "initial_digest": result["initial_digest"],
                   "final_digest": model.params_digest(result["final_raw"]).hex(),
                   "seconds": round(time.monotonic() - t0, 1)}
        bridge.store.close()
        (out / "flower-bridge.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"  rejected frames: {summary['rejected'] or 'none'}; nodes exited with "
            f"{sorted(set(codes.values()), key=str)}")
        say(f"  final model digest {summary['final_digest']} ({summary['seconds']} s); "
            f"summary: {out / 'flower-bridge.json'}")
        return summary
    finally:
        for p in procs.values():
            p.stop()
        brk.close()


def _simulate(cfg: BridgeConfig, sc: Scenario, out: Path, say: Callable[[str], None]
              ) -> dict[str, Any]:
    """The ServerApp (ExactKrum) in Flower's simulation engine, one SuperNode per node."""
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from microfed_host.flower import ExactKrum, digest_hex

    mdl = model.get(cfg.model, n_features=cfg.n_features, n_classes=cfg.n_classes)
    xs, ys, _info = model.decode_shard((out / "data" / "test.mfds").read_bytes())
    init = mdl.init(sc.seed)
    res: dict[str, Any] = {"digests": {}, "accuracy": {}, "n": {},
                           "initial_digest": model.params_digest(init).hex()}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        n = len(cfg.nodes)
        strategy = ExactKrum(num_malicious_nodes=sc.f, fraction_evaluate=0.0,
                             min_train_nodes=n, min_available_nodes=n,
                             audit_dir=str(out / "flower-audit"))

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            raw = [int(v) for v in to_raw(arrays["params"].numpy(), "params")]
            acc = mdl.evaluate(raw, (xs, ys)) / len(ys)
            res["accuracy"][rnd] = acc
            if rnd in strategy.digests:
                req = strategy.last_request or {"updates": ()}
                say(f"  round {rnd}: ExactKrum over {len(req['updates'])} node updates, "
                    f"digest {strategy.digests[rnd]}, accuracy {acc:.4f}")
            else:
                say(f"  round {rnd}: accuracy {acc:.4f}" + (" (initial model)" if rnd == 0
                                                            else " (round skipped)"))
            return MetricRecord({"accuracy": acc})

        result = strategy.start(grid=grid, num_rounds=sc.rounds, evaluate_fn=evaluate,
                                initial_arrays=ArrayRecord({"params": Array(
                                    from_raw(np.asarray(init), np.dtype(np.float64),
                                             (len(init),)))}))
        # What Flower reports: the digest and count in each round's MetricRecord.
        for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
            if "microfed-digest" in metrics:
                res["digests"][rnd] = digest_hex(metrics)
                res["n"][rnd] = cast(int, metrics["microfed-n"])
        res["final_raw"] = [int(v) for v in to_raw(result.arrays["params"].numpy(), "params")]

    n = len(cfg.nodes)
    run_simulation(
        server_app=server, client_app=app, num_supernodes=n,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            # Logical CPUs: a ClientApp mostly waits for its node, so every node gets one.
            "init_args": {"num_cpus": n, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "warning"},
        },
    )
    if "final_raw" not in res:
        raise BridgeError(ERR_NO_UPDATE, "the ServerApp did not finish (see Flower's log above)")
    return res
