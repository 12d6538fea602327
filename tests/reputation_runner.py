# Portable replay of reputation sequences: the same code runs under CPython (imported by
# tests/test_reputation.py and tools/gen_reputation_vectors.py) and under the MicroPython unix
# port (run as a script: JSON {"cases": [...], "decode": [hex, ...]} on stdin,
# {"results": [...], "decode": [...]} on stdout).
#
# A case is {"params": {...}, "steps": [step, ...], "query": [node ids]} where a step is
# {"ids": [...], "vecs": [[...], ...]} (one round) or {"unban": node}. The result records every
# step's outcome, the final to_bytes() in hex, and weight/rep/banned for the queried ids.
import json
import sys

from microfed import reputation

try:
    from binascii import hexlify, unhexlify
except ImportError:
    from ubinascii import hexlify, unhexlify


def make_book(params):
    return reputation.ReputationBook(**params)


def run_step(book, step):
    if "unban" in step:
        return {"unban": book.unban(step["unban"])}
    before = book.to_bytes()
    try:
        verdicts = book.observe(step["ids"], step["vecs"])
    except ValueError as e:
        if book.to_bytes() != before:  # a rejected round must leave the book untouched
            return {"error": "state changed by a rejected round: " + str(e)}
        return {"error": str(e)}
    return {"verdicts": verdicts}


def run_case(case):
    book = make_book(case["params"])
    steps = [run_step(book, s) for s in case["steps"]]
    q = {}
    for node in case.get("query", []):
        q[node] = [book.rep(node), book.weight(node), book.is_banned(node)]
    blob = book.to_bytes()
    again = reputation.from_bytes(blob).to_bytes()
    return {"steps": steps, "hex": hexlify(blob).decode(), "query": q,
            "banned": book.banned(), "roundtrip": again == blob}


def run_decode(hexstr):
    try:
        book = reputation.from_bytes(unhexlify(hexstr))
    except ValueError as e:
        return {"error": str(e)}
    return {"ok": hexlify(book.to_bytes()).decode()}


def main():
    data = json.loads(sys.stdin.read())
    out = {"results": [run_case(c) for c in data.get("cases", [])],
           "decode": [run_decode(h) for h in data.get("decode", [])]}
    sys.stdout.write(json.dumps(out))


if __name__ == "__main__":
    main()
