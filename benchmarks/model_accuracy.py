"""Q16.16 model vs its float64 twin on the reference task, plus local-training time.

    .venv/bin/python benchmarks/model_accuracy.py [--epochs 10] [--rounds 30] [--json OUT]

1. Central training on the digits train split, test accuracy per epoch, Q16.16 and float64
   on the same init, sample order, batches and learning rate.
2. A federated run (no attackers): N nodes, one local epoch per round, FedAvg and Krum over
   the deltas, IID and Dirichlet(0.5) shards; final test accuracy Q16.16 vs float64.
3. Time of one local epoch over a node's shard (~144 samples) on the MicroPython unix port and
   on CPython, measured inside each interpreter (start-up excluded), with the ratio.
Numbers go to docs/model.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from microfed import aggregate, model
from microfed_host import data, upy
from microfed_host import float_baseline as fb

LR = 32768
BATCH = 10


def central(split: data.Split, epochs: int) -> dict:
    m, f = model.get("softmax"), fb.FloatSoftmax()
    train, test = split.train.as_lists(), split.test.as_lists()
    xf, xt = fb.features(split.train.x), fb.features(split.test.x)
    p, pf = m.init(1), f.init(1)
    rows = []
    for ep in range(epochs):
        p = m.train(p, train, model.TrainConfig(LR, 1, BATCH, 100 + ep))
        pf = f.train(pf, xf, split.train.y, LR / 65536, 1, BATCH, 100 + ep)
        rows.append({"epoch": ep + 1, "q16": m.evaluate(p, test) / len(test[1]),
                     "float64": f.accuracy(pf, xt, split.test.y)})
    # The two runs really are different arithmetic: the largest parameter gap, in Q16.16 ulps.
    gap = float(np.max(np.abs(np.asarray(p, dtype=np.float64) - pf * 65536)))
    return {"per_epoch": rows, "max_param_gap_raw": gap}


def float_krum(deltas: np.ndarray, ids: list[str], f: int) -> np.ndarray:
    n = len(deltas)
    d2 = ((deltas[:, None, :] - deltas[None, :, :]) ** 2).sum(axis=2)
    scores = [np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)]
    best = min(range(n), key=lambda i: (scores[i], ids[i]))
    return deltas[best]


def federated(split: data.Split, nodes: int, rounds: int, how: str, rule: str, seed: int) -> dict:
    m, fm = model.get("softmax"), fb.FloatSoftmax()
    shards = data.shard(split.train, nodes, how, seed, alpha=0.5)
    ids = [f"node-{i:02d}" for i in range(nodes)]
    sizes = [len(s) for s in shards]
    lists = [s.as_lists() for s in shards]
    feats = [fb.features(s.x) for s in shards]
    test = split.test.as_lists()
    xt = fb.features(split.test.x)
    g, gf = m.init(1), fm.init(1)
    acc_q, acc_f = [], []
    for r in range(rounds):
        deltas, fdeltas = [], []
        for i in range(nodes):
            s = model.derive_seed(seed, r, ids[i])
            deltas.append(m.delta(g, m.train(g, lists[i], model.TrainConfig(LR, 1, BATCH, s))))
            fdeltas.append(fm.train(gf, feats[i], shards[i].y, LR / 65536, 1, BATCH, s) - gf)
        fd = np.stack(fdeltas)
        if rule == "krum":
            agg = aggregate.krum(ids, deltas, 3)[0]
            fagg = float_krum(fd, ids, 3)
        else:
            agg = aggregate.fedavg(deltas, sizes)
            fagg = np.average(fd, axis=0, weights=sizes)
        g = m.apply(g, agg)
        gf = gf + fagg
        acc_q.append(m.evaluate(g, test) / len(test[1]))
        acc_f.append(fm.accuracy(gf, xt, split.test.y))
    return {"split": how, "rule": rule, "nodes": nodes, "rounds": rounds,
            "q16": acc_q, "float64": acc_f}


TIMING = """
import time, sys
from microfed import model
xs, ys, info = model.decode_shard(open(sys.argv[1], 'rb').read())
m = model.get('softmax')
p = m.init(1)
clock = getattr(time, 'perf_counter', None) or time.time
best = None
for r in range(7):
    t0 = clock()
    p = m.train(p, (xs, ys), model.TrainConfig(32768, 1, 10, r))
    dt = clock() - t0
    best = dt if best is None or dt < best else best
print(info['n_samples'], int(best * 1e6))
"""


def timing(split: data.Split, nodes: int) -> dict:
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        shard = data.shard(split.train, nodes, "iid", 0)[0]
        path = data.write_shard(Path(tmp) / "shard.mfds", shard)
        script = Path(tmp) / "t.py"
        script.write_text(TIMING)
        import subprocess

        res = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                             text=True, check=True, env={"PYTHONPATH": str(upy.SHARED)})
        n, us = res.stdout.split()
        out["samples"] = int(n)
        out["cpython_ms"] = int(us) / 1000
        try:
            n2, us2 = upy.run([str(script), str(path)]).split()
            out["micropython_ms"] = int(us2) / 1000
            out["ratio_micropython_over_cpython"] = out["micropython_ms"] / out["cpython_ms"]
        except upy.MicroPythonError as e:
            out["micropython_error"] = str(e)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    split = data.train_test_split(args.seed)
    t0 = time.time()
    res: dict = {"train": len(split.train), "test": len(split.test), "lr": LR / 65536,
                 "batch": BATCH}
    res["central"] = central(split, args.epochs)
    print("central (test accuracy per epoch, q16 / float64):")
    for row in res["central"]["per_epoch"]:
        print(f"  epoch {row['epoch']:2d}: {row['q16']:.4f} / {row['float64']:.4f}")
    print(f"  largest |param q16 - param float64| after training: "
          f"{res['central']['max_param_gap_raw']:.1f} raw (1 raw = 2^-16)")
    res["federated"] = []
    print(f"federated, {args.nodes} nodes, {args.rounds} rounds, 1 local epoch:")
    print("| split | rule | Q16.16 | float64 | gap (points) |")
    print("| --- | --- | --- | --- | --- |")
    for how in ("iid", "dirichlet"):
        for rule in ("fedavg", "krum"):
            r = federated(split, args.nodes, args.rounds, how, rule, args.seed)
            res["federated"].append(r)
            gap = 100 * (r["q16"][-1] - r["float64"][-1])
            print(f"| {how} | {rule} | {r['q16'][-1]:.4f} | {r['float64'][-1]:.4f} | {gap:+.2f} |",
                  flush=True)
    res["timing"] = timing(split, args.nodes)
    print("local epoch time:", json.dumps(res["timing"]))
    res["wall_s"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
