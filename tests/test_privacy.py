"""Privacy in the product: the scenario's `privacy` key and [dp] table, calibration and the
accountant (microfed_host.privacy), and an in-process run with local DP whose summary.json and
live output carry the epsilon spent."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from microfed_host import privacy as pv
from microfed_host.mesh import run
from microfed_host.scenario import MeshError, Scenario, load_scenario


def test_parse_privacy() -> None:
    assert pv.parse_privacy("none") == "none"
    assert pv.parse_privacy("dp") == "dp"
    assert pv.parse_privacy("secagg") == "secagg"
    assert pv.parse_privacy("secagg+dp") == "secagg+dp"
    with pytest.raises(pv.PrivacyError, match="one of 'none', 'dp', 'secagg', 'secagg\\+dp'"):
        pv.parse_privacy("DP ")


def _zcdp_to_dp(rho: float, delta: float) -> float:
    """CKS20 Prop. 12 conversion of rho-zCDP (RDP alpha * rho), minimised over a fine grid of
    orders: an independent check of the accountant's number."""
    best = math.inf
    a = 1.01
    while a < 5000:
        best = min(best, a * rho + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
        a *= 1.001
    return best


@pytest.mark.parametrize(("z", "rounds"), [(0.5, 1), (1.0, 30), (4.0, 30), (20.0, 100)])
def test_accountant_matches_the_zcdp_bound(z: float, rounds: int) -> None:
    clip = 65536
    zf = pv.noise_multiplier(z)
    s2 = pv.sigma2_for(zf, clip)
    rho = pv.rho_local(clip, s2)
    assert rho == pytest.approx(2 / float(zf) ** 2, rel=1e-12)  # (2C)^2 / (2 z^2 C^2)
    eps = pv.epsilon(rho, rounds, 1e-5)
    fine = _zcdp_to_dp(rho * rounds, 1e-5)
    # the accountant's orders are a coarser grid than ours: never below, at most 2 % above
    assert fine * (1 - 1e-9) <= eps <= fine * 1.02 + 1e-9
    # and below the classic closed form rho + 2 sqrt(rho ln(1/delta)) (Bun-Steinke 2016)
    rt = rho * rounds
    assert eps <= rt + 2 * math.sqrt(rt * math.log(1e5))


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    e = [pv.epsilon(pv.rho_local(1000, pv.sigma2_for(Fraction(2), 1000)), r, 1e-5)
         for r in (1, 2, 10, 30)]
    assert e == sorted(e) and e[0] > 0
    assert pv.epsilon(0.5, 10, 1e-5) > pv.epsilon(0.1, 10, 1e-5)
    assert pv.epsilon(0.5, 10, 1e-3) < pv.epsilon(0.5, 10, 1e-6)


@pytest.mark.parametrize("target", [1.0, 8.0, 100.0])
def test_calibrate_is_the_smallest_multiplier_within_target(target: float) -> None:
    z = pv.calibrate(target, 1e-5, 30)
    assert z.denominator <= pv.Z_DENOMINATOR

    def eps(zz: Fraction) -> float:
        return pv.epsilon(2 / float(zz) ** 2, 30, 1e-5)

    assert eps(z) <= target
    assert eps(z - Fraction(1, pv.Z_DENOMINATOR)) > target


def test_distributed_bound_tends_to_the_central_one() -> None:
    clip, n, d = 65536, 10, 650
    s2 = pv.sigma2_for(Fraction(2), clip)
    central = pv.rho_local(clip, s2)
    assert pv.rho_distributed(clip, s2, n, d) == pytest.approx(central, rel=1e-9)
    # a per-node variance near the 1/2 limit: the sum is visibly not a discrete Gaussian
    small = (n, 1)  # sigma^2 = 10 in all, 1 per node
    assert pv.rho_distributed(1, small, n, d) > pv.rho_local(1, small)
    with pytest.raises(pv.PrivacyError, match="1/2"):
        pv.rho_distributed(1, (4, 1), n, d)


# ---------------------------------------------------------------- the scenario


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_scenario_privacy_keys(tmp_path: Path) -> None:
    sc = load_scenario(_toml(tmp_path, 'privacy = "dp"\n[dp]\nepsilon = 8\ndelta = 1e-6\n'
                                       'clip_norm = 0.5\nnoise = "seeded"\n'))
    sc.check()
    assert (sc.privacy, sc.dp_epsilon, sc.dp_delta, sc.clip_norm, sc.dp_noise) == (
        "dp", 8.0, 1e-6, 0.5, "seeded")
    dpc = sc.dp_config()
    assert dpc is not None and dpc["clip"] == 32768
    z = Fraction(*dpc["noise_multiplier"])
    assert dpc["sigma2"] == [(z * 32768).numerator ** 2, (z * 32768).denominator ** 2]
    assert pv.Accountant(dpc).spent(sc.rounds)["epsilon"] <= 8.0
    assert Scenario().dp_config() is None


@pytest.mark.parametrize(("text", "msg"), [
    ('privacy = "secagg+dp"\n', "secagg\\+dp works with rule fedavg only"),
    ('privacy = "secagg"\n', "works with rule fedavg only"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "coordinated"\n',
     "privacy secagg\\+dp needs exactly one of"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "gossip"\n[dp]\nepsilon = 8\n',
     "secagg\\+dp needs coordinated mode"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "coordinated"\nclip_l2 = 65536\n'
     '[dp]\nepsilon = 8\n', "one clip of both; drop clip_l2"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "coordinated"\nhonest = 2\n'
     '[dp]\nepsilon = 8\n', "secagg\\+dp needs 3..100 nodes"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "coordinated"\n'
     '[dp]\nepsilon = 8\n[[attackers]]\nattack = "replay"\n', "without \\[\\[attackers\\]\\]"),
    ('privacy = "secagg+dp"\nrule = "fedavg"\nf = 0\nmode = "coordinated"\n'
     '[dp]\nnoise_multiplier = 1\ndelta = 0\n', "dp delta"),
    ('privacy = "dp"\n', "exactly one of"),
    ('privacy = "dp"\n[dp]\nepsilon = 1\nnoise_multiplier = 2\n', "exactly one of"),
    ('privacy = "dp"\n[dp]\nepsilon = 1\ndelta = 1.0\n', "delta"),
    ('privacy = "dp"\n[dp]\nepsilon = 1\nclip_norm = 0\n', "clip_norm"),
    ('privacy = "dp"\n[dp]\nepsilon = 1\nnoise = "float"\n', "noise"),
    ('[dp]\nepsilon = 1\n', "privacy is 'none'"),
])
def test_scenario_privacy_errors(tmp_path: Path, text: str, msg: str) -> None:
    sc = load_scenario(_toml(tmp_path, text))
    with pytest.raises(MeshError, match=msg):
        sc.check()


def test_scenario_dp_table_errors(tmp_path: Path) -> None:
    with pytest.raises(MeshError, match="unknown key dp.eps"):
        load_scenario(_toml(tmp_path, '[dp]\neps = 1\n'))
    with pytest.raises(MeshError, match="privacy must be a string"):
        load_scenario(_toml(tmp_path, 'privacy = 1\n'))


# ---------------------------------------------------------------- a run


def _dp_scenario(**kw: object) -> Scenario:
    base = dict(name="dp", honest=5, rule="fedavg", f=0, rounds=3, mode="coordinated",
                seed=3, max_samples=30, privacy="dp", dp_epsilon=50.0, dp_noise="seeded")
    base.update(kw)
    return Scenario(**base)  # type: ignore[arg-type]


def test_inproc_run_reports_privacy_spent(tmp_path: Path) -> None:
    lines: list[str] = []
    s = run(_dp_scenario(), tmp_path / "a", transport="inproc", say=lines.append)
    p = s["privacy"]
    assert p["mode"] == "dp" and p["rounds"] == 3 and p["noise"] == "seeded"
    assert p["epsilon"] <= 50.0 and p["epsilon"] > 0.9 * 50.0  # calibrated to the target
    assert p["epsilon"] == pytest.approx(pv.epsilon(p["rho_per_round"], 3, p["delta"]))
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["privacy"] == p
    eps_lines = [ln for ln in lines if "eps " in ln]
    assert len(eps_lines) == 3 and f"eps {p['epsilon']:.3g} " in eps_lines[-1]
    conf = json.loads((tmp_path / "a" / "nodes" / "node-01" / "config.json").read_text())
    assert conf["dp"]["clip"] == 65536 and conf["dp"]["noise"] == "seeded"
    # seeded noise: the same run again gives the same model; without DP, another one
    again = run(_dp_scenario(), tmp_path / "b", transport="inproc", say=None)
    assert again["final_digest"] == s["final_digest"]
    plain = run(_dp_scenario(privacy="none", dp_epsilon=0.0), tmp_path / "c",
                transport="inproc", say=None)
    assert plain["final_digest"] != s["final_digest"]
    assert plain["privacy"] == {"mode": "none"}


def test_real_mesh_with_local_dp_reaches_the_inproc_digest(tmp_path: Path) -> None:
    """MicroPython nodes (firmware/main.py, config.json "dp") over mosquitto add the same
    seeded noise as the in-process engine: the same final model, bit for bit."""
    from microfed_host import upy
    from microfed_host.broker import find_mosquitto

    if find_mosquitto() is None or upy.find_micropython() is None:
        pytest.skip("needs mosquitto and the MicroPython unix port")
    sc = dict(rounds=2, deadline_s=30.0, dp_epsilon=20.0)
    real = run(_dp_scenario(**sc), tmp_path / "mqtt", broker="mosquitto", say=None)
    inproc = run(_dp_scenario(**sc), tmp_path / "inproc", transport="inproc", say=None)
    assert real["rounds"] == 2 and real["rejected"] == {}
    assert real["final_digest"] == inproc["final_digest"]
    assert real["privacy"] == inproc["privacy"]
