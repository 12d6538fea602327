"""A node's round on recorded inputs (tools/microfed_tools/roundcase.py), on the board, bit for
bit with the x86 reference: check the global, train on a 111-sample digits shard, sign, check
12 peers' updates as they arrive, rebuild the announced Krum aggregate, digest, sign — in
gossip and in coordinated mode. On the emulated MCUs also the instructions per phase (QEMU
instruction counting: a regression gate, and the issue's round budgets), on unix32 the
smallest heap the round runs in (bisection over -X heapsize) and the live heap per phase; on
mps2-an385 also the whole round from a firmware built with a 64 KB heap, shard and vectors on
its filesystem.
Figures and commands: docs/boards.md, "A node's round"."""

from __future__ import annotations

from typing import Any

import pytest

from microfed_tools import roundcase

# Instruction budgets: the issue's targets for a whole round, and per board, mode and phase the
# counts measured (`python benchmarks/device.py`) plus 5 % or at least 50 000, rounded up (lower
# them when the code gets faster; a change that needs more says why). The aggregate's were
# lowered when it moved to fixed int32 buffers (93 M -> 80 M on the M3), the boot's when
# Ed25519's comb table was frozen as constants (77.7 M -> 43.6 M; 2026-11-27). On 2026-11-27
# the round's large blocks became buffers allocated once at boot (noderound.RoundBuffers, the
# receive buffer): every collection scans them, which costs the signature phases a little
# (mps2-an385 gossip: check_global 90.6 -> 91.8 M, sign_update 90.2 -> 92.3 M), and training
# sums one class at a time (model.py; 246.2 -> 250.1 M). boot_shard is small and moves with
# where a collection lands (mps2-an385 gossip: 732 000 to 749 000 in three runs): its budgets
# are the measured figure + 50 000; since 2026-11-27 it allocates the round buffers and the
# registry phase builds the peer store (the node's order: buffers before the first Ed25519
# operation). Since 2026-11-27 (later) boot_shard also allocates the receive buffer, after a
# collection as node.py does (gossip, mps2-an385: 644 000 -> 797 000; virt-rv32: 817 000 ->
# 951 000), and Ed25519 verification uses a width-3 NAF (2 odd multiples instead of 8: the
# check_global phases moved by -0.4 M to +2.0 M, within their budgets, docs/ed25519.md).
# Later on 2026-11-27 a signature takes the public key the node checked at boot instead of
# deriving it again (ed25519.sign's pub): on the M3, gossip, sign_update 92.3 -> 65.3 M and
# sign_digest 45.2 -> 31.8 M (the whole round 371.6 -> 347.4 M); boot_registry +23 M, because
# the harness now derives the key at boot as a node's bundle check does (44.6 -> 67.7 M).
# Then a gossip node's aggregation buffers moved to boot (colagg.buffers, 13 x 256 B that every
# collection scans): gossip check_global 95.1 -> 96.9 M on the M3, 96.2 -> 98.4 M on RV32.
# On 2026-11-27 (third session) the global's values are read in place, one int32 at a time
# (wire.i32_at), instead of 64-value struct tuples a 64 KB Cortex-M3 did not always find a
# block for: check_global +1.4 to +1.8 M, every check_global budget re-derived from the
# counts then (`python benchmarks/device.py`: 101 715 000 / 90 676 000 / 102 462 000 /
# 94 134 000; the M3's gossip phase then measured 101 751 000 in CI, over its old budget); the
# M3's gossip sign_update measured 70.3 M (67.0 M before; nothing in the phase changed: a
# collection landed in it), re-derived too.
# 2026-11-28: Ed25519 is the firmware's C module (boards/firmware/ed25519c). The phases that
# sign or verify were re-derived from `python benchmarks/device.py` (M3 gossip: boot_registry
# 11 706 000, check_global 19 696 000, sign_digest 2 234 000, sign_update 9 510 000; M3
# coordinated 10 727 000, 18 858 000, 9 427 000; RV32 gossip 23 364 000, 39 984 000,
# 4 552 000, 14 922 000; RV32 coordinated 22 249 000, 39 042 000, 14 865 000): + 5 % or at
# least + 1 000 000, since a collection landing in a phase this small would be more than 5 %.
ROUND_BUDGETS = {"mps2-an385": {"gossip_round": 400_000_000, "coordinated_round": 250_000_000}}
PHASE_BUDGETS: dict[str, dict[str, int]] = {
    "mps2-an385:gossip": {
        "boot_registry": 12_710_000, "boot_shard": 847_000, "check_global": 20_700_000,
        "peer_checks": 15_870_000, "aggregate": 82_840_000, "sign_digest": 3_240_000,
        "train": 262_600_000, "sign_update": 10_510_000,
    },
    "mps2-an385:coordinated": {
        "boot_registry": 11_730_000, "boot_shard": 846_000, "check_global": 19_860_000,
        "train": 253_200_000, "sign_update": 10_430_000,
    },
    "virt-rv32:gossip": {
        "boot_registry": 24_540_000, "boot_shard": 1_001_000, "check_global": 41_990_000,
        "peer_checks": 19_020_000, "aggregate": 95_950_000, "sign_digest": 5_560_000,
        "train": 304_920_000, "sign_update": 15_930_000,
    },
    "virt-rv32:coordinated": {
        "boot_registry": 23_370_000, "boot_shard": 1_001_000, "check_global": 41_000_000,
        "train": 296_710_000, "sign_update": 15_870_000,
    },
}

