"""microfed_host.flower (exact strategies for Flower 1.42) and microfed_host.floatedge.

The edge conversion tests run anywhere. The strategy tests need flwr >= 1.42, which pins
libraries the dev venv keeps newer (starlette, uvicorn, typer), so it lives in its own venv,
`.venv-flower` (`./dev flower` makes it and runs this file there); in the dev venv,
`test_in_flower_venv` runs this same file inside it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from flower_venv import ROOT, have, run_in_flower_venv
from flower_venv import env as _env

from microfed import audit, q16
from microfed_host.floatedge import Q16ConversionError, from_raw, to_raw
from microfed_tools import cli as cli_mod

HAVE_FLWR = have("flwr.serverapp.strategy")
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="flwr >= 1.42 not in this venv "
                                "(test_in_flower_venv runs these in .venv-flower)")


# --- the edge: float -> Q16.16 -------------------------------------------------------------

def exact_raw(x: float) -> int:
    """floor(x * 65536 + 1/2) in exact rational arithmetic: the contract, independently."""
    v = Fraction(x) * 65536 + Fraction(1, 2)
    return v.numerator // v.denominator


@pytest.mark.parametrize("k", [0, 1, 2, -1, -2, -3, 1000, -1001, 2**30, -(2**30)])
def test_exact_half_ulp_rounds_half_up(k):
    # (k + 1/2) / 65536 is exactly half way between raw k and k + 1: up, toward +infinity.
    for dtype in (np.float64, np.float32):
        x = np.asarray([(k + 0.5) / 65536], dtype=dtype)
        if float(x[0]) * 65536 != k + 0.5:
            continue  # float32 cannot hold this half exactly
        assert to_raw(x)[0] == k + 1, (k, dtype)


def test_just_below_half_rounds_down():
    # Adding 0.5 in floating point would round 0.49999999999999994 + 0.5 to 1.0.
    below = np.nextafter(0.5, 0.0)
    assert to_raw(np.asarray([below / 65536]))[0] == 0
    assert to_raw(np.asarray([np.nextafter(7.5, 0.0) / 65536]))[0] == 7
    assert to_raw(np.asarray([-(0.5 + 2**-40) / 65536]))[0] == -1
    assert to_raw(np.asarray([-0.5 / 65536]))[0] == 0


def test_matches_exact_rounding_on_random_floats():
    rng = np.random.default_rng(11)
    xs = np.concatenate([
        rng.normal(0.0, 1.0, 2000), rng.normal(0.0, 3e4, 2000), rng.normal(0.0, 1e-5, 500),
        (rng.integers(-(2**31), 2**31 - 1, 500) + 0.5) / 65536,  # exact halves
        rng.normal(0.0, 1.0, 500).astype(np.float32).astype(np.float64),
    ])
    xs = xs[np.abs(xs) < 32767]
    assert to_raw(xs).tolist() == [exact_raw(float(x)) for x in xs]
    assert to_raw(xs.astype(np.float16)).tolist() == [
        exact_raw(float(x)) for x in xs.astype(np.float16)]


def test_range_ends_and_overflow_error():
    top = q16.MAX_RAW / 65536
    assert to_raw(np.asarray([top, q16.MIN_RAW / 65536])).tolist() == [q16.MAX_RAW, q16.MIN_RAW]
    # Half below MIN_RAW rounds up into range; half above MAX_RAW rounds up out of it.
    assert to_raw(np.asarray([(q16.MIN_RAW - 0.5) / 65536]))[0] == q16.MIN_RAW
    for bad in [(q16.MAX_RAW + 0.5) / 65536, (q16.MIN_RAW - 0.75) / 65536, 1e300, -40000.0]:
        with pytest.raises(Q16ConversionError) as ei:
            to_raw(np.asarray([0.0, bad]), "w")
        e = ei.value
        assert (e.reason, e.value, e.array, e.index) == ("overflow", bad, "w", (1,))
        assert "out of Q16.16 range" in str(e) and "'w'" in str(e)


def test_nan_and_inf_name_value_and_position():
    a = np.zeros((3, 4), dtype=np.float32)
    a[1, 2] = np.nan
    a[2, 0] = np.inf
    with pytest.raises(Q16ConversionError) as ei:
        to_raw(a, "layer.weight")
    e = ei.value
    assert e.reason == "nan" and e.index == (1, 2) and e.array == "layer.weight"
    assert e.value != e.value and "NaN" in str(e) and "(1, 2)" in str(e)
    a[1, 2] = 0
    with pytest.raises(Q16ConversionError) as ei:
        to_raw(a, "layer.weight")
    assert (ei.value.reason, ei.value.index, ei.value.value) == ("inf", (2, 0), float("inf"))
    with pytest.raises(Q16ConversionError) as ei:
        to_raw(np.asarray([1, 2], dtype=np.int64), "counts")
    assert ei.value.reason == "dtype" and "int64" in str(ei.value)


def test_back_to_float_is_exact_in_float64():
    raw = np.asarray([q16.MIN_RAW, -1, 0, 1, q16.MAX_RAW, 123456789], dtype=np.int64)
    back = from_raw(raw, np.dtype(np.float64), (2, 3))
    assert back.shape == (2, 3) and to_raw(back).tolist() == raw.tolist()


def test_import_without_flwr_names_the_extra():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "try:\n import microfed_host.flower\nexcept ImportError as e:\n print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=120)
    assert "pip install microfed[flower]" in out.stdout, out.stdout + out.stderr


@needs_flwr
def test_array_layout_round_trips_keys_shapes_and_dtypes():
    # The one layout code the strategies and the bridge share: record -> raw vector -> record.
    from flwr.app import Array, ArrayRecord

    from microfed_host.flowerarrays import ArrayLayout

    w = np.asarray([[0.5, -1.25, 3.0], [2**-16, -(2**-16), 0.0]], dtype=np.float32)
    b = np.asarray([7.0, -32768.0], dtype=np.float64)
    rec = ArrayRecord({"w": Array(w), "b": Array(b)})
    layout = ArrayLayout.of(rec)
    assert layout.keys == ("w", "b") and layout.shapes == ((2, 3), (2,))
    assert layout.size == 8
    raw = layout.raw(rec)
    assert raw.tolist() == [32768, -81920, 196608, 1, -1, 0, 458752, -(2**31)]
    back = layout.arrays(raw)
    assert list(back.keys()) == ["w", "b"]
    assert back["w"].numpy().dtype == np.float32 and back["w"].numpy().tolist() == w.tolist()
    assert back["b"].numpy().dtype == np.float64 and back["b"].numpy().tolist() == b.tolist()
    assert ArrayLayout.of(ArrayRecord({})).raw(ArrayRecord({})).size == 0


# --- the strategies -------------------------------------------------------------------------

def _reply(node: int, arrays: dict, num_examples: int = 10, loss: float = 0.5):
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    md = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0,
                  reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                  message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "loss": loss}),
    })
    return Message(content=content, metadata=md)


def _updates(seed: int, n: int):
    """n clients' float arrays (a float32 matrix and a float64 vector), with ties: some
    clients send identical updates (equal Krum scores) and columns share values."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w = rng.normal(0.0, 20.0, (3, 4)).astype(np.float32)
        b = rng.normal(0.0, 0.01, 5)
        if i % 4 == 3:  # a copy of the previous client's update: tied scores, tied values
            w, b = out[-1][1]["w"].copy(), out[-1][1]["b"].copy()
        if i % 5 == 0:
            b[:2] = (rng.integers(-50, 50, 2) + 0.5) / 65536  # exact half-ulp values
        out.append((1000 + 7 * ((i * 37) % n), {"w": w, "b": b}))
    return out


