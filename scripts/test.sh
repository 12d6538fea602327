#!/usr/bin/env bash
# The whole suite, in the order that fails fastest. Run through ./dev test (which installs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check .
echo "== pytest tests"; python -m pytest -q tests "$@"
echo "== pytest hil on the emulated micro:bit (Cortex-M0, MicroPython 1.9.2)"
python -m pytest -q hil --board microbit-qemu
