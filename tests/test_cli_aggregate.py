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
    ('{"rule": "median", "pre": "nnm", "f": 1, "updates": [{"node": "a", "vector": [1]}]}',
     "pre nnm needs n >= 2f + 1: n=1, f=1"),
    ('{"rule": "median", "pre": "bucketing", "bucket": 0, "seed": 1, '
     '"updates": [{"node": "a", "vector": [1]}]}', "'bucket' must be >= 1"),
    ('{"rule": "centered_clipping", "tau": 0, "iters": 1, '
     '"updates": [{"node": "a", "vector": [1]}]}', "'tau' must be a positive Q16.16 radius"),
    ('{"rule": "krum", "f": 1, "pre": "bucketing", "bucket": 2, "seed": 1, "updates": ['
     '{"node": "a", "vector": [1]}, {"node": "b", "vector": [2]}, {"node": "c", "vector": [3]}, '
     '{"node": "d", "vector": [4]}, {"node": "e", "vector": [5]}]}',
     "krum needs n >= 2f + 3: n=3, f=1 (the rule ran on 3 bucket means)"),
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


def test_huge_integer_is_one_line_exit_2_on_every_engine(micropython: str) -> None:
    """A 5,000-digit literal used to hit CPython's int/str digit limit inside json."""
    payload = '{"rule": "median", "updates": [{"node": "a", "vector": [' + "7" * 5000 + "]}]}"
    for engine in ("fast", "reference", "micropython", "all"):
        p = cli("--engine", engine, "-", stdin=payload)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (engine, p.stderr)
        assert len(lines) == 1 and "5000-digit integer" in lines[0] and "int32" in lines[0]
        assert lines[0].startswith("microfed aggregate: error: ")
        assert "Traceback" not in p.stderr and p.stdout == ""


# A tie broken by UTF-8 byte order where UTF-16 order differs: U+FF21 (EF BC A1) sorts before
# U+1F600 (F0 9F 98 80) as UTF-8, after it as UTF-16 code units (FF21 > D83D).
FULLWIDTH_A, GRIN = "\uff21", "\U0001F600"
UNICODE_REQ = {"rule": "krum", "f": 1, "updates": [
    {"node": GRIN, "vector": [0, 0]},
    {"node": FULLWIDTH_A, "vector": [0, 0]},
    {"node": "\u4e2d\u6587", "vector": [65536, 0]},         # CJK
    {"node": "e\u0301", "vector": [0, 65536]},              # e + combining acute
    {"node": "\u00e9", "vector": [-65536, 0]},              # precomposed: a different id
    {"node": "z" + GRIN + "\u200d\U0001F469", "vector": [0, -65536]}]}  # ZWJ sequence


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_all_engines_agree_on_any_unicode_node_ids(ensure_ascii: bool, micropython: str) -> None:
    payload = json.dumps(UNICODE_REQ, ensure_ascii=ensure_ascii)
    p = cli("--engine", "all", "-", stdin=payload)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["agree"] is True
    assert out["scores"][GRIN] == out["scores"][FULLWIDTH_A]  # a tie ...
    assert out["selected"] == [FULLWIDTH_A]  # ... broken by UTF-8 bytes
    assert set(out["scores"]) == {u["node"] for u in UNICODE_REQ["updates"]}
    # Bit for bit: every engine alone prints the same result.
    for engine in ("fast", "reference", "micropython"):
        q = cli("--engine", engine, "--compact", "-", stdin=payload)
        assert q.returncode == 0, q.stderr
        assert json.loads(q.stdout) == {k: v for k, v in out.items()
                                         if k not in ("engines", "agree")}


def test_multi_krum_order_with_unicode_ids_matches_on_every_engine(micropython: str) -> None:
    req = dict(UNICODE_REQ, rule="multi_krum", m=3)
    p = cli("--engine", "all", "-", stdin=json.dumps(req))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["selected"][:2] == [FULLWIDTH_A, GRIN]


@pytest.mark.parametrize("engine", ["fast", "reference", "micropython", "all"])
def test_lone_surrogate_node_id_is_refused(engine: str, micropython: str) -> None:
    payload = '{"rule": "median", "updates": [{"node": "a\\ud800", "vector": [1]}]}'
    p = cli("--engine", engine, "-", stdin=payload)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and "lone surrogate" in lines[0] and "valid Unicode" in lines[0]
    assert "Traceback" not in p.stderr


# The defences (docs/determinism.md 4.7-4.9) through every engine: an outlier d, Unicode ids.
DEFENCE_REQS = {
    "nnm-krum": dict(UNICODE_REQ, pre="nnm", f=1),
    "nnm-fedavg": {"rule": "fedavg", "pre": "nnm", "f": 2, "updates": [
        dict(u, weight=i + 1) for i, u in enumerate(REQ["updates"])]},
    "bucketing-median": {"rule": "median", "pre": "bucketing", "bucket": 2, "seed": 7,
                         "updates": REQ["updates"] + UNICODE_REQ["updates"]},
    "centered_clipping": dict(REQ, rule="centered_clipping", tau=65536, iters=3),
    "bucketing-centered_clipping": {"rule": "centered_clipping", "tau": 1 << 20, "iters": 2,
                                    "pre": "bucketing", "bucket": 3, "seed": 4294967295,
                                    "updates": REQ["updates"] + UNICODE_REQ["updates"]},
}


@pytest.mark.parametrize("name", sorted(DEFENCE_REQS))
def test_all_engines_agree_on_the_defences(name: str, micropython: str) -> None:
    req = {k: v for k, v in DEFENCE_REQS[name].items() if k != "m"}
    p = cli("--engine", "all", "-", stdin=json.dumps(req, ensure_ascii=False))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["agree"] is True and out["engines"] == ["fast", "reference", "micropython"]
    assert out["rule"] == req["rule"] and out.get("pre") == req.get("pre")
    if req.get("pre") == "bucketing":
        members = [m for b in out["buckets"] for m in b]
        assert sorted(members) == sorted(u["node"] for u in req["updates"])
        assert [len(b) for b in out["buckets"]][:-1] == [req["bucket"]] * (len(out["buckets"]) - 1)
    if name == "centered_clipping":
        # Three steps of at most tau (= 1.0) from the median of the honest four.
        assert abs(out["vector"][0] - 65536) <= 3 * 65536 and abs(out["vector"][1]) <= 3 * 65536
