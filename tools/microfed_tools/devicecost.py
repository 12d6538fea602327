"""Deterministic device cost: instructions per phase of a node's work, counted on an emulated
board that QEMU runs with `-icount shift=0` (virtual time: one instruction = 1 ns, so the
guest's `time.ticks_us()` advances once per 1000 instructions and a measurement repeats
exactly). Used by benchmarks/device.py (the table in docs/boards.md) and by the HIL gate
(hil/test_device_cost.py).

The phases run the frozen portable core on synthetic, seeded inputs of the node's real sizes:
the 650-parameter softmax model, a 32-sample shard (SAMPLES below), 13 updates for Krum
with f = 3; then, as a second program, one X25519 and one secure-aggregation PRG mask of 651
words.
"""

from __future__ import annotations

import ast
from typing import Any

ICOUNT_ARGS = ("-icount", "shift=0")

# Training samples. The node's real shard has 111; today a 111-sample epoch does not fit the
# emulated boards' 139 KB heap next to the decoded data (issue 9, "Fit"), so the benchmark
# trains on 32 and says so (48 fits on the Cortex-M3 build, not on RV32).
SAMPLES = 32

# The phases, portable: the device runs them (MicroPython 1.29, microfed frozen in) and the
# host runs the very same function under CPython for the results the device must reproduce
# (CPython has no ticks_us or mem_free: its counts are zeros and are not used).
# The start of every cost function: instruction clock, heap probe, and a clock started for
# the imports that come first.
_PROLOGUE = '''
    tk = getattr(time, "ticks_us", None) or (lambda: 0)
    td = getattr(time, "ticks_diff", None) or (lambda a, b: a - b)
    free = getattr(gc, "mem_free", None) or (lambda: 0)
    out = {}
    gc.collect()
    f0 = free()
    t = tk()
'''
COST_FUNCTION = ('''
import time, gc
SAMPLES = @SAMPLES@
def _mfcost():''' + _PROLOGUE + '''    from microfed import wire, ed25519, model, aggregate
    out["import"] = td(tk(), t)
    gc.collect()
    out["import_heap"] = f0 - free()
    seed = bytes(range(32))
    msg = bytes(range(32, 64))
    gc.collect(); t = tk()
    pub = ed25519.public_key(seed)
    out["public_key"] = td(tk(), t)
    gc.collect(); t = tk()
    sig = ed25519.sign(seed, msg)
    out["sign"] = td(tk(), t)
    gc.collect(); t = tk()
    ok = ed25519.verify(pub, msg, sig)
    out["verify"] = td(tk(), t)
    out["verify_ok"] = ok
    # The model first, then the data: allocated the other way round, the 111 small lists
    # fragment the 139 KB heap so much that init's 2.6 KB list no longer fits.
    m = model.get("softmax", n_features=64, n_classes=10)
    p = m.init(1)
    r = model.XorShift32(7)
    xs = [[(r.next() % 17) << 12 for _ in range(64)] for _ in range(SAMPLES)]
    ys = [r.next() % 10 for _ in range(SAMPLES)]
    cfg = model.TrainConfig(32768, 1, 10, 5)
    gc.collect(); t = tk()
    new = m.train(p, (xs, ys), cfg)
    out["train_epoch"] = td(tk(), t)
    out["train_digest"] = model.params_digest(new)
    xs = ys = None
    d = m.delta(p, new)
    gc.collect(); t = tk()
    payload = wire.encode_model_update(SAMPLES, d)
    frame = wire.encode(wire.MODEL_UPDATE, wire.mesh_id("cost"), "node-01", 1, 1, 0, payload,
                        lambda h: ed25519.sign(seed, h))
    out["encode_and_sign_update"] = td(tk(), t)
    gc.collect(); t = tk()
    fr = wire.decode(frame)
    out["decode_update"] = td(tk(), t)
    fr = frame = payload = new = p = d = None
    gc.collect()
    vecs = [[(r.next() % 131072) - 65536 for _ in range(650)] for _ in range(13)]
    ids = ["node-%02d" % i for i in range(13)]
    gc.collect(); t = tk()
    res = aggregate.krum(ids, vecs, 3)
    out["krum_13x650_f3"] = td(tk(), t)
    out["krum_selected"] = res[1]
    return out
''').replace("@SAMPLES@", str(SAMPLES))

