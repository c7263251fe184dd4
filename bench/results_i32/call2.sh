#!/usr/bin/env bash
# Device call 2 of 2 (issue #32), sent while call 1's machine is warm: joins flash-attn-4's wheels,
# installs them, then the flash GPU tests (flash = float64 reference, compiled = eager), row 1 with
# flash-attn-4 (this branch: the custom op, selective checkpointing), and flash-attn-4 vs torch's
# kernel by document length. Results: files in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
ROOT=$PWD NEW=${NEW:-.carry/i32} BASE=${BASE:-.}  # this branch's tree and the baseline's (main before the merge)
R=$OUT  # at most 8 files come back: each step writes its own, so a step cut short loses only itself
cat /root/stash/cu13part.aa .carry/whl2/cu13part.ab > /root/stash/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
md5sum /root/stash/nvidia_cutlass_dsl_libs_cu13-*.whl | tee "$R/env.txt"  # b45c1bac0786a433970dc75163c36011
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/stash/*.whl 2>&1 | tail -2
echo "import site; site.addsitedir('/tmp/site')" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flash_attn_4.pth"
python -c "from flash_attn.cute.interface import _flash_attn_fwd, _flash_attn_bwd; print('flash-attn-4 imports')" || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"; } | tee -a "$R/env.txt"
S="--warmup 2 --steps 6"
cd "$ROOT/$NEW"
echo "=== GPU tests $(date +%T)"
timeout 70 python -m pytest -m gpu -v -p no:cacheprovider tests/test_attention.py tests/test_model.py -k "flash" 2>&1 \
  | tee "$R/gpu_tests_flash.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed"
echo "=== after: this branch $(date +%T)"
timeout 100 python bench/train_step.py --attn flash --ckpt selective $S --profile --out "$R/new_flash.json" 2>&1 \
  | tee "$R/new_flash.log" | grep -v "^W1"
echo "=== kernels by document length $(date +%T)"
timeout 60 python bench/attention.py --tokens 16384 --doc-len 512,2048,16384 --backends flash,varlen --warmup 3 \
  --reps 10 --out "$R/attention_by_doc_len.json" 2>&1 | tee "$R/attention_by_doc_len.log" | tail -8
echo "=== done $(date +%T)"
grep -h -A6 "^training step" "$R"/new_flash.log
