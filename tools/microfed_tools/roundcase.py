"""A node's gossip round on recorded inputs, on a board and on the host, bit for bit.

    case = make_case()                      # seeded inputs: registry, shard, 3 messages kinds
    want = run_reference(case)              # tools/microfed_tools/roundprog.py under CPython
    got = run_repl(repl, case)              # the same file on a board (raw REPL)
    got = run_unix(micropython, case)       # the same file on a unix-port build, with files

The node is node-00 of a 13-node mesh: GLOBAL_MODEL round 1 (check, train on a 111-sample
digits shard, sign), the 12 peers' round-1 updates (checked as they arrive, kept in flash or
RAM), GLOBAL_MODEL round 2 announcing all 13 frames with Krum f = 3 (check, rebuild the
aggregate, digest, sign the digest, train, sign). The announced aggregate digest comes from
the reference rules (microfed.audit over whole vectors), not from the node's chunked code, so
`agrees` is a real cross-check. Used by hil/test_node_round.py (vectors, and the device-cost
gate) and benchmarks/device.py (the table in docs/boards.md).
"""

from __future__ import annotations

import ast
import hashlib
import random
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfed import audit, model, noderound, wire
from microfed_host import data, keys

PROGRAM = Path(__file__).with_name("roundprog.py")
MESH = "roundcase"
NODE = "node-00"
CLOCK = 1_780_000_000
TRAIN = {"lr": 32768, "epochs": 1, "batch": 10, "seed": 7}
SAMPLES = 111
PEERS = 12
KRUM_F = 3


def _seed(name: str) -> bytes:
    return hashlib.sha256(b"microfed/roundcase/" + name.encode()).digest()


@dataclass
class Case:
    registry: bytes
    shard: bytes
    gossip: bool
    # ("global", frame) | ("update", frame), in arrival order
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    expected_digest: str = ""


def make_case(gossip: bool = True, peers: int = PEERS, samples: int = SAMPLES,
              seed: int = 1) -> Case:
    """Coordinated (gossip=False): the same two globals, neither announcing anything, and no
    peers' updates (a coordinated node does not subscribe to them)."""
    mesh_id = wire.mesh_id(MESH)
    ids = [f"node-{i:02d}" for i in range(peers + 1)]
    coord = keys.signer(_seed("coordinator"))
    coord_pub = keys.public_key(_seed("coordinator"))
    entries = [(n, keys.public_key(_seed(n)), True) for n in ids]
    registry = wire.encode(wire.REGISTRY, mesh_id, wire.COORDINATOR, 0, 1, CLOCK,
                           wire.encode_registry(mesh_id, 1, coord_pub, entries), coord)
    split = data.train_test_split(seed)
    idx = np.random.default_rng(seed).permutation(len(split.train))[:samples]
    shard = data.encode_shard(split.train.subset(np.sort(idx)))

    m = model.get("softmax")
    g1 = m.init(seed)
    glob1 = wire.encode(wire.GLOBAL_MODEL, mesh_id, wire.COORDINATOR, 1, 2, CLOCK,
                        wire.encode_global_payload(g1), coord)
    # The node's own round-1 update, as the host computes it (same portable steps).
    own = noderound.local_update(m, model.Shard(shard), TRAIN, 1, NODE, g1)
    own_frame = bytes(noderound.update_frame(mesh_id, NODE, 1, 1, CLOCK, samples, own,
                                             keys.signer(_seed(NODE))))
    rng = random.Random(seed)
    vecs = {NODE: own}
    frames = []
    for n in ids[1:]:
        # Honest-looking deltas, and a few far-out ones (Krum must not pick them).
        span = 3000 if rng.random() < 0.75 else 400_000
        v = [rng.randint(-span, span) for _ in range(m.n_params)]
        vecs[n] = v
        frames.append(wire.encode(wire.MODEL_UPDATE, mesh_id, n, 1, 1, CLOCK,
                                  wire.encode_model_update(rng.randint(50, 150), v),
                                  keys.signer(_seed(n))))
    accepted = sorted([(wire.decode(f).sender, hashlib.sha256(f).digest())
                       for f in [own_frame, *frames]])
    ref = audit.run("krum", [a[0] for a in accepted], [vecs[a[0]] for a in accepted],
                    {"f": KRUM_F})
    g2 = m.apply(g1, ref["vector"])
    glob2 = wire.encode(wire.GLOBAL_MODEL, mesh_id, wire.COORDINATOR, 2, 3, CLOCK,
                        wire.encode_global_payload(g2, "krum", KRUM_F, 0,
                                                   bytes.fromhex(ref["digest"]), accepted),
                        coord)
    if not gossip:
        glob2 = wire.encode(wire.GLOBAL_MODEL, mesh_id, wire.COORDINATOR, 2, 3, CLOCK,
                            wire.encode_global_payload(g2), coord)
        return Case(registry, shard, False, [("global", glob1), ("global", glob2)], "")
    msgs = [("global", glob1)] + [("update", f) for f in frames] + [("global", glob2)]
    return Case(registry, shard, True, msgs, ref["digest"])


