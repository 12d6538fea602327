"""What a mesh run shows its user: live progress lines, summary.json, rounds.csv, the plots
and the closing table."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed import model
from microfed_host import coordinator as coordmod
from microfed_host import privacy as privmod
from microfed_host.rounds_store import RoundsStore
from microfed_host.scenario import MeshError, Scenario


class Progress:
    def __init__(self, sc: Scenario, out: Callable[[str], None] | None = print) -> None:
        self.sc = sc
        self.out = out
        self.t0 = time.monotonic()
        self.last_round_at = self.t0
        self.flagged: set[str] = set()

    def say(self, text: str) -> None:
        if self.out is not None:
            self.out(text)

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("ev")
        if kind == "start":
            acc = ev.get("accuracy")
            self.say(f"  round  0/{self.sc.rounds}  acc {_pct(acc)}  (initial model)")
        elif kind == "round":
            now = time.monotonic()
            rej = ev.get("rejected") or {}
            rtxt = ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) or "0"
            banned = ev.get("banned") or []
            priv = ev.get("privacy")
            eps = f"  eps {priv['epsilon']:.3g}" if priv else ""
            self.say(f"  round {ev['round']:>2}/{self.sc.rounds}  acc {_pct(ev.get('accuracy'))}"
                     f"  accepted {len(ev.get('accepted', []))}  rejected {rtxt}"
                     f"  banned {', '.join(banned) if banned else '-'}{eps}"
                     f"  ({now - self.last_round_at:.1f} s)")
            self.last_round_at = now
        elif kind == "flagged":
            if ev["node"] not in self.flagged:
                self.flagged.add(ev["node"])
                self.say(f"  ! {ev['node']} flagged: its gossip digest for round {ev['round']} "
                         "differs from the coordinator's aggregate")
        elif kind == "resume":
            self.say(f"  coordinator resumed round {ev['round']} from SQLite with "
                     f"{len(ev.get('accepted', []))} accepted update(s)")
        elif kind == "waiting":
            self.say(f"  round {ev['round']}: deadline passed, waiting for "
                     f"{sorted(set(ev.get('want', [])) - set(ev.get('have', [])))}")
        elif kind == "crosscheck_mismatch":
            self.say(f"  ! round {ev['round']}: fast path and reference disagree (reference used)")
        elif kind == "fatal":
            self.say(f"  coordinator error: {ev.get('error')}")


def _privacy_cell(p: dict[str, Any] | None) -> str:
    if not p or p["mode"] == "none":
        return "none"
    if p["mode"] == "secagg":
        return "secure aggregation (the coordinator saw only the sum)"
    if p["mode"] == "secagg+dp":
        return (f"distributed DP under secure aggregation, clip {p['clip_norm']:g}, noise "
                f"multiplier {p['noise_multiplier']:g} over {p['nodes']} shares ({p['noise']}): "
                f"epsilon {p['epsilon']:.3g} at delta {p['delta']:g} after {p['rounds']} rounds")
    return (f"local DP, clip {p['clip_norm']:g}, noise multiplier {p['noise_multiplier']:g} "
            f"({p['noise']}): epsilon {p['epsilon']:.3g} at delta {p['delta']:g} after "
            f"{p['rounds']} rounds ({p['epsilon_per_round']:.3g} per round)")


def _pct(x: float | None) -> str:
    return "   -  " if x is None else f"{100 * x:5.1f}%"


# ------------------------------------------------------------------ real mesh (MQTT)


def summarize(out: Path, doc: dict[str, Any], info: dict[str, Any], duration: float,
              src: Path | None = None) -> dict[str, Any]:
    """summary.json, rounds.csv and the plots in `out`, from the run directory `src` (default:
    `out`): its coordinator store and adversary.json, `doc` (its scenario.json) and `info`
    (what only the runner knew: transport, broker, boards, exit codes, chaos, restarts)."""
    src = out if src is None else src
    store = RoundsStore(src / coordmod.STORE_NAME)
    try:
        rows = store.rounds()
        st = store.load_state()
        rej = store.rejection_counts()
        rep = store.reputation_history()
        dig = store.digests()
        sec = store.security_events()
        rejected_hashes = store.rejected_hashes()
    finally:
        store.close()
    if st is None:
        raise MeshError(f"{out}: the coordinator never started (no state in the store)")
    final_params = coordmod._unpack(st["params"])
    honest = set(doc["honest_ids"])
    byz = set(doc["byzantine_ids"])
    last_rep: dict[str, tuple[int, bool]] = {}
    for _r, n, v, b, _vd in rep:
        last_rep[n] = (v, b)
    banned = sorted(n for n, (_v, b) in last_rep.items() if b)
    acc = [r["accuracy"] for r in rows]
    boards: dict[str, str] = info.get("boards") or {}
    agreement = None
    by_board: dict[str, Any] | None = None
    if doc["mode"] == "gossip":
        by_round: dict[int, dict[str, bool]] = {}
        for r, n, _d, a in dig:
            by_round.setdefault(r, {})[n] = a
        agreed = 0
        for row in rows:
            got = by_round.get(row["round"], {})
            want = [n for n in honest if n not in banned]
            if want and all(got.get(n) is True for n in want):
                agreed += 1
        agreement = {"rounds_agreed": agreed, "rounds": len(rows),
                     "honest_mismatches": sum(1 for r, n, _d, a in dig if n in honest and not a),
                     "flagged": sorted({n for r, n, _d, a in dig if not a})}
        if boards:
            by_board = _agreement_by_board(boards, by_round, rows, banned)
    injected: dict[str, Any] | None = None
    adv_path = src / "adversary.json"
    if adv_path.exists():
        adv = json.loads(adv_path.read_text())
        ok = sum(1 for e in adv["injected"] if rejected_hashes.get(e["sha256"]) == e["expect"])
        injected = {"by_reason": adv["injected_by_reason"], "total": len(adv["injected"]),
                    "rejected_with_expected_reason": ok}
    summary = {
        "scenario": doc["name"],
        "seed": doc["seed"],
        "transport": info.get("transport"),
        "mode": doc["mode"],
        "split": doc["split"] + (f"(alpha={doc['alpha']})" if doc["split"] == "dirichlet" else ""),
        "rule": doc["rule"],
        "f": doc["f"],
        "honest": doc["honest"],
        "byzantine": doc["byzantine"],
        "attack": "+".join(sorted({g["attack"] for g in doc["attackers"]})) or "none",
        "rounds": len(rows),
        "rounds_planned": doc["rounds"],
        "accuracy": acc,
        "final_accuracy": acc[-1] if acc else None,
        "rejected": dict(sorted(rej.items())),
        "banned": banned,
        "honest_banned": [n for n in banned if n in honest],
        "byzantine_banned": [n for n in banned if n in byz],
        "crosscheck": {"checked": sum(1 for r in rows if r["crosschecked"]),
                       "mismatches": sum(1 for e in sec if e["kind"] == "crosscheck_mismatch")},
        "digest_agreement": agreement,
        "final_digest": model.params_digest(final_params).hex(),
        "injected": injected,
        "coordinator_restarts": info.get("coordinator_restarts", 0),
        "security_events": {k: sum(1 for e in sec if e["kind"] == k)
                            for k in sorted({e["kind"] for e in sec})},
        "privacy": privacy_summary(doc.get("dp_resolved"), len(rows),
                                   doc.get("privacy", "none"),
                                   [int(r["n_accepted"]) for r in rows]),
        "duration_s": round(duration, 2),
    }
    if "broker" in info:
        summary["broker"] = info["broker"]
    if "chaos" in info:
        summary["chaos"] = info["chaos"]
    if "node_exit_codes" in info:
        summary["node_exit_codes"] = info["node_exit_codes"]
    if boards:
        summary["boards"] = boards  # honest node -> board kind (nodeproc.BOARD_KINDS)
    if by_board is not None:
        summary["digest_by_board"] = by_board  # the gossip digest check per board kind
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["round", "accuracy", "accepted", "selected", "close_reason", "crosschecked",
                    "agg_digest", "model_digest", "banned_after"])
        bans_by_round: dict[int, list[str]] = {}
        for r, n, _v, b, _vd in rep:
            if b:
                bans_by_round.setdefault(r, []).append(n)
        for row in rows:
            sel = json.loads(row["selected"]) if row["selected"] else []
            w.writerow([row["round"], f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "",
                        row["n_accepted"], " ".join(sel), row["close_reason"], row["crosschecked"],
                        row["agg_digest"], row["model_digest"],
                        " ".join(bans_by_round.get(row["round"], []))])
    summary["plots"] = plot(out, doc, rows, rep)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# What summarize needs to know that only the runner knew; `microfed report` takes it from the
# summary.json the run wrote.
RUNNER_INFO = ("transport", "broker", "boards", "node_exit_codes", "chaos", "coordinator_restarts")


def report_run(path: Path, out: Path | None = None) -> dict[str, Any]:
    """`microfed report`: summary.json, rounds.csv and the plots of a run directory (or of the
    run directory holding the coordinator store `path`), regenerated from its store, into
    `out` (default: the run directory). Works while the run is going on: the store is read
    as it is (SQLite WAL)."""
    run = path.parent if path.is_file() else path
    if not (run / coordmod.STORE_NAME).is_file():
        raise MeshError(f"{path}: no coordinator store ({coordmod.STORE_NAME}): not a run "
                        "directory of `microfed mesh run`")
    try:
        doc = json.loads((run / "scenario.json").read_text())
    except OSError:
        raise MeshError(f"{run}: no scenario.json: `microfed report` reads run directories of "
                        "`microfed mesh run`") from None
    old: dict[str, Any] = {}
    if (run / "summary.json").is_file():
        old = json.loads((run / "summary.json").read_text())
    info = {k: old[k] for k in RUNNER_INFO if k in old}
    info.setdefault("transport", "unknown (run still going)")
    dest = run if out is None else out
    dest.mkdir(parents=True, exist_ok=True)
    return summarize(dest, doc, info, float(old.get("duration_s", 0.0)), src=run)


def _agreement_by_board(boards: dict[str, str], by_round: dict[int, dict[str, bool]],
                        rows: list[dict[str, Any]], banned: list[str]) -> dict[str, Any]:
    """The gossip digest check per board kind: in how many rounds every node of that kind
    reported the coordinator's aggregate, and how many of its reports differed."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(boards.values()):
        mine = [n for n, k in boards.items() if k == kind and n not in banned]
        agreed = sum(1 for row in rows
                     if mine and all(by_round.get(row["round"], {}).get(n) is True for n in mine))
        out[kind] = {"nodes": len(mine), "rounds_agreed": agreed,
                     "mismatches": sum(1 for got in by_round.values() for n in mine
                                       if got.get(n) is False)}
    return out


