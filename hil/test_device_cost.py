"""Instruction counts per phase on the emulated MCUs, as a regression gate (not a timed test):
QEMU runs with `-icount shift=0`, so a count is the guest's instructions (in ticks_us() steps of
1 000); the same phase measured twice differs by at most 0.2 % or 5 000 instructions,
whichever is more: a garbage collection can land at another point (the collector scans the C
stack conservatively, so what it keeps alive can differ from run to run; measured: up
to 12 000 of 52.8 M for Krum, 2 000 of the 0.5 M import, 42 000 of 40.2 M for X25519, whose
long ints collect several times). Each phase must stay under its budget
below. The device's results must also
equal the host's (the work really ran). Figures and the command: docs/boards.md,
"Device cost" (`python benchmarks/device.py`).
"""

from __future__ import annotations

from typing import Any

import pytest

from microfed_tools import devicecost

# Budgets: the counts measured on 2026-11-26 plus 5 %, in instructions. Lower them when the
# code gets faster; a change that needs more must say why in its commit.
BUDGETS: dict[str, dict[str, int]] = {
    # import: 575 000 measured with wire kinds 7-13 (issue 10; before them 542 000, and main.py
    # and ramdisk.py are frozen too since the board mix), + 5 %.
    # Measured 2026-11-27: public_key 19 797 000 since the comb table is frozen as constants
    # (it was built on the first call: 53.0 M); decode_update 375 000-389 000 since vectors are
    # unpacked 64 values at a time (305 000 in one n-tuple, which needed a second 2.6 KB
    # block beside the list); import 602 000 (wire.encode_update and the helpers it shares).
    # Later on 2026-11-27: import 644 000 (training's sample buffers and array order, the
    # aggregation's column buffers, sign's public key argument), + 5 %.
    # 2026-11-27 (third session): decode_update 1 670 000 (virt-rv32: 2 098 000), + 5 %: a
    # vector's values are read one int32 at a time in place (wire.i32_at), 4 x the
    # instructions of 64-value struct tuples, whose 264-byte blocks a 64 KB Cortex-M3 node did
    # not always find mid-run (docs/boards.md); a node decodes one vector a round this way,
    # the global's (+1.3 to +1.8 M of a 357 M gossip round).
    # 2026-11-28: Ed25519 is the firmware's C module (boards/firmware/ed25519c): measured
    # import 546 000, public_key 1 832 000, sign 3 767 000, verify 6 915 000,
    # encode_and_sign_update 6 224 000 (virt-rv32: 587 000, 4 109 000, 8 403 000,
    # 15 987 000, 11 120 000), + 5 %.
    "mps2-an385": {"import": 580_000, "public_key": 1_930_000, "sign": 3_960_000,
                   "verify": 7_270_000, "train_epoch": 67_260_000,
                   "encode_and_sign_update": 6_540_000, "decode_update": 1_754_000,
                   "krum_13x650_f3": 125_140_000,
                   # issue 10, measured: 39 908 000 and 3 081 000, plus 5 %
                   "x25519": 41_910_000, "secagg_mask_651": 3_240_000},
    # import 694 000 later on 2026-11-27, + 5 %
    "virt-rv32": {"import": 620_000, "public_key": 4_320_000, "sign": 8_830_000,
                  "verify": 16_790_000, "train_epoch": 76_260_000,
                  # 2026-11-27: decode_update 415 000 in 64-value steps (353 000 in one
                  # n-tuple), import 645 000
                  "encode_and_sign_update": 11_680_000, "decode_update": 2_203_000,
                  "krum_13x650_f3": 133_120_000,
                  # issue 10, measured: 40 457 000 and 3 692 000, plus 5 %; import 615 000
                  "x25519": 42_480_000, "secagg_mask_651": 3_880_000},
}


@pytest.fixture(scope="module")
def counted(target: Any) -> list[dict[str, Any]]:
    """Two measurements on a second emulator of the same board, started with -icount."""
    board = target.board
    if getattr(board, "name", "") not in BUDGETS:
        pytest.skip("no instruction budget for board %s (QEMU instruction counting: "
                    "%s)" % (getattr(board, "name", board), ", ".join(BUDGETS)))
    return devicecost.measure_board(board, runs=2)


