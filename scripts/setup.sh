#!/usr/bin/env bash
# Creates .venv (reusing a system-wide torch where there is one), installs mimkit and its test tools,
# and makes sure the Fashion-MNIST Debian package is there. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  # This workplace keeps these two wheels on local disk; elsewhere pip fetches a matching build.
  "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>/dev/null || "$VPY" -m pip install -q torch torchvision
fi
if ! "$VPY" -c "import mimkit, timm, safetensors, torchmetrics, torch_fidelity, vector_quantize_pytorch, segmentation_models_pytorch, pytest, xdist, dall_e" >/dev/null 2>&1; then
  "$VPY" -m pip install -q -e ".[test]"
fi
DATA_DIR=${MIMKIT_DATA_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -e "$DATA_DIR/train-images-idx3-ubyte.gz" ] && [ ! -e "$DATA_DIR/train-images-idx3-ubyte" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null && [ -z "${MIMKIT_DATA_DIR:-}" ]; then
    echo "[setup] installing the Fashion-MNIST Debian package"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "[setup] Fashion-MNIST is missing: run 'sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist'," \
         "or set MIMKIT_DATA_DIR to a folder with its IDX files" >&2
    exit 1
  fi
fi