def messages(case: Case) -> bytes:
    """The registry frame and every message, back to back: the file script(msgs=...) reads."""
    return case.registry + b"".join(m for _k, m in case.messages)


def script(case: Case, heap0: str, store: str, shard_path: str, chunk: int,
           msgs: str = "") -> list[str]:
    """The statements that drive roundprog.py after it is loaded, in order; each one small
    enough for a board's raw REPL and heap (`chunk` hex characters of data per statement).
    `msgs`: the board's file holding messages(case); each message is then read from it into
    the receive buffer (RoundCase.recv) instead of being sent as hex."""
    buf = max(len(case.registry), *(len(m) for _k, m in case.messages))
    out = [f"_rc = RoundCase({heap0})"]
    at = [0]

    def feed(method: str, raw: bytes) -> None:
        if msgs and method == "put":
            out.append(f"_rc.recv({msgs!r}, {at[0]}, {len(raw)})")
            at[0] += len(raw)
            return
        h = raw.hex()
        for i in range(0, len(h), chunk):
            out.append(f"_rc.{method}('{h[i:i + chunk]}')")

    if not shard_path:
        out.append(f"_rc.shard_buffer({len(case.shard)})")
        feed("put_shard", case.shard)
    out.append(f"_rc.boot_shard({NODE!r}, {shard_path!r}, {buf})")
    feed("put", case.registry)
    out.append(f"_rc.boot_registry({_seed(NODE).hex()!r}, "
               f"{keys.public_key(_seed('coordinator')).hex()!r}, {MESH!r}, {store!r}, {CLOCK}, "
               f"{case.gossip})")
    for kind, msg in case.messages:
        feed("put", msg)
        out.append(f"_rc.on_global({TRAIN!r})" if kind == "global" else "_rc.on_update()")
    out.append("print(repr(_rc.report()))")
    return out


def run_reference(case: Case) -> dict[str, Any]:
    """roundprog.py under CPython: the answers (its counts and heap figures are zeros)."""
    ns: dict[str, Any] = {}
    exec(compile(PROGRAM.read_text(), str(PROGRAM), "exec"), ns)
    lines: list[str] = []
    ns["print"] = lambda s: lines.append(s)
    for stmt in script(case, "0", "", "", 1 << 20):
        exec(stmt, ns)
    return ast.literal_eval(lines[-1])


def run_repl(repl: Any, case: Case, files: bool = False, chunk: int = 1024,
             timeout: float = 600, frozen: bool = False) -> dict[str, Any]:
    """On a board behind a raw REPL (microfed frozen in). `files`: the board has a filesystem
    (its flash): the shard goes there first and the node reads it from there, and the peers'
    vectors wait there (`vectors = "flash"`); else both sit in RAM. `frozen`: the firmware's
    frozen round program is imported instead of compiling this one on the board, and with
    `files` each message is read from the board's filesystem into the receive buffer, as
    run_unix does, after a soft reset (what a node's own heap holds; the board's image must be
    a current `microfed firmware build`)."""
    store = shard_path = msgs = ""
    if files:
        repl.write_file(BOARD_DIR + "/shard.bin", case.shard)
        store, shard_path = BOARD_DIR, BOARD_DIR + "/shard.bin"
        if frozen:
            msgs = BOARD_DIR + "/msgs.bin"
            repl.write_file(msgs, messages(case))
            # A fresh interpreter with the files in flash, as a node boots: the raw REPL keeps
            # its input buffer at the size of the largest statement it was sent (a file block
            # as text, ~8 KB), and the transfer helpers stay defined; a reset frees both.
            repl.soft_reset()
    repl.exec_verified("import gc\ngc.collect()\n_h0 = gc.mem_free()\n", what="heap baseline")
    if frozen:
        repl.exec_verified("from roundprog import RoundCase\n", what="round program")
    else:
        repl.exec_verified(PROGRAM.read_text(), timeout=timeout, what="round program")
    text = ""
    for stmt in script(case, "_h0", store, shard_path, chunk, msgs):
        text = repl.exec_verified(stmt + "\n", timeout=timeout, what="round step")
    return ast.literal_eval(text.strip().splitlines()[-1])


