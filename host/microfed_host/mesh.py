"""`microfed mesh run`: a whole mesh on one machine, under attack, and its report.

This module runs the real mesh (`mqtt`) and ties the pieces together: scenario.py (the
scenario and its run directory), inproc.py (the in-process engine), report.py (progress,
summary, plots, table); the sweeps (sweep.py, study.py) call run() from above.

Two transports run the same protocol code:

- `mqtt` (default): an MQTT broker (mosquitto, else embedded amqtt, or $MICROFED_BROKER),
  the coordinator as its own process (`python -m microfed_host.coordinator`), one
  MicroPython node per honest node (firmware/main.py, exactly what a board runs) on the
  board kind the scenario's `boards` gives it (nodeproc.py: the 64-bit unix port by default,
  the 32-bit build with microfed frozen in, an emulated Cortex-M3), and the adversary (a
  host thread with the compromised nodes' registered keys).
- `inproc`: one CPython process, no broker, no MicroPython: the same Coordinator object,
  the same Adversary, and simulated nodes that call the same portable functions the
  firmware calls (model.train with the same seeds, wire frames, microfed.verify,
  microfed.audit aggregation). By the determinism contract it reaches the same final model
  digest as the real mesh with the same seed (tests/test_mesh.py checks it); it is what
  the results sweep (`microfed mesh sweep`) runs.

Run directory (--out):
    scenario.json        the effective scenario (file + flags)
    mesh/                provisioned keys, signed registry, device bundles
    data/                test.mfds (held-out split) and one shard per node
    nodes/<id>/          honest nodes: bundle.json, shard.bin, config.json, state/, node.log
    coordinator.json     coordinator settings;  coordinator.sqlite  its persistent state
    coordinator.log      its JSON event lines;   adversary.json     what the adversary did
    summary.json, rounds.csv, accuracy.png, reputation.png
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microfed_host import adversary as advmod
from microfed_host import brokerauth
from microfed_host.chaos import Chaos, ChaosDriver
from microfed_host.inproc import run_inproc
from microfed_host.nodeproc import (
    SERIAL_KINDS,
    NodeError,
    NodeLauncher,
    NodeProcess,
    stop_process,
    unix_launcher,
)
from microfed_host.privacy import privacy_line
from microfed_host.report import Progress, board_counts, summarize, table
from microfed_host.scenario import (
    DEFAULT_SCENARIO,
    MAX_TIMEOUT_S,
    REPO,
    TRANSPORTS,
    AttackGroup,
    MeshError,
    Scenario,
    apply_overrides,
    load_scenario,
    make_adversary,
    prepare,
    write_node_config,
)

__all__ = ["DEFAULT_SCENARIO", "AttackGroup", "MeshError", "Scenario", "apply_overrides",
           "load_scenario", "run", "table"]

def child_pythonpath() -> str:
    """PYTHONPATH for a child process that runs microfed from this checkout: its shared/,
    host/ and tools/, then the caller's own entries (no empty entry: that would put the
    child's working directory on sys.path)."""
    parts = [str(REPO / d) for d in ("shared", "host", "tools")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


class _Coord:
    """The coordinator child process (`module`: an edge coordinator's is microfed_host.edge)
    and a thread that turns its stdout into events."""

    def __init__(self, out: Path, broker: str, events: queue.Queue[dict[str, Any]],
                 module: str = "microfed_host.coordinator", what: str = "the coordinator"
                 ) -> None:
        self.argv = [sys.executable, "-m", module, str(out), "--broker", broker]
        self.log_path = out / "coordinator.log"
        self.events = events
        self.what = what
        self._start()

    def _start(self) -> None:
        env = dict(os.environ, PYTHONPATH=child_pythonpath())
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env=env)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict):
                self.events.put(ev)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.thread.join(5)

    def restart(self) -> None:
        """SIGKILL (a crash, a power cut), then the same process again on the same run
        directory: it resumes from its store, and its broker session kept what came meanwhile."""
        self.kill9()
        self.log.close()
        self._start()

    def check_alive(self) -> None:
        """MeshError with its log's tail if the process has exited and every event it
        printed has been taken."""
        if self.proc.poll() is not None and self.events.empty():
            self.thread.join(2)
            if self.events.empty():
                raise MeshError(f"{self.what} exited with code {self.proc.returncode}:\n"
                                + _tail(self.log_path))

    def stop(self) -> None:
        stop_process(self.proc)
        self.thread.join(5)
        self.log.close()