def test_device_results_equal_the_host(counted: list[dict[str, Any]]) -> None:
    want = devicecost.host_expectations()
    for run in counted:
        assert {k: run[k] for k in want} == want


def test_counts_repeat(counted: list[dict[str, Any]]) -> None:
    a, b = counted
    for phase in devicecost.PHASES:
        assert abs(a[phase] - b[phase]) <= max(5000, a[phase] // 500), (phase, a[phase], b[phase])


def test_every_phase_within_its_budget(counted: list[dict[str, Any]], target: Any) -> None:
    budget = BUDGETS[target.board.name]
    over = {p: (counted[0][p], budget[p]) for p in devicecost.PHASES
            if counted[0][p] > budget[p]}
    assert over == {}, "instructions over budget (measured, budget): %r" % over


# Local DP (microfed.dp, docs/privacy.md "Device cost"): measured 2026-11-26 plus 5 %.
DP_BUDGETS: dict[str, dict[str, int]] = {
    # dp_import: 392 000 on 2026-11-27 (q16 and wire gained exact_list and encode_update), + 5 %
    # dp_import 427 000 later on 2026-11-27 (the same imports as "import" above), + 5 %
    # All re-derived on 2026-11-28 (python benchmarks/device.py --dp, + 5 %) when other frozen
    # modules changed (config, node, colagg, ed25519, verify split into registry) and the
    # sampler's code did not: at 336a776 dgauss_2_3_x200 measured 23 120 000 (22 666 000 when
    # its budget was set, 2026-11-26), then 24 012 000; dgauss_mesh_x200 37 802 000 -> 38 792
    # 000, privatize_650 128 566 000 -> 131 807 000 (the same image-wide drift; not explained),
    # and after one more change to node.py (not imported here) 22 651 000, 37 302 000 and
    # 126 950 000 again: the budgets keep the higher counts + 5 %.
    "mps2-an385": {"dp_import": 455_000, "dgauss_mesh_x200": 40_732_000,
                   "dgauss_2_3_x200": 25_213_000, "l2_clip_650": 3_100_000,
                   "privatize_650": 138_398_000},
}


def _program_within_budget(target: Any, what: str, budgets: dict[str, dict[str, int]],
                           program: str, phases: tuple[str, ...],
                           want: dict[str, Any]) -> None:
    """One cost program on the board: its results equal the host's, its phases within
    budget."""
    board = target.board
    if getattr(board, "name", "") not in budgets:
        pytest.skip("no %s budget for board %s" % (what, getattr(board, "name", board)))
    run = devicecost.measure_board(board, programs=(program,), phases=phases)[0]
    assert {k: run[k] for k in want} == want
    budget = budgets[board.name]
    over = {p: (run[p], budget[p]) for p in phases if run[p] > budget[p]}
    assert over == {}, "instructions over budget (measured, budget): %r" % over


def test_dp_costs_within_budget_and_equal_the_host(target: Any) -> None:
    _program_within_budget(target, "local-DP", DP_BUDGETS, devicecost.DP_PROGRAM,
                           devicecost.DP_PHASES, devicecost.dp_host_expectations())


# The MLP (microfed.mlp, docs/model.md): measured 2026-11-27 (python benchmarks/device.py
# --mlp) plus 5 %. mlp_import re-derived later that day: 312 000 -> 329 000 on mps2-an385
# (virt-rv32 340 000 -> 357 000) when other frozen modules changed (serialframe, noderound,
# replay, colagg; mlp, model and q16 did not).
MLP_BUDGETS: dict[str, dict[str, int]] = {
    "mps2-an385": {"mlp_import": 345_000, "mlp_init": 20_006_000,
                   "mlp_train_epoch": 192_652_000},
}


def test_mlp_costs_within_budget_and_equal_the_host(target: Any) -> None:
    _program_within_budget(target, "MLP", MLP_BUDGETS, devicecost.MLP_PROGRAM,
                           devicecost.MLP_PHASES, devicecost.mlp_host_expectations())
