#!/usr/bin/env bash
# The prepared GPU benchmark: BERT-base, bf16, our model with variable-length attention and torch.compile on and
# off, against transformers (sdpa), side by side in one process. Results go to ${OUT:-.}/pretrain-gpu.json.
# Run from the repository root on a CUDA machine: bash bench/gpu.sh [extra bench/pretrain.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
$PY -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (varlen runs on bucketed SDPA)"
$PY bench/pretrain.py --device cuda --size base --batch 64 --seq 128 --precision bf16 --steps 20 --warmup 5 \
  --variants varlen,varlen+compile,padded,padded+compile --json "${OUT:-.}/pretrain-gpu.json" "$@"
