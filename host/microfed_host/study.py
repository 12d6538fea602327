"""`microfed mesh study`: the robustness study a paper could cite — rule x pre-aggregation x
attack x data split x Byzantine fraction, over several seeds, through the in-process engine;
mean final accuracy with a bootstrap 95 % interval over the seeds, reputation's detection
(true- and false-positive rates, rounds to a ban), accuracy-per-round bands and a rule x
attack heat map; the tables go into docs/results.md.

Every run is an ordinary `microfed mesh run --transport inproc` scenario (its run directory
is kept), so any cell can be re-run and audited on its own. The statistics (floats) are
analysis only: nothing here is on a consensus path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from microfed_host import adversary as advmod
from microfed_host import coordinator as coordmod
from microfed_host.mesh import run
from microfed_host.rounds_store import RoundsStore
from microfed_host.scenario import MODELS, AttackGroup, MeshError, Scenario

# Data splits of the study: name -> (split, Dirichlet alpha).
SPLITS = {"iid": ("iid", 0.5), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
HONEST = 15  # honest nodes in every cell; the Byzantine count follows the fraction
BUCKET = 2  # updates per bucket when the pre step is bucketing
BOOTSTRAP = 10000
MAX_JOBS = 8


def byzantine_count(fraction: float, honest: int = HONEST) -> int:
    """Byzantine nodes b such that b / (honest + b) is nearest `fraction` (f = b)."""
    if not 0 <= fraction < 0.5:
        raise MeshError(f"a Byzantine fraction must be in [0, 0.5), got {fraction}")
    return int(round(fraction * honest / (1 - fraction)))


def bootstrap_interval(xs: list[float], seed: int = 0, level: float = 0.95,
                       n: int = BOOTSTRAP) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap interval of the mean (fixed resampling
    seed, so the tables regenerate identically from results.json)."""
    a = np.asarray(xs, dtype=np.float64)
    if len(a) == 1:
        return float(a[0]), float(a[0]), float(a[0])
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, len(a), size=(n, len(a)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(a.mean()), float(lo), float(hi)


def _cell_name(c: dict[str, Any]) -> str:
    model = "" if c.get("model", "softmax") == "softmax" else f"-{c['model']}"
    return (f"{c['split']}-{c['rule']}-{c['pre']}-{c['attack']}-fn{c['fraction']}"
            f"-s{c['seed']}{model}")


def _ban_rounds(store: Path) -> dict[str, int]:
    st = RoundsStore(store)
    try:
        return {e["node"]: int(e["round"]) for e in st.security_events() if e["kind"] == "ban"}
    finally:
        st.close()


def run_cell(c: dict[str, Any]) -> dict[str, Any]:
    """One scenario of the grid (a process-pool job): its final accuracy, accuracy per round
    and who was banned when."""
    split, alpha = SPLITS[c["split"]]
    byz = 0 if c["attack"] == "none" else byzantine_count(c["fraction"])
    f = max(byzantine_count(c["fraction"]), 1)
    sc = Scenario(name=_cell_name(c), honest=HONEST,
                  attackers=[AttackGroup(c["attack"], byz)] if byz else [],
                  # fedavg reads f only for nearest-neighbour mixing
                  rule=c["rule"], f=0 if c["rule"] == "fedavg" and c["pre"] == "none" else f,
                  pre=c["pre"], bucket=BUCKET, model=c.get("model", "softmax"),
                  rounds=c["rounds"], mode="coordinated", split=split, alpha=alpha,
                  seed=c["seed"], crosscheck="sampled:10",
                  allow_more_byzantine=c["rule"] == "fedavg")
    out = Path(c["out"])
    s = run(sc, out, transport="inproc", force=True, say=None)
    bans = _ban_rounds(out / coordmod.STORE_NAME)
    byz_ids = s.get("byzantine_ids") or sc.byzantine_ids()
    return {**{k: c[k] for k in ("split", "rule", "pre", "attack", "fraction", "seed")},
            "model": c.get("model", "softmax"),
            "byzantine": len(byz_ids), "honest": HONEST, "f": sc.f,
            "final_accuracy": s["final_accuracy"], "accuracy": s["accuracy"],
            "banned": bans, "byzantine_ids": byz_ids,
            "crosscheck_mismatches": s["crosscheck"]["mismatches"],
            "duration_s": s["duration_s"], "run_dir": str(out)}


def grid(splits: list[str], rules: list[str], pres: list[str], attacks: list[str],
         fractions: list[float], seeds: list[int], rounds: int, out: Path,
         models: tuple[str, ...] = ("softmax",)) -> list[dict[str, Any]]:
    """The cells to run; combinations that cannot run are left out: bucketing before fedavg,
    a rule whose minimum (after the pre step) the honest nodes alone do not meet (Krum or
    trimmed mean on buckets of 2 at larger f), and the attack "none" at more than one fraction
    (it has no attackers)."""
    cells = []
    for sp in splits:
        for ru in rules:
            for pre in pres:
                if pre == "bucketing" and ru == "fedavg":
                    continue
                for at in attacks:
                    for fr in (fractions[:1] if at == "none" else fractions):
                        f = max(byzantine_count(fr), 1)
                        if coordmod.rule_min_nodes(ru, f, f, pre, BUCKET) > HONEST:
                            continue
                        for model in models:
                            for seed in seeds:
                                c = {"split": sp, "rule": ru, "pre": pre, "attack": at,
                                     "fraction": fr, "seed": seed, "rounds": rounds,
                                     "model": model}
                                c["out"] = str(out / "runs" / _cell_name(c))
                                cells.append(c)
    return cells


def study(cells: list[dict[str, Any]], out: Path, jobs: int = 2,
          say: Callable[[str], None] = print,
          axes: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {ex.submit(run_cell, c): c for c in cells}
        for fut in as_completed(futs):
            r = fut.result()
            results.append(r)
            left = (time.monotonic() - t0) / len(results) * (len(cells) - len(results))
            say(f"  [{len(results):>4}/{len(cells)}] {r['split']:6} {r['rule']:12} "
                f"{r['pre']:9} {r['attack']:10} f/n {r['fraction']:<4} seed {r['seed']:<3} "
                f"final {100 * r['final_accuracy']:5.1f}%  (about {left / 60:.0f} min left)")
    results.sort(key=lambda r: (r["split"], r["model"], r["rule"], r["pre"], r["attack"],
                                r["fraction"], r["seed"]))
    doc = {"honest": HONEST, "results": results, "elapsed_s": round(time.monotonic() - t0, 1),
           "jobs": jobs, "axes": axes or {}}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    return doc


# ------------------------------------------------------------------ statistics
def _split_model(r: dict[str, Any]) -> str:
    """The table a result goes in: its split, and its model when not the softmax."""
    m = r.get("model", "softmax")
    return r["split"] if m == "softmax" else f"{r['split']}, {m}"


def _groups(results: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    g: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        g.setdefault((_split_model(r), r["rule"], r["pre"], r["attack"], r["fraction"]),
                     []).append(r)
    return g


def detection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Reputation as a detector over a cell's seeds: the fraction of Byzantine nodes banned
    (TPR), of honest nodes banned (FPR), and the mean round of the Byzantine bans."""
    tp = fp = byz = honest = 0
    when: list[int] = []
    for r in runs:
        bz = set(r["byzantine_ids"])
        byz += len(bz)
        honest += r["honest"]
        for node, rnd in r["banned"].items():
            if node in bz:
                tp += 1
                when.append(rnd)
            else:
                fp += 1
    return {"tpr": tp / byz if byz else None, "fpr": fp / honest if honest else None,
            "rounds_to_ban": float(np.mean(when)) if when else None}


def summarize(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, runs in sorted(_groups(doc["results"]).items()):
        mean, lo, hi = bootstrap_interval([r["final_accuracy"] for r in runs])
        rows.append({"split": key[0], "rule": key[1], "pre": key[2], "attack": key[3],
                     "fraction": key[4], "seeds": len(runs), "mean": mean, "low": lo,
                     "high": hi, **detection(runs)})
    return rows


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def markdown(doc: dict[str, Any], command: str) -> str:
    rows = summarize(doc)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    order = doc.get("axes", {}).get("attacks", [])
    seeds = sorted({r["seed"] for r in doc["results"]})
    out = [f"_Generated by `{command}` ({doc['elapsed_s'] / 60:.0f} min with {doc['jobs']} "
           f"jobs on 2 cores); {len(doc['results'])} runs, seeds {', '.join(map(str, seeds))}; "
           "raw numbers in its results.json; plots next to it._", "",
           f"{HONEST} honest nodes and b Byzantine ones, b / n nearest the fraction, f = b "
           "(fedavg: f = 0), coordinated mode, in-process engine. Cells: mean final test "
           "accuracy (%) over the seeds [bootstrap 95 % interval of the mean]. Detection: "
           "TPR / FPR (%) of reputation's bans over all seeds, and the mean round of a "
           "Byzantine node's ban.", ""]
    for sp in splits:
        mine = [r for r in rows if r["split"] == sp]
        attacks = sorted(dict.fromkeys(r["attack"] for r in mine),
                         key=lambda a: order.index(a) if a in order else len(order))
        fracs = sorted({r["fraction"] for r in mine if r["attack"] != "none"})
        cols = [(a, fr) for a in attacks for fr in (fracs if a != "none" else
                                                    sorted({r["fraction"] for r in mine
                                                            if r["attack"] == "none"}))]
        out += [f"#### {sp}", "",
                "| rule | pre | " + " | ".join(a if a == "none" or len(fracs) == 1 else
                                              f"{a} {fr}" for a, fr in cols) + " |",
                "| --- | --- |" + " ---: |" * len(cols)]
        for ru, pre in dict.fromkeys((r["rule"], r["pre"]) for r in mine):
            cells = []
            for a, fr in cols:
                hit = [r for r in mine if (r["rule"], r["pre"], r["attack"], r["fraction"])
                       == (ru, pre, a, fr)]
                if not hit:
                    cells.append("–")
                    continue
                h = hit[0]
                cell = f"{100 * h['mean']:.1f} [{100 * h['low']:.1f}, {100 * h['high']:.1f}]"
                if a != "none":
                    cell += (f"<br>{_pct(h['tpr'])} / {_pct(h['fpr'])}"
                             + (f", r{h['rounds_to_ban']:.1f}" if h["rounds_to_ban"] else ""))
                cells.append(cell)
            out.append(f"| {ru} | {pre} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plots(doc: dict[str, Any], out: Path) -> list[str]:
    """Accuracy per round with bootstrap bands (one panel per split x attack, a line per rule
    and pre step), and a rule x attack heat map per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = _groups(doc["results"])
    splits = list(dict.fromkeys(k[0] for k in groups))
    order = doc.get("axes", {}).get("attacks", [])
    attacks = sorted(dict.fromkeys(k[3] for k in groups),
                     key=lambda a: order.index(a) if a in order else len(order))
    fr = max(k[4] for k in groups)
    fig, axes = plt.subplots(len(splits), len(attacks), figsize=(3.2 * len(attacks),
                                                                  2.6 * len(splits)),
                             squeeze=False, sharey=True)
    for i, sp in enumerate(splits):
        for j, at in enumerate(attacks):
            ax = axes[i][j]
            for key, runs in groups.items():
                if key[0] != sp or key[3] != at or (at != "none" and key[4] != fr):
                    continue
                acc = np.asarray([r["accuracy"] for r in runs], dtype=np.float64)
                lo, hi = [], []
                for t in range(acc.shape[1]):
                    _m, a, b = bootstrap_interval(list(acc[:, t]))
                    lo.append(a)
                    hi.append(b)
                xs = np.arange(1, acc.shape[1] + 1)
                (line,) = ax.plot(xs, acc.mean(axis=0), lw=1.2,
                                  label=key[1] + ("" if key[2] == "none" else "+" + key[2]))
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
            ax.set_title(f"{sp}, {at}" + ("" if at == "none" else f" (f/n {fr})"), fontsize=8)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    p = out / "accuracy_bands.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(str(p))
    rows = summarize(doc)
    for sp in splits:
        mine = [r for r in rows if r["split"] == sp and (r["attack"] == "none"
                                                          or r["fraction"] == fr)]
        combos = list(dict.fromkeys((r["rule"], r["pre"]) for r in mine))
        grid_ = np.full((len(combos), len(attacks)), np.nan)
        for r in mine:
            grid_[combos.index((r["rule"], r["pre"])), attacks.index(r["attack"])] = r["mean"]
        fig, ax = plt.subplots(figsize=(1.1 * len(attacks) + 2, 0.4 * len(combos) + 1.2))
        im = ax.imshow(grid_, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(attacks)), attacks, rotation=30, fontsize=7)
        ax.set_yticks(range(len(combos)),
                      [ru + ("" if pre == "none" else "+" + pre) for ru, pre in combos], fontsize=7)
        for (a, b), v in np.ndenumerate(grid_):
            if not np.isnan(v):
                ax.text(b, a, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if v < 0.6 else "black")
        ax.set_title(f"mean final accuracy, {sp}, f/n {fr}", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out / f"heatmap_{sp.replace(', ', '-')}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(str(p))
    return written


# ------------------------------------------------------------------ the command
def _names(text: str, what: str) -> list[str]:
    xs = [x.strip() for x in text.split(",") if x.strip()]
    if not xs:
        raise MeshError(f"--{what} needs at least one name")
    return xs


def main_study(a: Any) -> None:
    from microfed_host.sweep import write_block

    splits = _names(a.splits, "splits")
    rules = _names(a.rules, "rules")
    pres = _names(a.pres, "pres")
    models = _names(a.models, "models")
    for m in models:
        if m not in MODELS:
            raise MeshError(f"unknown model {m!r} (one of {', '.join(MODELS)})")
    try:
        attacks = [advmod.canonical_attack(x) for x in _names(a.attacks, "attacks")]
        fractions = [float(x) for x in _names(a.fractions, "fractions")]
        seeds = [int(x) for x in _names(a.seeds, "seeds")]
    except advmod.AdversaryError as e:
        raise MeshError(str(e)) from None
    except ValueError as e:
        raise MeshError(f"--fractions and --seeds take numbers: {e}") from None
    for s in splits:
        if s not in SPLITS:
            raise MeshError(f"unknown split {s!r} (one of {', '.join(SPLITS)})")
    for r in rules:
        if r not in coordmod.RULES:
            raise MeshError(f"unknown rule {r!r}")
    for p in pres:
        if p not in coordmod.PRES:
            raise MeshError(f"unknown pre step {p!r} (one of {', '.join(coordmod.PRES)})")
    for fr in fractions:
        byzantine_count(fr)
    if not 1 <= a.rounds <= 10000:
        raise MeshError(f"--rounds must be in 1..10000, got {a.rounds}")
    if not 1 <= a.jobs <= MAX_JOBS:
        raise MeshError(f"--jobs must be in 1..{MAX_JOBS}, got {a.jobs}")
    out = Path(a.out)
    cells = grid(splits, rules, pres, attacks, fractions, seeds, a.rounds, out, tuple(models))
    command = (f"microfed mesh study --splits {a.splits} --rules {a.rules} --pres {a.pres} "
               f"--attacks {a.attacks} --fractions {a.fractions} --seeds {a.seeds} "
               f"--rounds {a.rounds}" + ("" if models == ["softmax"] else f" --models {a.models}")
               + ("" if a.tag == "study" else f" --tag {a.tag}"))
    if a.render_only:
        try:
            doc = json.loads((out / "results.json").read_text())
        except (OSError, ValueError) as e:
            raise MeshError(f"--render-only needs {out / 'results.json'}: {e}") from None
    else:
        print(f"microfed mesh study: {len(cells)} runs ({len(splits)} splits x {len(rules)} "
              f"rules x {len(pres)} pre steps x {len(attacks)} attacks x {len(fractions)} "
              f"fractions x {len(models)} models x {len(seeds)} seeds, less what cannot run), "
              f"{a.rounds} rounds each, "
              f"{a.jobs} jobs", flush=True)
        doc = study(cells, out, a.jobs, axes={"splits": splits, "rules": rules, "pres": pres,
                                              "attacks": attacks, "fractions": fractions,
                                              "seeds": seeds, "models": models})
    pics = plots(doc, out)
    block = markdown(doc, command)
    if a.md:
        write_block(Path(a.md), a.tag, f"<!-- {a.tag}:begin -->\n" + block
                    + f"\n<!-- {a.tag}:end -->")
    print("\n" + block)
    for p in pics:
        print(f"  plot: {p}")
