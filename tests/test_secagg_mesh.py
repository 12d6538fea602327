"""Secure aggregation in the product (`microfed mesh run --privacy secagg`): with no noise the
final model digest equals the plain FedAvg run's on the same seed; a node that drops out in the
middle of a round — after it sent its encrypted shares, before its masked update, so its
pairwise masks are in every survivor's masked update and must be removed with its
reconstructed key — is recovered, and the digest equals plain FedAvg over the survivors
(computed here independently from the portable functions); the settings that cannot run on
masked updates are refused with a reason. With distributed DP (`--privacy secagg+dp`, seeded
noise) the digest is that of an independent loop of clip + noise share + unweighted FedAvg,
the noise lands (another digest than plain secagg), and the accountant charges each round for
the noise shares its sum held. In-process engine (seconds); the real MQTT meshes with
MicroPython nodes are tests/test_mesh.py::test_secagg_mqtt_mesh_matches_plain_fedavg and
::test_secagg_dp_mqtt_mesh_matches_the_inproc_digest."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from microfed import aggregate, dp, model, noderound, q16
from microfed_host import mesh
from microfed_host.inproc import run_inproc
from microfed_host.report import summarize
from microfed_host.rounds_store import RoundsStore
from microfed_host.scenario import prepare

ROUNDS = 3


def _scenario(**kw: Any) -> mesh.Scenario:
    sc = mesh.Scenario(name="secagg", honest=5, rule="fedavg", f=0, rounds=ROUNDS, seed=11,
                       max_samples=60, deadline_s=30.0, privacy="secagg")
    for k, v in kw.items():
        setattr(sc, k, v)
    return sc


def _run(sc: mesh.Scenario, out: Path, drop: tuple[str, int] | None = None) -> dict[str, Any]:
    doc = prepare(sc, out)
    info = run_inproc(sc, out, doc, drop=drop)
    return {**summarize(out, doc, info, 0.0), "node_rejections": info["node_rejections"]}


def _reference(out: Path, sc: mesh.Scenario, gone: dict[str, int]) -> str:
    """Plain FedAvg over the nodes present in each round (gone: node -> first round it is
    missing), from the portable functions alone: the digest secure aggregation must reach."""
    ids = sc.honest_ids()
    shards = {i: model.Shard((out / "nodes" / i / "shard.bin").read_bytes()) for i in ids}
    m = model.get("softmax", n_features=shards[ids[0]].d, n_classes=shards[ids[0]].k)
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    g = m.init(sc.seed)
    for r in range(1, sc.rounds + 1):
        here = [i for i in ids if gone.get(i, sc.rounds + 1) > r]
        deltas = [dp.l2_clip(noderound.local_update(m, shards[i], train, r, i, g), sc.clip_l2)
                  for i in here]
        agg = aggregate.fedavg(deltas, [shards[i].n for i in here])
        g = [q16.sat(a + b) for a, b in zip(g, agg, strict=True)]
    return model.params_digest(g).hex()


def _reference_dp(out: Path, sc: mesh.Scenario, gone: dict[str, int]) -> str:
    """secagg+dp from the portable functions: every present node's delta, clipped to the DP
    clip, plus its seeded share of the noise (microfed.dp.node_dp with config.json's "dp"),
    averaged with weight 1 each."""
    ids = sc.honest_ids()
    shards = {i: model.Shard((out / "nodes" / i / "shard.bin").read_bytes()) for i in ids}
    conf = json.loads((out / "nodes" / ids[0] / "config.json").read_text())
    nds = {i: dp.node_dp(conf["dp"], sc.seed, i) for i in ids}
    m = model.get("softmax", n_features=shards[ids[0]].d, n_classes=shards[ids[0]].k)
    train = {"lr": sc.lr, "epochs": sc.epochs, "batch": sc.batch, "seed": sc.seed}
    g = m.init(sc.seed)
    for r in range(1, sc.rounds + 1):
        here = [i for i in ids if gone.get(i, sc.rounds + 1) > r]
        deltas = []
        for i in here:
            nd = nds[i]
            assert nd is not None
            deltas.append(nd.apply(noderound.local_update(m, shards[i], train, r, i, g), r))
        agg = aggregate.fedavg(deltas, [1] * len(here))
        g = [q16.sat(a + b) for a, b in zip(g, agg, strict=True)]
    return model.params_digest(g).hex()


def _dp(**kw: Any) -> mesh.Scenario:
    return _scenario(privacy="secagg+dp", dp_epsilon=20.0, dp_noise="seeded", **kw)


def test_secagg_dp_is_clip_noise_share_fedavg_and_reports_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "sgdp"
    s = _run(_dp(), out)
    conf = json.loads((out / "nodes" / "node-01" / "config.json").read_text())
    assert conf["privacy"] == "secagg" and "clip_l2" not in conf
    assert conf["dp"]["nodes"] == 5 and conf["dp"]["clip"] == 65536
    assert s["final_digest"] == _reference_dp(out, _dp(), {})
    # deterministic with seeded noise; the noise lands: plain secagg gives another model
    assert _run(_dp(), tmp_path / "again")["final_digest"] == s["final_digest"]
    assert _run(_scenario(), tmp_path / "plain")["final_digest"] != s["final_digest"]
    p = s["privacy"]
    assert p["mode"] == "secagg+dp" and p["nodes"] == 5 and p["noise_shares"] == [5] * ROUNDS
    assert math.isfinite(p["epsilon"]) and 0.9 * 20.0 < p["epsilon"] <= 20.0
    assert json.loads((out / "summary.json").read_text())["privacy"] == p
    assert s["rejected"] == {} and s["node_rejections"] == {}


def test_secagg_dp_dropout_is_charged_for_the_missing_noise(tmp_path: Path) -> None:
    out = tmp_path / "drop"
    s = _run(_dp(), out, drop=("node-03", 2))
    assert s["final_digest"] == _reference_dp(out, _dp(), {"node-03": 2})
    p = s["privacy"]
    assert p["noise_shares"] == [5, 4, 4]
    assert p["epsilon"] > 20.0  # two rounds with 4/5 of the noise: more than the target


def test_secagg_digest_equals_plain_fedavg(tmp_path: Path) -> None:
    s = _run(_scenario(), tmp_path / "secagg")
    plain = _run(_scenario(privacy="none"), tmp_path / "plain")
    assert s["final_digest"] == plain["final_digest"]
    assert s["accuracy"] == plain["accuracy"]
    assert s["final_digest"] == _reference(tmp_path / "secagg", _scenario(), {})
    assert s["rejected"] == {}
    assert s["node_rejections"] == {}


def test_dropout_after_sharing_is_recovered_and_equals_fedavg_over_the_survivors(
        tmp_path: Path) -> None:
    out = tmp_path / "drop"
    s = _run(_scenario(), out, drop=("node-03", 2))
    assert s["rounds"] == ROUNDS
    want = _reference(out, _scenario(), {"node-03": 2})
    assert s["final_digest"] == want
    assert s["final_digest"] != _reference(out, _scenario(), {})
    assert s["node_rejections"] == {}
    st = RoundsStore(out / "coordinator.sqlite")
    try:
        rows = st.rounds()
    finally:
        st.close()
    # Round 2: node-03 shared, then never masked (recovered); round 3: it sends no keys.
    assert [r["n_accepted"] for r in rows] == [5, 4, 4]


@pytest.mark.parametrize("kw,message", [
    ({"privacy": "secagg+dp"}, "privacy secagg+dp needs exactly one of [dp] epsilon"),
    ({"privacy": "secagg+dp", "dp_epsilon": 8.0, "rule": "median", "f": 1},
     "privacy secagg+dp works with rule fedavg only"),
    ({"privacy": "secagg+dp", "dp_epsilon": 8.0, "clip_l2": 1 << 16},
     "clips with [dp] clip_norm (--clip-norm), the one clip of both; drop clip_l2"),
    ({"privacy": "secagg+dp", "dp_epsilon": 8.0, "honest": 2}, "secagg+dp needs 3..100 nodes"),
    ({"rule": "krum", "f": 1}, "privacy secagg works with rule fedavg only"),
    ({"mode": "gossip"}, "privacy secagg needs coordinated mode"),
    ({"reputation": {"ban_below": 0}}, "cannot score reputation"),
    ({"honest": 2}, "needs 3..100 nodes"),
    ({"clip_l2": 0}, "clip_l2 must be an integer"),
])
def test_settings_that_cannot_run_on_masked_updates_are_refused(kw: dict[str, Any],
                                                                message: str) -> None:
    with pytest.raises(mesh.MeshError, match=re.escape(message)):
        _scenario(**kw).check()
