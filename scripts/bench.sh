#!/usr/bin/env bash
# Benchmarks against peers, in the bench venv (./dev bench). Results go to docs/benchmarks.md
# by hand after review: machines are shared, so only ratios within one run are meaningful.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/bench
for b in benchmarks/*.py; do
  case $b in */rfc8032_reference.py) continue ;; esac
  echo "== $b"
  python "$b" "$@" | tee "runs/bench/$(basename "$b" .py).md"
done
