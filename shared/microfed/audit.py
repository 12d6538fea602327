# The audit contract of `microfed aggregate`: validate an untrusted JSON request, run one
# aggregation rule with the reference code, and describe the result (vector, selection,
# scores, digest). Portable (CPython and the MicroPython unix port) so the very same
# validation and dispatch run on every engine; only the arithmetic differs between engines.

try:
    import hashlib
except ImportError:  # MicroPython builds without hashlib: digests are then unavailable
    hashlib = None
try:
    import struct
except ImportError:
    import ustruct as struct

from microfed import aggregate as agg
from microfed import defences as dfn

# The rules a mesh runs (the coordinator and the gossip digest name these).
RULES = ("krum", "multi_krum", "median", "trimmed_mean", "fedavg")
# Rules the audit command runs besides them (docs/determinism.md 4.9); not yet a mesh rule.
DEFENCE_RULES = ("centered_clipping",)
# Pre-aggregation steps that may come before any rule (docs/determinism.md 4.7, 4.8).
PRES = ("nnm", "bucketing")
# Which optional top-level parameters each rule and each pre step reads.
PARAMS = {"krum": ("f",), "multi_krum": ("f", "m"), "median": (), "trimmed_mean": ("trim",),
          "fedavg": (), "centered_clipping": ("tau", "iters")}
PRE_PARAMS = {"nnm": ("f",), "bucketing": ("bucket", "seed")}
FIELDS = ("rule", "updates", "f", "m", "trim", "pre", "bucket", "seed", "tau", "iters")
MAX_NODE_ID_BYTES = 64
INT32_MIN = -2147483648
INT32_MAX = 2147483647


class InputError(ValueError):
    pass


def _is_int(x):
    # bool is an int subclass on CPython; a JSON `true` is not a Q16.16 value.
    return type(x) is int


def _param(req, name, who):
    if name not in req:
        raise InputError("%s needs parameter '%s'" % (who, name))
    v = req[name]
    if not _is_int(v) or v < 0:
        raise InputError("parameter '%s' must be a non-negative integer" % name)
    if name == "bucket" and v < 1:
        raise InputError("parameter 'bucket' must be >= 1 (updates per bucket)")
    if name == "seed" and v > dfn.MAX_SEED:
        raise InputError("parameter 'seed' must be in [0, 2^32-1]: %d" % v)
    if name == "tau" and (v < 1 or v > dfn.MAX_TAU):
        raise InputError("parameter 'tau' must be a positive Q16.16 radius in [1, 2^31-1]: %d"
                         % v)
    if name == "iters" and (v < 1 or v > dfn.MAX_ITERS):
        raise InputError("parameter 'iters' must be in [1, %d]: %d" % (dfn.MAX_ITERS, v))
    return v


