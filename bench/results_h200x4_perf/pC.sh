#!/bin/bash
# Call C (same warm nvidia-h200-x4, flash-attn-4 still installed from call B): 4B dp4 compiled, checkpointing
# on and off, and eager with the defaults; 0.6B on one GPU and sp2 with flash-attn-4, compiled.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/C; rm -rf $L; mkdir -p $L
T() { local to=$1 name=$2; shift 2; local t0=$(date +%s); timeout $to "$@" > $L/$name.log 2>&1; echo "$name exit $? $(( $(date +%s) - t0 )) s" | tee -a $L/times.txt; }
TS=bench/train_step.py
T 100 dp4_4b_eager torchrun --standalone --nproc-per-node 4 $TS --shape qwen3-4b --attn varlen --warmup 2 --steps 6 --out $L/dp4_4b_eager.json
T 240 dp4_4b_compile torchrun --standalone --nproc-per-node 4 $TS --shape qwen3-4b --attn varlen --compile --ckpt on,off --warmup 2 --steps 6 --out $L/dp4_4b_compile.json
( export CUDA_VISIBLE_DEVICES=0
  T 200 ts06_flash_compile python $TS --attn flash --compile --ckpt on,off --profile --out $L/ts06_flash_compile.json ) &
( export CUDA_VISIBLE_DEVICES=1,2
  T 200 sp2_flash_compile torchrun --standalone --nproc-per-node 2 $TS --sp 2 --tokens 32768 --attn flash --compile --out $L/sp2_flash_compile.json ) &
wait
tar czf $OUT/C.tgz -C /tmp C
cat $L/times.txt
for f in $L/*.log; do echo "== $f"; grep -A6 "^training step" $f | grep -v "^---"; grep -iE "error|out of memory" $f | tail -3; done
