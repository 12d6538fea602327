"""Generate tests/vectors/reputation.json from the reference (shared/microfed/reputation.py).

Each case is a sequence of steps (rounds and unbans) with parameters; the expected outcome of
every step, the final to_bytes() hex and a few queried weights come from the reference run on
CPython. Every other engine (MicroPython, a C port) must reproduce them bit for bit. A "decode"
section lists byte strings that from_bytes must accept (with their canonical re-encoding) or
reject. Deterministic: re-running produces an identical file.

Usage: python tools/gen_reputation_vectors.py            (writes the vector file)
       python tools/gen_reputation_vectors.py --measure  (prints the numbers quoted in
                                                          docs/reputation.md)
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "shared"))
sys.path.insert(0, str(ROOT / "tests"))

import reputation_runner  # noqa: E402

from microfed import reputation  # noqa: E402
from microfed.aggregate import dist, median  # noqa: E402
from microfed.q16 import MAX_RAW, MIN_RAW, ONE  # noqa: E402

OUT = ROOT / "tests" / "vectors" / "reputation.json"
Step = dict[str, Any]


def rnd_round(rng: random.Random, ids: list[str], d: int, spread: int,
              factors: dict[str, int] | None = None, centre: list[int] | None = None) -> Step:
    """One round: a common centre plus noise in [-spread, spread]; node k's noise is multiplied
    by factors[k] (default 1), which is how outliers and neutral-band nodes are made."""
    c = centre if centre is not None else [rng.randint(-4 * ONE, 4 * ONE) for _ in range(d)]
    vecs = []
    for k in ids:
        m = (factors or {}).get(k, 1)
        vecs.append([max(MIN_RAW, min(MAX_RAW, x + m * rng.randint(-spread, spread))) for x in c])
    return {"ids": list(ids), "vecs": vecs}


def names(n: int, prefix: str = "n") -> list[str]:
    return ["%s%d" % (prefix, i) for i in range(n)]


def case(name: str, steps: list[Step], params: dict[str, int] | None = None,
         query: list[str] | None = None) -> dict[str, Any]:
    full = reputation.ReputationBook().params()
    full.update(params or {})
    c: dict[str, Any] = {"name": name, "params": full, "steps": steps,
                         "query": query or []}
    c["expect"] = reputation_runner.run_case(c)
    return c


def build_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    for s in range(5):  # an outlier penalised every round until banned, then ignored
        rng = random.Random(100 + s)
        ids = names(5 + s % 4)
        d = 1 + s % 4
        steps = [rnd_round(rng, ids, d, ONE // 4, {ids[-1]: 40}) for _ in range(6)]
        cases.append(case("outlier-ban-s%d" % s, steps, query=ids + ["unknown"]))

    for s in range(8):  # mixed deviations, partial participation, decay on some
        rng = random.Random(200 + s)
        ids = names(7)
        decay = (0, 6554, 32768, 65536)[s % 4]
        steps = []
        for _ in range(10):
            part = sorted(rng.sample(ids, rng.randint(3, 7)))
            fac = {k: rng.choice((1, 1, 1, 2, 3, 4, 6)) for k in part}
            steps.append(rnd_round(rng, part, 1 + s % 3, 5000, fac))
        cases.append(case("mixed-s%d" % s, steps, {"decay": decay}, query=ids))

    # med == 0: a majority sends identical vectors.
    cases.append(case("med-zero-majority", [
        {"ids": names(5), "vecs": [[7, -3]] * 3 + [[7, -2], [100, 100]]}] * 3, query=names(5)))
    cases.append(case("med-zero-all-identical", [
        {"ids": names(4), "vecs": [[0, 0, 0]] * 4}] * 2, query=names(4)))
    cases.append(case("med-zero-even", [
        {"ids": names(6), "vecs": [[1], [1], [1], [1], [2], [-9]]}] * 5, query=names(6)))
    cases.append(case("med-zero-then-spread", [
        {"ids": names(4), "vecs": [[5], [5], [5], [6]]},
        {"ids": names(4), "vecs": [[5], [9], [1], [6]]}], query=names(4)))

    # no signal: too few non-banned updates, empty rounds, bigger min_cohort.
    cases.append(case("no-signal-small", [
        {"ids": [], "vecs": []},
        {"ids": ["a"], "vecs": [[1]]},
        {"ids": ["a", "b"], "vecs": [[1], [1000000]]}], query=["a", "b"]))
    rng = random.Random(300)
    steps = [rnd_round(rng, names(5), 2, 1000, {"n3": 50, "n4": 50}) for _ in range(4)]
    steps.append({"ids": names(5), "vecs": [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]})
    cases.append(case("no-signal-after-bans", steps, {"decay": 16384}, query=names(5)))
    rng = random.Random(301)
    cases.append(case("no-signal-min-cohort-5",
                      [rnd_round(rng, names(4), 3, 1000, {"n0": 30}) for _ in range(2)]
                      + [rnd_round(rng, names(5), 3, 1000, {"n0": 30}) for _ in range(2)],
                      {"min_cohort": 5}, query=names(5)))
    cases.append(case("no-signal-no-decay", [
        {"ids": names(3), "vecs": [[0], [1], [2]]},
        {"ids": ["n0"], "vecs": [[0]]}], {"decay": 65536}, query=names(3)))

    # decay: absent nodes drift toward `initial` from above and below; banned nodes do not.
    rng = random.Random(400)
    ids = names(6)
    up = [rnd_round(rng, ids, 2, 2000, {"n5": 4}) for _ in range(6)]  # n5 mostly neutral/penalty
    later = [rnd_round(rng, ids[:3] + ["m0"], 2, 2000) for _ in range(5)]
    for dec in (1, 6554, 45000, 65536):
        cases.append(case("decay-%d" % dec, up + later, {"decay": dec}, query=ids + ["m0"]))
    rng = random.Random(401)
    steps = [rnd_round(rng, names(5), 1, 100, {"n4": 1000}) for _ in range(4)]
    steps += [rnd_round(rng, names(4), 1, 100) for _ in range(3)]
    cases.append(case("decay-skips-banned", steps, {"decay": 32768}, query=names(5)))

    # unban: reset to initial, counters kept, no-op for non-banned or unknown nodes.
    rng = random.Random(500)
    ids = names(5)
    ban = [rnd_round(rng, ids, 2, 3000, {"n4": 60}) for _ in range(4)]
    cases.append(case("unban-then-honest", ban + [{"unban": "n4"}] +
                      [rnd_round(rng, ids, 2, 3000) for _ in range(3)], query=ids))
    cases.append(case("unban-then-reoffend", ban + [{"unban": "n4"}] +
                      [rnd_round(rng, ids, 2, 3000, {"n4": 60}) for _ in range(5)], query=ids))
    cases.append(case("unban-noops", ban[:2] + [{"unban": "n0"}, {"unban": "ghost"},
                                                 {"unban": "n4"}], query=ids + ["ghost"]))
    cases.append(case("unban-twice", ban + [{"unban": "n4"}, {"unban": "n4"}], {"decay": 100},
                      query=ids))

    # even cohorts: rdiv in the coordinate median and in the median of deviations.
    for s in range(4):
        rng = random.Random(600 + s)
        ids = names(4 + 2 * s)
        steps = [{"ids": ids, "vecs": [[rng.randint(-7, 7) for _ in range(3)] for _ in ids]}
                 for _ in range(6)]
        cases.append(case("even-rounding-s%d" % s, steps, query=ids))

    # huge values: int32 extremes, distances far beyond 64 bits.
    for s in range(3):
        rng = random.Random(700 + s)
        ids = names(5 + s)
        d = 4 + 2 * s
        steps = []
        for _ in range(5):
            vecs = [[rng.choice((MIN_RAW, MAX_RAW, rng.randint(MIN_RAW, MAX_RAW)))
                     for _ in range(d)] for _ in ids]
            steps.append({"ids": ids, "vecs": vecs})
        steps.append(rnd_round(rng, ids, d, 1 << 28, centre=[0] * d))
        cases.append(case("huge-s%d" % s, steps, query=ids))
    top = [MAX_RAW, MAX_RAW - 1, MAX_RAW - 3, MAX_RAW - 2]
    cases.append(case("huge-outlier", [
        {"ids": names(5), "vecs": [[v, -v] for v in top] + [[MIN_RAW, MAX_RAW]]}] * 4,
        query=names(5)))

    # parameter corners.
    rng = random.Random(800)
    ids = names(6)
    base = [rnd_round(rng, ids, 3, 4000, {"n4": 2, "n5": 5}) for _ in range(8)]
    for pname, params in (
        ("params-bands-1-1", {"reward_band": 1, "penalty_band": 1}),
        ("params-one-strike", {"penalty": ONE}),
        ("params-never-ban", {"ban_below": 0}),
        ("params-reward-one", {"reward": ONE}),
        ("params-initial-one", {"initial": ONE, "decay": 3000}),
        ("params-initial-zero", {"initial": 0, "ban_below": 1}),
        ("params-wide-bands", {"reward_band": 100, "penalty_band": 65536}),
    ):
        cases.append(case(pname, base, params, query=ids + ["new"]))

    # rejected rounds leave the book untouched.
    rng = random.Random(900)
    ids = names(4)
    good = rnd_round(rng, ids, 2, 500)
    bad: list[Step] = [
        {"ids": ["n0", "n0", "n1"], "vecs": [[1, 1], [1, 1], [2, 2]]},
        {"ids": ids, "vecs": [[1, 1], [1], [2, 2], [3, 3]]},
        {"ids": ids, "vecs": [[], [], [], []]},
        {"ids": ids, "vecs": [[1, 1], [1.5, 1], [2, 2], [3, 3]]},
        {"ids": ids, "vecs": [[1, 1], [True, 1], [2, 2], [3, 3]]},
        {"ids": ids, "vecs": [[1, 1], [MAX_RAW + 1, 1], [2, 2], [3, 3]]},
        {"ids": ids[:3] + ["x" * 65], "vecs": [[1, 1], [1, 1], [2, 2], [3, 3]]},
        {"ids": ids[:3] + [""], "vecs": [[1, 1], [1, 1], [2, 2], [3, 3]]},
        {"ids": ids, "vecs": [[1, 1], [1, 1], [2, 2]]},
        {"ids": ids[:3] + [7], "vecs": [[1, 1], [1, 1], [2, 2], [3, 3]]},
    ]
    for k in range(0, len(bad), 3):
        cases.append(case("error-rounds-%d" % k, [good] + bad[k:k + 3] + [good],
                          query=ids))

    # deviations exactly on the band edges: dev == 4 * med is a reward, dev == 9 * med neutral.
    rng = random.Random(950)
    edges: list[Step] = []
    while len(edges) < 4:
        ids = names(rng.choice((7, 8)))
        vecs = [[rng.randint(-12, 12) for _ in range(2)] for _ in ids]
        ref = median(vecs)
        devs = [dist(v, ref) for v in vecs]
        m = reputation.median_int(devs)
        if m > 0 and 4 * m in devs and 9 * m in devs:
            edges.append({"ids": ids, "vecs": vecs})
    cases.append(case("band-edges", edges, {"ban_below": 0}, query=names(8)))

    # non-ASCII ids: canonical order is by UTF-8 bytes.
    uids = ["z", "\u00e9", "a", "\u65e5\u672c", "\U0001f600", "A"]
    rng = random.Random(1000)
    cases.append(case("unicode-ids", [rnd_round(rng, uids, 2, 1000, {"A": 80})
                                      for _ in range(5)], query=uids))

    # weights across the range (cap 0.8 reached above rep ~0.928), late joiners.
    rng = random.Random(1100)
    ids = names(8)
    steps = [rnd_round(rng, ids[:5], 2, 1000, {"n4": 3}) for _ in range(25)]
    steps += [rnd_round(rng, ids, 2, 1000, {"n7": 90}) for _ in range(3)]
    cases.append(case("weights-and-late-joiners", steps, query=ids + ["unseen"]))
    return cases


def decode_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    good = bytes.fromhex(next(c for c in cases if c["name"] == "unicode-ids")["expect"]["hex"])
    empty = reputation.ReputationBook().to_bytes()

    def node(idb: bytes, rep: int = 1000, flags: int = 0) -> bytes:
        return bytes([len(idb)]) + idb + struct.pack("<IBIII", rep, flags, 1, 0, 1)

    def book(*nodes: bytes, head: bytes = empty[:37]) -> bytes:
        return head + struct.pack("<I", len(nodes)) + b"".join(nodes)

    params = bytearray(empty[:37])
    blobs: list[tuple[str, bytes]] = [
        ("valid", good),
        ("valid-empty", empty),
        ("valid-one-node", book(node(b"a"))),
        ("empty-input", b""),
        ("truncated-header", empty[:20]),
        ("truncated-count", good[:40]),
        ("truncated-node", good[:-1]),
        ("truncated-records", good[:44]),
        ("trailing-byte", good + b"\x00"),
        ("bad-magic", b"MFRQ" + good[4:]),
        ("version-2", good[:4] + b"\x02" + good[5:]),
        ("count-too-big", empty[:37] + struct.pack("<I", 70000)),
        ("count-exceeds-data", empty[:37] + struct.pack("<I", 3) + node(b"a")),
        ("id-length-0", book(b"\x00" + struct.pack("<IBIII", 0, 0, 0, 0, 0) + b"\x00")),
        ("id-length-65", book(node(b"x" * 65))),
        ("id-overlong-utf8", book(node(b"\xc0\x80"))),
        ("id-surrogate-utf8", book(node(b"\xed\xa0\x80"))),
        ("id-truncated-utf8", book(node(b"\xe6\x97"))),
        ("id-above-10ffff", book(node(b"\xf4\x90\x80\x80"))),
        ("ids-unsorted", book(node(b"b"), node(b"a"))),
        ("ids-duplicate", book(node(b"a"), node(b"a"))),
        ("rep-above-one", book(node(b"a", ONE + 1))),
        ("flags-2", book(node(b"a", 0, 2))),
        ("banned-rep-too-high", book(node(b"a", 13107, 1))),
        ("banned-ok", book(node(b"a", 13106, 1))),
    ]
    for label, off, val in (("reward-above-one", 9, ONE + 1), ("bands-swapped", 21, 10),
                            ("band-zero", 21, 0), ("min-cohort-2", 33, 2),
                            ("decay-above-one", 29, 1 << 31)):
        p = bytearray(params)
        p[off:off + 4] = struct.pack("<I", val)
        blobs.append(("param-" + label, book(node(b"a"), head=bytes(p))))
    out = []
    for label, blob in blobs:
        out.append({"name": label, "hex": blob.hex(),
                    "expect": reputation_runner.run_decode(blob.hex())})
    return out


def check_coverage(cases: list[dict[str, Any]]) -> None:
    seen = set()
    for c in cases:
        for st in c["expect"]["steps"]:
            seen.update(st.get("verdicts", {}).values())
            if st.get("unban"):
                seen.add("unban")
            if "error" in st:
                seen.add("error")
    need = {"reward", "penalty", "neutral", "banned", "no_signal", "unban", "error"}
    if need - seen:
        raise SystemExit("vector coverage incomplete: missing %s" % sorted(need - seen))


def measure() -> None:
    import reputation_scenarios as sc

    print("honest-only, 100 rounds, 10 clients (bans, penalties, min rep):")
    for label, kw in (
        ("d=50 signal 1.0 noise 2.0", {"signal": ONE, "noise": 2 * ONE}),
        ("d=50 signal 1.0 noise 2.0, scales 0.5..2", {"signal": ONE, "noise": 2 * ONE,
                                                     "scales": (0.5, 2.0)}),
        ("d=50 huge: signal 2^28 noise 2^28", {"signal": 2.0 ** 28, "noise": 2.0 ** 28}),
        ("d=5 signal 1.0 noise 1.0, scales 0.5..2", {"signal": ONE, "noise": ONE, "d": 5,
                                                    "scales": (0.5, 2.0)}),
        ("d=50 signal 1.0 noise 1.0, scales 0.5..3", {"signal": ONE, "noise": ONE,
                                                     "scales": (0.5, 3.0)}),
    ):
        for seed in range(3):
            book, verdicts = sc.replay(sc.honest_rounds(seed, 100, **kw))  # type: ignore[arg-type]
            pen = sum(1 for v in verdicts for x in v.values() if x == "penalty")
            low = min(book.rep(k) for k in book.nodes())
            print("  %-44s seed %d: banned %d, penalties %d, min rep %d (%.3f)"
                  % (label, seed, len(book.banned()), pen, low, low / ONE))
    print("one honest client k times noisier than the 9 others (signal 1, noise 1),")
    print("round at which it is banned within 100 rounds (None = never), 3 seeds:")
    for d in (50, 5):
        for k in (2.0, 2.5, 2.8, 3.0, 3.5):
            r = [sc.rounds_to_ban(sc.honest_rounds(s, 100, d=d, signal=ONE, noise=ONE,
                                                   scale_list=[1.0] * 9 + [k]), "h9")
                 for s in range(3)]
            print("  d = %2d, k = %.1f: %s" % (d, k, r))
    print("rounds to ban (10 honest + 1 attacker, noise 1.0, 5 seeds):")
    for snr in (0.5, 1.0, 1.5, 2.0, 4.0):
        for aname, fn in (("sign-flip", sc.sign_flip), ("scale x10", sc.scale10)):
            r = [sc.rounds_to_ban(sc.honest_rounds(s, 30, signal=snr * ONE, noise=ONE,
                                                   attackers={"x": fn}), "x") for s in range(5)]
            print("  signal/noise %.1f %-9s: %s" % (snr, aname, r))


def main() -> int:
    if "--measure" in sys.argv[1:]:
        measure()
        return 0
    cases = build_cases()
    check_coverage(cases)
    doc = {"about": "Reputation vectors: generated by tools/gen_reputation_vectors.py from "
                    "shared/microfed/reputation.py; spec in docs/reputation.md.",
           "cases": cases, "decode": decode_cases(cases)}
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print("wrote %s: %d cases, %d decode cases" % (OUT, len(cases), len(doc["decode"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
