"""What a complete node holds on the heap once it has booted, part by part: the frozen
firmware on the 32-bit unix build (31-bit small ints like an MCU), a node directory of the
default scenario (13 nodes, 650 parameters), booted by the firmware's own `main.boot` (its
config, MQTT transport and Node; no broker is contacted). Where benchmarks/node_heap.py says
at which heap a whole mesh runs, this says where that heap goes.

    .venv/bin/python benchmarks/node_boot_heap.py [--mode coordinated|gossip] [--heap 48k]
        [--write docs/results.md]   (between the `<!-- benchmarks/node_boot_heap.py MODE -->`
                                    markers)

Rows, each one `gc.mem_alloc()` difference after a collection:
- "import M": importing module M (with whatever it imports that is not imported yet), in
  the order below, before the boot;
- "main.boot (imports done)": the rest of the boot: configuration, the transport, the Node
  with its buffers, registry, state and counters, main's own objects;
- "of which ...": the same part built once more after the boot (the heap one more copy
  takes), so the boot's total can be read part by part.
At `--heap` (a `-X heapsize`): the free heap after the boot and its largest free block (which
varies with the provisioning: key bytes and the mesh's random name move objects around).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from markers import publish
from node_heap import parse_heap

from microfed_host.scenario import Scenario, prepare
from microfed_tools import firmware

# Dependencies first, so each row is mostly the module itself. Not `config`: main.boot reads
# the node's files with it and drops it (its rows would count what the boot frees again). Not
# `microfed.sha512` either: on the firmware Ed25519 is the C module's, which hashes in C.
MODULES = ("microfed.q16", "microfed.ed25519", "microfed.wire",
           "microfed.replay", "microfed.model", "microfed.registry", "microfed.verify",
           "microfed.aggregate", "microfed.colagg", "microfed.noderound", "microfed.gossip",
           "hal", "mqttc", "mqtt", "node", "main")

PROGRAM = """import gc, sys, json
gc.collect()
BASE = gc.mem_alloc()
out = [None] * 40  # made before the first measure: its growth would count in the rows
n_out = [0]
def held():
    gc.collect()
    return gc.mem_alloc() - BASE
def row(name, n):
    out[n_out[0]] = (name, n)
    n_out[0] += 1
START = last = held()  # the program's own objects: not the node's
for name in %(modules)r:
    if name in ("microfed.verify", "microfed.aggregate", "microfed.colagg",
                "microfed.gossip") and %(mode)r != "gossip":
        continue  # a coordinated node never imports peers' checks or the aggregation
    __import__(name)
    h = held()
    row("import " + name, h - last)
    last = h
import main
nd, t, hal, wifi, cfg, broker = main.boot([%(node_dir)r])
h = held()
row("main.boot (imports done)", h - last)
row("held after boot", h - START)
gc.collect()
free = gc.mem_free()
MODS = sorted(sys.modules.keys())  # what the node imported (the rows below import more)
import config
from microfed import noderound, registry, ed25519
a = held(); x = config.load("bundle.json", "config.json"); x[0].registry_frame = None  # as Node does
row("of which bundle + config", held() - a); x = None
a = held(); x = noderound.Topics(nd.b.mesh, nd.node_id)
x = tuple([s for s in (x.global_, x.registry, x.update, x.hello, x.notice) if s]
          + ([x.updates, x.update_prefix, x.digest] if nd.gossip else []))  # those it keeps
row("of which topic names", held() - a); x = None
a = held(); x = bytearray(len(t._rx)); row("of which MQTT receive buffer", held() - a); x = None
a = held(); x = noderound.RoundBuffers(nd.model, nd.node_id, nd.n_samples, t._rx)  # frame in rx, as Node's
row("of which round buffers (the update frame is built in the receive buffer)", held() - a); x = None
def registry_frame():  # the node dropped its copy; a function, so no stale bundle stays
    return config.load("bundle.json", "config.json")[0].registry_frame
rf = registry_frame()
a = held(); x = registry.load_registry_frame(rf, nd.mesh_id, nd.b.coordinator_key, ed25519.verify, 0, nd.own_entry)
row("of which registry", held() - a); x = None
print("MFHEAP " + json.dumps({"rows": out[:n_out[0]], "free": free,
                              "modules": MODS}))
"""

LARGEST = """
import gc, sys, micropython
import main
nd, t, hal, wifi, cfg, broker = main.boot([%(node_dir)r])
gc.collect()
micropython.mem_info()
"""


def run(exe: Path, work: Path, program: str, heap: int) -> str:
    (work / "prog.py").write_text(program)
    proc = subprocess.run([str(exe), "-X", f"heapsize={heap}", "prog.py"], cwd=work,
                          capture_output=True, text=True, timeout=300,
                          env={"MICROPYPATH": ".frozen"})
    if proc.returncode != 0:
        raise SystemExit(f"the node did not boot in {heap} bytes:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("coordinated", "gossip"), default="coordinated")
    ap.add_argument("--heap", default="48k", help="-X heapsize for the free-heap rows")
    ap.add_argument("--write", type=Path, default=None)
    a = ap.parse_args()
    exe = firmware.build("unix32", say=lambda m: print(m, file=sys.stderr))
    heap = parse_heap(a.heap)
    with tempfile.TemporaryDirectory(prefix="node-boot-heap-") as tmp:
        work = Path(tmp)
        sc = Scenario(name="heap", honest=13, mode=a.mode)
        prepare(sc, work / "run")
        node_dir = str(work / "run" / "nodes" / "node-01")
        args = {"modules": MODULES, "mode": a.mode, "node_dir": node_dir}
        line = next(x for x in run(exe, work, PROGRAM % args, 4 << 20).splitlines()
                    if x.startswith("MFHEAP "))
        doc = json.loads(line[7:])
        # A row for a module the node does not import would count heap it never pays.
        extra = [n for n, _ in doc["rows"]
                 if n.startswith("import ") and n[7:] not in doc["modules"]]
        if extra:
            raise SystemExit(f"a {a.mode} node does not import what these rows count: {extra}")
        info = run(exe, work, LARGEST % args, heap)
    gcline = next(x for x in info.splitlines() if "max free sz" in x)
    largest = int(gcline.split("max free sz:")[1].strip()) * 16  # GC blocks of 16 bytes
    freeline = next(x for x in info.splitlines() if x.startswith("GC:"))
    free = int(freeline.split("free:")[1].strip())
    command = f"python benchmarks/node_boot_heap.py --mode {a.mode} --heap {a.heap}"
    lines = [f"| {a.mode} node, unix32 | bytes |", "| --- | ---: |"]
    rows = [(name, n) for name, n in doc["rows"]]
    boot = dict(rows)["main.boot (imports done)"]
    rows.append(("of which the rest (the Node's other attributes, state, counters; gossip: "
                 "its peers' bookkeeping and aggregation buffers; the transport, main)",
                 boot - sum(n for name, n in rows if name.startswith("of which"))))
    rows += [(f"free after boot at -X heapsize={a.heap} ({heap} B)", free),
             ("its largest free block", largest)]
    for name, n in rows:
        label = "**" + name + "**" if name.startswith("held") else name
        lines.append(f"| {label} | {format(n, ',').replace(',', ' ')} |")
    table = "\n".join(lines)
    publish(command, table, a.write, f"benchmarks/node_boot_heap.py {a.mode}")


if __name__ == "__main__":
    main()
