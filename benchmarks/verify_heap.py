"""The smallest unix32 heap one Ed25519 operation runs in, microfed frozen in (the build of
`microfed firmware build --board unix32`): a fresh `micropython -X heapsize=N` imports
microfed.ed25519 and runs the operation once; N is bisected to 64 bytes. "import" is the
interpreter and the import alone, so the difference is what the operation itself needs,
fragmentation included. Figures: docs/ed25519.md (the NAF width of verification).

    .venv/bin/python benchmarks/verify_heap.py [--op verify --op sign --op import]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from microfed_host import keys
from microfed_tools import firmware

SEED = bytes(range(32))
MSG = bytes(32)

PROGRAM = """import sys
from microfed import ed25519
op = sys.argv[-1]
pub = bytes.fromhex(%r)
msg = bytes.fromhex(%r)
sig = bytes.fromhex(%r)
seed = bytes.fromhex(%r)
if op == "verify":
    assert ed25519.verify(pub, msg, sig)
elif op == "sign":
    assert ed25519.sign(seed, msg) == sig
print("OK")
"""


def runs(exe: str, work: Path, op: str, heap: int) -> bool:
    proc = subprocess.run([exe, "-X", f"heapsize={heap}", "prog.py", op], cwd=work,
                          capture_output=True, text=True, timeout=120,
                          env={"MICROPYPATH": ".frozen"})
    return proc.returncode == 0 and proc.stdout.strip().endswith("OK")


def smallest(exe: str, work: Path, op: str, lo: int = 1024, hi: int = 64 * 1024) -> int:
    if not runs(exe, work, op, hi):
        raise RuntimeError(f"{op} does not run in {hi} bytes")
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if runs(exe, work, op, mid):
            hi = mid
        else:
            lo = mid
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", action="append", choices=("import", "verify", "sign"))
    args = ap.parse_args()
    exe = str(firmware.build("unix32"))
    sig = keys.signer(SEED)(MSG)
    with tempfile.TemporaryDirectory(prefix="mfverify-") as d:
        work = Path(d)
        (work / "prog.py").write_text(PROGRAM % (keys.public_key(SEED).hex(), MSG.hex(),
                                                 sig.hex(), SEED.hex()))
        for op in args.op or ["import", "verify", "sign"]:
            print(f"{op}: smallest -X heapsize {smallest(exe, work, op)} B", flush=True)


if __name__ == "__main__":
    main()