def _by_board_text(s: dict[str, Any]) -> str:
    per = s.get("digest_by_board") or {}
    if len(per) < 2:
        return ""
    n = s["digest_agreement"]["rounds"]
    return " (" + ", ".join(f"{k} {v['rounds_agreed']}/{n}" for k, v in per.items()) + ")"


def board_counts(boards: dict[str, str]) -> str:
    """{node: kind} -> "unix32 x8, mps2-an385 x2" (in node order)."""
    kinds = list(boards.values())
    return ", ".join(f"{k} x{kinds.count(k)}" for k in dict.fromkeys(kinds))


def privacy_summary(dp: dict[str, Any] | None, rounds: int, mode: str = "none",
                    contributors: list[int] | None = None) -> dict[str, Any]:
    """summary.json's "privacy": the mode, the nodes' parameters and the epsilon spent (at the
    stated delta) per round and over the rounds run (docs/privacy.md has the bound).
    `contributors`: the nodes summed per round (secagg+dp charges each round for them)."""
    if not dp:
        return {"mode": mode}
    acc = privmod.Accountant(dp)
    z = dp["noise_multiplier"]
    spent = acc.spent(rounds, contributors)
    out = {"mode": dp["mode"], "clip_norm": dp["clip"] / 65536, "clip_raw": dp["clip"],
           "noise_multiplier": z[0] / z[1], "sigma2_raw": dp["sigma2"], "noise": dp["noise"],
           "delta": acc.delta, "target_epsilon": dp.get("target_epsilon"),
           "rho_per_round": acc.rho, "epsilon_per_round": acc.per_round(),
           "epsilon": spent["epsilon"], "rho": spent["rho"], "rounds": rounds,
           "accountant": "dp-accounting RdpAccountant, ZCDpEvent(rho) x rounds; "
                         "rho = (2 clip)^2 / (2 sigma^2) (CKS20 Thm 14, node-level, replace-one)"}
    if dp["mode"] == "secagg+dp":
        out.update({"nodes": dp["nodes"], "noise_shares": spent["noise_shares"],
                    "accountant": "dp-accounting RdpAccountant, ZCDpEvent(sum of the rounds' "
                                  "rho); rho = eps^2 / 2 of Kairouz, Liu, Steinke 2021 Thm 1 "
                                  "for the k noise shares in each round's sum (node-level, "
                                  "replace-one, Delta = 2 clip)"})
    return out


