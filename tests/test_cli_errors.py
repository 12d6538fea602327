"""Every refused command line ends the same way: one line `microfed <cmd>: error: <sentence>`
on stderr, exit code 2, no traceback (issue 8, item 7). Each case runs through the real CLI
entry point (microfed_tools.cli.main); the broker case runs as a subprocess."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from microfed_tools import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's usage errors
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc: int, err: str, prefix: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"microfed {prefix}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ------------------------------------------------------------------ mesh run

def _scenario_file(tmp_path: Path, body: str) -> str:
    p = tmp_path / "sc.toml"
    p.write_text('honest = 5\nf = 1\nrounds = 2\n' + body)
    return str(p)


MESH_RUN_CASES = [
    (["--byzantine", "-2"], ["--byzantine", "0..200", "-2"]),
    (["--honest", "5", "--byzantine", "6", "--f", "1"],
     ["krum with f=1 cannot tolerate 6 Byzantine", "--allow-more-byzantine"]),
    (["--rule", "trimmed_mean", "--byzantine", "3", "--f", "1"],
     ["trimmed_mean with trim=1 cannot tolerate 3 Byzantine"]),
    (["--rule", "median", "--honest", "5", "--byzantine", "5"], ["honest majority"]),
    (["--honest", "6", "--byzantine", "2"], ["krum with f=2 needs at least 7 honest nodes"]),
    (["--timeout", "-1"], ["--timeout", "got -1"]),
    (["--timeout", "inf"], ["--timeout"]),
    (["--timeout", "nan"], ["--timeout"]),
    (["--scale", "1e308"], ["--scale must be in"]),
    (["--scale=-inf"], ["--scale must be a finite number"]),
    (["--sigma", "nan"], ["--sigma must be a finite number"]),
    (["--sigma", "-1"], ["--sigma must be in"]),
    (["--tau", "inf"], ["--tau must be a finite number"]),
    (["--alpha", "nan"], ["alpha must be a finite number"]),
    (["--alpha", "inf"], ["alpha must be a finite number"]),
    (["--alpha", "0"], ["alpha must be in (0"]),
    (["--deadline", "inf"], ["deadline", "finite"]),
    (["--deadline", "1e308"], ["deadline", "86400"]),
    (["--deadline", "0"], ["deadline", "(0"]),
    (["--deadline", "-5"], ["deadline"]),
    (["--kill-coordinator-at", "-1"], ["--kill-coordinator-at"]),
    (["--kill-coordinator-at", "3"], ["--kill-coordinator-at", "1..2"]),
    (["--honest", "-1"], ["honest must be in 1..200"]),
    (["--honest", "300"], ["honest must be in 1..200"]),
    (["--honest", "150", "--byzantine", "100", "--f", "100"], ["at most 200 nodes"]),
    (["--rounds", "0"], ["rounds must be in 1..10000"]),
    (["--rounds", "99999999"], ["rounds must be in 1..10000"]),
    (["--seed", "-1"], ["seed must be in 0..2^32-1"]),
    (["--seed", "4294967296"], ["seed must be in 0..2^32-1"]),
    (["--max-samples", "-1"], ["max_samples must be >= 0"]),
    (["--f", "-1"], ["f and m must be in 0..255"]),
    (["--f", "1000"], ["f and m must be in 0..255"]),
    (["--crosscheck", "sampled:0"], ["bad cross-check policy"]),
    (["--honest", "abc"], ["invalid int value"]),
    (["--scale", "big"], ["invalid float value"]),
]


@pytest.mark.parametrize("args, needles", MESH_RUN_CASES,
                         ids=[" ".join(a) for a, _ in MESH_RUN_CASES])
def test_mesh_run_refuses_bad_flags(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    # --rounds 2 --max-samples 20: should a case ever pass validation, the run stays tiny.
    rc, _, err = run_cli(["mesh", "run", "--transport", "inproc", "--rounds", "2",
                          "--max-samples", "20", "--out", str(tmp_path / "run"), *args])
    prefix = "mesh run" if "invalid" in needles[0] else "mesh"
    assert_one_line_error(rc, err, prefix, *needles)
    assert not (tmp_path / "run").exists()


SCENARIO_CASES = [
    ('[reputation]\nbogus = 1\n', ["unknown [reputation] key(s) bogus", "ban_below"]),
    ('[reputation]\nban_below = 1.5\n', ["ban_below must be an integer"]),
    ('reputation = 3\n', ["[reputation] must be a table"]),
    ('name = "a/b#"\n', ["scenario name 'a/b#'", "'/'"]),
    ('deadline_s = nan\n', ["deadline", "finite"]),
    ('alpha = inf\n', ["alpha must be a finite number"]),
    ('crosscheck = 5\n', ["crosscheck must be a string"]),
    ('[[attackers]]\nattack = "scaling"\nscale = inf\n', ["attack parameter scale", "finite"]),
    ('[[attackers]]\nattack = "gaussian"\nsigma = "x"\n', ["attack parameter sigma must be a number"]),
    ('[[attackers]]\nattack = "sign-flip"\ncount = 4\n', ["krum with f=1 cannot tolerate 4"]),
    ('allow_more_byzantine = 1\n', ["allow_more_byzantine must be true or false"]),
]


@pytest.mark.parametrize("body, needles", SCENARIO_CASES, ids=[b for b, _ in SCENARIO_CASES])
def test_mesh_run_refuses_bad_scenarios(tmp_path: Path, body: str, needles: list[str]) -> None:
    rc, _, err = run_cli(["mesh", "run", "--transport", "inproc", "--out", str(tmp_path / "run"),
                          "--scenario", _scenario_file(tmp_path, body)])
    assert_one_line_error(rc, err, "mesh", *needles)


def test_mesh_run_refuses_an_out_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_cli(["mesh", "run", "--transport", "inproc", "--out", str(f),
                          "--honest", "5", "--byzantine", "1", "--rounds", "1"])
    assert_one_line_error(rc, err, "mesh", "exists and is not a directory")
    assert f.read_text() == "x"


def _ns(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {k: None for k in (
        "honest", "byzantine", "attack", "tau", "sigma", "scale", "rule", "f", "rounds", "mode",
        "split", "alpha", "seed", "max_samples", "crosscheck", "deadline")}
    base.update(kw)
    return argparse.Namespace(**base)


def test_f_defaults_to_byzantine_when_not_given() -> None:
    from microfed_host import mesh

    sc = mesh.apply_overrides(mesh.load_scenario(mesh.DEFAULT_SCENARIO), _ns(honest=7, byzantine=2))
    assert (sc.f, sc.byzantine) == (2, 2)  # was 3, the scenario's: "needs at least 9 honest"
    sc.check()
    sc = mesh.apply_overrides(mesh.load_scenario(mesh.DEFAULT_SCENARIO),
                              _ns(honest=9, byzantine=2, f=3))
    assert sc.f == 3  # an explicit --f wins
    sc.check()
    # Wire attackers send honest updates: they leave f alone.
    sc = mesh.apply_overrides(mesh.load_scenario(mesh.DEFAULT_SCENARIO),
                              _ns(honest=5, byzantine=3, attack="replay", f=1))
    assert sc.f == 1 and sc.model_byzantine == 0
    sc.check()


def test_allow_more_byzantine_runs_past_the_guarantee_on_purpose() -> None:
    from microfed_host import mesh

    a = _ns(honest=5, byzantine=6, f=1)
    sc = mesh.apply_overrides(mesh.load_scenario(mesh.DEFAULT_SCENARIO), a)
    with pytest.raises(mesh.MeshError, match="cannot tolerate 6 Byzantine"):
        sc.check()
    a.allow_more_byzantine = True
    mesh.apply_overrides(mesh.load_scenario(mesh.DEFAULT_SCENARIO), a).check()


# ------------------------------------------------------------------ mesh sweep

SWEEP_CASES = [
    (["--rounds", "0"], ["--rounds must be in 1..10000"]),
    (["--jobs", "0"], ["--jobs must be in 1..64"]),
    (["--jobs", "-1"], ["--jobs must be in 1..64"]),
    (["--seed", "-5"], ["--seed must be in 0..2^32-1"]),
    (["--attacks", "teleport"], ["unknown attack 'teleport'"]),
    (["--rules", "bogus"], ["unknown rule 'bogus'"]),
    (["--splits", ","], ["at least one name"]),
]


@pytest.mark.parametrize("args, needles", SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_mesh_sweep_refuses_bad_flags(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    rc, _, err = run_cli(["mesh", "sweep", "--rules", "krum", "--attacks", "none", "--splits",
                          "iid", "--rounds", "1", "--out", str(tmp_path / "sw"), "--md",
                          str(tmp_path / "r.md"), *args])
    assert_one_line_error(rc, err, "mesh sweep", *needles)


def test_mesh_sweep_refuses_file_and_directory_mixups(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    base = ["mesh", "sweep", "--rules", "krum", "--attacks", "none", "--splits", "iid",
            "--rounds", "1"]
    rc, _, err = run_cli([*base, "--out", str(f), "--md", str(tmp_path / "r.md")])
    assert_one_line_error(rc, err, "mesh sweep", "--out", "not a directory")
    rc, _, err = run_cli([*base, "--out", str(tmp_path / "sw"), "--md", str(tmp_path)])
    assert_one_line_error(rc, err, "mesh sweep", "--md", "is a directory")


# ------------------------------------------------------------------ provision

@pytest.mark.parametrize("args, needles", [
    (["--mesh", "a/b#"], ["'a/b#'", "'/'", "'#'", "MQTT topic"]),
    (["--mesh", "a+b"], ["'+'"]),
    (["--mesh", ""], ["1..64 bytes"]),
    (["--nodes", "0"], ["--nodes must be in 1..1000"]),
    (["--nodes", "-3"], ["--nodes must be in 1..1000"]),
    (["--nodes", "100000"], ["--nodes must be in 1..1000"]),
    (["--seed", "-1"], ["--seed must be in 0..2^32-1"]),
    (["--broker", "h:0"], ["port in 1..65535"]),
    (["--broker", "h:99999"], ["port in 1..65535"]),
])
def test_provision_init_refuses(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    out = tmp_path / "mesh"
    rc, _, err = run_cli(["provision", "init", "--mesh", "lab", "--nodes", "2", "--data", "none",
                          "--out", str(out), *args])
    assert_one_line_error(rc, err, "provision", *needles)
    assert not out.exists()  # refused before any key was written


# ------------------------------------------------------------------ coordinator

@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from microfed_host.provision import init_mesh

    d = tmp_path_factory.mktemp("coord") / "mesh"
    init_mesh(d, "lab", 3, "127.0.0.1:1")
    return d


@pytest.mark.parametrize("args, needles", [
    (["--deadline", "inf"], ["--deadline must be in (0, 86400]"]),
    (["--deadline", "nan"], ["--deadline"]),
    (["--deadline", "-1"], ["--deadline"]),
    (["--deadline", "1e308"], ["--deadline"]),
    (["--rounds", "0"], ["rounds must be in"]),
    (["--f", "-1"], ["0..255"]),
    (["--m", "300"], ["0..255"]),
    (["--trim", "-2"], ["0..255"]),
    (["--crosscheck", "sampled:-1"], ["bad cross-check policy"]),
    (["--broker", "1.2.3.4:99999"], ["port 1..65535"]),
    (["--broker", "nohost"], ["host:port"]),
    (["--rounds", "x"], ["a number or 'forever', got 'x'"]),
])
def test_coordinator_refuses_bad_flags(mesh_dir: Path, tmp_path: Path, args: list[str],
                                       needles: list[str]) -> None:
    rc, _, err = run_cli(["coordinator", "--mesh", str(mesh_dir), "--out", str(tmp_path / "run"),
                          *args])
    assert_one_line_error(rc, err, "coordinator", *needles)


def test_coordinator_refuses_an_out_that_is_a_file(mesh_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_cli(["coordinator", "--mesh", str(mesh_dir), "--out", str(f)])
    assert_one_line_error(rc, err, "coordinator", "not a directory")


@pytest.mark.parametrize("edit, needles", [
    ({"mesh": "a/b#"}, ["mesh.json", "'a/b#'", "MQTT topic"]),
    ({"broker": None}, ["names no broker", "--broker"]),
])
def test_coordinator_refuses_a_bad_mesh_json(mesh_dir: Path, tmp_path: Path,
                                            edit: dict[str, object], needles: list[str]) -> None:
    import shutil

    d = tmp_path / "mesh"
    shutil.copytree(mesh_dir, d)
    doc = json.loads((d / "mesh.json").read_text())
    doc.update(edit)
    (d / "mesh.json").write_text(json.dumps(doc))
    rc, _, err = run_cli(["coordinator", "--mesh", str(d), "--out", str(tmp_path / "run")])
    assert_one_line_error(rc, err, "coordinator", *needles)


def test_coordinator_with_an_unreachable_broker_is_one_line(mesh_dir: Path, tmp_path: Path) -> None:
    # Port 1 on loopback: connection refused. The coordinator's client retries ~15 s first.
    p = subprocess.run([sys.executable, "-m", "microfed_tools.cli", "coordinator", "--mesh",
                        str(mesh_dir), "--broker", "127.0.0.1:1", "--f", "0",
                        "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert_one_line_error(p.returncode, p.stderr, "coordinator", "127.0.0.1:1")
    assert "reach" in p.stderr or "CONNACK" in p.stderr
