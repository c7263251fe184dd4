#!/bin/bash
# Call D2 (same warm nvidia-h200-x2): flash-attn-4 installed again; the compiled-blocks test with it; the
# 0.6B step with blocks compiled in two parts (varlen and flash-attn-4, checkpointing on/off); sp2 compiled.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/D; rm -rf $L; mkdir -p $L
T() { local to=$1 name=$2; shift 2; local t0=$(date +%s); timeout $to "$@" > $L/$name.log 2>&1; echo "$name exit $? $(( $(date +%s) - t0 )) s" | tee -a $L/times.txt; }
cat /root/stash/part.aa .devrun/big/part.ab > /root/stash/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
rm /root/stash/part.aa
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/stash/*.whl > $L/install.log 2>&1
echo "import site; site.addsitedir('/tmp/site')" > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/zz_flash_attn_4.pth"
TS=bench/train_step.py
( export CUDA_VISIBLE_DEVICES=0
  T 100 flash_tests python -m pytest -v -s -p no:cacheprovider tests/test_model.py tests/test_attention.py -k "compiled_blocks_on_cuda or backend_matches"
  T 150 ts06_varlen_compile python $TS --attn varlen --compile --ckpt on,off --out $L/ts06_varlen_compile.json ) &
( export CUDA_VISIBLE_DEVICES=1
  T 240 ts06_flash_compile python $TS --attn flash --compile --ckpt on,off --profile --out $L/ts06_flash_compile.json ) &
wait
T 150 sp2_varlen_compile torchrun --standalone --nproc-per-node 2 $TS --sp 2 --tokens 32768 --attn varlen --compile --out $L/sp2_varlen_compile.json
tar czf $OUT/D.tgz -C /tmp D
cat $L/times.txt
grep -E "PASSED|FAILED|SKIPPED|ERROR|passed|failed" $L/flash_tests.log | tail -12
for f in $L/ts*.log $L/sp2*.log; do echo "== $f"; grep -A6 "^training step" $f | grep -v "^---"; grep -iE "error|out of memory" $f | tail -3; done