# Heap (bytes) on unix32 (31-bit small ints like an MCU, microfed frozen, a filesystem for the
# shard and the peers' vectors). "live": the most the round holds after a collection at the end
# of any phase (the issue's "peak heap after collect"); "smallest": the smallest -X heapsize
# the whole round runs in (transients and fragmentation included).
# Gossip: the issue's 48 KB stretch (its budget is 64 KB); coordinated: the issue's 32 KB.
# Measured (docs/boards.md, benchmarks/device.py): 43 008 / 32 768 B until the update frame
# was built in the receive buffer (as firmware/node.py does), 40 960 / 25 600 B since (aaf66ae,
# 2026-11-27), 43 008 then 37 888 / 25 600 B on 2026-11-28 (docs/boards.md says why); the
# round program frozen like node.py and messages read into the receive buffer
# (roundcase.run_unix).
HEAP_BUDGETS = {"gossip": {"live": 48 * 1024, "smallest": 48 * 1024},
                "coordinated": {"live": 32 * 1024, "smallest": 32 * 1024}}


def _frozen(target: Any) -> None:
    if not target.cap("frozen_core", False):
        pytest.skip("board %s has no microfed frozen into its firmware (capability "
                    "frozen_core): the round needs MicroPython 1.29 with the portable core"
                    % target.name)


