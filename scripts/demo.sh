#!/usr/bin/env bash
# Quick start 1: set up; tiny Vision ELECTRA (100 steps), then MAE at equal steps (100) and equal FLOPs (600), on
# Fashion-MNIST; k-NN and linear probes beside random init and raw pixels (2 idle CPU cores: ~8 min with the set-up);
# runs/demo/report.md, rewritten after every stage (re-run to continue an interrupted demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mimkit demo --out "${1:-runs/demo}"