# Secure aggregation (docs/privacy.md), a second program so the phases above keep the heap
# they always had: one X25519 (a node does 2 + 2 (n - 1) a round) and one PRG mask over the
# 651 masked words (n a round: n - 1 pairwise, 1 self).
SECAGG_FUNCTION = '''
import time, gc
def _mfcost():
    tk = getattr(time, "ticks_us", None) or (lambda: 0)
    td = getattr(time, "ticks_diff", None) or (lambda a, b: a - b)
    out = {}
    from microfed import x25519, secagg, model
    gc.collect(); t = tk()
    sh = x25519.x25519(bytes(range(32)), bytes(range(32, 64)))
    out["x25519"] = td(tk(), t)
    out["x25519_out"] = sh
    acc = [0] * 651
    gc.collect(); t = tk()
    secagg.prg_add(acc, sh, 1)
    out["secagg_mask_651"] = td(tk(), t)
    for i in range(651):
        acc[i] &= 0x7FFFFFFF  # in place: the 64-bit words are long ints on a 32-bit port
    out["mask_digest"] = model.params_digest(acc)
    return out
'''

# What the device runs: each function, then one dict literal on stdout.
DEVICE_PROGRAM = COST_FUNCTION + "print(repr(_mfcost()))\ndel _mfcost\n"
SECAGG_PROGRAM = SECAGG_FUNCTION + "print(repr(_mfcost()))\ndel _mfcost\n"


# Phases whose cost is counted (in units of 1000 instructions); the rest are results that
# must equal the host's (the work really happened, and the same way).
PHASES = ("import", "public_key", "sign", "verify", "train_epoch", "encode_and_sign_update",
          "decode_update", "krum_13x650_f3", "x25519", "secagg_mask_651")


RESULTS = ("verify_ok", "train_digest", "krum_selected", "x25519_out", "mask_digest")


# Local differential privacy on the node (microfed.dp, docs/privacy.md): the discrete Gaussian
# at the variance scenarios/dp.toml resolves to (noise multiplier 1.4357 = epsilon 64 over 30
# rounds at delta 1e-5, clip 1.0: sigma^2 = (1.4357 * 65536)^2 raw), and at sigma^2 = 2/3;
# the exact L2 clip and the whole privatisation (clip + 650 samples) of a 650-value delta.
# Noise from the seeded SHA-256 stream (the QEMU boards have no os.urandom), so the device's
# samples must equal the host's.
DP_SAMPLES = 200
DP_SIGMA2 = ((14357 * 65536) ** 2, 10000 ** 2)
DP_COST_FUNCTION = ('''
import time, gc
def _mfdpcost():''' + _PROLOGUE + '''    from microfed import dgauss, dp, model
    out["dp_import"] = td(tk(), t)
    gc.collect()
    out["dp_import_heap"] = f0 - free()
    for name, num, den in (("dgauss_mesh", @NUM@, @DEN@), ("dgauss_2_3", 2, 3)):
        g = dgauss.DGauss(num, den)
        src = dgauss.Sha256Stream(b"cost")
        gc.collect(); t = tk()
        xs = [g.sample(src) for _ in range(@N@)]
        out[name + "_x@N@"] = td(tk(), t)
        out[name + "_sum_sq"] = sum([x * x for x in xs])
        out[name + "_sha256_blocks"] = src.ctr
    r = model.XorShift32(3)
    delta = [(r.next() % 400001) - 200000 for _ in range(650)]
    gc.collect(); t = tk()
    c = dp.l2_clip(delta, 65536)
    out["l2_clip_650"] = td(tk(), t)
    out["clip_digest"] = model.params_digest(c)
    c = None
    nd = dp.NodeDP(65536, @NUM@, @DEN@, "seeded", 1, "node-01")
    gc.collect(); t = tk()
    nd.apply(delta, 1)
    out["privatize_650"] = td(tk(), t)
    out["privatize_digest"] = model.params_digest(delta)
    return out
''').replace("@N@", str(DP_SAMPLES)).replace("@NUM@", str(DP_SIGMA2[0])).replace(
    "@DEN@", str(DP_SIGMA2[1]))
DP_PROGRAM = DP_COST_FUNCTION + "print(repr(_mfdpcost()))\ndel _mfdpcost\n"
DP_PHASES = ("dp_import", "dgauss_mesh_x%d" % DP_SAMPLES, "dgauss_2_3_x%d" % DP_SAMPLES,
             "l2_clip_650", "privatize_650")
