"""Pre-aggregation defences in the coordinator (scenario `pre`), and `microfed mesh study`
(microfed_host.study): the round's aggregate with nearest-neighbour mixing or bucketing equals
the reference recomputed from the stored frames, what cannot run is refused, and the study's
statistics (bootstrap intervals, detection rates) are what their definitions say."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from microfed import audit, wire
from microfed_host import coordinator as coordmod
from microfed_host import mesh, study
from microfed_host.scenario import AttackGroup, MeshError, Scenario


def _recompute(run: Path) -> list[tuple[str, str]]:
    """(stored aggregate digest, the reference's digest over the stored accepted frames) of
    every round."""
    db = sqlite3.connect(run / "coordinator.sqlite")
    out = []
    try:
        for r, params, digest, rule in db.execute(
                "SELECT round, params, agg_digest, rule FROM rounds ORDER BY round"):
            frames = [bytes(f) for (f,) in db.execute(
                "SELECT frame FROM updates WHERE round = ? AND verdict = 'accepted'", (r,))]
            ups = sorted((wire.decode(f) for f in frames), key=lambda u: u.sender.encode())
            ids = [u.sender for u in ups]
            vecs = [list(u.body["values"]) for u in ups]
            p = json.loads(params)
            if rule == "fedavg":  # the store keeps the weights in the frames only
                p["weights"] = [u.body["samples"] for u in ups]
            res = audit.run(rule, ids, vecs, p)
            out.append((digest, res["digest"]))
    finally:
        db.close()
    return out


@pytest.mark.parametrize("rule,pre", [("krum", "nnm"), ("median", "bucketing"),
                                      ("multi_krum", "bucketing"), ("fedavg", "nnm")])
def test_the_coordinators_pre_step_equals_the_reference(tmp_path: Path, rule: str,
                                                        pre: str) -> None:
    sc = Scenario(name="pre", honest=14, attackers=[AttackGroup("alie", 2)], rule=rule, f=2,
                  pre=pre, bucket=2, rounds=3, mode="coordinated", split="dirichlet",
                  crosscheck="always", allow_more_byzantine=rule == "fedavg")
    s = mesh.run(sc, tmp_path, transport="inproc", say=None)
    assert s["crosscheck"] == {"checked": 3, "mismatches": 0}
    pairs = _recompute(tmp_path)
    assert len(pairs) == 3
    for stored, again in pairs:
        assert stored == again
    params = json.loads(sqlite3.connect(tmp_path / "coordinator.sqlite").execute(
        "SELECT params FROM rounds WHERE round = 2").fetchone()[0])
    assert params["pre"] == pre
    if pre == "bucketing":
        assert (params["bucket"], params["seed"]) == (2, 2)  # the round number seeds it


def test_nnm_changes_krums_result_under_non_iid_data(tmp_path: Path) -> None:
    # Not a no-op: the same run with and without mixing ends on different models.
    digests = []
    for pre in ("none", "nnm"):
        sc = Scenario(name=pre, honest=13, rule="krum", f=3, pre=pre, rounds=2,
                      mode="coordinated", split="dirichlet", crosscheck="off")
        digests.append(mesh.run(sc, tmp_path / pre, transport="inproc", say=None)["final_digest"])
    assert digests[0] != digests[1]


def test_what_cannot_run_is_refused() -> None:
    for kw, msg in (({"rule": "fedavg", "pre": "bucketing", "f": 0}, "bucketing before fedavg"),
                    ({"pre": "nnm", "mode": "gossip"}, "coordinated mode only"),
                    ({"pre": "sorting"}, "pre must be one of"),
                    ({"pre": "bucketing", "bucket": 0}, "bucket must be in 1..255"),
                    # Krum f=3 on buckets of 2 needs 9 buckets: 17 updates.
                    ({"pre": "bucketing", "bucket": 2, "honest": 13}, "needs at least 17")):
        sc = Scenario(**{"name": "x", "honest": 13, "rule": "krum", "f": 3, "mode": "coordinated",
                         **kw})
        with pytest.raises(MeshError, match=msg):
            sc.check()
    assert coordmod.rule_min_nodes("krum", 3, 3, "nnm") == 9
    assert coordmod.rule_min_nodes("median", 4, 4, "nnm") == 9
    assert coordmod.rule_min_nodes("trimmed_mean", 2, 2, "bucketing", 3) == 13


def test_bootstrap_interval() -> None:
    mean, lo, hi = study.bootstrap_interval([0.8, 0.9, 0.85, 0.95, 0.7])
    assert mean == pytest.approx(0.84)
    assert 0.7 <= lo < mean < hi <= 0.95
    # The same inputs give the same interval (fixed resampling seed), a wider spread a wider one.
    assert study.bootstrap_interval([0.8, 0.9, 0.85, 0.95, 0.7]) == (mean, lo, hi)
    _m, lo2, hi2 = study.bootstrap_interval([0.6, 1.0, 0.85, 0.95, 0.8])
    assert hi2 - lo2 > hi - lo
    assert study.bootstrap_interval([0.5]) == (0.5, 0.5, 0.5)
    # Against the definition on a small case: the 27 equally likely resamples of 3 values.
    xs = [0.0, 0.6, 1.2]
    means = sorted(np.mean([xs[i], xs[j], xs[k]]) for i in range(3) for j in range(3)
                   for k in range(3))
    _m, lo, hi = study.bootstrap_interval(xs, n=200000)
    assert lo == pytest.approx(np.quantile(means, 0.025, method="inverted_cdf"), abs=1e-9)
    assert hi == pytest.approx(np.quantile(means, 0.975, method="inverted_cdf"), abs=1e-9)


def test_byzantine_counts_and_detection() -> None:
    assert [study.byzantine_count(f) for f in (0.1, 0.2, 0.3)] == [2, 4, 6]
    with pytest.raises(MeshError):
        study.byzantine_count(0.5)
    runs = [{"byzantine_ids": ["b1", "b2"], "honest": 10, "banned": {"b1": 3, "h1": 5}},
            {"byzantine_ids": ["b1", "b2"], "honest": 10, "banned": {"b1": 5, "b2": 7}}]
    d = study.detection(runs)
    assert d == {"tpr": 3 / 4, "fpr": 1 / 20, "rounds_to_ban": 5.0}
    assert study.detection([{"byzantine_ids": [], "honest": 5, "banned": {}}]) == \
        {"tpr": None, "fpr": 0.0, "rounds_to_ban": None}


def test_grid_leaves_out_what_cannot_run(tmp_path: Path) -> None:
    cells = study.grid(["iid"], ["fedavg", "krum"], ["none", "bucketing"], ["none", "alie"],
                       [0.1, 0.2], [1, 2], 5, tmp_path)
    keys = {(c["rule"], c["pre"], c["attack"], c["fraction"]) for c in cells}
    assert ("fedavg", "bucketing", "alie", 0.1) not in keys
    assert ("krum", "none", "none", 0.2) not in keys  # no attackers: one fraction is enough
    assert ("krum", "bucketing", "alie", 0.2) not in keys  # 2f+3 = 11 buckets: 21 updates
    # seeds x (3 combos x (none + 2 fractions) - krum+bucketing's alie at 0.2)
    assert len(cells) == 2 * (3 * (1 + 2) - 1)
    assert len({c["out"] for c in cells}) == len(cells)
    # Krum on buckets of 2 needs 2f+3 buckets: at f/n 0.1 (f = 2) 13 updates, at 0.3 (f = 6)
    # 29, more than the 15 honest nodes.
    bk = study.grid(["iid"], ["krum"], ["bucketing"], ["alie"], [0.1, 0.3], [1], 5, tmp_path)
    assert [c["fraction"] for c in bk] == [0.1]
    both = study.grid(["iid"], ["krum"], ["none"], ["none"], [0.2], [1], 5, tmp_path,
                      ("softmax", "mlp"))
    assert [c["model"] for c in both] == ["softmax", "mlp"]
    assert len({c["out"] for c in both}) == 2


def test_the_study_command_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "study"
    md = tmp_path / "results.md"
    md.write_text("# Results\n")
    r = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "mesh", "study",
                        "--splits", "dir0.5", "--rules", "krum", "--pres", "none,nnm",
                        "--attacks", "none,alie", "--fractions", "0.2", "--seeds", "1,2",
                        "--rounds", "2", "--out", str(out), "--md", str(md)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["results"]) == 8
    assert all(x["crosscheck_mismatches"] == 0 for x in doc["results"])
    alie = [x for x in doc["results"] if x["attack"] == "alie"]
    assert all(x["byzantine"] == 4 and len(x["byzantine_ids"]) == 4 for x in alie)
    text = md.read_text()
    assert "<!-- study:begin -->" in text and "| krum | nnm |" in text
    for p in ("accuracy_bands.png", "heatmap_dir0.5.png"):
        assert (out / p).stat().st_size > 1000
    # Rendering again from results.json gives the same table.
    r2 = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "mesh", "study",
                         "--splits", "dir0.5", "--rules", "krum", "--pres", "none,nnm",
                         "--attacks", "none,alie", "--fractions", "0.2", "--seeds", "1,2",
                         "--rounds", "2", "--out", str(out), "--md", str(md), "--render-only"],
                        capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and md.read_text() == text


def test_the_mlp_in_a_real_mesh_equals_the_inproc_engine(tmp_path: Path, micropython: str) -> None:
    # MicroPython nodes over MQTT train the 2410-parameter MLP; the in-process engine, running
    # the same portable code, reaches the same final model, bit for bit.
    digests = []
    for transport in ("mqtt", "inproc"):
        sc = Scenario(name="mlp", honest=6, attackers=[AttackGroup("sign-flip", 1)], rule="krum",
                      f=1, model="mlp", rounds=3, mode="coordinated", crosscheck="always")
        s = mesh.run(sc, tmp_path / transport, transport=transport, say=None)
        assert s["crosscheck"]["mismatches"] == 0
        assert s["final_accuracy"] > 0.5
        digests.append(s["final_digest"])
    assert digests[0] == digests[1]
    with pytest.raises(MeshError, match="coordinated mode"):
        Scenario(name="x", model="mlp", mode="gossip").check()
    with pytest.raises(MeshError, match="model must be one of"):
        Scenario(name="x", model="cnn").check()
