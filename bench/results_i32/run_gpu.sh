#!/usr/bin/env bash
# Issue #32's GPU runs on one GPU, about 3 minutes, from any directory (it runs in the repo root):
#   bash bench/results_i32/run_gpu.sh                  # results in $OUT/i32 (else /tmp/i32)
#   ATTN=sdpa EXTRA=--tiny bash bench/results_i32/run_gpu.sh   # CPU smoke run of the same commands
#   FLASH_ONLY=1 bash bench/results_i32/run_gpu.sh     # part 3 alone (after install_flash.sh)
# 1. Row 1 of the issue: the 0.6B train step, 16,384 tokens in 2,048-token documents, compiled blocks,
#    torch's varlen kernel, with checkpointing full (the old default: the same code path as main before
#    this branch), selective (the new default) and none; a profile table of each.
# 2. The GPU tests of this change: compiled = eager under selective checkpointing (fullgraph), flash =
#    float64 reference (both kernels where installed).
# 3. Where flash-attn-4 imports (docs/flash_attn.md; its wheels need two device calls to carry): row 1
#    with it, and flash-attn-4 vs torch's kernel by document length.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
ATTN=${ATTN:-varlen} EXTRA=${EXTRA:-} FLASH_ONLY=${FLASH_ONLY:-}
R=${OUT:-/tmp}/i32; mkdir -p "$R"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python -c "import torch; print('torch', torch.__version__)"; } | tee "$R/env.txt"
S="--warmup 2 --steps 6 $EXTRA"
if [ -z "$FLASH_ONLY" ]; then
  echo "=== train step, $ATTN, checkpointing full / selective / none ($(date +%T))"
  timeout 170 python bench/train_step.py --attn "$ATTN" --ckpt full,selective,none $S --profile \
    --out "$R/train_step_$ATTN.json" 2>&1 | tee "$R/train_step_$ATTN.log" | grep -v "^W1"
  echo "=== GPU tests ($(date +%T))"
  timeout 60 python -m pytest -m gpu -v -p no:cacheprovider tests/test_attention.py tests/test_model.py \
    -k "varlen or flash" 2>&1 | tee "$R/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed|skipped"
fi
if python -c "from flash_attn.cute.interface import _flash_attn_fwd, _flash_attn_bwd" 2>/dev/null; then
  [ -n "$FLASH_ONLY" ] && timeout 60 python -m pytest -m gpu -v -p no:cacheprovider tests/test_attention.py \
    tests/test_model.py -k "flash" 2>&1 | tee "$R/gpu_tests_flash.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed"
  echo "=== train step, flash-attn-4, selective ($(date +%T))"
  timeout 80 python bench/train_step.py --attn flash --ckpt selective $S --profile --out "$R/train_step_flash.json" \
    2>&1 | tee "$R/train_step_flash.log" | grep -v "^W1"
  echo "=== attention kernels by document length ($(date +%T))"
  timeout 45 python bench/attention.py --tokens 16384 --doc-len 512,2048,16384 --backends flash,varlen --warmup 3 \
    --reps 10 $EXTRA --out "$R/attention.json" 2>&1 | tee "$R/attention.log" | tail -8
else
  echo "=== flash-attn-4 does not import here: its runs are skipped"
fi
echo "=== done ($(date +%T))"
grep -h -A8 "^training step" "$R"/train_step_*.log
