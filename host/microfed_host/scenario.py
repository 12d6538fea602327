"""Mesh scenarios: the TOML file, flag overrides, and the run directory they prepare
(provisioned mesh, data shards, node directories, coordinator settings)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tomllib
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from microfed.reputation import ReputationBook
from microfed_host import adversary as advmod
from microfed_host import coordinator as coordmod
from microfed_host import data, keys
from microfed_host import privacy as privmod
from microfed_host.chaos import Chaos, parse_chaos
from microfed_host.coordinator import CoordinatorConfig
from microfed_host.nodeproc import BOARD_KINDS, DEFAULT_UNIX32_HEAP, SERIAL_KINDS

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"
SCENARIOS = REPO / "scenarios"
DEFAULT_SCENARIO = SCENARIOS / "default.toml"
SPLITS = ("iid", "dirichlet")
TRANSPORTS = ("mqtt", "inproc")
MAX_NODES = 200
MAX_ATTACK_PARAM = 1e6  # |tau|, |sigma|, |scale|, |z|: far beyond Q16.16's +-32768 already
MAX_ALPHA = 1e6
MAX_DEADLINE_S = 86400.0
MAX_TIMEOUT_S = 7 * 86400.0
# unix32 heap bounds: 16 KB is below what the node's imports and registry hold (the budgets
# under test are 64 KB gossip, 32 KB coordinated); 64 MB is far beyond any MCU (the point of
# unix32 is an MCU's constraints).
UNIX32_HEAP_RANGE = (16 * 1024, 64 * 1024 * 1024)
M3_HEAP_RANGE = (16 * 1024, 4 * 1024 * 1024)  # what microfed_tools.firmware builds
# Secure aggregation's per-node L2 clip bound (raw Q16.16): 16.0, above every delta of the
# digits model at the default lr (docs/privacy.md, "Clipping", measured there).
DEFAULT_CLIP_L2 = 16 << 16
# Attacks whose compromised node still sends an honestly trained update (the wire attacks
# inject extra frames the verifier rejects): they do not count against the rule's f.
HONEST_UPDATE_ATTACKS = ("none",) + advmod.WIRE_ATTACKS
BYZANTINE_POLICY = (
    "the number of model-poisoning Byzantine nodes must not exceed f (trimmed_mean: the trim "
    "count; median: also fewer than the honest nodes), the most the rule is configured to "
    "tolerate; --allow-more-byzantine runs past that guarantee on purpose")


def _finite(name: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """A float setting in [lo, hi] ((lo, hi] with lo_open), refusing nan, inf and non-numbers."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise MeshError(f"{name} must be a number, got {v!r}")
    x = float(v)
    if not math.isfinite(x):
        raise MeshError(f"{name} must be a finite number, got {x}")
    if x < lo or (lo_open and x == lo) or x > hi:
        low = "(" if lo_open else "["
        raise MeshError(f"{name} must be in {low}{lo:g}, {hi:g}], got {x:g}")
    return x


class MeshError(RuntimeError):
    """Bad scenario, flags or run directory, or a mesh process that failed: says which."""


