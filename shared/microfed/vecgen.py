# Deterministic input generator for large test vectors (docs/determinism.md, "Generated
# inputs"): xorshift32, so a vector file can describe a 100 000-wide update in a few bytes and
# any implementation (C included) can rebuild it exactly.

M32 = 0xFFFFFFFF


def xorshift32(state):
    x = state
    x ^= (x << 13) & M32
    x ^= x >> 17
    x ^= (x << 5) & M32
    return x


def vectors(seed, n, d, lo, hi):
    """n lists of d ints in [lo, hi]: value = lo + next() % (hi - lo + 1), row by row."""
    x = seed & M32
    if x == 0:
        x = 1
    span = hi - lo + 1
    out = []
    for _ in range(n):
        row = []
        for _ in range(d):
            x ^= (x << 13) & M32
            x ^= x >> 17
            x ^= (x << 5) & M32
            row.append(lo + x % span)
        out.append(row)
    return out


def expand(req):
    """A request whose updates are given as {"generate": {...}} becomes a plain request."""
    g = req.get("generate")
    if g is None:
        return req
    vecs = vectors(g["seed"], len(g["ids"]), g["d"], g["lo"], g["hi"])
    ups = []
    ws = g.get("weights")
    for i in range(len(g["ids"])):
        u = {"node": g["ids"][i], "vector": vecs[i]}
        if ws is not None:
            u["weight"] = ws[i]
        ups.append(u)
    out = {}
    for k in req:
        if k != "generate":
            out[k] = req[k]
    out["updates"] = ups
    return out
