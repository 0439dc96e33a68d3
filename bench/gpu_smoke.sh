#!/usr/bin/env bash
# GPU acceptance run (one command): a Pythia-160M-shape GPT-NeoX built locally (no download); bf16 RLOO
# (KL, MaxEnt) and DPO / SimPO on one GPU, save + kill + resume, FSDP2 and ZeRO-3 with one process, and
# RLOO with vLLM rollouts where vLLM is installed (engine start, weight sync, log-prob gap, episodes/s);
# one table (episodes/s, tokens/s, peak GPU memory, update-phase MFU, pass/fail per check), written to
# the file it names; exit status 1 when a check fails. Estimated 3-5 minutes on one H100 (see the README).
#
#   bash bench/gpu_smoke.sh                              # any CUDA machine
#   bash bench/gpu_smoke.sh --out /tmp/smoke --table smoke.md
#   bash bench/gpu_smoke.sh --tiny                       # CPU dry run of every check (tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for arg in "$@"; do
    if [ "$arg" = "--tiny" ]; then
        exec env CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python bench/gpu_smoke.py "$@"
    fi
done
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: no GPU visible; run 'bash bench/gpu_smoke.sh --tiny' for the CPU dry run" >&2
    exit 2
fi
exec python bench/gpu_smoke.py "$@"
