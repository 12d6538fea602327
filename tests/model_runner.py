# Portable replay of tests/vectors/model.json: imported by tests/test_model.py under CPython
# (which also generates the file with it) and run under the MicroPython unix port as a script
# (JSON {"cases": [...]} without expectations on stdin, a JSON list of results on stdout).
import binascii
import json
import sys

from microfed import model


def _hex(b):
    return binascii.hexlify(b).decode()


def _params(m, spec):
    if isinstance(spec, dict):
        p = m.init(spec["init"])
        for i, v in spec.get("set", []):
            p[i] = v
        return p
    return list(spec)


def _cfg(d):
    return model.TrainConfig(d["lr"], d["epochs"], d["batch"], d["seed"])


def _data(spec):
    if "shard" in spec:
        xs, ys, _ = model.decode_shard(binascii.unhexlify(spec["shard"]))
        return xs, ys
    return spec["xs"], spec["ys"]


def _out_params(p, full):
    out = {"digest": _hex(model.params_digest(p))}
    if full:
        out["params"] = p
    else:
        out["head"] = p[:8]
        out["bias"] = p[-10:]
    return out


def run(case):
    op = case["op"]
    a = case["args"]
    try:
        if op == "exp":
            return model.exp(a[0])
        if op == "softmax":
            return model.softmax(a[0])
        if op == "xorshift":
            r = model.XorShift32(a[0])
            return [r.next() for _ in range(a[1])]
        if op == "shuffle":
            r = model.XorShift32(a[0])
            order = list(range(a[1]))
            r.shuffle(order)
            return order
        if op == "derive_seed":
            return model.derive_seed(a[0], a[1], a[2])
        if op == "decode_shard":
            xs, ys, info = model.decode_shard(binascii.unhexlify(a["hex"]))
            return {"xs": xs, "ys": ys, "info": info}
        m = model.get(a["model"], **a.get("kw", {}))
        if op == "init":
            return _out_params(m.init(a["seed"]), a.get("full", False))
        if op == "logits":
            return m.logits(_params(m, a["params"]), a["x"])
        if op == "predict":
            return m.predict(_params(m, a["params"]), a["x"])
        if op == "evaluate":
            return m.evaluate(_params(m, a["params"]), _data(a["data"]))
        if op == "train":
            p = m.train(_params(m, a["params"]), _data(a["data"]), _cfg(a["cfg"]))
            return _out_params(p, a.get("full", False))
        if op == "delta":
            return m.delta(a["old"], a["new"])
        if op == "apply":
            return m.apply(a["params"], a["delta"])
        return {"error": "unknown op " + op}
    except (ValueError, TypeError) as e:
        return {"error": str(e)}


def main():
    data = json.loads(sys.stdin.read())
    sys.stdout.write(json.dumps([run(c) for c in data["cases"]]))


if __name__ == "__main__":
    main()
