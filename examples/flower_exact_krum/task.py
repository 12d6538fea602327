"""The example's task, in its own module so Ray's workers can import it (a function defined in
``__main__`` does not pickle by reference): data shards, the model, the ClientApp."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from microfed_host.data import shard, train_test_split
from microfed_host.float_baseline import FloatSoftmax, features

SEED = 1
LR = 0.5
BATCH = 8
MODEL = FloatSoftmax(64, 10)


@lru_cache(maxsize=4)
def shards(n_clients: int) -> tuple:
    split = train_test_split(SEED)
    return tuple(shard(split.train, n_clients, "iid", SEED)), split.test


def client_app(n_attackers: int, boost: float) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        n = int(context.node_config["num-partitions"])
        ds = shards(n)[0][pid]
        glob = msg.content["arrays"]["params"].numpy()
        rnd = int(msg.content["config"]["server-round"])
        new = MODEL.train(glob, features(ds.x), ds.y, LR, 1, BATCH, seed=SEED * 1000 + pid + rnd)
        if pid < n_attackers:
            new = glob - boost * (new - glob)  # sign-flip: the honest step, reversed
        reply = RecordDict({
            "arrays": ArrayRecord({"params": Array(new)}),
            "metrics": MetricRecord({"num-examples": len(ds)}),
        })
        return Message(content=reply, reply_to=msg)

    return app