def start_adversary(adv: advmod.Adversary, mesh_dir: Path, host: str, port: int,
                    deadline_s: float, own_topics: bool) -> advmod.AdversaryThread:
    """The adversary's thread, started on broker (host, port): compromised REGISTERED nodes,
    each logged in as itself (its login from mesh directory `mesh_dir`); with `own_topics`
    its wire attacks go out on its own topic (a broker's ACL drops anything else;
    adversary.py explains)."""
    adv.own_topics = own_topics
    logins = {c.node_id: brokerauth.client_auth(mesh_dir, c.node_id) for c in adv.nodes}
    th = advmod.AdversaryThread(adv, host, port, wait_s=max(5.0, deadline_s / 2), logins=logins)
    th.start_client()
    th.start()
    return th


def node_launchers(sc: Scenario, given: dict[str, NodeLauncher] | None) -> dict[str, NodeLauncher]:
    """A launcher for every board kind the scenario uses: `given` (from the CLI layer, which
    builds the firmware images) wins; `unix` needs nothing built."""
    out = dict(given or {})
    for kind, _n in sc.board_counts():
        if kind in out:
            continue
        if kind == "unix":
            try:
                out[kind] = unix_launcher()
            except NodeError as e:
                raise MeshError(str(e)) from None
        else:
            raise MeshError(f"board kind {kind} needs its firmware and launcher: run it with "
                            "`microfed mesh run --boards ...`, which builds them")
    return out


