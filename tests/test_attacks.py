"""The optimised attacks (microfed_host.attacks): each does what its paper defines — min-max
and min-sum push as far as the honest updates' own spread allows and no further, the attack on
Krum gets one of its copies selected by microfed's exact Krum, mimic copies an honest update,
the adaptive attack is rewarded by microfed's own reputation rule and would not be 10 %
further out — and the adversary sends them in a real run of the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_microfed

from microfed import aggregate
from microfed_host import adversary, attacks


def honest_updates(n: int = 10, d: int = 50, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.rint(rng.normal(2000, 3000, (n, d)) + rng.normal(0, 500, (1, d)))


def _dist(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((x - y) ** 2).sum()))


def test_min_max_goes_as_far_as_the_honest_spread_and_no_further() -> None:
    h = honest_updates()
    m = attacks.min_max(h)
    bound = max(_dist(a, b) for a in h for b in h)
    assert max(_dist(m, a) for a in h) <= bound
    mu = h.mean(axis=0)
    gamma = _dist(m, mu)
    assert gamma > 0
    p = (m - mu) / gamma  # the inverse unit mean
    assert np.allclose(p, -mu / np.linalg.norm(mu))
    further = mu + gamma * 1.001 * p
    assert max(_dist(further, a) for a in h) > bound


def test_min_sum_goes_as_far_as_the_honest_spread_and_no_further() -> None:
    h = honest_updates()
    m = attacks.min_sum(h)
    bound = max(sum(_dist(a, b) ** 2 for b in h) for a in h)
    assert sum(_dist(m, a) ** 2 for a in h) <= bound
    mu = h.mean(axis=0)
    gamma = _dist(m, mu)
    further = mu + 1.001 * (m - mu)
    assert gamma > 0 and sum(_dist(further, a) ** 2 for a in h) > bound


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_fang_gets_a_copy_selected_by_exact_krum(seed: int) -> None:
    h = honest_updates(n=10, seed=seed)
    f = c = 3
    w = np.rint(attacks.fang_krum(h, f, c)).astype(np.int64)
    assert np.any(w != 0)
    ids = [f"byz-{i}" for i in range(c)] + [f"node-{i:02d}" for i in range(len(h))]
    vecs = [[int(v) for v in w]] * c + [[int(v) for v in row] for row in h]
    chosen = aggregate.krum(ids, vecs, f)
    assert chosen[1][0].startswith("byz-")  # the exact rule picks the poison
    # ... and it points against where the honest nodes move the model.
    assert float(np.dot(w, h.mean(axis=0))) < 0


def test_mimic_copies_the_most_outlying_honest_update() -> None:
    h = honest_updates()
    m = attacks.mimic(h)
    far = max(range(len(h)), key=lambda i: _dist(h[i], h.mean(axis=0)))
    assert np.array_equal(m, h[far])


def test_names_and_a_run_under_each(tmp_path: Path) -> None:
    for alias, name in (("minmax", "min-max"), ("min_sum", "min-sum"), ("fang", "fang-krum"),
                        ("mimic", "mimic"), ("adaptive-reputation", "adaptive")):
        assert adversary.canonical_attack(alias) == name
    for name in ("min-max", "fang-krum"):
        out = tmp_path / name
        r = run_microfed("mesh", "run", "--transport", "inproc", "--attack", name, "--rounds",
                         "3", "--out", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        s = json.loads((out / "summary.json").read_text())
        assert s["attack"] == name and s["rounds"] == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_adaptive_stays_just_inside_the_reward_band(seed: int) -> None:
    from microfed.reputation import ReputationBook

    h = honest_updates(n=10, seed=seed)
    c = 3
    x = np.rint(attacks.adaptive_reputation(h, c)).astype(np.int64)

    def verdicts(v: np.ndarray) -> set[str]:
        ids = [f"byz-{i}" for i in range(c)] + [f"node-{i:02d}" for i in range(len(h))]
        vecs = [[int(t) for t in v]] * c + [[int(t) for t in row] for row in h]
        got = ReputationBook().observe(ids, vecs)  # the coordinator's own rule, exact
        return {got[i] for i in ids[:c]}

    assert verdicts(x) == {"reward"}  # the real rule rewards it ...
    base = np.median(h, axis=0)
    further = np.rint(base + 1.1 * (x - base)).astype(np.int64)
    assert verdicts(further) != {"reward"}  # ... and 10 % further it would not
    assert float(np.dot(x - base, h.mean(axis=0))) < 0  # it pulls against the honest nodes