def parse_privacy(value: object) -> str:
    """The scenario's `privacy` key or --privacy: one of coordinator.PRIVACY."""
    try:
        return coordmod.parse_privacy(value)
    except coordmod.CoordinatorError as e:
        raise MeshError(str(e)) from None


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
    pre: str = "none"  # coordmod.PRES: a pre-aggregation step (coordinated mode)
    model: str = "softmax"  # MODELS: the mlp's 2 410 parameters run in coordinated mode

    bucket: int = 2  # pre = "bucketing": updates per bucket
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
    round_min_s: float = 0.0  # the coordinator closes no round sooner (pacing; chaos runs)
    reputation: dict[str, int] = field(default_factory=dict)
    allow_more_byzantine: bool = False
    chaos: Chaos | None = None  # the [chaos] table (microfed_host.chaos); mqtt transport only
    # Which board kind runs each honest node (microfed_host.nodeproc): "KIND[:COUNT],...",
    # in node order; one entry without a count takes the rest. mqtt transport only.
    boards: str = "unix"
    unix32_heap: int = DEFAULT_UNIX32_HEAP  # -X heapsize= of the unix32 nodes, bytes
    # The MicroPython heap of the mps2-an385 nodes' firmware (`microfed firmware build --heap`),
    # bytes; 0: the board profile's build (138 000 B).
    m3_heap: int = 0
    privacy: str = "none"  # microfed_host.privacy.PRIVACY_MODES
    # [dp] (privacy = "dp"): a target epsilon over the whole run at dp_delta, or a noise
    # multiplier z (sigma = z * clip_norm); clip_norm in model units (converted at the edge).
    dp_epsilon: float = 0.0
    dp_delta: float = privmod.DEFAULT_DELTA
    dp_noise_multiplier: float = 0.0
    clip_norm: float = privmod.DEFAULT_CLIP_NORM
    dp_noise: str = "urandom"
    clip_l2: int = DEFAULT_CLIP_L2  # secagg: each node's exact L2 clip bound, raw Q16.16

    @property
    def byzantine(self) -> int:
        return sum(g.count for g in self.attackers)

    @property
    def model_byzantine(self) -> int:
        """Compromised nodes whose updates are poisoned (the ones f must cover)."""
        return sum(g.count for g in self.attackers if g.attack not in HONEST_UPDATE_ATTACKS)

    @property
    def attack_label(self) -> str:
        if not self.attackers:
            return "none"
        return "+".join(f"{g.attack}x{g.count}" if len(self.attackers) > 1 else g.attack
                        for g in self.attackers)

    def node_ids(self) -> list[str]:
        from microfed_host.provision import node_ids

        return node_ids(self.honest + self.byzantine)

    def honest_ids(self) -> list[str]:
        return self.node_ids()[: self.honest]

    def byzantine_ids(self) -> list[str]:
        return self.node_ids()[self.honest:]

    def board_counts(self) -> list[tuple[str, int]]:
        """`boards` parsed and checked against `honest`: [(kind, count), ...] in node order."""
        return parse_boards(self.boards, self.honest)

    def node_boards(self) -> dict[str, str]:
        """Honest node id -> board kind (the compromised nodes run in the adversary)."""
        ids = iter(self.honest_ids())
        return {next(ids): kind for kind, n in self.board_counts() for _ in range(n)}

    def check(self) -> None:
        if (not isinstance(self.name, str) or not 1 <= len(self.name) <= 64
                or any(c in "/\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in self.name)):
            raise MeshError(f"scenario name {self.name!r} must be 1..64 characters without '/', "
                            "'\\' or control characters (it names the run directory)")
        if not 1 <= self.honest <= MAX_NODES:
            raise MeshError(f"honest must be in 1..{MAX_NODES}, got {self.honest}")
        for g in self.attackers:
            try:
                g.attack = advmod.canonical_attack(g.attack)
            except advmod.AdversaryError as e:
                raise MeshError(str(e)) from None
            if not 0 <= g.count <= MAX_NODES:
                raise MeshError(f"byzantine (attacker count) must be in 0..{MAX_NODES}, got {g.count}")
            for k, v in g.params.items():
                if k not in advmod.DEFAULTS:
                    raise MeshError(f"unknown attack parameter {k!r} (known: {', '.join(advmod.DEFAULTS)})")
                # tau, sigma and z are magnitudes; a negative scale is a legitimate attack.
                lo = -MAX_ATTACK_PARAM if k == "scale" else 0.0
                g.params[k] = _finite(f"attack parameter {k}", v, lo, MAX_ATTACK_PARAM)
        if self.honest + self.byzantine > MAX_NODES:
            raise MeshError(f"at most {MAX_NODES} nodes in all, got {self.honest} honest + "
                            f"{self.byzantine} Byzantine")
        self.attackers = [g for g in self.attackers if g.count > 0]
        if self.rule not in coordmod.RULES:
            raise MeshError(f"unknown rule {self.rule!r}; one of {', '.join(coordmod.RULES)}")
        if self.mode not in coordmod.MODES:
            raise MeshError(f"mode must be one of {', '.join(coordmod.MODES)}")
        if self.split not in SPLITS:
            raise MeshError(f"split must be one of {', '.join(SPLITS)}")
        if self.model not in MODELS:
            raise MeshError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.model != "softmax" and self.mode == "gossip":
            raise MeshError(f"model {self.model} runs in coordinated mode: a gossip node holds "
                            "13 update vectors, which for its parameters exceed a board's heap")
        self.alpha = _finite("alpha", self.alpha, 0.0, MAX_ALPHA, lo_open=True)
        if not 1 <= self.rounds <= 10000:
            raise MeshError(f"rounds must be in 1..10000, got {self.rounds}")
        if not 0 <= self.seed <= 0xFFFFFFFF:
            raise MeshError(f"seed must be in 0..2^32-1, got {self.seed}")
        if self.max_samples < 0:
            raise MeshError(f"max_samples must be >= 0 (0: no cap), got {self.max_samples}")
        if not 1 <= self.lr <= 0x7FFFFFFF:
            raise MeshError(f"lr must be in 1..2^31-1 (raw Q16.16), got {self.lr}")
        if not 1 <= self.epochs <= 1000 or not 1 <= self.batch <= 100000:
            raise MeshError(f"epochs must be in 1..1000 and batch in 1..100000, got "
                            f"{self.epochs} and {self.batch}")
        self.deadline_s = _finite("deadline (seconds)", self.deadline_s, 0.0, MAX_DEADLINE_S,
                                  lo_open=True)
        self.round_min_s = _finite("round_min_s (seconds)", self.round_min_s, 0.0,
                                   self.deadline_s)
        if not 0 <= self.f <= 255 or not 0 <= self.m <= 255 or not -1 <= self.trim <= 255:
            raise MeshError(f"f and m must be in 0..255 and trim in -1..255, got f={self.f}, "
                            f"m={self.m}, trim={self.trim}")
        trim = self.f if self.trim < 0 else self.trim
        need = coordmod.rule_min_nodes(self.rule, self.f, trim, self.pre, self.bucket)
        # Bans may remove every attacker: the honest nodes alone must still satisfy the rule.
        if self.honest < need:
            what = f"trim={trim}" if self.rule == "trimmed_mean" else f"f={self.f}"
            if self.pre != "none":
                what += f" after {self.pre}" + (f" (buckets of {self.bucket})"
                                                if self.pre == "bucketing" else "")
            raise MeshError(f"rule {self.rule} with {what} needs at least {need} honest nodes "
                            f"(bans can leave only those), got {self.honest}; add honest nodes "
                            "or lower --f (below --byzantine only with --allow-more-byzantine)")
        self._check_byzantine_budget()
        serial = [k for k, _n in self.board_counts() if k in SERIAL_KINDS]
        if serial and self.chaos is not None:
            raise MeshError(f"a [chaos] scenario stops and restarts nodes mid-run, which "
                            f"{serial[0]} nodes do not survive yet (QEMU's UART has no Ctrl-C: "
                            "their RAM disk would go with the emulator); use unix or unix32")
        self.unix32_heap = parse_heap(self.unix32_heap)
        if self.m3_heap != 0:
            self.m3_heap = parse_heap(self.m3_heap, "m3_heap", M3_HEAP_RANGE)
            if self.m3_heap % 1024:
                raise MeshError(f"m3_heap must be a multiple of 1024 bytes, got {self.m3_heap}")
        self._check_privacy()
        if not isinstance(self.reputation, dict):
            raise MeshError("[reputation] must be a table")
        known = ReputationBook().params()
        bad = sorted(set(self.reputation) - set(known))
        if bad:
            raise MeshError(f"unknown [reputation] key(s) {', '.join(bad)} "
                            f"(known: {', '.join(known)})")
        try:
            CoordinatorConfig(mesh_dir="", rule=self.rule, f=self.f, m=self.m, trim=self.trim,
                              rounds=self.rounds, crosscheck=self.crosscheck, mode=self.mode,
                              pre=self.pre, bucket=self.bucket,
                              reputation=self.reputation).check()
        except (coordmod.CoordinatorError, ValueError, TypeError) as e:
            raise MeshError(str(e)) from None

    def _check_privacy(self) -> None:
        self.privacy = parse_privacy(self.privacy)
        if self.privacy in privmod.SECAGG_MODES:
            self._check_secagg()
        if self.privacy not in privmod.DP_MODES:
            if self.dp_epsilon or self.dp_noise_multiplier:
                raise MeshError("[dp] epsilon / noise_multiplier given but privacy is "
                                f"{self.privacy!r}; set privacy = \"dp\" or \"secagg+dp\" "
                                "(--privacy dp, --privacy secagg+dp)")
            return
        self.dp_epsilon = _finite("dp epsilon", self.dp_epsilon, 0.0, 1e6)
        self.dp_noise_multiplier = _finite("dp noise_multiplier", self.dp_noise_multiplier, 0.0,
                                           privmod.MAX_NOISE_MULTIPLIER)
        if (self.dp_epsilon > 0) == (self.dp_noise_multiplier > 0):
            raise MeshError(f"privacy {self.privacy} needs exactly one of [dp] epsilon (a target over the "
                            "whole run) or noise_multiplier (--dp-epsilon / "
                            "--dp-noise-multiplier), both > 0")
        self.dp_delta = _finite("dp delta", self.dp_delta, 0.0, 1.0, lo_open=True)
        if self.dp_delta >= 1.0:
            raise MeshError(f"dp delta must be below 1, got {self.dp_delta:g}")
        self.clip_norm = _finite("clip_norm", self.clip_norm, 0.0, 256.0, lo_open=True)
        if q16_raw(self.clip_norm) < 1:
            raise MeshError(f"clip_norm {self.clip_norm:g} is below one Q16.16 step")
        if self.dp_noise not in privmod.NOISE_SOURCES:
            raise MeshError(f"dp noise must be one of {', '.join(privmod.NOISE_SOURCES)}, got "
                            f"{self.dp_noise!r}")

    def _check_secagg(self) -> None:
        try:
            coordmod.check_privacy(self.privacy, self.rule, self.mode, self.reputation)
        except coordmod.CoordinatorError as e:
            raise MeshError(str(e)) from None
        if self.privacy == "secagg+dp":
            # One clip: [dp] clip_norm (--clip-norm) is the L2 clip of secure aggregation too.
            if self.clip_l2 != DEFAULT_CLIP_L2:
                raise MeshError("privacy secagg+dp clips with [dp] clip_norm (--clip-norm), the "
                                "one clip of both; drop clip_l2 (--clip-l2)")
        elif type(self.clip_l2) is not int or not 1 <= self.clip_l2 <= 0x7FFFFFFF:
            raise MeshError(f"clip_l2 must be an integer in 1..2^31-1 (raw Q16.16), got "
                            f"{self.clip_l2!r}")
        if self.attackers:
            raise MeshError(f"privacy {self.privacy} runs without [[attackers]]: the adversary "
                            "does not take part in secure aggregation (--byzantine 0)")
        from microfed import secagg
        from microfed_host.secagg_server import MAX_NODES as SA_MAX

        if not secagg.MIN_NODES <= self.honest <= SA_MAX:
            raise MeshError(f"privacy {self.privacy} needs {secagg.MIN_NODES}..{SA_MAX} nodes, "
                            f"got {self.honest}")

    def dp_config(self) -> dict[str, Any] | None:
        """The resolved DP settings (None without DP): clip in raw Q16.16, the noise
        multiplier z as an exact rational (calibrated to the target epsilon when one is
        given), sigma^2 = (z * clip)^2 as [num, den] (with secagg+dp the variance of the sum,
        split over "nodes" shares; "dim" values per update), and the accountant's view."""
        if self.privacy not in privmod.DP_MODES:
            return None
        clip = q16_raw(self.clip_norm)
        extra: dict[str, Any] = {}
        rho_of = None
        if self.privacy == "secagg+dp":
            extra = {"nodes": self.honest, "dim": model_dim()}

            def rho_of(z: Fraction) -> float:
                try:
                    return privmod.rho_distributed(clip, privmod.sigma2_for(z, clip),
                                                   extra["nodes"], extra["dim"])
                except privmod.PrivacyError:  # a per-node variance below 1/2: too little
                    return math.inf
        try:
            z = (privmod.calibrate(self.dp_epsilon, self.dp_delta, self.rounds, rho_of)
                 if self.dp_epsilon > 0 else privmod.noise_multiplier(self.dp_noise_multiplier))
            num, den = privmod.sigma2_for(z, clip)
            doc = {"mode": self.privacy, "clip": clip, "sigma2": [num, den],
                   "delta": self.dp_delta, "noise": self.dp_noise,
                   "noise_multiplier": [z.numerator, z.denominator],
                   "target_epsilon": self.dp_epsilon or None, **extra}
            privmod.Accountant(doc).per_round()  # refuses a bound that cannot be computed
        except privmod.PrivacyError as e:
            raise MeshError(str(e)) from None
        return doc

    def _check_byzantine_budget(self) -> None:
        """BYZANTINE_POLICY: more poisoners than the rule's f voids its guarantee."""
        byz = self.model_byzantine
        if self.allow_more_byzantine or byz == 0:
            return
        if self.rule == "trimmed_mean":
            budget, what, flag = (self.f if self.trim < 0 else self.trim), "trim", "--f (or trim)"
        else:
            budget, what, flag = self.f, "f", "--f"
        if byz > budget:
            raise MeshError(
                f"{self.rule} with {what}={budget} cannot tolerate {byz} Byzantine nodes: its "
                f"guarantee needs {what} >= the number of Byzantine nodes; raise {flag} to {byz} "
                "or pass --allow-more-byzantine to run past the guarantee")
        if self.rule == "median" and byz >= self.honest:
            raise MeshError(
                f"median cannot tolerate {byz} Byzantine nodes against {self.honest} honest: "
                "it needs an honest majority; add honest nodes or pass --allow-more-byzantine")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["byzantine"] = self.byzantine
        return d


def parse_boards(spec: Any, honest: int) -> list[tuple[str, int]]:
    """ "unix32:8,mps2-an385:2" -> [("unix32", 8), ("mps2-an385", 2)]. Counts must add up to
    the honest nodes, unless one entry has no count: it takes the rest."""
    if not isinstance(spec, str) or not spec.strip():
        raise MeshError(f"boards must be a string like \"unix32:8,mps2-an385:2\", got {spec!r}")
    kinds = ", ".join(BOARD_KINDS)
    out: list[tuple[str, int]] = []
    rest: str | None = None
    for item in spec.split(","):
        kind, sep, count = item.strip().partition(":")
        kind = kind.strip()
        if kind not in BOARD_KINDS:
            raise MeshError(f"boards: unknown board kind {kind!r} in {spec!r} (kinds: {kinds})")
        if any(k == kind for k, _n in out) or kind == rest:
            raise MeshError(f"boards: {kind} appears twice in {spec!r}")
        if not sep:
            if rest is not None:
                raise MeshError(f"boards: only one kind may go without a count (it takes the "
                                f"rest), got {rest} and {kind} in {spec!r}")
            rest = kind
            out.append((kind, -1))
            continue
        if not count.strip().isdigit() or int(count) < 1:
            raise MeshError(f"boards: {kind}:{count} needs a node count >= 1 in {spec!r}")
        out.append((kind, int(count)))
    given = sum(n for _k, n in out if n > 0)
    if rest is None and given != honest:
        raise MeshError(f"boards {spec!r} puts {given} nodes on boards but there are {honest} "
                        f"honest nodes; make the counts add up to {honest}, or leave one kind "
                        "without a count to take the rest (e.g. unix32:8,unix)")
    if rest is not None and given >= honest:
        raise MeshError(f"boards {spec!r} leaves no node for {rest}: the counts already give "
                        f"{given} of the {honest} honest nodes")
    return [(k, honest - given if n < 0 else n) for k, n in out]


def parse_heap(v: Any, name: str = "unix32_heap",
               limits: tuple[int, int] = UNIX32_HEAP_RANGE) -> int:
    """A heap size in bytes: an integer, or a string with a k/m suffix (\"512k\")."""
    n: int | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str):
        t = v.strip().lower()
        mult = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
        digits = t[:-1] if mult > 1 else t
        if digits.isdigit():
            n = int(digits) * mult
    lo, hi = limits
    if n is None or not lo <= n <= hi:
        raise MeshError(f"{name} must be bytes (or \"512k\", \"1m\") in "
                        f"{lo // 1024}k..{hi // (1024 * 1024)}m, got {v!r}")
    return n


_TOP = {"boards", "unix32_heap", "m3_heap", "chaos", "name", "description", "honest", "rule", "f", "m", "trim", "pre", "bucket", "model", "rounds", "mode", "seed",
        "crosscheck", "deadline_s", "round_min_s", "split", "alpha", "max_samples", "attackers", "train",
        "data", "reputation", "allow_more_byzantine", "privacy", "dp",
        "clip_l2"}
# Models a scenario may name (microfed.model.get).
MODELS = ("softmax", "mlp")
# [dp] table key -> Scenario field.
DP_KEYS = {"epsilon": "dp_epsilon", "delta": "dp_delta", "noise_multiplier": "dp_noise_multiplier",
           "clip_norm": "clip_norm", "noise": "dp_noise"}


def model_dim() -> int:
    """Parameters of the mesh's model (coordinator.json's model on the digits data)."""
    from microfed import model

    c = CoordinatorConfig(mesh_dir="")
    return int(model.get(c.model, n_features=c.n_features, n_classes=c.n_classes).n_params)


def q16_raw(x: float) -> int:
    """A real number at the edge -> raw Q16.16 (docs/determinism.md 2.6)."""
    from microfed import q16

    return q16.from_float(x)


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
        for k in ("name", "description", "honest", "rule", "f", "m", "trim", "pre", "bucket",
                  "model", "rounds", "mode", "seed", "crosscheck", "deadline_s", "round_min_s", "split", "alpha", "max_samples",
                  "allow_more_byzantine", "boards", "unix32_heap", "m3_heap", "privacy",
                  "clip_l2"):
            if k in doc:
                setattr(sc, k, doc[k])
        dpt = doc.get("dp", {})
        if not isinstance(dpt, dict):
            raise MeshError(f"scenario {path}: [dp] must be a table")
        for k, v in dpt.items():
            if k not in DP_KEYS:
                raise MeshError(f"scenario {path}: unknown key dp.{k} (known: {', '.join(DP_KEYS)})")
            if k == "noise" and not isinstance(v, str):
                raise MeshError(f"scenario {path}: dp.noise must be a string")
            if k != "noise" and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise MeshError(f"scenario {path}: dp.{k} must be a number")
            setattr(sc, DP_KEYS[k], v if k == "noise" else float(v))
        for section, keys_ in (("train", ("lr", "epochs", "batch")),
                               ("data", ("split", "alpha", "max_samples"))):
            sub = doc.get(section, {})
            if not isinstance(sub, dict):
                raise MeshError(f"scenario {path}: [{section}] must be a table")
            for k in sub:
                if k not in keys_:
                    raise MeshError(f"scenario {path}: unknown key {section}.{k}")
                setattr(sc, k, sub[k])
        rep = doc.get("reputation", {})
        if not isinstance(rep, dict):
            raise MeshError(f"scenario {path}: [reputation] must be a table")
        sc.reputation = dict(rep)
        sc.chaos = parse_chaos(doc.get("chaos"))
        groups = doc.get("attackers", [])
        if not isinstance(groups, list):
            raise MeshError(f"scenario {path}: attackers must be an array of tables [[attackers]]")
        for g in groups:
            if not isinstance(g, dict) or "attack" not in g:
                raise MeshError(f"scenario {path}: every [[attackers]] needs attack = \"NAME\"")
            params = {}
            for k, v in g.items():
                if k in ("attack", "count"):
                    continue
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise MeshError(f"scenario {path}: attack parameter {k} must be a number")
                params[k] = float(v)
            count = g.get("count", 1)
            if type(count) is not int:
                raise MeshError(f"scenario {path}: attackers count must be an integer")
            sc.attackers.append(AttackGroup(str(g["attack"]), count, params))
    except (TypeError, ValueError) as e:  # ChaosError is a ValueError
        raise MeshError(f"scenario {path}: {e}") from None
    for k, typ in (("honest", int), ("f", int), ("rounds", int), ("seed", int), ("lr", int),
                   ("epochs", int), ("batch", int), ("max_samples", int), ("m", int), ("trim", int),
                   ("name", str), ("description", str), ("rule", str), ("mode", str),
                   ("pre", str), ("bucket", int), ("model", str),
                   ("split", str), ("crosscheck", str), ("allow_more_byzantine", bool),
                   ("boards", str), ("privacy", str), ("clip_l2", int)):
        if type(getattr(sc, k)) is not typ:
            what = {int: "an integer", str: "a string", bool: "true or false"}[typ]
            raise MeshError(f"scenario {path}: {k} must be {what}")
    for k in ("alpha", "deadline_s", "round_min_s"):
        v = getattr(sc, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise MeshError(f"scenario {path}: {k} must be a number")
        setattr(sc, k, float(v))
    return sc


def apply_overrides(sc: Scenario, a: Any) -> Scenario:
    """Flags win over the scenario file. Without --f, --byzantine K also sets f = K (the rule
    is configured to tolerate the attackers asked for); wire attacks, whose nodes send honest
    updates, leave f alone."""
    for k in ("honest", "rule", "f", "pre", "bucket", "model", "rounds", "mode", "split", "alpha",
              "seed",
              "crosscheck", "max_samples", "boards", "unix32_heap", "m3_heap", "privacy",
              "clip_l2"):
        v = getattr(a, k, None)
        if v is not None:
            setattr(sc, k, v)
    if getattr(a, "allow_more_byzantine", False):
        sc.allow_more_byzantine = True
    if getattr(a, "deadline", None) is not None:
        sc.deadline_s = float(a.deadline)
    for k in ("privacy", "dp_delta", "clip_norm", "dp_noise"):
        if getattr(a, k, None) is not None:
            setattr(sc, k, getattr(a, k))
    # A target epsilon and a noise multiplier exclude each other: the flag replaces the file's.
    if getattr(a, "dp_epsilon", None) is not None:
        sc.dp_epsilon, sc.dp_noise_multiplier = float(a.dp_epsilon), 0.0
    if getattr(a, "dp_noise_multiplier", None) is not None:
        sc.dp_noise_multiplier, sc.dp_epsilon = float(a.dp_noise_multiplier), 0.0
    for name in ("tau", "sigma", "scale"):
        if getattr(a, name, None) is not None:
            lo = -MAX_ATTACK_PARAM if name == "scale" else 0.0
            _finite(f"--{name}", getattr(a, name), lo, MAX_ATTACK_PARAM)
    byz, attack = getattr(a, "byzantine", None), getattr(a, "attack", None)
    if byz is not None and not 0 <= byz <= MAX_NODES:
        raise MeshError(f"--byzantine must be in 0..{MAX_NODES}, got {byz}")
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
        try:
            poisons = advmod.canonical_attack(attack) not in HONEST_UPDATE_ATTACKS
        except advmod.AdversaryError as e:
            raise MeshError(str(e)) from None
        if getattr(a, "byzantine", None) is not None and getattr(a, "f", None) is None and poisons:
            sc.f = byz
    else:
        for name in ("tau", "sigma", "scale"):
            if getattr(a, name, None) is not None:
                for g in sc.attackers:
                    g.params[name] = float(getattr(a, name))
    return sc


# ------------------------------------------------------------------ run directory


def prepare(sc: Scenario, out: Path, force: bool = False) -> dict[str, Any]:
    """Provision the mesh, write shards, node directories and the coordinator settings."""
    from microfed_host.provision import ProvisionError, init_mesh

    sc.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MeshError(f"--out {out} exists and is not a directory; name a new or empty directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MeshError(f"{out} is not empty; pick another --out or add --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = sc.node_ids()
    mesh_name = f"mesh-{sc.seed}-{os.urandom(3).hex()}"
    try:
        init_mesh(out / "mesh", mesh_name, len(ids), "127.0.0.1:1883")
    except ProvisionError as e:
        raise MeshError(f"provisioning failed: {e}") from None
    ddir = out / "data"
    split, shards = write_data(sc, ids, ddir)
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    dp = sc.dp_config()
    for nid in sc.honest_ids():
        make_node_dir(out / "nodes" / nid, out / "mesh" / "bundles" / f"{nid}.json",
                      ddir / f"{nid}.mfds", sc, None, dp)
    cfg = CoordinatorConfig(mesh_dir=str(out / "mesh"), rule=sc.rule, f=sc.f, m=sc.m,
                            trim=sc.trim, pre=sc.pre, bucket=sc.bucket, rounds=sc.rounds,
                            mode=sc.mode, model=sc.model,
                            crosscheck=sc.crosscheck, deadline_s=sc.deadline_s,
                            round_min_s=sc.round_min_s,
                            init_seed=sc.seed, test_shard=str(ddir / "test.mfds"),
                            reputation=dict(sc.reputation), expected=ids,
                            dp=dp or {},
                            wait_hello_s=min(30.0, sc.deadline_s),
                            revoke_at=({sc.chaos.revoke_node: sc.chaos.revoke_round}
                                       if sc.chaos is not None and sc.chaos.revoke_node else {}),
                            privacy=sc.privacy)
    (out / coordmod.CONFIG_NAME).write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    doc = sc.to_json()
    doc.update({"mesh": mesh_name, "honest_ids": sc.honest_ids(),
                "byzantine_ids": sc.byzantine_ids(), "node_boards": sc.node_boards(),
                "train": train,
                "test_samples": len(split.test), "shard_sizes": [len(s) for s in shards],
                "dp_resolved": dp})
    (out / "scenario.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def write_data(sc: Scenario, ids: list[str], ddir: Path) -> tuple[Any, list[Any]]:
    """The run's data in `ddir` (new): test.mfds and one shard per node id (<id>.mfds), split
    as the scenario says; returns (the train/test split, the shards)."""
    split = data.train_test_split(sc.seed)
    shards = data.shard(split.train, len(ids), sc.split, sc.seed, sc.alpha)
    if sc.max_samples:
        shards = [s.subset(np.arange(min(len(s), sc.max_samples))) for s in shards]
    ddir.mkdir()
    data.write_shard(ddir / "test.mfds", split.test)
    for i, (nid, s) in enumerate(zip(ids, shards, strict=True)):
        data.write_shard(ddir / f"{nid}.mfds", s, i, len(ids))
    return split, shards


def make_node_dir(nd: Path, bundle: Path, shard: Path, sc: Scenario,
                  broker: tuple[str, int] | None, dp: dict[str, Any] | None = None) -> None:
    """A node directory: state/, bundle.json (0600), shard.bin and config.json."""
    (nd / "state").mkdir(parents=True)
    shutil.copy(bundle, nd / "bundle.json")
    os.chmod(nd / "bundle.json", 0o600)
    shutil.copy(shard, nd / "shard.bin")
    write_node_config(nd, sc, broker, dp=dp)


def write_node_config(nd: Path, sc: Scenario, broker: tuple[str, int] | None,
                      link: str = "tcp", dp: dict[str, Any] | None = None) -> None:
    """The node's config.json. link "serial": the node's MQTT goes over its serial line to a
    bridge (mps2-an385); `dp`: Scenario.dp_config() (its node part goes to "dp")."""
    conf: dict[str, Any] = {
        "mode": sc.mode,
        "model": sc.model,
        "train": {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed},
        # A node whose runner died must not linger: no GLOBAL_MODEL for this long -> exit.
        "idle_exit_s": int(max(120, 3 * sc.deadline_s)),
        "status_interval_ms": 100,
    }
    if sc.privacy in privmod.SECAGG_MODES:
        # The key set of 100 nodes is ~15 KB: above the default 16 KB once framed.
        conf.update({"privacy": "secagg", "max_msg": 65536})
        if dp is None:  # with secagg+dp, dp.clip is the clip (firmware/config.py)
            conf["clip_l2"] = sc.clip_l2
    if broker is not None:
        conf["broker"] = {"host": broker[0], "port": broker[1]}
    if link != "tcp":
        conf["link"] = link
    if dp is not None:
        conf["dp"] = {"clip": dp["clip"], "sigma2": dp["sigma2"], "noise": dp["noise"]}
        if "nodes" in dp:  # distributed DP: the node adds share_sigma2(sigma2, nodes)
            conf["dp"]["nodes"] = dp["nodes"]
    (nd / "config.json").write_text(json.dumps(conf, indent=2) + "\n")


def make_adversary(sc: Scenario, out: Path, mesh: str) -> advmod.Adversary | None:
    if not sc.attackers:
        return None
    return adversary_of(sc, mesh, out / "mesh", out / "data", sc.byzantine_ids(),
                        sc.honest_ids())


def adversary_of(sc: Scenario, mesh: str, md: Path, ddir: Path, byzantine: list[str],
                 honest: list[str]) -> advmod.Adversary:
    """The Adversary holding the registered keys (in mesh directory `md`) and shards (in
    `ddir`) of `byzantine`, attacking as sc.attackers say, group by group in id order, among
    `honest` nodes."""
    coord_pub = keys.read_public_key(md / "coordinator.pub")
    nodes: list[advmod.Compromised] = []
    byz = iter(byzantine)
    for g in sc.attackers:
        for _ in range(g.count):
            nid = next(byz)
            ds, _i, _n = data.decode_shard((ddir / f"{nid}.mfds").read_bytes())
            xs, ys = ds.as_lists()
            nodes.append(advmod.Compromised(nid, keys.read_private_key(md / "nodes" / f"{nid}.key"),
                                            g.attack, xs, ys, dict(g.params)))
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    return advmod.Adversary(mesh, coord_pub, nodes, honest, sc.rounds, train,
                            sc.mode, sc.seed, model_name=sc.model,
                            reward_band=int(sc.reputation.get("reward_band",
                                                              ReputationBook().reward_band)))


# ------------------------------------------------------------------ progress output
