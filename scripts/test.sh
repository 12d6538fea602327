#!/usr/bin/env bash
# The whole suite, in the order that fails fastest. Run through ./dev test (which installs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check .
echo "== pytest tests"; python -m pytest -q tests "$@"
echo "== pytest hil on the emulated micro:bit (Cortex-M0, MicroPython 1.9.2)"
python -m pytest -q hil --board microbit-qemu
# MicroPython 1.29 built here from ../shared/vendor with microfed frozen in (the first run
# builds each image, ~25 s; later runs reuse the cache unless an input changed).
for board in mps2-an385 virt-rv32 unix32; do
  echo "== pytest hil on $board (MicroPython 1.29, microfed frozen in)"
  python -m pytest -q hil --board "$board"
done
