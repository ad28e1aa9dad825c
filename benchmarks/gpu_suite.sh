#!/usr/bin/env bash
# The device checks, as one script for a lent GPU (the device tool's budget is 15 minutes in all, start-up
# included; this takes about 6): the CUDA tests, then the ViT-B recipes' memory estimate and images/s and peak
# memory of every method in eager mode, MAE and Vision ELECTRA also compiled, Vision ELECTRA also with activation
# checkpointing. Everything lands in $OUT (or runs/gpu-suite) as gpu-suite.md.
# Run from the repository root:  bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-suite}
mkdir -p "$OUT"
PY=${PY:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
REPORT="$OUT/gpu-suite.md"
{
    echo "# GPU suite, $(date -u +%Y-%m-%d), $($PY -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
    echo
    echo '## tests/test_cuda.py'
    echo '```'
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
    echo '```'
} > "$REPORT"
bench() {   # config, modes, extra overrides...
    local config=$1 modes=$2
    shift 2
    timeout 120 $PY -m mimkit.cli bench --config "configs/$config" --batch 256 --steps 10 --warmup 3 --modes "$modes" \
        "$@" >> "$REPORT" 2>&1 || echo "($config, $modes: stopped: exit $?)" >> "$REPORT"
    echo >> "$REPORT"
}
echo '## images/s and peak memory, ViT-B recipes, batch 256, bf16' >> "$REPORT"
bench mae_vit-b16_in1k-800e.yaml eager,compiled
bench vision-electra_vit-b16_in1k-100e.yaml eager,compiled,checkpointed
bench simmim_vit-b16_in1k-800e.yaml eager
bench gan-mae_vit-b16_in1k-300e.yaml eager
# CAE's and CIM's ImageNet recipes read DALL-E's tokenizer, which does not travel: CAE with pixel targets at ViT-B
# stands in; CIM runs when TOKENIZER names a tokenizer file (mimkit tokenizer convert-dalle's output)
bench cae-pixels_vit-mini_fmnist-tiny.yaml eager model.size=base model.img_size=[224,224] model.patch_size=16 data.channels=3
if [ -n "${TOKENIZER:-}" ]; then
    bench cim-respix_vit-b16_in1k-300e.yaml eager tokenizer.path="$TOKENIZER"
else
    echo "(CIM ViT-B: skipped, no TOKENIZER file given)" >> "$REPORT"
fi
bench perceptual-mae-lsgan-p_vit-b16_in1k-300e.yaml eager
cat "$REPORT"
