# Batch driver for the audit contract, used to run the reference under any interpreter
# (the host's `--engine micropython` and the test suite). Reads a JSON list of requests on
# stdin, writes a JSON list of {"ok": result} / {"error": message} on stdout.
import sys
import json

from microfed import audit
from microfed.aggregate import AggregationError


def handle(req):
    try:
        rule, ids, vecs, params = audit.parse(req)
        return {"ok": audit.run(rule, ids, vecs, params)}
    except (audit.InputError, AggregationError) as e:
        return {"error": str(e)}


def main():
    reqs = json.loads(sys.stdin.read())
    out = []
    for r in reqs:
        out.append(handle(r))
    sys.stdout.write(json.dumps(out))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
