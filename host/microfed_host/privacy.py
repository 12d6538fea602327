"""Privacy modes of a mesh run and the coordinator's privacy accounting (docs/privacy.md).

Differential privacy here is node-level: the protected unit is one node's whole data set
(everything behind one update), neighbouring data sets are any two data sets of one node
(replace-one), so a delta clipped to L2 norm C has L2 sensitivity Delta = 2C.

- Local DP (`privacy = "dp"`): every honest node clips its delta and adds N_Z(0, sigma^2)
  per coordinate (microfed.dp.NodeDP). By Canonne, Kamath and Steinke 2020 (Thm 14, the
  multivariate discrete Gaussian) each published update is rho-zCDP with
  rho = Delta^2 / (2 sigma^2) = 2 / z^2 for sigma = z C.
- Distributed DP (`privacy = "secagg+dp"`, under secure aggregation): each of the n nodes
  clips its delta and adds N_Z(0, sigma^2 / n) (microfed.dp.share_sigma2) before masking,
  every node weighing 1; the coordinator sees only the sum of the k nodes whose masked update
  made it into the round, which is (eps^2 / 2)-zCDP with eps from Kairouz, Liu and Steinke
  2021, Thm 1 (`rho_distributed`) for k nodes of per-node variance sigma^2 / n: a dropout
  removes its noise share, and the accountant charges the round for the k that remained.

One round releases each node's update once; T rounds compose to the sum of their rho (zCDP
composes additively). dp-accounting's RDP accountant turns the composed ZCDpEvent into epsilon at the
stated delta (its conversion: CKS20 Prop. 12). Floats appear only here, on the host, in
accounting and display: never on the device path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

PRIVACY_MODES = ("none", "dp", "secagg", "secagg+dp")
SECAGG_MODES = ("secagg", "secagg+dp")  # the modes that run secure aggregation
DP_MODES = ("dp", "secagg+dp")  # the modes whose nodes add noise (Scenario.dp_config)
NOISE_SOURCES = ("urandom", "seeded")  # microfed.dp.NOISE_SOURCES
DEFAULT_DELTA = 1e-5
DEFAULT_CLIP_NORM = 1.0
Z_DENOMINATOR = 10_000  # noise multipliers are rationals k / 10^4 (rounded up)
MAX_NOISE_MULTIPLIER = 1e4


class PrivacyError(ValueError):
    """A privacy setting that cannot be used: the message says which and why."""


def parse_privacy(value: Any) -> str:
    """The scenario's `privacy` value, or PrivacyError naming the allowed values."""
    if value in PRIVACY_MODES:
        return str(value)
    allowed = ", ".join(repr(m) for m in PRIVACY_MODES)
    raise PrivacyError(f"privacy must be one of {allowed}, got {value!r}")


def rho_local(clip: int, sigma2: tuple[int, int]) -> float:
    """zCDP of one locally privatised update: Delta^2 / (2 sigma^2) with Delta = 2 * clip
    (raw units), sigma^2 = num / den (raw units squared); computed exactly, then rounded."""
    num, den = sigma2
    return float(Fraction((2 * clip) ** 2 * den, 2 * num))


def rho_distributed(clip: int, sigma2: tuple[int, int], n: int, d: int) -> float:
    """zCDP of the sum of n nodes' updates, each with N_Z(0, sigma^2 / n) noise per each of d
    coordinates (Kairouz, Liu, Steinke 2021, Thm 1, with per-node variance s^2 = sigma^2/n):
    eps = min(sqrt(D2^2/(n s^2) + tau d / 2), D2/(sqrt(n) s) + tau sqrt(d)), D2 = 2 * clip,
    tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k+1)); rho = eps^2 / 2."""
    num, den = sigma2
    s2 = num / (den * n)
    if s2 < 0.5:
        raise PrivacyError("distributed DP needs a per-node variance sigma^2/n >= 1/2")
    d2 = 2.0 * clip
    tau = 10.0 * sum(math.exp(-2 * math.pi ** 2 * s2 * k / (k + 1)) for k in range(1, n))
    eps = min(math.sqrt(d2 ** 2 / (n * s2) + tau * d / 2),
              d2 / (math.sqrt(n * s2)) + tau * math.sqrt(d))
    return eps * eps / 2