def plot(out: Path, doc: dict[str, Any], rows: list[dict[str, Any]],
         rep: list[tuple[int, str, int, bool, str | None]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = [r["round"] for r in rows]
    ys = [100 * (r["accuracy"] or 0) for r in rows]
    ax.plot(xs, ys, marker="o", label=f"{doc['rule']} ({doc['mode']})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    attack = "+".join(sorted({g["attack"] for g in doc["attackers"]})) or "none"
    ax.set_title(f"{doc['honest']} honest + {doc['byzantine']} Byzantine ({attack}), {doc['split']}")
    ax.legend()
    fig.tight_layout()
    p = out / "accuracy.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    fig, ax = plt.subplots(figsize=(6.4, 4))
    byz = set(doc["byzantine_ids"])
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r, n, v, _b, _vd in rep:
        s = series.setdefault(n, ([], []))
        s[0].append(r)
        s[1].append(v / 65536)
    for n in sorted(series):
        s = series[n]
        ax.plot(s[0], s[1], linestyle="--" if n in byz else "-", label=n + (" (byz)" if n in byz else ""))
    ax.set_xlabel("round")
    ax.set_ylabel("reputation")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if 0 < len(series) <= 16:  # none: a run without reputation (privacy secagg)
        ax.legend(fontsize=6, ncol=2)
    ax.set_title("reputation per node (dashed: Byzantine)")
    fig.tight_layout()
    p = out / "reputation.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(str(p))
    return paths


def table(summary: dict[str, Any]) -> str:
    s = summary
    rej = ", ".join(f"{k} {v}" for k, v in s["rejected"].items()) or "none"
    da = s["digest_agreement"]
    rows = [
        ("rule", f"{s['rule']} (f={s['f']})"),
        ("nodes", f"{s['honest']} honest + {s['byzantine']} Byzantine ({s['attack']})"),
        *([("boards", board_counts(s["boards"]))] if s.get("boards") else []),
        ("mode / split", f"{s['mode']} / {s['split']}"),
        ("rounds", str(s["rounds"])),
        ("accuracy", f"{_pct(s['accuracy'][0]).strip()} after round 1 -> "
                     f"{_pct(s['final_accuracy']).strip()} final" if s["accuracy"] else "-"),
        ("rejected", rej),
        ("banned", ", ".join(s["banned"]) or "none"),
        ("honest banned", ", ".join(s["honest_banned"]) or "none"),
        ("cross-check", f"{s['crosscheck']['checked']} rounds checked, "
                        f"{s['crosscheck']['mismatches']} mismatches"),
        ("digest agreement", "n/a (coordinated)" if da is None else
         f"{da['rounds_agreed']}/{da['rounds']} rounds, flagged: {', '.join(da['flagged']) or 'none'}"
         + _by_board_text(s)),
        ("final digest", s["final_digest"]),
        ("privacy", _privacy_cell(s.get("privacy"))),
        ("time", f"{s['duration_s']:.1f} s ({s['transport']})"),
    ]
    if s.get("injected") and s["injected"]["total"]:
        inj = s["injected"]
        rows.insert(6, ("injected frames", f"{inj['total']} ({', '.join(f'{k} {v}' for k, v in inj['by_reason'].items())}), "
                        f"{inj['rejected_with_expected_reason']} rejected with the expected reason"))
    if s.get("coordinator_restarts"):
        rows.append(("coordinator restarts", str(s["coordinator_restarts"])))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


# ------------------------------------------------------------------ entry points
