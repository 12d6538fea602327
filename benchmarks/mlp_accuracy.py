"""The MLP (microfed.mlp, 64-32-10) against the softmax regression on the reference task:
central training on the digits train split, test accuracy per epoch, both in Q16.16, and the
time of one epoch on CPython. Numbers go to docs/model.md ("The MLP").

    .venv/bin/python benchmarks/mlp_accuracy.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import time

from microfed import model
from microfed_host import data

RUNS = (("softmax", 32768), ("mlp", 16384))  # learning rates (raw Q16.16): 0.5 and 0.25
BATCH = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="split seed (docs/model.md uses 0)")
    a = ap.parse_args()
    split = data.train_test_split(a.seed)
    train, test = split.train.as_lists(), split.test.as_lists()
    print(f"python benchmarks/mlp_accuracy.py --epochs {a.epochs} --seed {a.seed}: "
          f"{len(train[1])} train / {len(test[1])} test digits, batch {BATCH}\n")
    print("| model | parameters | lr | " + " | ".join(f"epoch {e + 1}" for e in range(a.epochs))
          + " | s per epoch (CPython) |")
    print("| --- | ---: | ---: |" + " ---: |" * (a.epochs + 1))
    for name, lr in RUNS:
        m = model.get(name)
        p = m.init(1)
        accs, secs = [], []
        for ep in range(a.epochs):
            t0 = time.perf_counter()
            p = m.train(p, train, model.TrainConfig(lr, 1, BATCH, 100 + ep))
            secs.append(time.perf_counter() - t0)
            accs.append(100 * m.evaluate(p, test) / len(test[1]))
        print(f"| {name} | {m.n_params} | {lr / 65536:g} | "
              + " | ".join(f"{x:.2f}" for x in accs) + f" | {min(secs):.1f} |")


if __name__ == "__main__":
    main()
