"""The mesh coordinator: round state machine, verification, robust aggregation with the
reference cross-check, reputation and bans, signed global models, gossip digest checks,
and SQLite persistence that survives SIGKILL (docs/protocol.md, "Round flow").

`Coordinator` is transport-agnostic: it consumes (topic, payload) pairs through `handle()`,
emits with a `publish(topic, payload, retain)` callable and checks its deadlines in `tick()`.
`serve()` runs it over MQTT (a persistent session with manual acknowledgements, so an update
the broker delivered is acknowledged only once it is in SQLite); the in-process engine of
`microfed_host.mesh` drives the very same object from an in-memory bus.

Run as a process (what `microfed mesh run` does):

    python -m microfed_host.coordinator RUN_DIR --broker HOST:PORT

RUN_DIR holds coordinator.json (the configuration) and the provisioned mesh; the state goes
to RUN_DIR/coordinator.sqlite. Started again on the same RUN_DIR it resumes the round in
progress. Output: one JSON object per line on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfed import audit, model, q16, secagg, wire
from microfed.reputation import BANNED, ReputationBook
from microfed.reputation import from_bytes as book_from_bytes
from microfed.verify import Limits, Rejected
from microfed_host import privacy as privmod
from microfed_host.crosscheck import CrossChecker, CrossCheckMismatch, Policy
from microfed_host.rounds_store import RoundsStore
from microfed_host.secagg_server import MAX_NODES as SECAGG_MAX_NODES
from microfed_host.secagg_server import Result as SecAggResult
from microfed_host.secagg_server import SecAggRound
from microfed_host.verifier import HostVerifier

REPO = Path(__file__).resolve().parents[2]
RULES = audit.RULES
MODES = ("coordinated", "gossip")
# Privacy modes (docs/privacy.md): "dp" local differential privacy (the nodes noise their
# updates; config `dp` feeds the accountant), "secagg" secure aggregation (FedAvg, coordinated),
# "secagg+dp" both: distributed DP, the nodes' noise shares add up in the masked sum.
PRIVACY = privmod.PRIVACY_MODES
STORE_NAME = "coordinator.sqlite"
CONFIG_NAME = "coordinator.json"
DEFAULT_MAX_ABS = 256 * 65536  # must equal the nodes' config "max_abs"

# Reasons the coordinator adds to microfed.verify.REASONS.
EXTRA_REASONS = ("duplicate", "equivocation", "banned", "topic_sender_mismatch", "bad_topic",
                 "not_expected", "internal_error", "counter_behind")
# The receive path's memory bound: QUEUE_SIZE messages of at most MAX_MESSAGE bytes.
MAX_MESSAGE = wire.MAX_FRAME
QUEUE_SIZE = 256
# Rejected frames are acknowledged in batches of this size, after one SQLite commit; below
# mosquitto's default of 20 unacknowledged QoS 1 messages in flight per client.
ACK_BATCH = 16
# `--rounds forever`: the most rounds a run may have (a round number stays a small int on a
# 32-bit MicroPython: 34 years of one round a second).
ROUNDS_FOREVER = (1 << 30) - 1
# What a reload (SIGHUP) may change in a running run; every other setting defines what the
# rounds compute (rule, f, mode, model, ...) and is fixed for the run's life.
RELOADABLE = ("rounds", "deadline_s", "crosscheck", "round_min_s")
# How often serve() writes its receive queue's figures to the store (the queue-depth metric).
QUEUE_REPORT_S = 1.0

Log = Callable[[dict[str, Any]], None]
Publish = Callable[[str, bytes, bool], None]


class CoordinatorError(RuntimeError):
    """Bad configuration or state: the message says what and why."""


def parse_privacy(value: object) -> str:
    """The privacy mode of a scenario, flag or coordinator.json: one of PRIVACY."""
    try:
        return privmod.parse_privacy(value)
    except privmod.PrivacyError as e:
        raise CoordinatorError(str(e)) from None


def check_privacy(privacy: str, rule: str, mode: str, reputation: dict[str, int]) -> None:
    """Refuse what cannot run on masked updates: every rule but FedAvg needs the individual
    updates (Krum's distances, the median's and trimmed mean's sorted coordinates), and so
    do reputation scores and a gossip node's own aggregation (docs/privacy.md)."""
    if privacy not in privmod.SECAGG_MODES:
        return
    if rule != "fedavg":
        raise CoordinatorError(
            f"privacy {privacy} works with rule fedavg only: {rule} needs the individual updates, "
            "which secure aggregation hides (docs/privacy.md, \"What robustness is lost\")")
    if mode != "coordinated":
        raise CoordinatorError(f"privacy {privacy} needs coordinated mode: a gossip node "
                               "would aggregate its peers' individual updates")
    if reputation:
        raise CoordinatorError(f"privacy {privacy} cannot score reputation (it needs each node's "
                               "update); remove the [reputation] settings")




def topics(mesh: str) -> dict[str, str]:
    base = f"microfed/{mesh}/"
    return {"base": base, "global": base + "global", "registry": base + "registry",
            "update": base + "update/", "digest": base + "digest/", "hello": base + "hello/",
            "notice": base + "notice/", "secagg": base + "secagg/",
            "secagg_round": base + "secagg-round"}


def _notice_seq(now: float) -> int:
    """Counters of the coordinator's notices: milliseconds since the epoch. Strictly rising
    across restarts without persisting anything (notices are not part of the round state)."""
    return max(1, int(now * 1000))


# Pre-aggregation steps before the rule (microfed.defences; docs/determinism.md 4.7-4.8).
PRES = ("none", "nnm", "bucketing")


def rule_min_nodes(rule: str, f: int, trim: int, pre: str = "none", bucket: int = 1) -> int:
    """The fewest updates a round can aggregate: the rule's own minimum, nearest-neighbour
    mixing's 2f + 1, and with bucketing enough updates for that many buckets of `bucket`."""
    if rule in ("krum", "multi_krum"):
        need = 2 * f + 3
    elif rule == "trimmed_mean":
        need = 2 * trim + 1
    else:
        need = 1
    if pre == "nnm":
        need = max(need, 2 * f + 1)
    elif pre == "bucketing":
        need = (need - 1) * bucket + 1
    return need


@dataclass
class CoordinatorConfig:
    mesh_dir: str
    rule: str = "krum"
    f: int = 3
    m: int = 0  # multi_krum: 0 = n - f
    trim: int = -1  # trimmed_mean: -1 = f
    rounds: int = 10
    mode: str = "coordinated"
    crosscheck: str = "always"
    deadline_s: float = 60.0
    digest_grace_s: float = 5.0
    # No round closes sooner than this after it opened, even with every update in: paces a
    # mesh (battery-powered nodes that sleep between rounds) and gives operators (and the
    # chaos runs) a window to act between rounds. 0: close as soon as the quorum is in.
    round_min_s: float = 0.0
    wait_hello_s: float = 0.0  # > 0: round 1 starts when every expected node said HELLO
    init_seed: int = 1
    model: str = "softmax"
    n_features: int = 64
    n_classes: int = 10
    test_shard: str = ""
    max_abs: int = DEFAULT_MAX_ABS
    reputation: dict[str, int] = field(default_factory=dict)
    expected: list[str] = field(default_factory=list)  # empty: every active registry node
    # Scheduled revocations: node -> the round after whose close the coordinator revokes it
    # (re-signs the registry in the mesh directory and adopts it before any update of the
    # next round is handled). Exact round for reproducible experiments; `microfed provision
    # revoke` does the same at any time, effective within a second.
    revoke_at: dict[str, int] = field(default_factory=dict)
    # A pre-aggregation step before the rule: "nnm" (nearest-neighbour mixing, with f) or
    # "bucketing" (buckets of `bucket` updates, permuted by a seed that is the round number).
    pre: str = "none"
    bucket: int = 2
    privacy: str = "none"  # PRIVACY; "secagg", "secagg+dp": docs/privacy.md
    # Differential privacy the nodes apply ({}: none), for the accountant: microfed_host.privacy
    # (check_config) says what it holds; the coordinator reports epsilon spent per round.
    dp: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.rule not in RULES:
            raise CoordinatorError(f"unknown rule {self.rule!r} (one of {', '.join(RULES)})")
        if self.mode not in MODES:
            raise CoordinatorError(f"mode must be one of {', '.join(MODES)}")
        if not 0 <= self.f <= 255 or not 0 <= self.m <= 255 or not -1 <= self.trim <= 255:
            raise CoordinatorError("f, m and trim must fit 0..255 (they travel as u8)")
        if not 1 <= self.rounds <= ROUNDS_FOREVER:
            raise CoordinatorError(f"rounds must be in 1..{ROUNDS_FOREVER} (forever)")
        if self.pre not in PRES:
            raise CoordinatorError(f"pre must be one of {', '.join(PRES)}, got {self.pre!r}")
        if self.pre != "none":
            if type(self.bucket) is not int or not 1 <= self.bucket <= 255:
                raise CoordinatorError(f"bucket must be in 1..255, got {self.bucket!r}")
            if self.pre == "bucketing" and self.rule == "fedavg":
                raise CoordinatorError("bucketing before fedavg is refused: a bucket mean "
                                       "carries no sample weight (docs/determinism.md 4.8)")
            if self.mode == "gossip":
                raise CoordinatorError(f"pre {self.pre} runs in coordinated mode only: gossip "
                                       "nodes rebuild the aggregate without pre steps")
        for node, rr in self.revoke_at.items():
            if not isinstance(node, str) or type(rr) is not int or not 1 <= rr <= self.rounds:
                raise CoordinatorError(f"revoke_at: {node!r} -> {rr!r} must name a node and a "
                                       f"round in 1..{self.rounds}")
        if not self.deadline_s > 0 or not self.digest_grace_s >= 0:
            raise CoordinatorError("deadline_s must be > 0 and digest_grace_s >= 0")
        if not 0 <= self.round_min_s <= self.deadline_s:
            raise CoordinatorError("round_min_s must be in [0, deadline_s]")
        try:
            Policy.parse(self.crosscheck)
        except ValueError as e:
            raise CoordinatorError(str(e)) from None
        ReputationBook(**self.reputation)  # raises ValueError naming a bad parameter
        try:
            privmod.check_config(self.dp)
        except privmod.PrivacyError as e:
            raise CoordinatorError(str(e)) from None
        privacy = parse_privacy(self.privacy)
        check_privacy(privacy, self.rule, self.mode, self.reputation)
        if (privacy == "secagg+dp") != (self.dp.get("mode") == "secagg+dp"):
            raise CoordinatorError("privacy secagg+dp and a dp config of mode secagg+dp go "
                                   f"together; got privacy {privacy!r}, dp mode "
                                   f"{self.dp.get('mode')!r}")

    @property
    def trim_count(self) -> int:
        return self.f if self.trim < 0 else self.trim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> CoordinatorConfig:
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(doc) - known)
        if bad:
            raise CoordinatorError(f"unknown coordinator setting(s): {', '.join(bad)}")
        cfg = cls(**doc)
        cfg.check()
        return cfg


