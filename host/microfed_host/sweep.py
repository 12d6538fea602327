"""`microfed mesh sweep`: rules x attacks x splits through the in-process engine, the float64
twin for comparison, and the results table in docs/results.md."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from microfed import model
from microfed_host import adversary as advmod
from microfed_host import coordinator as coordmod
from microfed_host import data
from microfed_host.mesh import run
from microfed_host.scenario import SPLITS, AttackGroup, MeshError, Scenario

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
    from microfed_host.provision import node_ids

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


MAX_JOBS = 64


def main_sweep(a: Any) -> None:
    rules = [x.strip() for x in a.rules.split(",") if x.strip()]
    try:
        attacks = [advmod.canonical_attack(x) for x in a.attacks.split(",") if x.strip()]
    except advmod.AdversaryError as e:
        raise MeshError(str(e)) from None
    splits = [x.strip() for x in a.splits.split(",") if x.strip()]
    if not rules or not attacks or not splits:
        raise MeshError("--rules, --attacks and --splits each need at least one name")
    if not 1 <= a.rounds <= 10000:
        raise MeshError(f"--rounds must be in 1..10000, got {a.rounds}")
    if not 0 <= a.seed <= 0xFFFFFFFF:
        raise MeshError(f"--seed must be in 0..2^32-1, got {a.seed}")
    if not 1 <= a.jobs <= MAX_JOBS:
        raise MeshError(f"--jobs must be in 1..{MAX_JOBS}, got {a.jobs}")
    for flag, path, want_dir in (("--out", Path(a.out), True), ("--md", Path(a.md), False)):
        if path.exists() and path.is_dir() != want_dir:
            raise MeshError(f"{flag} {path} exists and is "
                            f"{'not a directory' if want_dir else 'a directory'}")
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
    write_block(md, tag, block)
    print(f"\n{checks}\n\n{tables}\n\nwrote {md} and {Path(a.out) / 'results.json'}")


def write_block(md: Path, tag: str, block: str) -> None:
    """Put `block` (which starts and ends with the tag's markers) between the
    `<!-- TAG:begin -->` and `<!-- TAG:end -->` markers of `md`, or append it."""
    text = md.read_text() if md.exists() else ""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text else "# Results\n\n") + block + "\n"
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)


# ------------------------------------------------------------------ accuracy vs epsilon

DP_TAG = "dp-sweep"


def _dp_one(job: tuple[str, float, int, int, str]) -> dict[str, Any]:
    rule, eps, seed, rounds, out = job
    # Honest nodes only: the accuracy cost of local DP alone. Seeded noise so that the table
    # repeats (same distribution as os.urandom's; no privacy against whoever knows the seed).
    sc = Scenario(name=f"dp-{rule}-{eps:g}-{seed}", honest=10, rule=rule,
                  f=3 if rule == "krum" else 0, rounds=rounds, mode="coordinated", split="iid",
                  seed=seed, crosscheck="off", privacy="dp" if eps > 0 else "none",
                  dp_epsilon=eps, dp_noise="seeded")
    s = run(sc, Path(out), transport="inproc", force=True, say=None)
    p = s["privacy"]
    return {"rule": rule, "epsilon_target": eps, "seed": seed,
            "final_accuracy": s["final_accuracy"], "accuracy": s["accuracy"],
            "epsilon": p.get("epsilon"), "noise_multiplier": p.get("noise_multiplier"),
            "honest_banned": s["honest_banned"], "final_digest": s["final_digest"],
            "duration_s": s["duration_s"], "run_dir": out}


def dp_sweep(rules: list[str], epsilons: list[float], seeds: list[int], rounds: int, out: Path,
             jobs: int = 2, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Final accuracy per (rule, epsilon, seed); epsilon 0 = no DP (the baseline)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out.mkdir(parents=True, exist_ok=True)
    todo = [(ru, e, sd, rounds, str(out / f"{ru}-eps{e:g}-seed{sd}"))
            for ru in rules for e in epsilons for sd in seeds]
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        for fut in as_completed([ex.submit(_dp_one, j) for j in todo]):
            r = fut.result()
            results.append(r)
            say(f"  [{len(results):>3}/{len(todo)}] {r['rule']:8} epsilon "
                f"{r['epsilon_target'] or 'none':>6} seed {r['seed']}  final "
                f"{100 * r['final_accuracy']:5.1f}%  ({r['duration_s']:.0f} s)")
    doc = {"rounds": rounds, "honest": 10, "delta": 1e-5, "clip_norm": 1.0,
           "results": sorted(results, key=lambda x: (x["rule"], x["epsilon_target"], x["seed"])),
           "elapsed_s": round(time.monotonic() - t0, 1)}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def mean_interval(xs: list[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval at `level`) of the values."""
    from scipy.stats import t as student

    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = (sum((x - mean) ** 2 for x in xs) / (n - 1)) ** 0.5
    return mean, float(student.ppf(0.5 + level / 2, n - 1)) * sd / n ** 0.5


def dp_markdown(doc: dict[str, Any]) -> str:
    rules = sorted({r["rule"] for r in doc["results"]})
    epsilons = sorted({r["epsilon_target"] for r in doc["results"]}, key=lambda e: e or 1e300)
    lines = ["| rule | " + " | ".join(f"epsilon {e:g}" if e else "no DP" for e in epsilons)
             + " |", "| --- |" + " ---: |" * len(epsilons)]
    for ru in rules:
        cells = []
        for e in epsilons:
            rs = [r for r in doc["results"] if r["rule"] == ru and r["epsilon_target"] == e]
            accs = [100 * r["final_accuracy"] for r in rs]
            m, h = mean_interval(accs)
            cells.append(f"{m:.1f} ± {h:.1f} [{min(accs):.1f}, {max(accs):.1f}]")
        lines.append(f"| {ru} | " + " | ".join(cells) + " |")
    zs = []
    for e in epsilons:
        if e:
            r = next(r for r in doc["results"] if r["epsilon_target"] == e)
            zs.append(f"epsilon {e:g}: z = {r['noise_multiplier']:g} "
                      f"(spent {r['epsilon']:.2f})")
    banned = sorted({n for r in doc["results"] for n in r["honest_banned"]})
    return ("\n".join(lines) + "\n\nNoise multipliers (sigma = z x clip): " + "; ".join(zs)
            + f".\nHonest nodes banned by reputation in any run: {', '.join(banned) or 'none'}.")


def main_dp_sweep(a: Any) -> None:
    rules = [x.strip() for x in a.rules.split(",") if x.strip()]
    try:
        epsilons = [float(x) for x in a.epsilons.split(",") if x.strip()]
        seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    except ValueError as e:
        raise MeshError(f"--epsilons takes numbers and --seeds integers: {e}") from None
    if not rules or not epsilons or not seeds:
        raise MeshError("--rules, --epsilons and --seeds each need at least one value")
    for r in rules:
        if r not in ("fedavg", "krum"):
            raise MeshError(f"the privacy sweep runs fedavg or krum, not {r!r}")
    if any(not 0 <= e <= 1e6 for e in epsilons) or any(not 0 <= s <= 0xFFFFFFFF for s in seeds):
        raise MeshError("epsilons must be in [0, 1e6] (0: no DP) and seeds in 0..2^32-1")
    if not 1 <= a.rounds <= 10000 or not 1 <= a.jobs <= MAX_JOBS:
        raise MeshError(f"--rounds must be in 1..10000 and --jobs in 1..{MAX_JOBS}")
    print(f"microfed mesh dp-sweep: {len(rules)} rules x {len(epsilons)} epsilons x "
          f"{len(seeds)} seeds, {a.rounds} rounds, in-process engine, {a.jobs} jobs")
    raw = Path(a.json)
    if a.render_only:
        try:
            doc = json.loads(raw.read_text())
        except (OSError, ValueError) as e:
            raise MeshError(f"--render-only needs {raw}: {e}") from None
    else:
        doc = dp_sweep(rules, epsilons, seeds, a.rounds, Path(a.out), a.jobs)
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(doc, indent=2) + "\n")
    table = dp_markdown(doc)
    cmd = (f"microfed mesh dp-sweep --rules {','.join(rules)} --epsilons {a.epsilons} "
           f"--seeds {a.seeds} --rounds {a.rounds}")
    block = (f"<!-- {DP_TAG}:begin -->\n_Generated by `{cmd}` ({doc['elapsed_s']:.0f} s with "
             f"{a.jobs} jobs); raw numbers in `{raw}`._\n\n"
             f"Final test accuracy (%) after {doc['rounds']} rounds, 10 honest nodes, no "
             f"attackers, IID, local DP at delta = 1e-5 over the whole run, clip norm 1.0: "
             f"mean ± half-width of the 95 % Student-t interval over {len(seeds)} seeds "
             f"[min, max].\n\n{table}\n<!-- {DP_TAG}:end -->")
    write_block(Path(a.md), DP_TAG, block)
    print(f"\n{table}\n\nwrote {a.md} and {raw}")
