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

RULES = ("krum", "multi_krum", "median", "trimmed_mean", "fedavg")
# Which optional top-level parameters each rule reads.
PARAMS = {"krum": ("f",), "multi_krum": ("f", "m"), "median": (), "trimmed_mean": ("trim",),
          "fedavg": ()}
MAX_NODE_ID_BYTES = 64
INT32_MIN = -2147483648
INT32_MAX = 2147483647


class InputError(ValueError):
    pass


def _is_int(x):
    # bool is an int subclass on CPython; a JSON `true` is not a Q16.16 value.
    return type(x) is int


def _param(req, name):
    if name not in req:
        raise InputError("rule %s needs parameter '%s'" % (req["rule"], name))
    v = req[name]
    if not _is_int(v) or v < 0:
        raise InputError("parameter '%s' must be a non-negative integer" % name)
    return v


def parse(req):
    """Validate a request dict; return (rule, ids, vecs, params) or raise InputError."""
    if not isinstance(req, dict):
        raise InputError("request must be a JSON object")
    rule = req.get("rule")
    if rule not in RULES:
        raise InputError("unknown rule %r (expected one of %s)" % (rule, ", ".join(RULES)))
    for key in req:
        if key not in ("rule", "updates", "f", "m", "trim"):
            raise InputError("unknown field '%s'" % key)
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
        params[name] = _param(req, name)
    if rule == "fedavg":
        params["weights"] = weights
    return rule, ids, vecs, params


def run(rule, ids, vecs, params):
    """Run one rule with the reference code; result dict without the digest."""
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
