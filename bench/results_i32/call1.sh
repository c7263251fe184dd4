#!/usr/bin/env bash
# Device call 1 of 2 (issue #32), run from the root of main's tree with this branch in $NEW (.carry/i32):
# row 1 before (main's code: compiled blocks, full checkpointing, torch's varlen kernel) and after
# (this branch: selective and none), the one-GPU GPU tests of torch's kernel; stashes half of
# flash-attn-4's wheels for call 2. Results: files in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
ROOT=$PWD NEW=${NEW:-.carry/i32} BASE=${BASE:-.}  # this branch's tree and the baseline's (main before the merge)
R=$OUT  # at most 8 files come back: each step writes its own, so a step cut short loses only itself
[ -d .carry/whl1 ] && mkdir -p /root/stash && cp .carry/whl1/* /root/stash/  # when call 2 follows
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"; } | tee "$R/env.txt"
S="--warmup 2 --steps 6"
cd "$ROOT/$NEW"
echo "=== after: this branch $(date +%T)"
timeout 110 python bench/train_step.py --attn varlen --ckpt selective,none $S --profile --out "$R/new_varlen.json" 2>&1 \
  | tee "$R/new_varlen.log" | grep -v "^W1"
cd "$ROOT/$BASE"
echo "=== before: main $(date +%T)"
timeout 60 python bench/train_step.py --compile --ckpt on --attn varlen $S --out "$R/main_varlen.json" 2>&1 | tee "$R/main_varlen.log" | grep -v "^W1"
cd "$ROOT/$NEW"
echo "=== GPU tests $(date +%T)"
timeout 40 python -m pytest -m gpu -v -p no:cacheprovider tests/test_model.py -k "varlen" 2>&1 | tee "$R/gpu_tests.log" | grep -E "PASS|FAIL|SKIP|ERROR|relative error|passed|failed"
echo "=== done $(date +%T)"
grep -h -A8 "^training step" "$R"/main_varlen.log "$R"/new_varlen.log
