#!/usr/bin/env bash
# Device call 2 of 2 (issue #32), sent while call 1's machine is warm: joins flash-attn-4's wheels,
# installs them, then row 1 with flash-attn-4 before (main's code: its graph break under checkpointing)
# and after (this branch: the custom op, selective checkpointing), flash-attn-4 vs torch's kernel by
# document length, and the flash GPU tests. Results: $OUT/call2.tgz (+ the log).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/r2; mkdir -p "$R"
cat /root/stash/cu13part.aa .carry/whl2/cu13part.ab > /root/stash/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
md5sum /root/stash/nvidia_cutlass_dsl_libs_cu13-*.whl | tee "$R/env.txt"  # b45c1bac0786a433970dc75163c36011
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/stash/*.whl 2>&1 | tail -2
echo "import site; site.addsitedir('/tmp/site')" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flash_attn_4.pth"
python -c "from flash_attn.cute.interface import _flash_attn_fwd, _flash_attn_bwd; print('flash-attn-4 imports')" || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__)"; } | tee -a "$R/env.txt"
S="--warmup 2 --steps 6"
echo "=== before: main $(date +%T)"
python bench/train_step.py --compile --ckpt on --attn flash $S --out "$R/main_flash.json" 2>&1 | tee "$R/main_flash.log" | grep -v "^W1"
cd .carry/i32
echo "=== after: this branch $(date +%T)"
python bench/train_step.py --attn flash --ckpt selective $S --profile --out "$R/new_flash.json" 2>&1 \
  | tee "$R/new_flash.log" | grep -v "^W1"
echo "=== kernels by document length $(date +%T)"
for L in 256 1024 2048 16384; do
  python bench/attention.py --tokens 16384 --doc-len $L --backends flash,varlen --warmup 5 --reps 20 \
    --out "$R/attention_doc$L.json" 2>&1 | tee "$R/attention_doc$L.log" | tail -3
done
echo "=== GPU tests $(date +%T)"
python -m pytest -m gpu -v -p no:cacheprovider tests/test_attention.py tests/test_model.py -k "flash" 2>&1 \
  | tee "$R/gpu_tests_flash.log" | grep -E "PASS|FAIL|SKIP|ERROR|passed|failed"
echo "=== done $(date +%T)"
tar czf "$OUT/call2.tgz" -C "$OUT" r2
grep -h -A6 "^training step" "$R"/main_flash.log "$R"/new_flash.log
