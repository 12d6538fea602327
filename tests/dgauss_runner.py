# Portable sampler runner: the same code runs under CPython (imported by tests/test_dgauss.py
# and tests/test_dp.py) and under the MicroPython unix port (as a script: a JSON list of jobs
# on stdin, one JSON list of results on stdout). Big integers travel as decimal strings.
import hashlib
import json
import sys

from microfed import dgauss, dp


def run_job(job):
    kind = job["kind"]
    if kind == "sample":
        g = dgauss.DGauss(int(job["num"]), int(job["den"]))
        src = dgauss.Sha256Stream(job["key"].encode())
        hist = {}
        keep = []
        h = hashlib.sha256()
        for i in range(job["n"]):
            x = g.sample(src)
            hist[x] = hist.get(x, 0) + 1
            if i < job["keep"]:
                keep.append(x)
            h.update(str(x).encode() + b",")
        return {"hist": [[k, hist[k]] for k in sorted(hist)], "first": keep,
                "sha256": "".join(["%02x" % b for b in h.digest()]),
                "stream_blocks": src.ctr}
    if kind == "privatize":
        nd = dp.NodeDP(int(job["clip"]), int(job["num"]), int(job["den"]), "seeded",
                       job["seed"], job["node"], int(job["limit"]))
        return {"out": nd.apply([int(v) for v in job["delta"]], job["round"])}
    if kind == "clip":
        return {"out": dp.l2_clip([int(v) for v in job["values"]], int(job["bound"]))}
    raise ValueError("unknown job kind %r" % kind)


def main():
    jobs = json.loads(sys.stdin.read())
    print(json.dumps([run_job(j) for j in jobs]))


if __name__ == "__main__":
    main()