class _Pending:
    __slots__ = ("sender", "sha", "samples", "values")

    def __init__(self, sender: str, sha: bytes, samples: int, values: list[int]) -> None:
        self.sender = sender
        self.sha = sha
        self.samples = samples
        self.values = values


def _json_log(ev: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(ev, sort_keys=True) + "\n")
    sys.stdout.flush()


class Coordinator:
    def __init__(
        self,
        cfg: CoordinatorConfig,
        store: RoundsStore,
        publish: Publish,
        log: Log = _json_log,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from microfed_host import keys

        cfg.check()
        self.cfg = cfg
        self.store = store
        self._publish = publish
        self._log = log
        self.clock = clock
        mesh, seed, reg, self.registry_frame, self._registry_stamp = self._load(cfg.mesh_dir)
        self.mesh = str(mesh["mesh"])
        self.mesh_id = wire.mesh_id(self.mesh)
        self._sign = keys.signer(seed)
        self.registry = reg.portable()
        self._next_registry_check = 0.0
        known = set(self.registry.nodes)
        self._fixed_expected = bool(cfg.expected)
        self.expected = sorted(cfg.expected or self.registry.active_ids(), key=lambda s: s.encode())
        unknown = [n for n in self.expected if n not in known]
        if unknown:
            raise CoordinatorError(f"expected nodes not in the registry: {unknown}")
        # Revoked nodes stay listed (a run directory outlives a revocation) but never count.
        n_min = rule_min_nodes(cfg.rule, cfg.f, cfg.trim_count, cfg.pre, cfg.bucket)
        if len(self.expected) < n_min:
            raise CoordinatorError(
                f"rule {cfg.rule} with f={cfg.f} needs at least {n_min} nodes, "
                f"the mesh has {len(self.expected)}")
        self.n_min = n_min
        self.secagg_on = cfg.privacy in privmod.SECAGG_MODES
        if self.secagg_on and not secagg.MIN_NODES <= len(self.expected) <= SECAGG_MAX_NODES:
            raise CoordinatorError(
                f"privacy {cfg.privacy} needs {secagg.MIN_NODES}..{SECAGG_MAX_NODES} nodes, the mesh "
                f"has {len(self.expected)} (with fewer than 3 the sum reveals the others' update)")
        self.model = model.get(cfg.model, n_features=cfg.n_features, n_classes=cfg.n_classes)
        if cfg.dp.get("mode") == "secagg+dp" and (cfg.dp["nodes"] != len(self.expected)
                                                   or cfg.dp["dim"] != self.model.n_params):
            raise CoordinatorError(
                f"privacy secagg+dp: the dp config counts {cfg.dp['nodes']} noise shares of "
                f"{cfg.dp['dim']} values, the mesh has {len(self.expected)} nodes and the model "
                f"{self.model.n_params} parameters")
        self.test: tuple[list[list[int]], list[int]] | None = None
        if cfg.test_shard:
            try:
                xs, ys, info = model.decode_shard(Path(cfg.test_shard).read_bytes())
            except (OSError, model.ModelError) as e:
                raise CoordinatorError(f"test shard {cfg.test_shard}: {e}") from None
            self.test = (xs, ys)
        limits = Limits(self.model.n_params, cfg.max_abs)
        self.v_update = HostVerifier(self.registry, store, limits, kinds=(wire.MODEL_UPDATE,),
                                     clock=clock, refine=self._counter_behind)
        self._notified: set[tuple[str, int]] = set()
        self.v_digest = HostVerifier(self.registry, store, limits, kinds=(wire.GOSSIP_DIGEST,),
                                     clock=clock)
        self.v_hello = HostVerifier(self.registry, store, limits, kinds=(wire.HELLO, wire.STATUS),
                                    clock=clock)
        self.v_sa = HostVerifier(self.registry, store, limits, clock=clock,
                                 kinds=(wire.SA_KEYS, wire.SA_SHARES, wire.SA_MASKED,
                                        wire.SA_REVEAL))
        self.sa: SecAggRound | None = None
        self._sa_seq = 0
        self.checker = CrossChecker(Policy.parse(cfg.crosscheck))
        self.t = topics(self.mesh)
        self.round = 0
        self.params: list[int] = []
        self.book = ReputationBook(**cfg.reputation)
        self.accountant = privmod.Accountant(cfg.dp)
        self.pending: dict[str, _Pending] = {}
        self.coord_seq = 0
        self.global_frame = b""
        self.deadline = 0.0
        self.finish_deadline = 0.0
        self.finishing = False
        self.done = False
        self.rejected: dict[str, int] = {}
        self.last_accuracy: float | None = None
        self.hellos: set[str] = set()
        self.gate_open = True
        self.gate_deadline = 0.0
        self.paused_since: float | None = None
        self.round_opened = 0.0
        # What handle() and tick() cost, summed (thread CPU and wall seconds; cost()).
        self.busy_cpu_s = 0.0
        self.busy_wall_s = 0.0
        self._busy_since: tuple[float, float] | None = None

    # -- plumbing -----------------------------------------------------------------------
    # What serve() subscribes to under microfed/<mesh>/, and its client id's prefix.
    SUBSCRIBE: tuple[str, ...] = ("update/+", "digest/+", "hello/+", "secagg/+")
    CLIENT_PREFIX = "microfed-coordinator-"
    ROLE = "coordinator"

    def _load(self, mesh_dir: str) -> tuple[dict[str, Any], bytes, Any, bytes, tuple[int, int]]:
        """The mesh directory: (mesh.json, the signing seed, registry, its frame, stamp)."""
        return _load_mesh(mesh_dir)

    def _initial_frame(self) -> tuple[bytes, int]:
        """The frame a new run starts with and its counter: the GLOBAL_MODEL of round 1."""
        return self._global_frame(1, self.params, {})

    def _round_frame(self, r: int, new_params: list[int], agg: list[int],
                     ann: dict[str, Any]) -> tuple[bytes, int]:
        """The signed frame closing round r produces (and its counter): GLOBAL_MODEL r+1
        with the announcement `ann` (an edge coordinator sends its aggregate up instead)."""
        return self._global_frame(r + 1, new_params, ann)

    def _emit(self, frame: bytes) -> None:
        """Publish what the last closed round produced (retained; again after a restart)."""
        self.publish(self.t["global"], frame, True)

    def log(self, ev: str, **kw: Any) -> None:
        kw["ev"] = ev
        kw["t"] = round(self.clock(), 3)
        try:
            self._log(kw)
        except Exception:  # a broken log sink must not stop the mesh
            pass

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self._publish(topic, payload, retain)

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        """fn(*args), its thread CPU and wall time added to busy_cpu_s and busy_wall_s."""
        c0, w0 = time.thread_time(), time.perf_counter()
        self._busy_since = (c0, w0)
        try:
            fn(*args)
        finally:
            self.busy_cpu_s += time.thread_time() - c0
            self.busy_wall_s += time.perf_counter() - w0
            self._busy_since = None

    def cost(self) -> dict[str, Any]:
        """What the coordinator has cost so far (benchmarks/scaling.py): the last aggregation
        on the fast path and on the reference (thread CPU seconds; 0.0: not run), the thread
        CPU and wall seconds inside handle() and tick() (the call in progress included), this
        process's CPU seconds (user + system, every thread: in-process runs count the
        simulated nodes too) and peak RSS in KB (VmHWM: getrusage's ru_maxrss would count
        the RSS of the parent that started this process, which Linux carries across fork
        and exec)."""
        cpu, wall = self.busy_cpu_s, self.busy_wall_s
        if self._busy_since is not None:
            cpu += time.thread_time() - self._busy_since[0]
            wall += time.perf_counter() - self._busy_since[1]
        t = os.times()
        return {"fast_s": round(self.checker.fast_s, 6), "ref_s": round(self.checker.ref_s, 6),
                "busy_cpu_s": round(cpu, 6), "busy_wall_s": round(wall, 6),
                "cpu_s": round(t.user + t.system, 3),
                "maxrss_kb": peak_rss_kb()}

    def _rule_params(self, n: int, weights: list[int],
                     round_: int) -> tuple[dict[str, Any], int, int]:
        """The rule's request parameters (audit.run / fast.run) and the announcement's p1, p2."""
        c = self.cfg
        pre: dict[str, Any] = {}
        if c.pre == "nnm":
            pre = {"pre": "nnm", "f": c.f}
        elif c.pre == "bucketing":
            pre = {"pre": "bucketing", "bucket": c.bucket, "seed": round_}
        if c.rule == "krum":
            return {**pre, "f": c.f}, c.f, 0
        if c.rule == "multi_krum":
            groups = -(-n // c.bucket) if c.pre == "bucketing" else n
            m = c.m or (groups - c.f)
            return {**pre, "f": c.f, "m": m}, c.f, m
        if c.rule == "trimmed_mean":
            return {**pre, "trim": c.trim_count}, c.trim_count, 0
        if c.rule == "fedavg":
            return {**pre, "weights": weights}, 0, 0
        return pre, 0, 0

    def accuracy(self, params: list[int]) -> float | None:
        if self.test is None:
            return None
        return self.model.evaluate(params, self.test) / len(self.test[1])

    def _global_frame(self, round_: int, params: list[int], ann: dict[str, Any]) -> tuple[bytes, int]:
        seq = self.coord_seq + 1
        return sign_global(self.mesh_id, self._sign, round_, seq, int(self.clock()), params,
                           ann), seq

    def expected_now(self) -> list[str]:
        """The nodes this round waits for: expected, still active in the registry, not banned."""
        return [n for n in self.expected
                if self._active(n) and not self.book.is_banned(n)]

    def _active(self, node: str) -> bool:
        e = self.registry.nodes.get(node)
        return e is not None and bool(e[1])

    def _scheduled_revocations(self, closed: int) -> None:
        """cfg.revoke_at: revoke each node whose round has closed (idempotent: a restart
        after a crash finds it revoked already)."""
        from microfed_host.provision import ProvisionError, revoke_node

        due = sorted(n for n, rr in self.cfg.revoke_at.items()
                     if rr <= closed and self._active(n))
        if not due:
            return
        for node in due:
            try:
                revoke_node(Path(self.cfg.mesh_dir), node)
            except ProvisionError as e:
                self.log("registry_error", error=f"scheduled revocation of {node}: {e}"[:300])
        self.check_registry(force=True)

    # -- live registry -------------------------------------------------------------------
    def check_registry(self, force: bool = False) -> bool:
        """Adopt a newer signed registry from the mesh directory (`microfed provision revoke`,
        `add`, `reenrol` rewrite it): at most once a second unless forced. A bad or older file
        is logged and ignored; the running registry stays. True if a new one was adopted."""
        now = self.clock()
        if not force and now < self._next_registry_check:
            return False
        self._next_registry_check = now + 1.0
        try:
            stamp = _registry_stamp(self.cfg.mesh_dir)
            if stamp == self._registry_stamp:
                return False
            _mesh, _seed, reg, frame, stamp = self._load(self.cfg.mesh_dir)
        except CoordinatorError as e:
            self.log("registry_error", error=str(e)[:300])
            return False
        self._registry_stamp = stamp
        new = reg.portable()
        if new.mesh_id != self.mesh_id or new.version <= self.registry.version:
            if new.version < self.registry.version:
                self.log("registry_error", error="registry.json v%d is older than the running v%d"
                         % (new.version, self.registry.version))
            return False
        self._adopt_registry(new, frame)
        return True

    def _adopt_registry(self, new: Any, frame: bytes) -> None:
        old = self.registry
        self.registry = new
        self.registry_frame = frame
        for v in (self.v_update, self.v_digest, self.v_hello, self.v_sa):
            v.registry = new
        rekeyed = self.store.adopt_keys(active_keys(new))
        revoked = sorted(n for n, (_p, a) in new.nodes.items()
                         if not a and old.nodes.get(n, (b"", False))[1])
        added = sorted(n for n, (_p, a) in new.nodes.items() if a and n not in old.nodes)
        if not self._fixed_expected:
            self.expected = sorted(set(self.expected) | set(added), key=lambda s: s.encode())
        dropped = sorted(n for n in revoked if n in self.pending)
        for n in dropped:
            # A revoked node's update of the open round is not aggregated either.
            del self.pending[n]
        for n in revoked:
            self.store.security_event(self.round, "revoked", n, "registry v%d" % new.version)
        for n in rekeyed:
            self.store.security_event(self.round, "reenrolled", n,
                                      "new key in registry v%d; counters restart (epoch %d)"
                                      % (new.version, self.store.key_epoch(n)))
        self.log("registry", version=new.version, revoked=revoked, added=added,
                 reenrolled=rekeyed, dropped_pending=dropped)
        self.publish(self.t["registry"], self.registry_frame, True)
        self.maybe_close()

    # -- start / resume ---------------------------------------------------------------
    def reconfigure(self, new: CoordinatorConfig) -> list[str]:
        """A reload: take the RELOADABLE settings of `new` (the next deadline, the cross-check
        policy from the next round, the round count) and record them in the store; returns
        the names of those that changed. CoordinatorError (nothing changed) if `new` changes anything else, or
        ends the run before a round already begun."""
        new.check()
        old, want = self.cfg.to_json(), new.to_json()
        changed = sorted(k for k in want if want[k] != old.get(k))
        fixed = [k for k in changed if k not in RELOADABLE]
        if fixed:
            raise CoordinatorError(f"{', '.join(fixed)} cannot change in a running run (they "
                                   "define what its rounds compute); nothing reloaded")
        if self.round > self.cfg.rounds and new.rounds != self.cfg.rounds:
            raise CoordinatorError("the last round has closed and the nodes were told so; "
                                   "rounds cannot change any more; nothing reloaded")
        if new.rounds < min(self.round, self.cfg.rounds):
            raise CoordinatorError(f"rounds {new.rounds} would end the run before round "
                                   f"{self.round}, which has begun; nothing reloaded")
        if not changed:
            return []
        if "crosscheck" in changed:
            self.checker.policy = Policy.parse(new.crosscheck)
        self.cfg = new
        self.store.put_config(want)
        return changed

    def start(self) -> None:
        self.store.adopt_keys(active_keys(self.registry))
        stored = self.store.get_config()
        mine = self.cfg.to_json()
        if stored is None:
            self.store.put_config(mine)
        elif stored != mine:
            diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            raise CoordinatorError(
                f"{self.store.path} belongs to a run with other settings ({', '.join(diff)}); "
                "use a new run directory")
        st = self.store.load_state()
        if st is None:
            self.round = 1
            self.params = self.model.init(self.cfg.init_seed)
            frame, seq = self._initial_frame()
            self.store.init_state(1, _pack(self.params), self.book.to_bytes(), frame, seq)
            self.coord_seq, self.global_frame = seq, frame
            self.last_accuracy = self.accuracy(self.params)
            if self.cfg.wait_hello_s > 0:
                # A gossip node that subscribes after its peers published round 1 would miss
                # their updates: round 1 waits until every node has said it is listening.
                self.gate_open = False
                self.gate_deadline = self.clock() + self.cfg.wait_hello_s
        else:
            self.round = st["round"]
            self.params = _unpack(st["params"])
            self.book = book_from_bytes(st["reputation"])
            self.coord_seq = st["coord_seq"]
            self.global_frame = st["global_frame"]
            rows = self.store.rounds()
            self.checker.checked = sum(1 for r in rows if r["crosschecked"])
            self.checker.mismatches = sum(
                1 for e in self.store.security_events() if e["kind"] == "crosscheck_mismatch")
            for raw in self.store.accepted_frames(self.round):
                fr = wire.decode(raw)
                if not self._active(fr.sender):
                    continue  # revoked while the coordinator was down
                self.pending[fr.sender] = _Pending(fr.sender, hashlib.sha256(raw).digest(),
                                                   fr.body["samples"], fr.body["values"])
            self.rejected = dict(self.store.rejection_counts())
            self.last_accuracy = self.accuracy(self.params)
            self.store.security_event(self.round, "restart", None,
                                      f"resumed with {len(self.pending)} accepted update(s)")
            self.log("resume", round=self.round, accepted=sorted(self.pending),
                     done=st["done"], model_digest=model.params_digest(self.params).hex())
            if st["done"]:
                self.done = True
        self.publish(self.t["registry"], self.registry_frame, True)
        self._scheduled_revocations(self.round - 1)
        if self.gate_open:
            self._open_round_one_or_resume()
        else:
            self.log("waiting_hello", expected=self.expected, seconds=self.cfg.wait_hello_s)

    def _open_round_one_or_resume(self) -> None:
        self.gate_open = True
        if self.round == 1 and not self.store.rounds() and not self.pending:
            self.log("start", mesh=self.mesh, round=1, expected=self.expected, rule=self.cfg.rule,
                     rounds=self.cfg.rounds, accuracy=self.last_accuracy,
                     model_digest=model.params_digest(self.params).hex(),
                     missing_hello=[n for n in self.expected if n not in self.hellos])
        # Re-publishing the stored bytes (not a re-signed frame) lets nodes that already
        # acted on it recognise it by hash.
        self._emit(self.global_frame)
        if self.round > self.cfg.rounds and not self.done:
            self._begin_finish()
        self.deadline = self.clock() + self.cfg.deadline_s
        self.round_opened = self.clock()
        if not self.finishing and not self.done:
            self.maybe_close()

    # -- input ----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """One MQTT message. Never raises: whatever goes wrong while handling one message
        is that message's rejection (reason `internal_error`, counted, logged with the
        frame's SHA-256), so the caller acknowledges it and no message can be redelivered
        into a crash loop."""
        if self.done:
            return
        self._timed(self._handle, topic, payload)

    def _handle(self, topic: str, payload: bytes) -> None:
        try:
            self._dispatch(topic, payload)
        except Exception as e:
            self.store.drop_staged()
            raw = payload if isinstance(payload, bytes | bytearray) else b""
            sha = hashlib.sha256(raw).hexdigest()
            try:
                self._reject("internal_error", f"{type(e).__name__}: {e}"[:300], bytes(raw), sha,
                             None)
            except Exception:  # the store itself failed: count in memory at least
                self.rejected["internal_error"] = self.rejected.get("internal_error", 0) + 1
            self.log("internal_error", topic=str(topic)[:200], frame_sha256=sha,
                     error=f"{type(e).__name__}: {e}"[:300])

    def _dispatch(self, topic: str, payload: bytes) -> None:
        t = self.t
        if not isinstance(payload, bytes | bytearray):
            raise TypeError("payload is not bytes")
        payload = bytes(payload)
        if topic.startswith(t["update"]):
            self.on_update(topic[len(t["update"]):], payload)
        elif topic.startswith(t["digest"]):
            self.on_digest(topic[len(t["digest"]):], payload)
        elif topic.startswith(t["hello"]):
            self.on_hello(topic[len(t["hello"]):], payload)
        elif topic.startswith(t["secagg"]):
            self.on_secagg(topic[len(t["secagg"]):], payload)
        # global / registry: our own retained messages echoed back; nothing else subscribed.

    def _reject(self, reason: str, message: str, raw: bytes, sha: str,
                fr: wire.Frame | None = None, record: bool = True,
                header: tuple[str, int, int, int] | None = None) -> None:
        """Count and log one rejected message. Nothing here touches a replay counter.
        `header` (sender, kind, round, seq), when the verifier already decoded the frame,
        saves decoding it again."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        sender = rnd = seq = kind = None
        if fr is None and header is None and len(raw) <= wire.MAX_FRAME:
            try:
                fr = wire.decode(raw)
            except Exception:
                fr = None
        if fr is not None:
            sender, rnd, seq, kind = fr.sender, fr.round, fr.seq, fr.kind
        elif header is not None:
            sender, kind, rnd, seq = header
        if record:
            self.store.record_rejection(reason, message, len(raw), sha, sender, kind, rnd, seq)
        self.log("rejected", reason=reason, node=sender, round=rnd, msg=message[:200],
                 frame_sha256=sha[:16])

    def on_update(self, topic_node: str, raw: bytes) -> None:
        sha = hashlib.sha256(raw).hexdigest()
        if self.secagg_on:
            # A plain update would be aggregated in the clear: never in a secagg run.
            self._reject("wrong_kind", "plain model updates are refused with privacy secagg",
                         raw, sha)
            return
        prev = self.store.accepted_round_of(sha)
        if prev is not None and prev >= self.round - 1:
            # The same signed bytes again: a QoS 1 redelivery (or a copy of it). Harmless.
            self._reject("duplicate", "exact copy of an accepted update of round %d" % prev,
                         raw, sha)
            return
        self.store.stage()
        try:
            fr = self.v_update.verify(raw, None, self.round, self.round)
        except Rejected as e:
            self.store.drop_staged()
            # HostVerifier has written the audit row; only count it.
            self._reject(e.reason, e.message, raw, sha, header=self.v_update.last_header,
                         record=False)
            if e.reason == "counter_behind":
                self._notify_counter_behind(raw)
            return
        # Authentic, but the counter is only staged: a frame rejected below does not move
        # it, so the genuine frame that follows a rejected copy is still accepted.
        sender = fr.sender
        reason = None
        if sender != topic_node:
            reason = ("topic_sender_mismatch", "sent on update/%s" % topic_node[:64])
        elif sender not in self.expected or not self._active(sender):
            reason = ("not_expected", "%s is not part of this run" % sender)
        elif self.book.is_banned(sender):
            reason = ("banned", "%s is banned" % sender)
        elif sender in self.pending:
            reason = ("equivocation", "second update from %s in round %d" % (sender, self.round))
        if reason is not None:
            self.store.drop_staged()
            self._reject(reason[0], reason[1], raw, sha, fr)
            return
        self.store.accept_update(self.round, sender, fr.seq, fr.body["samples"], sha, raw)
        self.pending[sender] = _Pending(sender, bytes.fromhex(sha), fr.body["samples"],
                                        fr.body["values"])
        self.log("accepted", round=self.round, node=sender, seq=fr.seq,
                 have=len(self.pending), want=len(self.expected_now()))
        self.maybe_close()

    def _counter_behind(self, data: bytes, e: Rejected) -> Rejected | None:
        """HostVerifier's refinement of `replay`: the frame is validly signed (the signature
        step comes first) but its bytes were never accepted, so they are not a replay of
        anything we hold: the key holder is counting from an old counter — a device that lost
        its counter file. Said so, with what to do, and the node is told (notice)."""
        if e.reason != "replay" or not isinstance(data, bytes | bytearray):
            return None
        if self.store.accepted_round_of(hashlib.sha256(data).hexdigest()) is not None:
            return None
        return Rejected("counter_behind", e.message + "; a new frame with an old counter: "
                        "the node lost its counter file (reflashed?). It is told to skip "
                        "ahead; if its key is lost too, run `microfed provision reenrol`")

    def _notify_counter_behind(self, raw: bytes) -> None:
        try:
            fr = wire.decode(raw)
        except wire.WireError:
            return
        key = (fr.sender, self.round)
        if key in self._notified:
            return  # one notice per node and round: a replayed frame cannot make us chatty
        self._notified.add(key)
        last = max(self.store.last(fr.sender, k) for k in wire.KIND_NAMES)
        notice = wire.encode(wire.STATUS, self.mesh_id, wire.COORDINATOR, self.round,
                             _notice_seq(self.clock()), int(self.clock()),
                             wire.encode_counter_notice(self.round, last), self._sign)
        self.log("notice", node=fr.sender, reason="counter_behind", last_seq=last)
        self.publish(self.t["notice"] + fr.sender, notice, False)

    def _staged_verify(self, v: HostVerifier, raw: bytes, sha: str, lo: int | None,
                       hi: int | None) -> wire.Frame | None:
        """Verify with the counter staged (committed by the caller once the frame is taken);
        a rejection is counted (HostVerifier has written its audit row) and gives None."""
        self.store.stage()
        try:
            return v.verify(raw, None, lo, hi)
        except Rejected as e:
            self.store.drop_staged()
            self._reject(e.reason, e.message, raw, sha, header=v.last_header, record=False)
            return None

    def on_digest(self, topic_node: str, raw: bytes) -> None:
        sha = hashlib.sha256(raw).hexdigest()
        last_closed = min(self.round - 1, self.cfg.rounds)
        fr = self._staged_verify(self.v_digest, raw, sha, 1, max(1, last_closed))
        if fr is None:
            return
        if fr.sender != topic_node:
            self.store.drop_staged()
            self._reject("topic_sender_mismatch", "sent on digest/%s" % topic_node[:64], raw, sha,
                         fr)
            return
        row = self.store.round_row(fr.round)
        if row is None:
            self.store.drop_staged()
            self._reject("future_round", "no aggregate for round %d yet" % fr.round, raw, sha,
                         fr)
            return
        self.store.commit_staged()
        d = fr.body["digest"].hex()
        agree = d == row["agg_digest"]
        if self.store.record_digest(fr.round, fr.sender, d, agree):
            self.log("digest", round=fr.round, node=fr.sender, agree=agree)
            if not agree:
                self.log("flagged", round=fr.round, node=fr.sender, reason="digest_mismatch")
        self.maybe_finish()

    def on_hello(self, topic_node: str, raw: bytes) -> None:
        sha = hashlib.sha256(raw).hexdigest()
        fr = self._staged_verify(self.v_hello, raw, sha, None, None)
        if fr is None:
            return
        if fr.sender != topic_node:
            self.store.drop_staged()
            self._reject("topic_sender_mismatch", "sent on hello/%s" % topic_node[:64], raw, sha,
                         fr)
            return
        self.store.commit_staged()
        b = fr.body
        kind = wire.KIND_NAMES[fr.kind]
        self.store.record_status(fr.sender, kind, b["state"], b["last_round"], b["label"])
        self.log("status", node=fr.sender, kind=kind, state=b["state"],
                 last_round=b["last_round"], label=b["label"])
        if fr.kind == wire.HELLO:
            self.hellos.add(fr.sender)
            if not self.gate_open and all(n in self.hellos for n in self.expected):
                self._open_round_one_or_resume()

    # -- secure aggregation (docs/privacy.md) ---------------------------------------------
    def on_secagg(self, topic_node: str, raw: bytes) -> None:
        """A node's secure-aggregation frame for the open round: verified (signature, replay,
        round [r, r], role, dimension), then taken by the round's SecAggRound phase."""
        sha = hashlib.sha256(raw).hexdigest()
        if not self.secagg_on or not self.gate_open or self.finishing:
            self._reject("wrong_kind", "no secure aggregation is running", raw, sha)
            return
        sa = self._secagg_round()
        if bytes.fromhex(sha) in sa.sha.values():
            self._reject("duplicate", "exact copy of an accepted frame", raw, sha)
            return
        fr = self._staged_verify(self.v_sa, raw, sha, self.round, self.round)
        if fr is None:
            return
        bad = (("topic_sender_mismatch", "sent on secagg/%s" % topic_node[:64])
               if fr.sender != topic_node else sa.add(fr, bytes.fromhex(sha)))
        if bad is not None:
            self.store.drop_staged()
            self._reject(bad[0], bad[1], raw, sha, fr)
            return
        self.store.commit_staged()
        self.log("secagg", round=self.round, phase=sa.phase, node=fr.sender, have=len(sa.got),
                 want=len(sa.wanted))
        self.maybe_close()

    def _secagg_round(self) -> SecAggRound:
        if self.sa is None or self.sa.round != self.round:
            from microfed_host import keys

            self.sa = SecAggRound(self.round, self.expected_now(), self.model.n_params,
                                  keys.x25519)
        return self.sa

    def _secagg_close(self, reason: str) -> None:
        """Close the open phase: publish what it produced, or finish the round."""
        sa = self._secagg_round()
        phase = sa.phase
        try:
            out = sa.close()
        except secagg.SecAggError as e:
            # Shares that do not reconstruct: a node lied. The round cannot finish.
            self.store.security_event(self.round, "secagg_failed", None, str(e)[:300])
            self.log("secagg_failed", round=self.round, phase=phase, error=str(e)[:300])
            self.deadline = self.clock() + self.cfg.deadline_s
            return
        self.log("secagg_phase", round=self.round, closed=phase, reason=reason,
                 nodes=len(sa.wanted) if not isinstance(out, SecAggResult) else len(out.ids))
        if isinstance(out, SecAggResult):
            self._close_secagg_round(out, reason)
            return
        for to, kind, payload in out:
            self._sa_seq = max(self._sa_seq + 1, _notice_seq(self.clock()))
            frame = wire.encode(kind, self.mesh_id, wire.COORDINATOR, self.round, self._sa_seq,
                                int(self.clock()), payload, self._sign)
            if to is None:
                self.publish(self.t["secagg_round"], frame, True)
            else:
                self.publish(self.t["notice"] + to, frame, False)
        self.deadline = self.clock() + self.cfg.deadline_s

    def _close_secagg_round(self, res: SecAggResult, reason: str) -> None:
        r = self.round
        digest = audit.digest(res.vector)
        res_doc = {"vector": res.vector, "digest": digest, "selected": None}
        self._finish_round(r, reason, res.ids, [(i, res.frame_sha[i]) for i in res.ids],
                           res_doc, {}, 0, 0, False, [], {}, [])

    # -- rounds ----------------------------------------------------------------------------
    def pause(self) -> None:
        """The broker is unreachable: deadlines stop running (nobody can reach us, so closing
        a round now would only drop updates that are waiting in the nodes' outboxes)."""
        if self.paused_since is None:
            self.paused_since = self.clock()
            self.log("paused", round=self.round)

    def resume(self) -> None:
        if self.paused_since is None:
            return
        gap = self.clock() - self.paused_since
        self.paused_since = None
        self.deadline += gap
        self.round_opened += gap
        self.finish_deadline += gap
        self.gate_deadline += gap
        self.log("resumed", round=self.round, paused_s=round(gap, 3))

    def tick(self) -> None:
        if self.done:
            return
        self._timed(self._tick)

    def _tick(self) -> None:
        self.store.flush_if_due(self.clock())
        if self.paused_since is not None:
            return
        self.check_registry()
        now = self.clock()
        if not self.gate_open:
            if now >= self.gate_deadline:
                self._open_round_one_or_resume()
            return
        if self.finishing:
            if now >= self.finish_deadline:
                self._finish("grace period over")
            return
        if self.cfg.round_min_s:
            self.maybe_close()
            if self.finishing or self.done:
                return
        if now >= self.deadline and self.secagg_on:
            sa = self._secagg_round()
            if len(sa.got) >= sa.need():
                self._secagg_close("deadline")
            else:
                self.log("waiting", round=self.round, phase=sa.phase, have=sorted(sa.got),
                         want=sa.wanted, need=sa.need())
                self.deadline = now + self.cfg.deadline_s
            return
        if now >= self.deadline:
            if len(self.pending) >= self.n_min:
                self.close_round("deadline")
            else:
                self.log("waiting", round=self.round, have=sorted(self.pending),
                         want=self.expected_now(), need=self.n_min)
                self.deadline = now + self.cfg.deadline_s

    def maybe_close(self) -> None:
        if self.finishing or self.done or not self.gate_open:
            return
        if self.secagg_on:
            if self.sa is not None and self.sa.round == self.round and self.sa.complete():
                self._secagg_close("quorum")
            return
        want = self.expected_now()
        if want and all(n in self.pending for n in want):
            if self.clock() < self.round_opened + self.cfg.round_min_s:
                return  # paced: tick() closes it when round_min_s is up
            self.close_round("quorum")

    def close_round(self, reason: str) -> None:
        # A registry changed since the last check (a revocation written just now) applies
        # to this round: adopting it re-evaluates the quorum, which may close it in turn.
        if self.check_registry(force=True):
            return
        r = self.round
        ids = sorted(self.pending, key=lambda s: s.encode())
        ups = [self.pending[i] for i in ids]
        vecs = [u.values for u in ups]
        weights = [u.samples for u in ups]
        params, p1, p2 = self._rule_params(len(ids), weights, r)
        matrix = np.asarray(vecs, dtype=np.int64)
        security: list[tuple[str, str | None, str]] = []
        crosschecked = self.checker.policy.wants(r)
        try:
            res = self.checker.run(self.cfg.rule, ids, matrix, params, round_no=r)
        except CrossCheckMismatch as e:
            # The reference is the contract: use it, and leave a security event behind.
            res = audit.run(self.cfg.rule, ids, vecs, params)
            security.append(("crosscheck_mismatch", None, e.diff[:2000]))
            self.log("crosscheck_mismatch", round=r, diff=e.diff[:2000])
        before = set(self.book.banned())
        verdicts = self.book.observe(ids, vecs)
        newly = [n for n in self.book.banned() if n not in before]
        for n in newly:
            security.append(("ban", n, "reputation %d below %d" % (self.book.rep(n),
                                                                    self.book.ban_below)))
        self._finish_round(r, reason, ids, [(u.sender, u.sha) for u in ups], res, params, p1,
                           p2, crosschecked, security, verdicts, newly)

    def _finish_round(self, r: int, reason: str, ids: list[str],
                      accepted: list[tuple[str, bytes]], res: dict[str, Any],
                      params: dict[str, Any], p1: int, p2: int, crosschecked: bool,
                      security: list[tuple[str, str | None, str]], verdicts: dict[str, Any],
                      newly: list[str]) -> None:
        """Everything after the aggregate of round r: the new model, the signed GLOBAL_MODEL
        r+1 with the announcement, one SQLite transaction, then the publication."""
        agg = res["vector"]
        new_params = [q16.sat(a + b) for a, b in zip(self.params, agg, strict=True)]
        rep_rows = [(n, self.book.rep(n), self.book.is_banned(n), verdicts.get(n))
                    for n in self.book.nodes()]
        acc = self.accuracy(new_params)
        final = r >= self.cfg.rounds
        ann = {"rule": self.cfg.rule, "p1": p1, "p2": p2,
               "agg_digest": bytes.fromhex(res["digest"]),
               "accepted": accepted, "final": final}
        frame, seq = self._round_frame(r, new_params, agg, ann)
        model_digest = model.params_digest(new_params).hex()
        row = {"n_accepted": len(ids), "rule": self.cfg.rule,
               "params": {k: v for k, v in params.items() if k != "weights"},
               "selected": res.get("selected"), "agg_digest": res["digest"],
               "model_digest": model_digest, "accuracy": acc, "crosschecked": crosschecked,
               "close_reason": reason}
        self.store.close_round(r, row, rep_rows, security, r + 1, _pack(new_params),
                               self.book.to_bytes(), frame, seq)
        # Persisted first: a crash from here on re-publishes exactly this frame.
        self.round = r + 1
        self.params = new_params
        self.pending = {}
        self.coord_seq, self.global_frame = seq, frame
        self.last_accuracy = acc
        self.deadline = self.clock() + self.cfg.deadline_s
        self.round_opened = self.clock()
        self.log("round", round=r, accuracy=acc, accepted=ids, selected=res.get("selected"),
                 agg_digest=res["digest"], model_digest=model_digest,
                 banned=self.book.banned(), newly_banned=newly, close_reason=reason,
                 crosschecked=crosschecked, rejected=dict(self.rejected),
                 verdicts={k: v for k, v in verdicts.items() if v != BANNED},
                 cost=self.cost(), **self._privacy_spent(r))
        self._emit(frame)
        self._scheduled_revocations(r)
        if final:
            self._begin_finish()

    # -- the end --------------------------------------------------------------------------
    def _begin_finish(self) -> None:
        self.finishing = True
        self.finish_deadline = self.clock() + (
            self.cfg.digest_grace_s if self.cfg.mode == "gossip" else 0.0)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if not self.finishing or self.done:
            return
        if self.cfg.mode != "gossip":
            self._finish("coordinated")
            return
        got = {n for r, n, _d, _a in self.store.digests() if r == self.cfg.rounds}
        if all(n in got for n in self.expected_now()):
            self._finish("all digests in")

    def _finish(self, why: str) -> None:
        self.store.mark_done()
        self.done = True
        self.log("done", round=self.cfg.rounds, why=why,
                 final_digest=model.params_digest(self.params).hex(),
                 accuracy=self.last_accuracy, banned=self.book.banned(),
                 crosscheck={"checked": self.checker.checked,
                             "mismatches": self.checker.mismatches},
                 rejected=dict(self.rejected), cost=self.cost(),
                 **self._privacy_spent(self.cfg.rounds))

    def _privacy_spent(self, rounds: int) -> dict[str, Any]:
        """{"privacy": epsilon spent by every honest node after `rounds` rounds} or {}. With
        secagg+dp each round is charged for the noise shares its sum held (its nodes)."""
        if not self.accountant.active:
            return {}
        ks = [int(row["n_accepted"]) for row in self.store.rounds()]
        return {"privacy": self.accountant.spent(rounds, ks)}


def sign_global(mesh_id: bytes, sign: Callable[[bytes], bytes], round_: int, seq: int,
                now: int, params: list[int], ann: dict[str, Any]) -> bytes:
    """The GLOBAL_MODEL frame of `round_`: the model `params` and the announcement `ann`
    (wire.encode_global_payload's keywords; {} announces nothing), signed with the
    coordinator's key by `sign` (keys.signer). Ed25519 is deterministic: the same arguments
    give the same bytes (the Flower bridge relies on it, microfed_host.flowerbridge)."""
    payload = wire.encode_global_payload(params, **ann)
    return wire.encode(wire.GLOBAL_MODEL, mesh_id, wire.COORDINATOR, round_, seq, now, payload,
                       sign)


def peak_rss_kb(pid: int | str = "self") -> int:
    """A process's peak resident set size in KB (/proc/PID/status VmHWM; 0 when gone or
    not on Linux)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def active_keys(reg: Any) -> dict[str, bytes]:
    """Node id -> public key of every active node of a portable Registry."""
    return {n: pub for n, (pub, active) in reg.nodes.items() if active}


def _pack(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def _unpack(b: bytes) -> list[int]:
    return [int(v) for v in np.frombuffer(b, dtype="<i4")]


# ------------------------------------------------------------------ mesh directory
def _registry_stamp(mesh_dir: str) -> tuple[int, int]:
    st = (Path(mesh_dir) / "registry.json").stat()
    return (st.st_mtime_ns, st.st_size)


def _load_mesh(mesh_dir: str) -> tuple[dict[str, Any], bytes, Any, bytes, tuple[int, int]]:
    """mesh.json, the coordinator seed, the registry (signature checked against the pinned
    coordinator key), the registry's signed frame and the file's stamp."""
    from microfed_host import keys
    from microfed_host.provision import MeshDir, ProvisionError
    from microfed_host.registry import RegistryError

    try:
        stamp = _registry_stamp(mesh_dir)
        mesh, seed, reg = MeshDir(Path(mesh_dir)).load()
        frame = bytes.fromhex(json.loads((Path(mesh_dir) / "registry.json").read_text())["frame"])
    except (ProvisionError, RegistryError, keys.KeyFileError, OSError, KeyError, TypeError,
            ValueError) as e:
        raise CoordinatorError(f"mesh directory {mesh_dir}: {e}") from None
    return mesh, seed, reg, frame, stamp


# ------------------------------------------------------------------ MQTT
class RetainedPublisher:
    """The coordinator's only publications are retained (registry, global): keep the latest
    payload per topic and (re)send it until the broker acknowledges it. A broker outage
    leaves them pending instead of killing the coordinator; every reconnect marks them all
    pending again, because a restarted broker may have lost its retained messages.

    flush() never waits for a PUBACK (HostMQTT.publish_nowait): it runs on the thread that
    drains the receive queue, and under a flood that queue is full, so the network thread
    that reads PUBACKs is waiting for room. A publication not acknowledged within
    `resend_s` is logged (publish_pending) and sent again."""

    def __init__(self, client: Any, log: Log, resend_s: float = 10.0) -> None:
        self.client = client
        self.log = log
        self.resend_s = resend_s
        self.latest: dict[str, bytes] = {}
        self.pending: set[str] = set()
        self.inflight: dict[str, tuple[bytes, Any, float]] = {}
        self._lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if not retain:
            self._once(topic, payload)
            return
        with self._lock:
            self.latest[topic] = payload
            self.pending.add(topic)
        self.flush()

    def _once(self, topic: str, payload: bytes) -> None:
        """A notice: best effort, never queued (the node's next frame asks again)."""
        from microfed_host.mqtt import MQTTError

        if not self.client.connected:
            return
        try:
            self.client.publish_nowait(topic, payload, qos=1, retain=False)
        except MQTTError as e:
            self.log({"ev": "publish_failed", "topic": topic, "why": str(e)[:200],
                      "t": time.time()})

    def republish_all(self) -> None:
        with self._lock:
            self.pending |= set(self.latest)
            self.inflight.clear()

    def flush(self) -> None:
        from microfed_host.mqtt import MQTTError

        if not self.client.connected:
            return
        with self._lock:
            todo = sorted(self.pending)
        for topic in todo:
            with self._lock:
                payload = self.latest[topic]
                cur = self.inflight.get(topic)
            if cur is not None and cur[0] is payload:
                try:
                    done = bool(cur[1].is_published())
                    why = "not acknowledged within %g s" % self.resend_s
                except (RuntimeError, ValueError) as e:
                    done, why = False, str(e)
                if done:
                    with self._lock:
                        self.inflight.pop(topic, None)
                        if self.latest.get(topic) is payload:
                            self.pending.discard(topic)
                    continue
                if time.monotonic() - cur[2] < self.resend_s and why.startswith("not ack"):
                    continue
                self.log({"ev": "publish_pending", "topic": topic, "why": why[:200],
                          "t": time.time()})
            try:
                info = self.client.publish_nowait(topic, payload, qos=1, retain=True)
            except MQTTError as e:
                self.log({"ev": "publish_pending", "topic": topic, "why": str(e)[:200],
                          "t": time.time()})
                return
            with self._lock:
                self.inflight[topic] = (payload, info, time.monotonic())


def load_config(run_dir: Path) -> CoordinatorConfig:
    path = run_dir / CONFIG_NAME
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise CoordinatorError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise CoordinatorError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CoordinatorError(f"{path}: must be a JSON object")
    try:
        return CoordinatorConfig.from_json(doc)
    except (TypeError, ValueError) as e:
        raise CoordinatorError(f"{path}: {e}") from None


def serve(run_dir: Path, host: str, port: int, log: Log = _json_log,
          connect_timeout: float = 15.0, stop: Callable[[], bool] | None = None,
          reload: Callable[[], CoordinatorConfig | None] | None = None,
          role: type[Coordinator] | None = None) -> int:
    """Run the coordinator over MQTT until the run is over, or until `stop()` is true (a
    service told to stop: the message in hand is handled and acknowledged, the store
    flushed, a "stopped" event logged; the round stays open in the store, and the next
    serve() on this run directory resumes it, while the broker keeps what arrives meanwhile
    for the persistent session). Returns an exit code (0 for both). `reload()`, asked
    between messages: None, or new settings to take (Coordinator.reconfigure; a refusal is
    logged as a "reload_refused" event and the run goes on unchanged).

    One durable HostMQTT session (persistent, manual acks, bounded blocking queue): every
    message is acknowledged after handle() returns, whatever its verdict, so none can be
    redelivered into a loop. A broker outage pauses the round (deadlines stop); the
    coordinator waits for the broker however long it takes, then re-publishes its retained
    registry and global. `role`: the Coordinator class to run (an edge coordinator's:
    microfed_host.edge)."""
    from microfed_host import brokerauth
    from microfed_host.mqtt import HostMQTT, MQTTError
    from microfed_host.provision import MeshDir

    cfg = load_config(run_dir)
    store = RoundsStore(run_dir / STORE_NAME)
    parent = os.getppid()
    client: HostMQTT | None = None
    try:
        mesh = MeshDir(Path(cfg.mesh_dir)).read_mesh()["mesh"]
        t = topics(mesh)
        # Frames above wire.MAX_FRAME are rejected unread: the client drops (and acks) them
        # before they reach the queue, which bounds memory at QUEUE_SIZE x MAX_MESSAGE.
        cls = role or Coordinator
        client = HostMQTT(host, port, f"{cls.CLIENT_PREFIX}{mesh}"[:64], durable=True,
                          max_message=MAX_MESSAGE, queue_size=QUEUE_SIZE,
                          reconnect_min=0.5, reconnect_max=4.0,
                          **brokerauth.client_auth(Path(cfg.mesh_dir)))
        for sub in cls.SUBSCRIBE:
            client.subscribe(t["base"] + sub)
        try:
            client.connect(connect_timeout)
        except MQTTError as e:
            raise CoordinatorError(str(e)) from None
        pub = RetainedPublisher(client, log)
        client.on_reconnect.append(pub.republish_all)
        coord = cls(cfg, store, pub.publish, log)
        coord.start()
        # The runner starts the nodes only now: from here on the broker keeps every
        # message for this (persistent) session, even while the coordinator is down.
        log({"ev": "ready", "t": time.time(), "round": coord.round})
        reconnects = client.connects
        deferred: list[Any] = []
        first_deferred = 0.0
        queue_reported = 0.0
        while not coord.done and not (stop is not None and stop()):
            if client.connected:
                if client.connects != reconnects:
                    reconnects = client.connects
                    log({"ev": "reconnected", "t": time.time(), "connects": reconnects})
                coord.resume()
                pub.flush()
            else:
                coord.pause()
            msg = client.get(0.2)
            if msg is not None:
                try:
                    coord.handle(msg.topic, msg.payload)
                finally:
                    # Acknowledged only once its verdict is in SQLite: accepted updates are
                    # committed by handle(); rejections are buffered and written in batches,
                    # so their acks wait for the batch (one fsync per ACK_BATCH frames).
                    if store.pending_rejections:
                        if not deferred:
                            first_deferred = time.monotonic()
                        deferred.append(msg)
                    else:
                        client.ack(msg)
            if deferred and (len(deferred) >= ACK_BATCH or msg is None
                             or time.monotonic() - first_deferred >= 0.2):
                store.flush()
                for m in deferred:
                    client.ack(m)
                deferred.clear()
            new = reload() if reload is not None else None
            if new is not None:
                try:
                    changed = coord.reconfigure(new)
                    if changed:
                        (run_dir / CONFIG_NAME).write_text(
                            json.dumps(new.to_json(), indent=2) + "\n")
                    log({"ev": "reloaded", "t": time.time(), "round": coord.round,
                         "changed": {k: getattr(new, k) for k in changed}})
                except CoordinatorError as e:
                    log({"ev": "reload_refused", "t": time.time(), "error": str(e)})
            coord.tick()
            if time.monotonic() - queue_reported >= QUEUE_REPORT_S:
                queue_reported = time.monotonic()
                store.put_queue(client.stats())
            if os.getppid() != parent:
                log({"ev": "orphaned", "t": time.time()})
                return 3
        store.flush()
        for m in deferred:
            client.ack(m)
        # The final global must reach the broker. Whatever still arrives is not handled any
        # more (the run is over); it is drained so the network thread can read the PUBACK.
        end = time.monotonic() + 10.0
        while pub.pending and client.connected and time.monotonic() < end:
            client.drain()
            pub.flush()
            time.sleep(0.01)
        if not coord.done:
            log({"ev": "stopped", "t": time.time(), "round": coord.round,
                 "note": "the round stays open; serve this run directory again to resume"})
        return 0
    finally:
        if client is not None:
            client.close()
        store.close()


def main(argv: list[str] | None = None, role: type[Coordinator] | None = None,
         prog: str = "python -m microfed_host.coordinator") -> int:
    from microfed_host.broker import parse_address

    ap = argparse.ArgumentParser(prog=prog, description="Run the microfed %s on a run directory."
                                 % ("coordinator" if role is None else role.ROLE))
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--broker", required=True, metavar="HOST:PORT")
    a = ap.parse_args(argv)

    def _term(signum: int, frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    try:
        host, port = parse_address(a.broker)
        return serve(a.run_dir, host, port, role=role)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one readable line for the runner, never a bare traceback
        _json_log({"ev": "fatal", "error": f"{type(e).__name__}: {e}", "t": time.time()})
        return 2


if __name__ == "__main__":
    sys.exit(main())
