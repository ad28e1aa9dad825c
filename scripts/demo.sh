#!/usr/bin/env bash
# Quick start 1: set up; tiny Vision ELECTRA, then MAE at equal steps and equal FLOPs, on Fashion-MNIST (2 idle CPU
# cores: ~7 min); probes; runs/demo/report.md, rewritten after every stage (re-run to continue an interrupted demo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mimkit demo --out "${1:-runs/demo}"