def epsilon(rho: float, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP of `rounds` compositions of a rho-zCDP release, by dp-accounting's
    RDP accountant."""
    import dp_accounting

    if rounds <= 0 or rho == 0:
        return 0.0
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ZCDpEvent(rho), rounds))
    return float(acc.get_epsilon(delta))


def sigma2_for(z: Fraction, clip: int) -> tuple[int, int]:
    """sigma^2 = (z * clip)^2 as an exact rational (num, den) in raw units."""
    s = z * clip
    return s.numerator ** 2, s.denominator ** 2


def noise_multiplier(value: float) -> Fraction:
    """A noise multiplier as the rational k / Z_DENOMINATOR at or above `value`."""
    return Fraction(math.ceil(value * Z_DENOMINATOR - 1e-9), Z_DENOMINATOR)


def calibrate(target: float, delta: float, rounds: int,
              rho_of: Callable[[Fraction], float] | None = None) -> Fraction:
    """The smallest noise multiplier z (a multiple of 1 / Z_DENOMINATOR) whose run of `rounds`
    rounds spends at most `target` epsilon at `delta`. rho_of(z): one round's zCDP; local DP's
    2 / z^2 by default (distributed DP passes its bound)."""
    def eps_of(z: Fraction) -> float:
        return epsilon(rho_of(z) if rho_of is not None else float(2 / (z * z)), rounds, delta)

    lo, hi = Fraction(1, Z_DENOMINATOR), Fraction(1)
    while eps_of(hi) > target:
        hi *= 2
        if hi > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(f"epsilon {target:g} over {rounds} rounds at delta {delta:g} "
                               f"needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}")
    if eps_of(lo) <= target:
        return lo
    # eps_of is decreasing in z: keep eps_of(lo) > target >= eps_of(hi).
    while hi - lo > Fraction(1, Z_DENOMINATOR):
        mid = noise_multiplier(float((lo + hi) / 2))
        if mid <= lo or mid >= hi:
            break
        if eps_of(mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


def rho_shares(clip: int, sigma2: tuple[int, int], nodes: int, k: int, d: int) -> float:
    """zCDP of one secagg+dp round whose sum holds the noise shares of k of the `nodes` nodes
    (each N_Z(0, sigma^2 / nodes) per coordinate): rho_distributed for k nodes with the same
    per-node variance, i.e. a total variance of sigma^2 * k / nodes."""
    if not 1 <= k <= nodes:
        raise PrivacyError(f"a round summed {k} noise shares, the run has {nodes} nodes")
    return rho_distributed(clip, (sigma2[0] * k, sigma2[1] * nodes), k, d)


class Accountant:
    """What the coordinator reports: epsilon spent after r rounds, per round and in total,
    from a run's `privacy` settings (CoordinatorConfig.dp). secagg+dp charges each round for
    the nodes whose noise share is in its sum (`contributors`; all nodes when not given)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.mode = cfg.get("mode", "none")
        self.delta = float(cfg.get("delta", DEFAULT_DELTA))
        self.nodes = int(cfg.get("nodes", 1))
        if self.mode in DP_MODES:
            self.clip = int(cfg["clip"])
            self.sigma2 = (int(cfg["sigma2"][0]), int(cfg["sigma2"][1]))
        self.rho = self.round_rho(self.nodes)  # a round with every node's share
        self._cache: dict[tuple[int, ...], tuple[float, float]] = {}  # ks -> (rho, epsilon)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def round_rho(self, k: int) -> float:
        """zCDP of one round whose sum carries k noise shares (k is moot for local DP)."""
        if self.mode == "dp":
            return rho_local(self.clip, self.sigma2)
        if self.mode == "secagg+dp":
            return rho_shares(self.clip, self.sigma2, self.nodes, k, int(self.cfg["dim"]))
        return 0.0

    def spent(self, rounds: int, contributors: Sequence[int] | None = None) -> dict[str, Any]:
        """Epsilon after `rounds` rounds; `contributors[i]`: how many nodes' updates (noise
        shares) round i+1 summed."""
        ks = tuple(contributors[:rounds]) if contributors is not None else ()
        ks = ks + (self.nodes,) * (rounds - len(ks))
        if ks not in self._cache:
            # zCDP composes additively: one ZCDpEvent of the summed rho (equal to composing
            # the rounds one by one).
            rho = sum(self.round_rho(k) for k in ks)
            self._cache[ks] = (rho, epsilon(rho, 1, self.delta) if ks else 0.0)
        rho, eps = self._cache[ks]
        out: dict[str, Any] = {"rounds": rounds, "epsilon": eps, "delta": self.delta,
                               "rho": rho}
        if self.mode == "secagg+dp":
            out["noise_shares"] = list(ks)
        return out

    def per_round(self) -> float:
        return self.spent(1)["epsilon"]


def check_config(cfg: dict[str, Any]) -> None:
    """The coordinator's `privacy` settings: {} or {"mode": "none"}; or {"mode": "dp" |
    "secagg+dp", "clip": raw int, "sigma2": [num, den], "delta": float, ...}; secagg+dp also
    "nodes" (noise shares) and "dim" (model parameters, for the bound)."""
    if not cfg:
        return
    mode = parse_privacy(cfg.get("mode", "none"))
    if mode == "none":
        return
    clip, s2, delta = cfg.get("clip"), cfg.get("sigma2"), cfg.get("delta", DEFAULT_DELTA)
    if type(clip) is not int or not 1 <= clip <= 0x7FFFFFFF:
        raise PrivacyError("privacy clip must be an int in 1..2^31-1 (raw Q16.16)")
    if (not isinstance(s2, (list, tuple)) or len(s2) != 2
            or any(type(v) is not int or v < 1 for v in s2)):
        raise PrivacyError("privacy sigma2 must be [num, den], positive ints")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PrivacyError(f"privacy delta must be in (0, 1), got {delta!r}")
    if mode == "secagg+dp":
        for k in ("nodes", "dim"):
            v = cfg.get(k)
            if type(v) is not int or v < 1:
                raise PrivacyError(f"privacy secagg+dp needs {k}, a positive int, got {v!r}")


def privacy_line(dp: dict[str, Any], rounds: int) -> str:
    """One line for the user: what the nodes do and what it costs over `rounds` rounds."""
    z = Fraction(dp["noise_multiplier"][0], dp["noise_multiplier"][1])
    acc = Accountant(dp)
    eps = acc.spent(rounds)["epsilon"]
    if dp["mode"] == "secagg+dp":
        what = (f"distributed DP under secure aggregation: delta clipped to L2 "
                f"{dp['clip'] / 65536:g}, each of {dp['nodes']} nodes adds 1/{dp['nodes']} of "
                f"the variance of discrete Gaussian noise sigma = {float(z):g} x clip")
        tail = " (if every node stays in; a dropout costs more)"
    else:
        what = (f"local DP: delta clipped to L2 {dp['clip'] / 65536:g}, discrete Gaussian "
                f"noise sigma = {float(z):g} x clip")
        tail = ""
    return (f"{what} ({dp['noise']}); epsilon {acc.per_round():.3g} per round, {eps:.3g} "
            f"after {rounds} rounds at delta {acc.delta:g}{tail}")