def board_label(sc: Scenario) -> str:
    """ "unix32 x8, mps2-an385 x2" """
    return board_counts(sc.node_boards())


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_mqtt(sc: Scenario, out: Path, doc: dict[str, Any], broker_arg: str | None = None,
             progress: Progress | None = None, kill_coordinator_at: int = 0,
             timeout: float = 1800.0, chaos: Chaos | None = None,
             on_ready: Callable[[str, int, str], None] | None = None,
             launchers: dict[str, NodeLauncher] | None = None,
             on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    from microfed_host.broker import BrokerError, broker_from_arg

    launchers = node_launchers(sc, launchers)
    prog = progress or Progress(sc, None)
    info: dict[str, Any] = {"transport": "mqtt", "coordinator_restarts": 0,
                            "boards": sc.node_boards()}
    nodes: dict[str, NodeProcess] = {}
    coord: _Coord | None = None
    adv_thread: advmod.AdversaryThread | None = None
    try:
        # The broker refuses strangers: password file + ACL from the provisioned mesh.
        broker = broker_from_arg(broker_arg, workdir=out / "broker",
                                 auth_dir=out / "mesh" / brokerauth.BROKER_DIR)
    except BrokerError as e:
        raise MeshError(str(e)) from None
    try:
        try:
            broker.start()
        except BrokerError as e:
            raise MeshError(str(e)) from None
        info["broker"] = {"kind": broker.kind, "address": broker.address}
        prog.say(f"  broker: {broker.kind} on {broker.address}")
        if broker.kind == "external":
            prog.say("  clients log in with this run's fresh credentials (mesh/broker/passwd): an "
                     "external broker enforces them only if it loads that file and mesh/broker/acl")
        else:
            prog.say("  broker auth: anonymous clients refused; logins and topic ACL from "
                     "mesh/broker/passwd and mesh/broker/acl")
        addr = (broker.host, broker.port)
        for nid, kind in sc.node_boards().items():
            write_node_config(out / "nodes" / nid, sc, addr,
                              "serial" if kind in SERIAL_KINDS else "tcp",
                              doc.get("dp_resolved"))
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        coord = _Coord(out, broker.address, events)
        # Nodes start once the coordinator's session is subscribed (it says "ready"): from
        # then on the broker keeps their messages for it, even across a coordinator restart.
        ready_by = time.monotonic() + 60
        while True:
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                ev = None
            if ev is not None and ev.get("ev") == "ready":
                break
            if ev is not None and ev.get("ev") == "fatal":
                raise MeshError(f"coordinator failed: {ev.get('error')}")
            coord.check_alive()
            if time.monotonic() > ready_by:
                raise MeshError("the coordinator did not get ready within 60 s:\n"
                                + _tail(out / "coordinator.log"))
        if on_ready is not None:
            # A hook (tests, benchmarks: a junk flood) that runs once the coordinator is
            # subscribed and before the nodes start: (broker host, port, mesh name).
            on_ready(broker.host, broker.port, str(doc["mesh"]))
        adv = make_adversary(sc, out, doc["mesh"])
        if adv is not None:
            adv_thread = start_adversary(adv, out / "mesh", broker.host, broker.port,
                                         sc.deadline_s, own_topics=broker.kind != "external")
        board_of = sc.node_boards()

        def start_node(nid: str) -> None:
            stop_node(nid)
            launch = launchers.get(board_of[nid])
            if launch is None:  # checked before the broker started; a guard
                raise MeshError(f"no launcher for board kind {board_of[nid]}")
            node = launch(nid, out / "nodes" / nid, addr)
            try:
                node.start()
            except NodeError as e:
                raise MeshError(str(e)) from None
            nodes[nid] = node

        def stop_node(nid: str) -> None:
            node = nodes.pop(nid, None)
            if node is not None:
                node.stop(grace=0.0)

        restart_coord = {"now": False}
        driver = None
        if chaos is not None:
            byz = sc.byzantine_ids()
            if not byz and (chaos.faults and (chaos.flood_round or chaos.malformed_round)):
                raise MeshError("chaos: the flood and the malformed frames come from a "
                                "compromised node's login: add an [[attackers]] group")
            if broker.kind == "external" and chaos.faults and chaos.broker_restart_round:
                raise MeshError("chaos: broker_restart_round needs a broker microfed starts "
                                "(mosquitto or amqtt), not an external one")
            intruder = byz[0] if byz else ""
            driver = ChaosDriver(chaos, out, doc["mesh"], broker, prog.say,
                                 lambda: restart_coord.update(now=True), stop_node, start_node,
                                 intruder, brokerauth.client_auth(out / "mesh", intruder)
                                 if intruder else {})
        for nid in sc.honest_ids():
            start_node(nid)
        prog.say(f"  started the coordinator, {len(nodes)} MicroPython nodes ({board_label(sc)})"
                 + (f" and the adversary ({len(adv.nodes)} compromised)" if adv else ""))
        deadline = time.monotonic() + timeout
        done: dict[str, Any] | None = None
        killed = False
        while done is None:
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                ev = None
            if ev is not None:
                prog.event(ev)
                k = ev.get("ev")
                if k == "done":
                    done = ev
                    break
                if k == "fatal":
                    raise MeshError(f"coordinator failed: {ev.get('error')}")
                if driver is not None:
                    driver.on_event(ev)
                    if restart_coord["now"]:
                        restart_coord["now"] = False
                        coord.restart()
                        info["coordinator_restarts"] += 1
                        continue
                if (k == "accepted" and kill_coordinator_at and not killed
                        and ev.get("round") == kill_coordinator_at
                        and ev.get("have", 0) >= max(1, ev.get("want", 2) // 2)
                        and ev.get("have", 0) < ev.get("want", 0)):
                    coord.restart()
                    killed = True
                    info["coordinator_restarts"] += 1
                    prog.say(f"  *** SIGKILL to the coordinator in round {ev['round']} "
                             f"({ev['have']}/{ev['want']} updates accepted); restarting it")
                    continue
            coord.check_alive()
            for nid, node in nodes.items():
                rc = node.poll()
                if rc == EXIT_REVOKED and _revoked(out, nid):
                    continue  # it learnt of its revocation and stopped, as it should
                if rc is not None and rc != 0:
                    raise MeshError(f"node {nid} ({node.board}) exited with code {rc}:\n"
                                    + _tail(node.log_path))
            if adv_thread is not None and adv_thread.error:
                raise MeshError(f"adversary failed: {adv_thread.error}")
            if time.monotonic() > deadline:
                raise MeshError(f"the run did not finish within {timeout:.0f} s")
        info["coordinator_done"] = done
        # Nodes exit by themselves on the final GLOBAL_MODEL (after their last digest).
        end = time.monotonic() + 15
        for node in nodes.values():
            node.wait(max(0.1, end - time.monotonic()))
        info["node_exit_codes"] = {nid: node.poll() for nid, node in nodes.items()}
        coord.proc.wait(10)
        if on_done is not None:
            on_done()  # the run is over and its broker still up (e.g. last alerts over MQTT)
        if adv is not None:
            (out / "adversary.json").write_text(json.dumps(adv.report(), indent=2) + "\n")
        if driver is not None:
            driver.close()
            info["chaos"] = {"settings": chaos.summary() if chaos else {}, **driver.report}
        return info
    finally:
        # Every child goes, whatever happened (Ctrl-C, an error, a failed node).
        for node in nodes.values():
            node.stop()
        if coord is not None:
            coord.stop()
        if adv_thread is not None:
            adv_thread.stop()
        broker.close()


# A node's exit code when the registry revoked it (firmware/node.py).
EXIT_REVOKED = 5


def _revoked(out: Path, node: str) -> bool:
    """True if the run's signed registry marks `node` revoked."""
    from microfed_host.provision import MeshDir, ProvisionError
    from microfed_host.registry import RegistryError

    try:
        _mesh, _seed, reg = MeshDir(out / "mesh").load()
    except (ProvisionError, RegistryError, OSError, ValueError):
        return False
    e = reg.nodes.get(node)
    return e is not None and not e.active


# ------------------------------------------------------------------ in-process engine


def run(sc: Scenario, out: Path, transport: str = "mqtt", broker: str | None = None,
        force: bool = False, say: Callable[[str], None] | None = print,
        kill_coordinator_at: int = 0, timeout: float = 1800.0,
        on_ready: Callable[[str, int, str], None] | None = None,
        launchers: dict[str, NodeLauncher] | None = None,
        on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run scenario `sc` into run directory `out` and return its summary. on_ready (mqtt
    only): called with (broker host, port, mesh name) once the coordinator is ready, before
    the nodes start; on_done (mqtt only): once the coordinator is done, before the broker
    stops. launchers (mqtt only): board kind -> NodeLauncher for the kinds in
    `sc.boards` other than unix (the CLI layer builds their firmware; nodeproc.py)."""
    if transport not in TRANSPORTS:
        raise MeshError(f"transport must be one of {', '.join(TRANSPORTS)}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
            and 0 < timeout <= MAX_TIMEOUT_S):
        raise MeshError(f"--timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}], "
                        f"got {timeout}")
    sc.check()
    if transport != "mqtt" and sc.boards.strip() != "unix":
        raise MeshError(f"boards {sc.boards!r} needs the mqtt transport (inproc runs no nodes "
                        "on boards)")
    if not 0 <= kill_coordinator_at <= sc.rounds:
        raise MeshError(f"--kill-coordinator-at must be a round in 1..{sc.rounds} (0: never), "
                        f"got {kill_coordinator_at}")
    if sc.chaos is not None:
        if on_ready is not None or on_done is not None:
            raise MeshError("on_ready and on_done are not supported for a [chaos] scenario")
        return run_chaos(sc, out, transport, broker, force, say, timeout, launchers)
    return _run_once(sc, out, transport, broker, force, say, kill_coordinator_at, timeout,
                     None, on_ready, launchers, on_done)


def _run_once(sc: Scenario, out: Path, transport: str, broker: str | None, force: bool,
              say: Callable[[str], None] | None, kill_coordinator_at: int, timeout: float,
              chaos: Chaos | None = None,
              on_ready: Callable[[str, int, str], None] | None = None,
              launchers: dict[str, NodeLauncher] | None = None,
              on_done: Callable[[], None] | None = None) -> dict[str, Any]:
    t0 = time.monotonic()
    doc = prepare(sc, out, force)
    prog = Progress(sc, say)
    prog.say(f"microfed mesh: {sc.name}: {sc.honest} honest + {sc.byzantine} Byzantine "
             f"({sc.attack_label}), rule {sc.rule} f={sc.f}, {sc.rounds} rounds, {sc.mode}, "
             f"{sc.split}, seed {sc.seed}, transport {transport}"
             + (f", boards {board_label(sc)}" if transport == "mqtt" else ""))
    prog.say(f"  run directory: {out}")
    if doc.get("dp_resolved"):
        prog.say(f"  privacy: {privacy_line(doc['dp_resolved'], sc.rounds)}")
    if transport == "mqtt":
        info = run_mqtt(sc, out, doc, broker, prog, kill_coordinator_at, timeout, chaos,
                        on_ready, launchers, on_done)
    else:
        if kill_coordinator_at or on_ready is not None or on_done is not None:
            raise MeshError("--kill-coordinator-at, on_ready and on_done need the mqtt "
                            "transport")
        info = run_inproc(sc, out, doc, prog)
    return summarize(out, doc, info, time.monotonic() - t0)


def run_chaos(sc: Scenario, out: Path, transport: str, broker: str | None, force: bool,
              say: Callable[[str], None] | None, timeout: float,
              launchers: dict[str, NodeLauncher] | None = None) -> dict[str, Any]:
    """A scenario with a [chaos] table runs twice: the reference (membership changes only)
    in OUT/reference, then with every fault in OUT/chaos. The faults must cost nothing:
    both runs end with the same final digest. OUT/chaos.json compares them."""
    chaos = sc.chaos
    assert chaos is not None
    if transport != "mqtt":
        raise MeshError("a [chaos] scenario needs the mqtt transport (it restarts the broker "
                        "and the coordinator)")
    try:
        chaos.check(sc.honest_ids(), sc.rounds)
    except ValueError as e:
        raise MeshError(str(e)) from None
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise MeshError(f"{out} is not empty; pick another --out or add --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    emit = say or (lambda _m: None)
    emit("chaos: 1/2 the reference run (membership changes only, no faults)")
    ref = _run_once(sc, out / "reference", transport, broker, False, say, 0, timeout,
                    chaos.reference(), launchers=launchers)
    emit("chaos: 2/2 the same scenario with every fault")
    hit = _run_once(sc, out / "chaos", transport, broker, False, say, 0, timeout, chaos,
                    launchers=launchers)
    same = hit["final_digest"] == ref["final_digest"]
    result = {"same_final_digest": same, "final_digest": hit["final_digest"],
              "reference_final_digest": ref["final_digest"],
              "chaos": hit.get("chaos"), "rejected": hit.get("rejected"),
              "reference_rejected": ref.get("rejected"),
              "coordinator_restarts": hit.get("coordinator_restarts"),
              "reference": str(out / "reference"), "run": str(out / "chaos")}
    (out / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    emit(f"  final digest      {hit['final_digest']}")
    emit(f"  clean run's       {ref['final_digest']}  "
         + ("(equal: the faults cost nothing)" if same else "(DIFFERENT)"))
    if not same:
        raise MeshError(f"chaos changed the result: final digest {hit['final_digest']} != "
                        f"the reference run's {ref['final_digest']} (see {out / 'chaos.json'})")
    hit["chaos_result"] = result
    return hit
