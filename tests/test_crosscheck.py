"""The cross-check API: policy parsing, counting, and the dedicated mismatch error."""

from __future__ import annotations

import numpy as np
import pytest

from microfed_host import crosscheck, fast
from microfed_host.crosscheck import CrossChecker, CrossCheckMismatch, Policy

X = np.array([[1, 2], [2, 3], [3, 1], [100, -100], [2, 2]], dtype=np.int32)
IDS = ["a", "b", "c", "d", "e"]


def test_policy_parse_and_schedule() -> None:
    assert [Policy.parse("sampled:3").wants(r) for r in range(7)] == [
        True, False, False, True, False, False, True]
    assert Policy.parse("always").wants(5) and not Policy.parse("off").wants(0)
    for bad in ("sometimes", "sampled:0", "sampled:x"):
        with pytest.raises(ValueError, match="cross-check policy"):
            Policy.parse(bad)


def test_checker_counts_and_returns_fast_result() -> None:
    cc = CrossChecker(Policy.parse("sampled:2"))
    for r in range(4):
        res = cc.run("krum", IDS, X, {"f": 1}, round_no=r)
        assert res["selected"] == ["e"] or res["selected"] == ["b"]
    assert cc.checked == 2 and cc.mismatches == 0


def test_mismatch_raises_with_diff(monkeypatch) -> None:
    real = fast.run

    def off_by_one(rule, ids, x, params):
        out = real(rule, ids, x, params)
        out["vector"] = [v + 1 for v in out["vector"]]
        out["scores"] = {k: v + 1 for k, v in out["scores"].items()}
        return out

    monkeypatch.setattr(crosscheck.fast, "run", off_by_one)
    cc = CrossChecker(Policy())
    with pytest.raises(CrossCheckMismatch) as e:
        cc.run("krum", IDS, X, {"f": 1})
    assert "[0] fast=" in e.value.diff and "score[a]" in e.value.diff
    assert cc.mismatches == 1
