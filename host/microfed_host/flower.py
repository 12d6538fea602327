"""Exact robust strategies for Flower (flwr >= 1.42, Message API): docs/flower.md.

ExactKrum, ExactMultiKrum, ExactMedian, ExactTrimmedMean and ExactFedAvg subclass Flower's
``FedAvg`` (``flwr.serverapp.strategy``) and override only ``aggregate_train``; sampling,
configuration and evaluation stay Flower's. Each round:

1. replies with errors are dropped (Flower's own ``_check_and_log_replies``); every other reply
   is checked on its own (one ArrayRecord with the model's keys, shapes and float dtypes; for
   ExactFedAvg with reported weights, one integer weight). A reply that fails, or holds NaN, an
   infinity or a value outside Q16.16, is dropped and logged (``on_invalid="drop"``, the
   default: one Byzantine client must not be able to stop the run) or raises
   (``on_invalid="raise"``, ``Q16ConversionError`` / ``ReplyRejected``);
2. the arrays become one raw Q16.16 vector per node (``microfed_host.floatedge``: round half
   up, no saturation), rows ordered by node id (``"%020d" % src_node_id``);
3. the rule runs on microfed's exact numpy fast path and, per the cross-check policy (``always``
   by default), on the portable reference too; any difference raises ``CrossCheckMismatch``;
4. the result goes back as arrays of the model's dtypes and the MetricRecord carries its SHA-256
   digest, the one ``microfed aggregate`` prints for the same request
   (``digest_hex(metrics)``), beside the client metrics Flower would aggregate.

``strategy.last_request`` is the round's request in ``microfed aggregate``'s JSON format and
``audit_dir`` writes it per round, so anyone can recompute the digest offline.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.exception import InconsistentMessageReplies
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
except ImportError as e:  # flwr missing, or older than the Message API strategies (1.42)
    raise ImportError(
        "microfed_host.flower needs Flower >= 1.42 (flwr.serverapp.strategy): "
        "pip install microfed[flower]"
    ) from e

from microfed.aggregate import AggregationError
from microfed_host.crosscheck import CrossChecker, Policy
from microfed_host.floatedge import Q16ConversionError, to_raw
from microfed_host.flowerarrays import ArrayLayout

__all__ = [
    "DIGEST_KEY",
    "ExactFedAvg",
    "ExactKrum",
    "ExactMedian",
    "ExactMultiKrum",
    "ExactTrimmedMean",
    "Q16ConversionError",
    "ReplyRejected",
    "digest_hex",
]

log = logging.getLogger("microfed.flower")

DIGEST_KEY = "microfed-digest"  # 8 x uint32, big-endian words of the SHA-256
INT32_MAX = 2147483647


class ReplyRejected(ValueError):
    """A reply whose structure does not fit the model (keys, shapes, dtypes, weight)."""

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"node {node}: {reason}")
        self.node = node
        self.reason = reason


def digest_hex(metrics: MetricRecord | dict[str, Any]) -> str:
    """The result digest carried in a strategy's MetricRecord, as ``microfed aggregate``
    prints it (64 hex digits)."""
    words = metrics[DIGEST_KEY]
    if not isinstance(words, list) or len(words) != 8:
        raise ValueError(f"{DIGEST_KEY} must be a list of 8 ints")
    return "".join("%08x" % int(w) for w in words)


def _digest_words(hexdigest: str) -> list[int]:
    return [int(hexdigest[i : i + 8], 16) for i in range(0, 64, 8)]


def default_node_id(msg: Message) -> str:
    """The id a reply aggregates under: the SuperLink's src_node_id, zero-padded so string
    order (Krum's tie-break, docs/determinism.md) is numeric order. Not client-controlled."""
    return "%020d" % msg.metadata.src_node_id


class _ExactBase(FedAvg):
    """What every exact strategy shares; subclasses name the rule and its parameters."""

    rule = ""

    def __init__(
        self,
        *,
        crosscheck: str = "always",
        on_invalid: str = "drop",
        audit_dir: str | None = None,
        node_id_fn: Callable[[Message], str] = default_node_id,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if on_invalid not in ("drop", "raise"):
            raise ValueError(f"on_invalid must be 'drop' or 'raise', not {on_invalid!r}")
        self.checker = CrossChecker(Policy.parse(crosscheck))
        self.on_invalid = on_invalid
        self.audit_dir = audit_dir
        self.node_id_fn = node_id_fn
        self.layout: ArrayLayout | None = None
        self._last_input: tuple[list[str], np.ndarray, dict] | None = None
        self.last_result: dict | None = None
        self.digests: dict[int, str] = {}

    @property
    def last_request(self) -> dict | None:
        """The last round's request in `microfed aggregate`'s JSON format (built on demand:
        n x d Python ints cost more than the aggregation itself)."""
        if self._last_input is None:
            return None
        return self._request(*self._last_input)

    # -- what subclasses supply ---------------------------------------------------------------
    def _params(self, n: int) -> dict:
        return {}

    def _weight(self, node: str, content: RecordDict) -> int:
        return 1

    # -- Flower hooks ---------------------------------------------------------------------------
    def summary(self) -> None:
        log.info("%s: microfed exact %s, cross-check %s, invalid replies: %s",
                 type(self).__name__, self.rule, self.checker.policy.mode, self.on_invalid)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's, remembering the model's layout: replies are checked against the server's
        own model, not against whichever reply came first."""
        self.layout = ArrayLayout.of(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the replies' ArrayRecords exactly; the MetricRecord carries the digest."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid_replies:
            return None, None
        named = sorted(((self.node_id_fn(m), m) for m in valid_replies), key=lambda t: t[0])
        layout = self.layout or self._layout_from(named)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        weights: list[int] = []
        contents: dict[str, RecordDict] = {}
        rejected = 0
        for node, msg in named:
            try:
                if node in contents:
                    raise ReplyRejected(node, "duplicate node id")
                row = self._unpack(node, msg.content, layout)
                w = self._weight(node, msg.content)
            except (ReplyRejected, Q16ConversionError) as e:
                if self.on_invalid == "raise":
                    raise
                rejected += 1
                log.warning("round %d: dropped the reply of %s", server_round, e)
                continue
            ids.append(node)
            rows.append(row)
            weights.append(w)
            contents[node] = msg.content
        if not ids:
            log.warning("round %d: no usable reply; the model is unchanged", server_round)
            return None, MetricRecord({"microfed-rejected": rejected, "microfed-skipped": 1})
        matrix = np.empty((len(rows), layout.size), dtype=np.int32)
        for i, row in enumerate(rows):
            matrix[i] = row  # in int32 range: to_raw checked
        params = self._params(len(ids))
        if self.rule == "fedavg":
            params["weights"] = weights
        self._last_input = (ids, matrix, params)
        if self.audit_dir:
            os.makedirs(self.audit_dir, exist_ok=True)
            path = os.path.join(self.audit_dir, "round-%04d.json" % server_round)
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(self.last_request, fh, separators=(",", ":"))
        checked_before = self.checker.checked
        try:
            result = self.checker.run(self.rule, ids, matrix, params, round_no=server_round)
        except AggregationError as e:
            # Too few usable replies for the rule (e.g. Krum's n >= 2f + 3): skip the round
            # loudly, as Flower's Bulyan does, rather than fall back to another rule.
            log.warning("round %d: %s cannot aggregate %d replies: %s; the model is unchanged",
                        server_round, self.rule, len(ids), e)
            return None, MetricRecord({"microfed-rejected": rejected, "microfed-skipped": 1})
        self.last_result = result
        self.digests[server_round] = result["digest"]
        arrays = layout.arrays(np.asarray(result["vector"], dtype=np.int64))
        used = [contents[s] for s in result.get("selected", ids)]
        metrics = self._client_metrics(used)
        metrics[DIGEST_KEY] = _digest_words(result["digest"])
        metrics["microfed-n"] = len(ids)
        metrics["microfed-rejected"] = rejected
        metrics["microfed-checked"] = int(self.checker.checked > checked_before)
        log.info("round %d: %s over %d replies (%d dropped), digest %s", server_round,
                 self.rule, len(ids), rejected, result["digest"])
        return arrays, metrics

    # -- helpers --------------------------------------------------------------------------------
    def _layout_from(self, named: list[tuple[str, Message]]) -> ArrayLayout:
        # aggregate_train called without configure_train (tests, custom loops): the first
        # reply in node-id order that has one ArrayRecord defines the layout.
        for _, msg in named:
            if len(msg.content.array_records) == 1:
                return ArrayLayout.of(next(iter(msg.content.array_records.values())))
        raise ReplyRejected("*", "no reply holds exactly one ArrayRecord")

    def _unpack(self, node: str, content: RecordDict, layout: ArrayLayout) -> np.ndarray:
        if len(content.array_records) != 1:
            raise ReplyRejected(node, f"{len(content.array_records)} ArrayRecords, expected 1")
        rec = next(iter(content.array_records.values()))
        if not layout.keys:
            raise ReplyRejected(node, "the model has no arrays")
        if tuple(rec.keys()) != layout.keys:
            raise ReplyRejected(node, f"array keys {list(rec.keys())}, expected "
                                      f"{list(layout.keys)}")
        parts = []
        for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes, strict=True):
            try:
                a = rec[key].numpy()
            except Exception as e:  # malformed bytes from a client: a rejection, not a crash
                raise ReplyRejected(node, f"array {key!r} does not decode: {e}") from None
            if a.shape != shape or a.dtype != dtype:
                raise ReplyRejected(node, f"array {key!r} is {a.dtype}{list(a.shape)}, expected "
                                          f"{dtype}{list(shape)}")
            try:
                parts.append(to_raw(a, key))
            except Q16ConversionError as e:
                raise e.with_node(node) from None
        return np.concatenate(parts)

    def _request(self, ids: list[str], matrix: np.ndarray, params: dict) -> dict:
        req: dict[str, Any] = {"rule": self.rule}
        for k, v in params.items():
            if k != "weights":
                req[k] = v
        ups = []
        for i, node in enumerate(ids):
            u: dict[str, Any] = {"node": node, "vector": matrix[i].tolist()}
            if self.rule == "fedavg":
                u["weight"] = params["weights"][i]
            ups.append(u)
        req["updates"] = ups
        return req

    def _client_metrics(self, used: list[RecordDict]) -> MetricRecord:
        """Flower's aggregation of the clients' own metrics over the replies the rule used
        (Krum: the selected ones), when they are consistent; otherwise none."""
        try:
            validate_message_reply_consistency(used, self.weighted_by_key, False)
            agg = self.train_metrics_aggr_fn(used, self.weighted_by_key)
        except (InconsistentMessageReplies, TypeError, ValueError, ZeroDivisionError) as e:
            log.info("client metrics not aggregated: %s", e)
            return MetricRecord()
        return MetricRecord({k: v for k, v in agg.items() if not k.startswith("microfed-")})


class ExactKrum(_ExactBase):
    """Krum (Blanchard et al. 2017) as docs/determinism.md pins it: exact integer distances,
    score = sum of the n - f - 2 smallest, ties by node id; the winner's update unweighted.
    ``num_malicious_nodes`` is f (needs n >= 2f + 3 usable replies)."""

    rule = "krum"

    def __init__(self, *, num_malicious_nodes: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_malicious_nodes = num_malicious_nodes

    def _params(self, n: int) -> dict:
        return {"f": self.num_malicious_nodes}


class ExactMultiKrum(_ExactBase):
    """Multi-Krum: the ``num_nodes_to_select`` best Krum scores, averaged unweighted with the
    round-half-up rule (Flower's MultiKrum weights them by num-examples; this does not)."""

    rule = "multi_krum"

    def __init__(
        self, *, num_malicious_nodes: int = 0, num_nodes_to_select: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_malicious_nodes = num_malicious_nodes
        self.num_nodes_to_select = num_nodes_to_select

    def _params(self, n: int) -> dict:
        return {"f": self.num_malicious_nodes, "m": self.num_nodes_to_select}


class ExactMedian(_ExactBase):
    """Coordinate-wise median; an even count averages the middle two, rounding half up."""

    rule = "median"


class ExactTrimmedMean(_ExactBase):
    """Coordinate-wise trimmed mean dropping ``trim`` values from each end; by default
    ``trim = int(beta * n)``, the cut Flower's FedTrimmedAvg makes for the same ``beta``."""

    rule = "trimmed_mean"

    def __init__(self, *, beta: float = 0.2, trim: int | None = None, **kwargs: Any) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError("`beta` must be in the range [0, 0.5).")
        if trim is not None and trim < 0:
            raise ValueError("`trim` must be >= 0")
        super().__init__(**kwargs)
        self.beta = beta
        self.trim = trim

    def _params(self, n: int) -> dict:
        return {"trim": self.trim if self.trim is not None else int(self.beta * n)}


class ExactFedAvg(_ExactBase):
    """Weighted mean, exact. ``weights="uniform"`` (default) gives every usable reply weight 1:
    the num-examples a client reports is its own claim, so a Byzantine client could otherwise
    give itself any share of the average. ``weights="reported"`` uses the reply's
    ``weighted_by_key`` metric (an integer in [0, 2^31 - 1], else the reply is dropped), capped
    at ``max_weight`` when given."""

    rule = "fedavg"

    def __init__(
        self, *, weights: str = "uniform", max_weight: int | None = None, **kwargs: Any
    ) -> None:
        if weights not in ("uniform", "reported"):
            raise ValueError(f"weights must be 'uniform' or 'reported', not {weights!r}")
        if max_weight is not None and not 1 <= max_weight <= INT32_MAX:
            raise ValueError("max_weight must be in [1, 2^31 - 1]")
        super().__init__(**kwargs)
        self.weights = weights
        self.max_weight = max_weight

    def _weight(self, node: str, content: RecordDict) -> int:
        if self.weights == "uniform":
            return 1
        if len(content.metric_records) != 1:
            raise ReplyRejected(node, "reported weights need exactly one MetricRecord")
        rec = next(iter(content.metric_records.values()))
        w = rec.get(self.weighted_by_key)
        if isinstance(w, float) and w.is_integer():
            w = int(w)
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= INT32_MAX:
            raise ReplyRejected(node, f"weight {self.weighted_by_key!r} = {w!r} is not an "
                                      "integer in [0, 2^31 - 1]")
        if self.max_weight is not None:
            w = min(w, self.max_weight)
        return w
