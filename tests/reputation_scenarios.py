"""Synthetic federated rounds for the reputation tests and the measurements in docs/reputation.md.

Each round has a common direction g (what the honest clients agree on; Gaussian, per-coordinate
std `signal`) and per-client noise (Gaussian, std `noise * scale_i`, scale_i fixed per client so
clients are persistently heterogeneous). All values are Q16.16 raw ints, saturated to int32.
CPython only (uses `random`); the resulting rounds are plain lists and replay anywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from microfed import q16
from microfed.reputation import ReputationBook

Vec = list[int]
Attack = Callable[[Vec, Vec, random.Random], Vec]


def _sat(x: float) -> int:
    return q16.sat(int(round(x)))


def honest_rounds(
    seed: int,
    rounds: int,
    n: int = 10,
    d: int = 50,
    signal: float = 65536.0,
    noise: float = 131072.0,
    scales: tuple[float, float] = (1.0, 1.0),
    attackers: dict[str, Attack] | None = None,
    scale_list: list[float] | None = None,
) -> list[dict]:
    """`rounds` rounds of n honest clients h0..h{n-1}, plus one update per attacker id.

    Client i's noise std is noise * scale_i, scale_i spread linearly over `scales` unless
    `scale_list` gives them one by one.

    An attacker's function gets (its own honest update, the round's common vector g, rng)
    and returns what it sends."""
    rng = random.Random(seed)
    lo, hi = scales
    scale = scale_list or [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    attackers = attackers or {}
    out = []
    for _ in range(rounds):
        g = [rng.gauss(0.0, signal) for _ in range(d)]
        ids, vecs = [], []
        for i in range(n):
            ids.append("h%d" % i)
            vecs.append([_sat(x + rng.gauss(0.0, noise * scale[i])) for x in g])
        for a in sorted(attackers):
            own = [_sat(x + rng.gauss(0.0, noise)) for x in g]
            ids.append(a)
            vecs.append(attackers[a](own, [_sat(x) for x in g], rng))
        out.append({"ids": ids, "vecs": vecs})
    return out


def sign_flip(own: Vec, g: Vec, rng: random.Random) -> Vec:
    return [q16.sat(-x) for x in own]


def scale10(own: Vec, g: Vec, rng: random.Random) -> Vec:
    return [q16.sat(10 * x) for x in own]


def replay(rounds: list[dict], book: ReputationBook | None = None) -> tuple[ReputationBook, list[dict]]:
    book = book or ReputationBook()
    verdicts = [book.observe(r["ids"], r["vecs"]) for r in rounds]
    return book, verdicts


def rounds_to_ban(rounds: list[dict], node: str, book: ReputationBook | None = None) -> int | None:
    """1-based round after which `node` is banned, or None."""
    book = book or ReputationBook()
    for i, r in enumerate(rounds):
        book.observe(r["ids"], r["vecs"])
        if book.is_banned(node):
            return i + 1
    return None
