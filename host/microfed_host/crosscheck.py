"""Run the fast path and the portable reference side by side and prove they agree.

The coordinator calls `CrossChecker.run` once per round; its policy decides whether the
reference runs too (always / every N-th round / off). A disagreement raises
`CrossCheckMismatch` carrying a readable diff: it is never logged and ignored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from microfed import audit
from microfed_host import fast

MAX_DIFF_LINES = 12


class CrossCheckMismatch(RuntimeError):
    """The fast path and the reference produced different results."""

    def __init__(self, diff: str) -> None:
        super().__init__("fast path and reference disagree:\n" + diff)
        self.diff = diff


@dataclass(frozen=True)
class Policy:
    """When to run the reference: mode 'always', 'off', or 'sampled' (every `every`-th round,
    round 0 included), deterministic so an audit can tell which rounds were checked."""

    mode: str = "always"
    every: int = 1

    @classmethod
    def parse(cls, text: str) -> Policy:
        """'always' | 'off' | 'sampled:N'."""
        if text in ("always", "off"):
            return cls(text)
        if text.startswith("sampled:"):
            try:
                every = int(text.split(":", 1)[1])
            except ValueError:
                every = 0
            if every >= 1:
                return cls("sampled", every)
        raise ValueError(f"bad cross-check policy {text!r}: use always, off or sampled:N (N >= 1)")

    def wants(self, round_no: int) -> bool:
        if self.mode == "always":
            return True
        if self.mode == "off":
            return False
        return round_no % self.every == 0


def diff_results(a: dict, b: dict, names: tuple[str, str] = ("fast", "reference")) -> str | None:
    """Readable description of how two result dicts differ, or None when they are identical."""
    if a == b:
        return None
    lines: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if va == vb:
            continue
        if key == "vector" and isinstance(va, list) and isinstance(vb, list):
            if len(va) != len(vb):
                lines.append(f"vector length: {names[0]}={len(va)} {names[1]}={len(vb)}")
            bad = [i for i, (p, q) in enumerate(zip(va, vb, strict=False)) if p != q]
            lines.append(f"vector: {len(bad)} coordinate(s) differ")
            for i in bad[:MAX_DIFF_LINES]:
                lines.append(f"  [{i}] {names[0]}={va[i]} {names[1]}={vb[i]}")
        elif key == "scores" and isinstance(va, dict) and isinstance(vb, dict):
            for node in sorted(set(va) | set(vb)):
                if va.get(node) != vb.get(node):
                    lines.append(
                        f"score[{node}]: {names[0]}={va.get(node)} {names[1]}={vb.get(node)}"
                    )
        else:
            lines.append(f"{key}: {names[0]}={va!r} {names[1]}={vb!r}")
    return "\n".join(lines)


@dataclass
class CrossChecker:
    policy: Policy
    checked: int = 0
    mismatches: int = 0
    # CPU seconds (this thread's: robust to a shared machine) the last run() spent on the
    # fast path and on the reference (0.0: not run).
    fast_s: float = 0.0
    ref_s: float = 0.0

    def run(
        self,
        rule: str,
        ids: Sequence[str],
        matrix: np.ndarray,
        params: dict,
        round_no: int = 0,
    ) -> dict:
        """Aggregate on the fast path; when the policy says so, also with the reference and
        raise CrossCheckMismatch if the two differ in any bit."""
        t0 = time.thread_time()
        result = fast.run(rule, ids, matrix, params)
        t1 = time.thread_time()
        self.fast_s, self.ref_s = t1 - t0, 0.0
        if self.policy.wants(round_no):
            ref = audit.run(rule, list(ids), matrix.tolist(), params)
            self.ref_s = time.thread_time() - t1
            self.checked += 1
            diff = diff_results(result, ref)
            if diff is not None:
                self.mismatches += 1
                raise CrossCheckMismatch(diff)
        return result
