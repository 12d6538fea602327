"""What the dashboard shows, read from a coordinator store (SQLite, read-only, one connection
per snapshot): the mesh, its nodes, its rounds, security events and rejected frames, privacy
spent. One JSON-ready dict; the dashboard sends it whole whenever it changes.

    snap = snapshot(run_dir / "coordinator.sqlite")

Bounded for runs of weeks: the last ROUNDS_SHOWN rounds, EVENTS_SHOWN security events and
rejected frames, VERDICTS_SHOWN verdicts per node (the store itself keeps them all, except
rejected frames, whose log the coordinator bounds).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

ROUNDS_SHOWN = 500
EVENTS_SHOWN = 100
VERDICTS_SHOWN = 30
Q16 = 65536


def _rows(db: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    try:
        cur = db.execute(sql, args)
    except sqlite3.OperationalError:  # a table the coordinator has not created yet
        return []
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _run_files(store: Path) -> tuple[dict[str, str], list[str]]:
    """Board kind per node and the simulated attackers, when the store belongs to a
    `microfed mesh run` directory (its scenario.json); else nothing."""
    try:
        doc = json.loads((store.parent / "scenario.json").read_text())
    except (OSError, ValueError):
        return {}, []
    boards = doc.get("node_boards") if isinstance(doc, dict) else None
    byz = doc.get("byzantine_ids") if isinstance(doc, dict) else None
    return (boards if isinstance(boards, dict) else {},
            [b for b in byz if isinstance(b, str)] if isinstance(byz, list) else [])


def snapshot(store: Path) -> dict[str, Any]:
    """The dashboard's whole state. Before the coordinator has written its store:
    {"store_up": False, ...} with empty lists."""
    store = Path(store)
    out: dict[str, Any] = {"store_up": False, "store": str(store), "read_at": time.time(),
                           "run": {}, "rounds": [], "nodes": [], "security": [],
                           "rejected": {"by_reason": {}, "recent": []}, "privacy": None}
    if not store.is_file():
        return out
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        out["store_up"] = True
        cfg = _config(db)
        out["run"] = _run(db, cfg)
        out["rounds"] = _rounds(db)
        boards, byzantine = _run_files(store)
        out["nodes"] = _nodes(db, cfg, boards, byzantine)
        out["security"] = _rows(db, "SELECT id, at, round, kind, node, detail FROM security "
                                    "ORDER BY id DESC LIMIT ?", (EVENTS_SHOWN,))
        out["rejected"] = {
            "by_reason": {r["reason"]: r["count"] for r in _rows(
                db, "SELECT reason, count FROM reject_counts ORDER BY reason")},
            "recent": _rows(db, "SELECT id, at, reason, message, size, frame_sha256, sender, "
                                "round FROM events ORDER BY id DESC LIMIT ?", (EVENTS_SHOWN,))}
        out["privacy"] = _privacy(cfg, [int(r["n"]) for r in _rows(
            db, "SELECT n_accepted AS n FROM rounds ORDER BY round")])
    finally:
        db.close()
    return out


def _config(db: sqlite3.Connection) -> dict[str, Any]:
    rows = _rows(db, "SELECT value FROM run WHERE key = 'config'")
    try:
        cfg = json.loads(rows[0]["value"]) if rows else {}
    except ValueError:
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def _run(db: sqlite3.Connection, cfg: dict[str, Any]) -> dict[str, Any]:
    st = _rows(db, "SELECT round, done, updated FROM state WHERE id = 1")
    try:
        mesh = json.loads((Path(str(cfg.get("mesh_dir", ""))) / "mesh.json").read_text())["mesh"]
    except (OSError, ValueError, KeyError, TypeError):
        mesh = None
    return {"mesh_dir": cfg.get("mesh_dir"), "mesh": mesh, "rule": cfg.get("rule"),
            "f": cfg.get("f"), "mode": cfg.get("mode"), "rounds": cfg.get("rounds"),
            "crosscheck": cfg.get("crosscheck"), "privacy": cfg.get("privacy", "none"),
            "round": st[0]["round"] if st else 0, "done": bool(st[0]["done"]) if st else False,
            "updated": st[0]["updated"] if st else None}


def _rounds(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = _rows(db, "SELECT round, closed, n_accepted, rule, selected, agg_digest, "
                     "model_digest, accuracy, crosschecked, close_reason FROM rounds "
                     "ORDER BY round DESC LIMIT ?", (ROUNDS_SHOWN,))
    rows.reverse()
    if not rows:
        return rows
    first = rows[0]["round"]
    rejected: dict[int, dict[str, int]] = {}
    for r in _rows(db, "SELECT round, reason, sum(count) AS n FROM rejections WHERE round >= ? "
                       "GROUP BY round, reason", (first,)):
        rejected.setdefault(r["round"], {})[r["reason"]] = r["n"]
    digests: dict[int, list[int]] = {}
    for r in _rows(db, "SELECT round, sum(agree) AS agree, count(*) AS n FROM digests "
                       "WHERE round >= ? GROUP BY round", (first,)):
        digests[r["round"]] = [r["agree"], r["n"]]
    for row in rows:
        row["rejected"] = rejected.get(row["round"], {})
        agree, n = digests.get(row["round"], [0, 0])
        row["digests"] = {"agree": agree, "disagree": n - agree}
        try:
            row["selected"] = json.loads(row["selected"]) if row["selected"] else None
        except ValueError:
            pass
    return rows


def _nodes(db: sqlite3.Connection, cfg: dict[str, Any], boards: dict[str, str],
           byzantine: list[str]) -> list[dict[str, Any]]:
    names: dict[str, None] = dict.fromkeys(n for n in cfg.get("expected", []) if isinstance(n, str))
    for sql in ("SELECT DISTINCT node FROM reputation", "SELECT DISTINCT node FROM status",
                "SELECT DISTINCT sender AS node FROM updates WHERE verdict = 'accepted'"):
        names.update(dict.fromkeys(r["node"] for r in _rows(db, sql) if r["node"]))
    seen = {r["node"]: r for r in _rows(
        db, "SELECT node, max(at) AS at FROM (SELECT node, at FROM status UNION ALL "
            "SELECT sender AS node, at FROM updates WHERE verdict = 'accepted') GROUP BY node")}
    status = {r["node"]: r for r in _rows(
        db, "SELECT s.node, s.kind, s.label, s.last_round FROM status s WHERE s.id = "
            "(SELECT max(id) FROM status WHERE node = s.node)")}
    accepted = {r["node"]: r["n"] for r in _rows(
        db, "SELECT sender AS node, count(*) AS n FROM updates WHERE verdict = 'accepted' "
            "GROUP BY sender")}
    rejected = {r["node"]: r["n"] for r in _rows(
        db, "SELECT sender AS node, sum(count) AS n FROM rejections GROUP BY sender")}
    bans = {r["node"]: r for r in _rows(
        db, "SELECT node, round, detail FROM security WHERE kind = 'ban' ORDER BY id")}
    out = []
    for n in sorted(names):
        hist = _rows(db, "SELECT round, rep, banned, verdict FROM reputation WHERE node = ? "
                         "ORDER BY round DESC LIMIT ?", (n, VERDICTS_SHOWN))
        hist.reverse()
        last = hist[-1] if hist else None
        st = status.get(n)
        ban = bans.get(n)
        out.append({
            "node": n, "board": boards.get(n), "simulated_attacker": n in byzantine,
            "last_seen": seen[n]["at"] if n in seen else None,
            "last_status": ({"kind": st["kind"], "label": st["label"],
                             "last_round": st["last_round"]} if st else None),
            "reputation": last["rep"] / Q16 if last else None,
            "banned": bool(last["banned"]) if last else False,
            "ban": {"round": ban["round"], "reason": ban["detail"]} if ban else None,
            "accepted": accepted.get(n, 0), "rejected": rejected.get(n, 0),
            "verdicts": [{"round": h["round"], "verdict": h["verdict"], "rep": h["rep"] / Q16,
                          "banned": bool(h["banned"])} for h in hist]})
    return out


def _privacy(cfg: dict[str, Any], accepted: list[int]) -> dict[str, Any] | None:
    """Epsilon spent so far (every closed round; `accepted`: the nodes each one summed), by the
    coordinator's own accountant; None without DP."""
    dp = cfg.get("dp")
    if not isinstance(dp, dict) or not dp or dp.get("mode", "none") == "none":
        return None
    from microfed_host.privacy import Accountant  # dp-accounting: only when DP is on

    acc = Accountant(dp)
    spent = acc.spent(len(accepted), accepted)
    return {"mode": dp.get("mode"), "delta": acc.delta, "epsilon": spent["epsilon"],
            "rounds": len(accepted), "target_epsilon": dp.get("target_epsilon")}
