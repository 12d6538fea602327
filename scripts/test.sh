#!/usr/bin/env bash
# The whole suite, in the order that fails fastest. Run through ./dev test (which installs).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"; ruff check .
echo "== pytest tests"; python -m pytest -q tests "$@"