@pytest.fixture(scope="module", params=["gossip", "coordinated"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def case(mode: str) -> roundcase.Case:
    return roundcase.make_case(gossip=mode == "gossip")


@pytest.fixture(scope="module")
def want(case: roundcase.Case) -> dict[str, Any]:
    return roundcase.run_reference(case)


def test_reference_agrees_with_the_coordinators_aggregate(want: dict[str, Any],
                                                          case: roundcase.Case) -> None:
    # The announced digest comes from microfed.audit over whole vectors, the node's from its
    # chunked rebuild: a disagreement here is a bug before any board is involved.
    if case.gossip:
        assert want["out"]["agrees"] is True
        assert want["out"]["digest"] == case.expected_digest
    assert set(want["out"]) >= {"update_1", "update_2"}


def test_the_round_on_the_board_equals_the_reference(device: Any, case: roundcase.Case,
                                                     want: dict[str, Any]) -> None:
    _frozen(device)
    device.fresh()
    got = roundcase.run_repl(device.repl, case)
    device.fresh()
    assert got["out"] == want["out"]


def test_a_decoded_vector_is_held_at_its_length(device: Any) -> None:
    # list(x) on MicroPython appends and doubles: a 650-value vector would hold a 4 KB block
    # (1024 slots), which a 64 KB heap could not always find mid-round (measured on the
    # Cortex-M3 build: MemoryError in training). q16.exact_list and the wire decoder size the
    # list once: what they hold after a collection is the list object plus 650 slots.
    _frozen(device)
    device.fresh()
    text = device.repl.exec_verified(
        "import gc, struct, sys\n"
        "from microfed import q16, wire\n"
        "def _mfheld(make, arg):\n"
        " gc.collect()\n f = gc.mem_free()\n kept = make(arg)\n gc.collect()\n"
        " return f - gc.mem_free(), kept\n"
        "_b = struct.pack('<650i', *range(650))\n"
        "_c, _l = _mfheld(q16.exact_list, struct.unpack('<650i', _b))\n"
        "_d, _v = _mfheld(lambda b: wire._unpack_i32(b, 0, 650), _b)\n"
        "print(_c, _d, 4 if sys.maxsize < (1 << 32) else 8, _l == _v)\n"
        "_mfheld = _l = _v = _b = None\n", what="allocation check")
    copied, decoded, word, same = text.split()
    assert same == "True"
    # Slots rounded up to the GC's 16-byte blocks (4 words), plus the list object (4 words),
    # plus one block a conservative scan of the C stack may keep alive (unix32 scans it: one
    # stray 16-byte block seen on 2026-11-27). A doubled list would be 1.5 KB more.
    limit = (650 + 4) * int(word) + 16 + 16
    assert int(copied) <= limit, (copied, limit)
    assert int(decoded) <= limit, (decoded, limit)


@pytest.fixture(scope="module")
def counted(target: Any, case: roundcase.Case) -> dict[str, Any]:
    _frozen(target)
    counted_boards = set(ROUND_BUDGETS) | {k.split(":")[0] for k in PHASE_BUDGETS}
    if target.board.name not in counted_boards:
        pytest.skip("no instruction budget for board %s (QEMU instruction counting: %s)"
                    % (target.board.name, ", ".join(sorted(counted_boards))))
    return roundcase.measure_board(target.board, case)


def test_counted_run_equals_the_reference(counted: dict[str, Any], want: dict[str, Any]) -> None:
    assert counted["out"] == want["out"]


def test_whole_round_within_the_issue_budget(counted: dict[str, Any], target: Any) -> None:
    budget = ROUND_BUDGETS.get(target.board.name, {})
    got = roundcase.round_costs(counted)
    over = {k: (got[k], budget[k]) for k in got if k in budget and got[k] > budget[k]}
    assert over == {}, "instructions over budget (measured, budget): %r" % over
    assert any(k in budget for k in got) or target.board.name not in ROUND_BUDGETS


def test_every_phase_within_its_budget(counted: dict[str, Any], target: Any, mode: str) -> None:
    budget = PHASE_BUDGETS.get(target.board.name + ":" + mode)
    if budget is None:
        pytest.skip("no per-phase budget for %s in %s mode" % (target.board.name, mode))
    over = {p: (counted["cost"][p], b) for p, b in budget.items() if counted["cost"][p] > b}
    assert over == {}, "instructions over budget (measured, budget): %r" % over


@pytest.fixture(scope="module")
def unix32(target: Any) -> str:
    if target.board.name != "unix32":
        pytest.skip("heap bisection runs the unix32 build (-X heapsize); board is %s"
                    % target.board.name)
    from microfed_tools import firmware

    return str(firmware.build("unix32"))


def test_heap_on_unix32(unix32: str, case: roundcase.Case, want: dict[str, Any], mode: str) -> None:
    budget = HEAP_BUDGETS[mode]
    res = roundcase.run_unix(unix32, case, str(budget["smallest"]))
    assert res["out"] == want["out"]
    live = max(res["live"].values())
    assert live <= budget["live"], res["live"]
    smallest = roundcase.smallest_heap(unix32, case, hi=budget["smallest"])
    assert smallest <= budget["smallest"]
    # Nowhere between the budget and 512 KB does it fail (failures need not be monotonic).
    assert roundcase.sweep(unix32, case, budget["smallest"]) == []
    # A heap no larger than the measured live peak (its size includes the GC's own tables)
    # cannot hold the round: it fails, and says so (a MemoryError). Not "smallest - 2 KB":
    # failures are not monotonic near the edge, so the bisection's answer can have working
    # heaps just below it.
    with pytest.raises(RuntimeError, match="MemoryError"):
        roundcase.run_unix(unix32, case, str(live))


# The emulated Cortex-M3 as a board with flash: shard and peers' vectors on its filesystem
# (the RAM disk, docs/boards.md), MicroPython built with a 64 KB heap.
M3_SMALL_HEAP = 64 * 1024


@pytest.fixture(scope="module")
def m3_small_heap(target: Any, case: roundcase.Case) -> dict[str, Any]:
    if target.board.name != "mps2-an385":
        pytest.skip("the 64 KB-heap firmware is built for mps2-an385; board is %s"
                    % target.board.name)
    from microfed_tools import firmware

    image = firmware.build("mps2-an385", heap=M3_SMALL_HEAP)
    # The round program frozen and the messages in files, as a node has them: compiled on the
    # board and fed as 1 KB hex statements, the harness itself ran out of heap (a 1 025-byte
    # statement, once, under load, when the raw REPL resent blocks; 2026-11-27).
    return roundcase.measure_board(target.board, case, files=True, image=str(image),
                                   frozen=True)


def test_round_runs_in_a_64k_heap_on_the_cortex_m3(m3_small_heap: dict[str, Any],
                                                   want: dict[str, Any], mode: str) -> None:
    assert m3_small_heap["out"] == want["out"]
    live = max(m3_small_heap["live"].values())
    assert live <= HEAP_BUDGETS[mode]["live"], m3_small_heap["live"]


# The issue's heaps as a Cortex-M3 firmware's whole heap: the coordinated round in a 32 KB
# build, the gossip round in a 48 KB build (the stretch; its budget is 64 KB, above). Since
# Ed25519 is the firmware's C module (2026-11-28); before, a 32 KB and a 34 KB build ran out
# of heap in the coordinated round (docs/boards.md).
M3_ISSUE_HEAP = {"coordinated": 32 * 1024, "gossip": 48 * 1024}


def test_round_runs_in_the_issues_heap_on_the_cortex_m3(target: Any, case: roundcase.Case,
                                                        want: dict[str, Any], mode: str) -> None:
    if target.board.name != "mps2-an385":
        pytest.skip("the %d KB-heap firmware is built for mps2-an385; board is %s"
                    % (M3_ISSUE_HEAP[mode] // 1024, target.board.name))
    from microfed_tools import firmware

    image = firmware.build("mps2-an385", heap=M3_ISSUE_HEAP[mode])
    res = roundcase.measure_board(target.board, case, files=True, image=str(image), frozen=True)
    assert res["out"] == want["out"]
