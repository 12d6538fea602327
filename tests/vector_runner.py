# Portable vector runner: the same code replays tests/vectors/*.json under CPython (imported by
# the tests and by tools/gen_vectors.py) and under the MicroPython unix port (run as a script:
# JSON {"q16": [...], "aggregate": [...]} on stdin, results on stdout).
import json
import sys

from microfed import audit, q16, vecgen
from microfed.aggregate import AggregationError

FULL_VECTOR_MAX_D = 64


def run_q16(case):
    try:
        return {"expect": getattr(q16, case["op"])(*case["args"])}
    except (ZeroDivisionError, ValueError):
        return {"error": True}


def normalise(res):
    out = {"digest": res["digest"]}
    if res["d"] <= FULL_VECTOR_MAX_D:
        out["vector"] = res["vector"]
    if "scores" in res:
        out["selected"] = res["selected"]
        sc = {}
        for k in res["scores"]:
            sc[k] = str(res["scores"][k])  # big ints as strings: JSON readers differ on them
        out["scores"] = sc
    if "buckets" in res:
        out["buckets"] = res["buckets"]  # the permutation, checkable by any implementation
    return out


def run_agg(req):
    try:
        rule, ids, vecs, params = audit.parse(vecgen.expand(req))
        return normalise(audit.run(rule, ids, vecs, params))
    except (audit.InputError, AggregationError) as e:
        return {"error": str(e)}


def main():
    data = json.loads(sys.stdin.read())
    out = {"q16": [run_q16(c) for c in data.get("q16", [])],
           "aggregate": [run_agg(c["request"]) for c in data.get("aggregate", [])]}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
