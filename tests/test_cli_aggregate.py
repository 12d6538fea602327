"""`microfed aggregate`: the user-facing audit contract, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQ = {"rule": "krum", "f": 1, "updates": [
    {"node": "a", "vector": [65536, 0]}, {"node": "b", "vector": [65000, 10]},
    {"node": "c", "vector": [66000, -5]}, {"node": "d", "vector": [-9000000, 2**31 - 1]},
    {"node": "e", "vector": [65536, 1]}]}


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microfed_tools.cli", "aggregate", *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("engine", ["fast", "reference", "micropython"])
def test_engines_print_the_contract(engine: str, micropython: str) -> None:
    p = cli("--engine", engine, "-", stdin=json.dumps(REQ))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["selected"] == ["a"] or out["selected"] == ["e"]
    assert set(out["scores"]) == {"a", "b", "c", "d", "e"}
    assert all(isinstance(v, int) for v in out["scores"].values())
    assert out["vector"] in ([65536, 0], [65536, 1])
    assert len(out["digest"]) == 64


def test_all_engines_agree_and_file_input(tmp_path: Path, micropython: str) -> None:
    f = tmp_path / "req.json"
    f.write_text(json.dumps(REQ))
    p = cli("--engine", "all", str(f))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["agree"] is True and out["engines"] == ["fast", "reference", "micropython"]
    # The winner is the honest update closest to its neighbours, never the outlier d.
    assert out["selected"] != ["d"]


def test_all_engines_report_a_disagreement(monkeypatch, capsys) -> None:
    """A fast path that is off by one in one coordinate is caught with a readable diff."""
    from microfed_host import fast
    from microfed_tools import cli as cli_mod

    real = fast.run

    def broken(rule, ids, x, params):
        out = real(rule, ids, x, params)
        out["vector"] = [out["vector"][0] + 1] + out["vector"][1:]
        return out

    monkeypatch.setattr(fast, "run", broken)
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(json.dumps(
        dict(REQ, rule="median"))))
    rc = cli_mod.main(["aggregate", "--engine", "reference", "-"])
    assert rc == 0  # the reference alone is fine
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(json.dumps(
        dict(REQ, rule="median"))))
    monkeypatch.setattr("microfed_tools.cmd_aggregate.ENGINES", ("fast", "reference"))
    rc = cli_mod.main(["aggregate", "--engine", "all", "-"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "fast and reference disagree" in err and "[0]" in err


@pytest.mark.parametrize("payload, needle", [
    ('{"rule": "krum", "f": 1, "updates": [{"node": "a", "vector": [1, 2]}, '
     '{"node": "b", "vector": [1]}]}', "ragged"),
    ('{"rule": "krum", "f": 1, "updates": [{"node": "a", "vector": [1]}]}', "n >= 2f + 3"),
    ('{"rule": "median", "updates": [{"node": "a", "vector": [0.5]}]}', "not an integer"),
    ('{"rule": "median", "updates": [{"node": "a", "vector": [2147483648]}]}', "outside int32"),
    ('{"rule": "mean", "updates": [{"node": "a", "vector": [1]}]}', "unknown rule"),
    ('{"rule": "median", "updates": [', "invalid JSON"),
    ('[1, 2]', "must be a JSON object"),
    ('{"rule": "trimmed_mean", "updates": [{"node": "a", "vector": [1]}]}', "'trim'"),
])
@pytest.mark.parametrize("engine", ["fast", "micropython"])
def test_bad_input_is_one_line_exit_2(payload: str, needle: str, engine: str,
                                      micropython: str) -> None:
    p = cli("--engine", engine, "-", stdin=payload)
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_missing_file_is_a_clear_error() -> None:
    p = cli("/nonexistent/req.json")
    assert p.returncode == 2 and "cannot read" in p.stderr and "Traceback" not in p.stderr