def _cli(req: dict, tmp_path: Path, capsys, engine: str = "reference") -> dict:
    path = tmp_path / "req.json"
    path.write_text(json.dumps(req))
    capsys.readouterr()
    assert cli_mod.main(["aggregate", "--engine", engine, "--compact", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def _expected_request(rule: str, ups, params: dict, weights=None) -> dict:
    order = sorted(ups, key=lambda u: "%020d" % u[0])
    req = {"rule": rule, **params, "updates": []}
    for node, arrays in order:
        vec = [exact_raw(float(x)) for k in ("w", "b") for x in np.ravel(arrays[k])]
        u = {"node": "%020d" % node, "vector": vec}
        if weights is not None:
            u["weight"] = weights[node]
        req["updates"].append(u)
    return req


def _strategy(rule: str, n: int, **kw):
    from microfed_host import flower as mf

    f = (n - 3) // 2 if rule in ("krum", "multi_krum") else 0
    if rule == "krum":
        return mf.ExactKrum(num_malicious_nodes=f, **kw), {"f": f}
    if rule == "multi_krum":
        return mf.ExactMultiKrum(num_malicious_nodes=f, num_nodes_to_select=3, **kw), {
            "f": f, "m": 3}
    if rule == "median":
        return mf.ExactMedian(**kw), {}
    if rule == "trimmed_mean":
        return mf.ExactTrimmedMean(beta=0.2, **kw), {"trim": int(0.2 * n)}
    return mf.ExactFedAvg(**kw), {}


def _as_raw(arrays) -> list[int]:
    return to_raw(arrays["w"].numpy()).tolist() + to_raw(arrays["b"].numpy()).tolist()


RULES = ("krum", "multi_krum", "median", "trimmed_mean", "fedavg")


@needs_flwr
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_equals_microfed_aggregate(rule, seed, tmp_path, capsys):
    from microfed_host.flower import DIGEST_KEY, digest_hex

    n = 7 + seed * 2
    ups = _updates(seed * 31 + len(rule), n)
    strategy, params = _strategy(rule, n)
    arrays, metrics = strategy.aggregate_train(seed, [_reply(node, a) for node, a in ups])
    req = _expected_request(rule, ups, params, {node: 1 for node, _ in ups}
                            if rule == "fedavg" else None)
    assert strategy.last_request == req
    ref = _cli(req, tmp_path, capsys)
    assert _as_raw(arrays) == ref["vector"]
    assert digest_hex(metrics) == ref["digest"] == audit.digest(ref["vector"])
    assert len(metrics[DIGEST_KEY]) == 8
    assert metrics["microfed-n"] == n and metrics["microfed-checked"] == 1
    assert arrays["w"].numpy().dtype == np.float32 and arrays["b"].numpy().shape == (5,)
    if rule in ("krum", "multi_krum"):
        assert strategy.last_result["selected"] == ref["selected"]
        assert strategy.last_result["scores"] == ref["scores"]


@needs_flwr
def test_every_engine_agrees_once(tmp_path, capsys):
    """One case through `microfed aggregate --engine all` (MicroPython included)."""
    from microfed_host.flower import digest_hex

    ups = _updates(99, 9)
    strategy, params = _strategy("multi_krum", 9)
    arrays, metrics = strategy.aggregate_train(1, [_reply(node, a) for node, a in ups])
    ref = _cli(strategy.last_request, tmp_path, capsys, engine="all")
    assert ref["agree"] and ref["vector"] == _as_raw(arrays)
    assert digest_hex(metrics) == ref["digest"]


@needs_flwr
def test_krum_tie_goes_to_the_smaller_node_id():
    from microfed_host.flower import ExactKrum

    same = {"w": np.ones((3, 4), np.float32), "b": np.zeros(5)}
    far = {"w": np.full((3, 4), 9.0, np.float32), "b": np.zeros(5)}
    # Four identical updates tie; '9' > '50' as text, 9 < 50 as a number: zero-padded ids
    # make the tie-break numeric.
    ups = [(50, same), (300, same), (9, same), (77, same), (100, far)]
    s = ExactKrum(num_malicious_nodes=0)
    s.aggregate_train(1, [_reply(node, a) for node, a in ups])
    assert s.last_result["selected"] == ["%020d" % 9]


@needs_flwr
@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_inflated_num_examples_changes_nothing(rule):
    """A Byzantine client reporting 10^9 examples, selected or not, moves no bit."""
    from microfed_host.flower import digest_hex

    n = 11
    ups = _updates(5, n)
    attacker = ups[0][0]
    ups[0] = (attacker, {"w": np.full((3, 4), 500.0, np.float32), "b": np.full(5, 1.0)})
    results = []
    for claim in (10, 10**9, 0):
        for who in (attacker, ups[1][0]):  # the outlier, then a node Krum may select
            s, _ = _strategy(rule, n)
            replies = [_reply(node, a, num_examples=claim if node == who else 10)
                       for node, a in ups]
            arrays, metrics = s.aggregate_train(1, replies)
            results.append((_as_raw(arrays), digest_hex(metrics)))
    assert all(r == results[0] for r in results)
    # Flower's own weighted average is what the claim would move: the selected nodes'
    # unweighted mean is the result.
    s, _ = _strategy(rule, n)
    s.aggregate_train(1, [_reply(node, a) for node, a in ups])
    assert "%020d" % attacker not in s.last_result["selected"]


@needs_flwr
def test_fedavg_reported_weights_equal_microfed_aggregate(tmp_path, capsys):
    from microfed_host.flower import ExactFedAvg, digest_hex

    ups = _updates(8, 9)
    claims = {node: 3 + (i * 17) % 40 for i, (node, _) in enumerate(ups)}
    s = ExactFedAvg(weights="reported")
    arrays, metrics = s.aggregate_train(1, [_reply(node, a, num_examples=claims[node])
                                            for node, a in ups])
    req = _expected_request("fedavg", ups, {}, claims)
    assert s.last_request == req
    ref = _cli(req, tmp_path, capsys)
    assert _as_raw(arrays) == ref["vector"] and digest_hex(metrics) == ref["digest"]
    # capped: the cap is what microfed aggregate gets
    s = ExactFedAvg(weights="reported", max_weight=10)
    s.aggregate_train(1, [_reply(node, a, num_examples=claims[node]) for node, a in ups])
    assert [u["weight"] for u in s.last_request["updates"]] == [
        min(10, claims[node]) for node in sorted(claims, key=lambda v: "%020d" % v)]


@needs_flwr
def test_bad_reply_is_dropped_or_raises():
    from microfed_host.flower import ExactMedian, ReplyRejected, digest_hex

    ups = _updates(3, 8)
    bad_node = ups[2][0]
    poisoned = {"w": ups[2][1]["w"].copy(), "b": ups[2][1]["b"].copy()}
    poisoned["w"][2, 1] = np.nan
    replies = [_reply(node, poisoned if node == bad_node else a) for node, a in ups]
    s = ExactMedian()
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["microfed-rejected"] == 1 and metrics["microfed-n"] == 7
    clean = ExactMedian()
    _, m2 = clean.aggregate_train(1, [_reply(node, a) for node, a in ups if node != bad_node])
    assert digest_hex(metrics) == digest_hex(m2)
    with pytest.raises(Q16ConversionError) as ei:
        ExactMedian(on_invalid="raise").aggregate_train(1, replies)
    e = ei.value
    assert (e.reason, e.array, e.index, e.node) == ("nan", "w", (2, 1), "%020d" % bad_node)
    wrong = [_reply(node, {"w": a["w"][:2], "b": a["b"]} if node == bad_node else a)
             for node, a in ups]
    with pytest.raises(ReplyRejected, match="expected float32"):
        ExactMedian(on_invalid="raise").aggregate_train(1, wrong)


@needs_flwr
def test_digest_survives_the_metricrecord_wire_format():
    from flwr.app import MetricRecord

    from microfed_host.flower import digest_hex

    s, _ = _strategy("krum", 9)
    _, metrics = s.aggregate_train(1, [_reply(node, a) for node, a in _updates(4, 9)])
    back = MetricRecord.inflate(metrics.deflate())
    assert digest_hex(back) == s.last_result["digest"] == s.digests[1]
    assert back["loss"] == pytest.approx(0.5)  # the clients' metrics still travel beside it


@needs_flwr
def test_too_few_replies_skips_the_round():
    from microfed_host.flower import ExactKrum

    s = ExactKrum(num_malicious_nodes=3)
    arrays, metrics = s.aggregate_train(1, [_reply(node, a) for node, a in _updates(2, 6)])
    assert arrays is None and metrics["microfed-skipped"] == 1


@needs_flwr
def test_benchmark_case_flower_krum_picks_the_byzantine_client():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/aggregate.py"), "--case"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Flower 1.42 Krum (float) winner:  client-0" in out.stdout
    assert "exact Krum (microfed) winner:     client-0" not in out.stdout


# --- the example ----------------------------------------------------------------------------

@needs_flwr
@pytest.mark.skipif(not HAVE_RAY, reason="flwr[simulation] (ray) not installed")
def test_example_digest_is_the_same_on_every_run(tmp_path, capsys):
    """examples/flower_exact_krum: 100 virtual clients, 3 rounds, twice (~30 s each)."""
    digests = []
    for i in range(2):
        audit_dir = tmp_path / f"audit{i}"
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples/flower_exact_krum/run.py"), "--clients", "100",
             "--rounds", "3", "--audit-dir", str(audit_dir)],
            capture_output=True, text=True, env=_env(), timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("final digest: ")]
        digests.append(line[0].split(": ")[1])
    assert digests[0] == digests[1]
    # Anyone can recompute it offline from the recorded request.
    req = json.loads((tmp_path / "audit1" / "round-0003.json").read_text())
    assert len(req["updates"]) == 100 and req["rule"] == "krum" and req["f"] == 20
    assert _cli(req, tmp_path, capsys)["digest"] == digests[0]


# --- from the dev venv ----------------------------------------------------------------------

@pytest.mark.skipif(HAVE_FLWR, reason="flwr is in this venv: the tests above ran here")
def test_in_flower_venv():
    run_in_flower_venv(__file__, timeout=900)