DP_RESULTS = ("dgauss_mesh_sum_sq", "dgauss_mesh_sha256_blocks", "dgauss_2_3_sum_sq",
              "dgauss_2_3_sha256_blocks", "clip_digest", "privatize_digest")


# The MLP (microfed.mlp, 64-32-10 = 2 410 parameters, docs/model.md): import, init and one
# epoch over SAMPLES synthetic samples (the same as train_epoch's), and the heap it then holds
# (module, parameters, trained copy, sums, samples).
MLP_COST_FUNCTION = ('''
import time, gc
SAMPLES = @SAMPLES@
def _mfmlpcost():''' + _PROLOGUE + '''    from microfed import model
    m = model.get("mlp")
    out["mlp_import"] = td(tk(), t)
    gc.collect(); t = tk()
    p = m.init(1)
    out["mlp_init"] = td(tk(), t)
    # The trained copy and the sums before the data, as a node's RoundBuffers: allocated
    # after the samples' small lists, a 9.6 KB block is not always there (measured).
    buf = [0] * m.n_params
    sums = [0] * m.scratch_len()
    r = model.XorShift32(7)
    xs = [[(r.next() % 17) << 12 for _ in range(64)] for _ in range(SAMPLES)]
    ys = [r.next() % 10 for _ in range(SAMPLES)]
    cfg = model.TrainConfig(16384, 1, 10, 5)
    gc.collect(); t = tk()
    new = m.train(p, (xs, ys), cfg, buf, sums)
    out["mlp_train_epoch"] = td(tk(), t)
    out["mlp_train_digest"] = model.params_digest(new)
    gc.collect()
    out["mlp_live_heap"] = f0 - free()
    return out
''').replace("@SAMPLES@", str(SAMPLES))
MLP_PROGRAM = MLP_COST_FUNCTION + "print(repr(_mfmlpcost()))\ndel _mfmlpcost\n"
MLP_PHASES = ("mlp_import", "mlp_init", "mlp_train_epoch")
MLP_RESULTS = ("mlp_train_digest",)


def host_expectations(functions: tuple[str, ...] = (COST_FUNCTION, SECAGG_FUNCTION),
                      name: str = "_mfcost",
                      results: tuple[str, ...] = RESULTS) -> dict[str, Any]:
    """What the device must compute: the same function's results on CPython."""
    out: dict[str, Any] = {}
    for src in functions:
        ns: dict[str, Any] = {}
        exec(compile(src, "devicecost", "exec"), ns)
        out.update(ns[name]())
    return {k: out[k] for k in results}


def dp_host_expectations() -> dict[str, Any]:
    return host_expectations((DP_COST_FUNCTION,), "_mfdpcost", DP_RESULTS)


def mlp_host_expectations() -> dict[str, Any]:
    return host_expectations((MLP_COST_FUNCTION,), "_mfmlpcost", MLP_RESULTS)


def measure(repl: Any, programs: tuple[str, ...] = (DEVICE_PROGRAM, SECAGG_PROGRAM),
            phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
    """Run the phases on the device behind `repl` (an emulator started with ICOUNT_ARGS);
    returns {phase: instructions} plus the result fields and import_heap (bytes)."""
    raw: dict[str, Any] = {}
    for prog in programs:
        text = repl.exec_verified(prog, timeout=600, what="device cost")
        raw.update(ast.literal_eval(text.strip().splitlines()[-1]))
    out: dict[str, Any] = {k: v for k, v in raw.items() if k not in phases}
    for k in phases:
        out[k] = int(raw[k]) * 1000
    return out


def measure_board(board: Any, runs: int = 1,
                  programs: tuple[str, ...] = (DEVICE_PROGRAM, SECAGG_PROGRAM),
                  phases: tuple[str, ...] = PHASES) -> list[dict[str, Any]]:
    """Boot `board` in QEMU with instruction counting and measure `runs` times (each from a
    soft reset)."""
    from microfed_tools import rawrepl
    from microfed_tools.emulator import Emulator

    emu = Emulator(board, extra_args=ICOUNT_ARGS)
    pty = emu.start()
    try:
        out = []
        for _ in range(runs):
            # Without the RAM disk (mps2-an385): mounted, every import first looks for a file
            # on it ('' leads sys.path), which is the filesystem's cost, not our code's.
            repl = rawrepl.connect(pty, board, timeout=60, soft_reset=True, fs_mount=False)
            try:
                out.append(measure(repl, programs, phases))
            finally:
                repl.close()
        return out
    finally:
        emu.stop()
