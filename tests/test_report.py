"""`microfed report`: a run's tables and plots regenerated from its coordinator store are the
ones the run wrote and printed; --out leaves the run directory alone; a directory that is not
a run is refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import inproc_run, run_microfed


def _table(stdout: str) -> list[str]:
    """The summary table of `microfed mesh run` / `microfed report` output: from its first
    row ("rule") to the blank line after it."""
    lines = stdout.splitlines()
    first = next(i for i, x in enumerate(lines) if x.startswith("  rule "))
    end = lines.index("", first)
    return lines[first:end]


def test_report_regenerates_what_the_run_wrote(tmp_path: Path) -> None:
    run, printed = inproc_run(tmp_path, 2)
    summary = json.loads((run / "summary.json").read_text())
    csv = (run / "rounds.csv").read_bytes()
    for name in ("rounds.csv", "accuracy.png", "reputation.png"):
        (run / name).unlink()
    r = run_microfed("report", str(run))
    assert r.returncode == 0, r.stderr
    assert _table(r.stdout) == _table(printed) and len(_table(printed)) >= 10
    assert (run / "rounds.csv").read_bytes() == csv
    assert json.loads((run / "summary.json").read_text()) == summary
    assert (run / "accuracy.png").stat().st_size > 1000
    assert (run / "reputation.png").stat().st_size > 1000
    # The store's path works too, and --out writes elsewhere, leaving the run as it is.
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    out = tmp_path / "again"
    r = run_microfed("report", str(run / "coordinator.sqlite"), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["final_digest"] == summary["final_digest"]
    assert got["plots"] == [str(out / "accuracy.png"), str(out / "reputation.png")]
    assert (out / "rounds.csv").read_bytes() == csv
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_report_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    r = run_microfed("report", str(tmp_path))
    assert r.returncode == 2 and "no coordinator store" in r.stderr
    run, _ = inproc_run(tmp_path, 1)
    (run / "scenario.json").unlink()
    r = run_microfed("report", str(run))
    assert r.returncode == 2 and "no scenario.json" in r.stderr