def parse(req):
    """Validate a request dict; return (rule, ids, vecs, params) or raise InputError."""
    if not isinstance(req, dict):
        raise InputError("request must be a JSON object")
    rule = req.get("rule")
    if rule not in RULES and rule not in DEFENCE_RULES:
        raise InputError("unknown rule %r (expected one of %s)"
                         % (rule, ", ".join(RULES + DEFENCE_RULES)))
    for key in req:
        if key not in FIELDS:
            raise InputError("unknown field '%s'" % key)
    pre = req.get("pre")
    if pre is not None and pre not in PRES:
        raise InputError("unknown pre %r (expected one of %s)" % (pre, ", ".join(PRES)))
    if pre != "bucketing" and ("bucket" in req or "seed" in req):
        raise InputError("'bucket' and 'seed' belong to \"pre\": \"bucketing\"")
    if pre == "bucketing" and rule == "fedavg":
        raise InputError("pre bucketing does not combine with fedavg: a bucket mean carries "
                         "no weight")
    ups = req.get("updates")
    if not isinstance(ups, list) or not ups:
        raise InputError("'updates' must be a non-empty list")
    ids, vecs, weights = [], [], []
    seen = {}
    d = -1
    for i, u in enumerate(ups):
        if not isinstance(u, dict):
            raise InputError("update %d is not an object" % i)
        node = u.get("node")
        if not isinstance(node, str) or not node:
            raise InputError("update %d: 'node' must be a non-empty string" % i)
        try:
            nb = len(node.encode("utf-8"))
        except UnicodeError:
            # CPython: a lone surrogate (e.g. an unpaired \ud800 escape) is not Unicode text.
            raise InputError("update %d: node id holds a lone surrogate; node ids must be "
                             "valid Unicode (UTF-8 encodable)" % i)
        if nb > MAX_NODE_ID_BYTES:
            raise InputError("update %d: node id longer than %d bytes" % (i, MAX_NODE_ID_BYTES))
        if node in seen:
            raise InputError("duplicate node id %r" % node)
        seen[node] = 1
        vec = u.get("vector")
        if not isinstance(vec, list) or not vec:
            raise InputError("update %r: 'vector' must be a non-empty list" % node)
        if d < 0:
            d = len(vec)
        elif len(vec) != d:
            raise InputError("ragged vectors: update %r has %d values, expected %d" % (node, len(vec), d))
        for k, x in enumerate(vec):
            if not _is_int(x):
                raise InputError("update %r: value %d is not an integer (raw Q16.16 expected)" % (node, k))
            if x < INT32_MIN or x > INT32_MAX:
                raise InputError("update %r: value %d = %d outside int32" % (node, k, x))
        w = u.get("weight", 1 if rule != "fedavg" else None)
        if rule == "fedavg":
            if not _is_int(w) or w < 0 or w > INT32_MAX:
                raise InputError("update %r: 'weight' must be an integer in [0, 2^31-1]" % node)
        ids.append(node)
        vecs.append(vec)
        weights.append(w)
    params = {}
    for name in PARAMS[rule]:
        params[name] = _param(req, name, "rule " + rule)
    if pre is not None:
        for name in PRE_PARAMS[pre]:
            params[name] = _param(req, name, "pre " + pre)
        params["pre"] = pre
        n = len(ids)
        if pre == "nnm" and n < 2 * params["f"] + 1:
            raise InputError("pre nnm needs n >= 2f + 1: n=%d, f=%d" % (n, params["f"]))
    if rule == "fedavg":
        params["weights"] = weights
    return rule, ids, vecs, params


def run(rule, ids, vecs, params):
    """Run the pre step (if any) then one rule with the reference code; the result dict."""
    pre = params.get("pre")
    groups = None
    if pre == "nnm":
        vecs = dfn.nnm(ids, vecs, params["f"])
    elif pre == "bucketing":
        ids, vecs, groups = dfn.bucketing(ids, vecs, params["bucket"], params["seed"])
    try:
        out = run_rule(rule, ids, vecs, params)
    except agg.AggregationError as e:
        raise after_pre(e, groups)
    return with_pre(out, pre, groups)


def after_pre(e, groups):
    """A rule's error, saying that it counted bucket means (every engine words it so)."""
    if groups is None:
        return e
    return agg.AggregationError("%s (the rule ran on %d bucket means)" % (e, len(groups)))


def with_pre(out, pre, groups):
    if pre is not None:
        out["pre"] = pre
    if groups is not None:
        out["buckets"] = groups
    return out


def run_rule(rule, ids, vecs, params):
    """Run one rule with the reference code; the result dict."""
    selected = None
    scores = None
    if rule == "krum":
        vec, selected, sc = agg.krum(ids, vecs, params["f"])
        scores = sc
    elif rule == "multi_krum":
        vec, selected, sc = agg.multi_krum(ids, vecs, params["f"], params["m"])
        scores = sc
    elif rule == "median":
        vec = agg.median(vecs)
    elif rule == "trimmed_mean":
        vec = agg.trimmed_mean(vecs, params["trim"])
    elif rule == "centered_clipping":
        vec = dfn.centered_clipping(vecs, params["tau"], params["iters"])
    else:
        vec = agg.fedavg(vecs, params["weights"])
    return describe(rule, ids, vec, selected, scores)


def describe(rule, ids, vec, selected, scores):
    out = {"rule": rule, "n": len(ids), "d": len(vec), "vector": vec, "digest": digest(vec)}
    if scores is not None:
        out["selected"] = selected
        sd = {}
        for i in range(len(ids)):
            sd[ids[i]] = scores[i]
        out["scores"] = sd
    return out


def digest(vec):
    """SHA-256 hex of the vector as little-endian int32 bytes."""
    if hashlib is None:
        return None
    h = hashlib.sha256()
    step = 512
    for i in range(0, len(vec), step):
        part = vec[i:i + step]
        h.update(struct.pack("<%di" % len(part), *part))
    return _hex(h.digest())


def _hex(b):
    return "".join(["%02x" % x for x in b])
