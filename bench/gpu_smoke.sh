#!/usr/bin/env bash
# GPU smoke benchmark (issue 7): a ~160M-parameter GPT-NeoX built locally (no download), a few
# iterations of train_rloo.py and steps of train_offline.py with bf16 and gradient checkpointing on
# one GPU; prints tokens/s, episodes/s and peak GPU memory. Under 5 minutes on one H100.
#
#   bash bench/gpu_smoke.sh                      # one GPU, configs/accelerate/single_gpu.yaml (bf16)
#   bash bench/gpu_smoke.sh --iterations 10 --steps 20 --out /tmp/smoke
#   bash bench/gpu_smoke.sh --tiny               # CPU dry run of the same code path (tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for arg in "$@"; do
    if [ "$arg" = "--tiny" ]; then
        exec env CUDA_VISIBLE_DEVICES="" python bench/gpu_smoke.py "$@"
    fi
done
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: no GPU visible; run 'bash bench/gpu_smoke.sh --tiny' for the CPU dry run" >&2
    exit 2
fi
exec accelerate launch --config_file configs/accelerate/single_gpu.yaml bench/gpu_smoke.py "$@"