# Where run_repl(files=True) puts the shard and the vector file on a board.
BOARD_DIR = "/mfround"


def run_unix(exe: str, case: Case, heapsize: str = "256k", store: bool = True,
             timeout: float = 600) -> dict[str, Any]:
    """On a unix-port build (e.g. unix32, microfed frozen in) with a filesystem: the shard is
    a file and, with `store`, the peers' vectors too. Raises RuntimeError with the board's
    output when the run fails (e.g. MemoryError at this heap size).

    What is measured is what a node needs, so the harness takes on the heap only what a node's
    own would: the round program is the build's frozen `roundprog` (frozen like node.py, whose
    place it takes; exec'd from source it would add its bytecode, ~2.6 KB, and its compilation
    to the heap), and each message is read from a file straight into the receive buffer, as
    the MQTT client reads a payload from its socket (not compiled from hex statements). The
    statements that remain are one short call each."""
    # Always a directory name of the same length: the GC scans the C stack conservatively,
    # and a longer working directory shifts what it finds there (measured: 40 more characters
    # moved the smallest coordinated heap by 1 KB).
    with tempfile.TemporaryDirectory(prefix="mfround-", dir="/tmp") as d:
        work = Path(d)
        (work / "shard.bin").write_bytes(case.shard)
        (work / "msgs.bin").write_bytes(messages(case))
        (work / "steps.txt").write_text(
            "\n".join(script(case, "_h0", "." if store else "", "shard.bin", 1024, "msgs.bin"))
            + "\n")
        (work / "round.py").write_text("import gc\ngc.collect()\n_h0 = gc.mem_free()\n"
                                       "from roundprog import RoundCase\n"
                                       "for _line in open('steps.txt'):\n"
                                       "    exec(_line)\n"
                                       "    _line = None\n")
        proc = subprocess.run([exe, "-X", f"heapsize={heapsize}", "round.py"],
                              capture_output=True, text=True, timeout=timeout,
                              env={"MICROPYPATH": ".frozen"}, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"round failed with heap {heapsize}: "
                           f"{(proc.stdout + proc.stderr).strip()[-600:]}")
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def smallest_heap(exe: str, case: Case, lo: int = 8 * 1024,
                  hi: int = 512 * 1024, step: int = 1024, store: bool = True) -> int:
    """The smallest -X heapsize (bytes, to `step`) at which the whole round runs."""
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        try:
            run_unix(exe, case, str(mid), store)
            hi = mid
        except RuntimeError:
            lo = mid
    return hi


def measure_board(board: Any, case: Case, files: bool = False,
                  image: str | None = None, frozen: bool = False) -> dict[str, Any]:
    """Boot `board` in QEMU with instruction counting (devicecost.ICOUNT_ARGS), optionally from
    another `image` (e.g. a smaller-heap build), and run the case once from a soft reset;
    counts come back in instructions (not thousands)."""
    from microfed_tools import devicecost, rawrepl
    from microfed_tools.emulator import Emulator

    emu = Emulator(board, extra_args=devicecost.ICOUNT_ARGS, image=image)
    pty = emu.start()
    try:
        # The RAM disk (mps2-an385's fs_mount) only when the case uses files: mounted, every
        # import first looks on it, which is the filesystem's cost, not the round's.
        repl = rawrepl.connect(pty, board, timeout=60, soft_reset=True, fs_mount=files)
        try:
            res = run_repl(repl, case, files, frozen=frozen)
        finally:
            repl.close()
    finally:
        emu.stop()
    res["cost"] = {k: v * 1000 for k, v in res["cost"].items()}
    return res


def round_costs(res: dict[str, Any]) -> dict[str, int]:
    """The whole-round figures from one run: round 2 is the full round (gossip: check the
    global, rebuild and digest round 1's aggregate, sign the digest, train, sign), plus the
    12 peer checks that happened during round 1; round 1 has no aggregate to rebuild."""
    c = res["cost"]
    out = {"round_2": c["round_2"], "round_1": c["round_1"]}
    if "peer_checks" in c:
        out["gossip_round"] = c["round_2"] + c["peer_checks"]
    else:
        out["coordinated_round"] = c["round_2"]
    return out


def sweep(exe: str, case: Case, lo: int, hi: int = 512 * 1024,
          step: int = 16 * 1024, store: bool = True) -> list[int]:
    """Heap sizes in [lo, hi] (every `step` bytes) at which the round does NOT run: a failure
    above the smallest working heap would be fragmentation, which bisection alone misses."""
    failed = []
    for heap in range(lo, hi + 1, step):
        try:
            run_unix(exe, case, str(heap), store)
        except RuntimeError:
            failed.append(heap)
    return failed
