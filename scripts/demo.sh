#!/usr/bin/env bash
# Quick start 1: set up, pre-train a tiny MAE on Fashion-MNIST (CPU: ~6 min), probe it, write runs/demo/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mimkit demo --out "${1:-runs/demo}"
