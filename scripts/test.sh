#!/usr/bin/env bash
# Quick start 2: set up, then run the test suite (two workers; ~10 min on a 2-core CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q -p no:cacheprovider -p no:benchmark "$@" tests
