#!/bin/bash
# Call A (nvidia-h200-x4): 1-GPU rows in parallel (train step 0.6B, decode, RL step), then sp2 vs sp1 and the
# default job eager vs --compile; stashes the first half of the cutlass libs wheel for call B.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
L=/tmp/A; rm -rf $L; mkdir -p $L /root/stash
cp .devrun/big/part.aa .devrun/whl/*.whl /root/stash/
{ date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nvidia-smi topo -m;
  python -c "import torch;print(torch.__version__, torch.cuda.nccl.version())"; nproc; } > $L/env.txt 2>&1
T() { local to=$1 name=$2; shift 2; local t0=$(date +%s); timeout $to "$@" > $L/$name.log 2>&1; echo "$name exit $? $(( $(date +%s) - t0 )) s" | tee -a $L/times.txt; }
TS=bench/train_step.py
# phase 1: one GPU each
( export CUDA_VISIBLE_DEVICES=0
  T 120 ts06_eager python $TS --ckpt on,off --profile --out $L/ts06_eager.json
  T 210 ts06_compile python $TS --compile --ckpt on,off --profile --out $L/ts06_compile.json ) &
( export CUDA_VISIBLE_DEVICES=1
  T 120 gen python bench/generate.py --shapes qwen3-0.6b --batches 64,256 --modes graphs --hf-batches "" --reps 3 --profile 256 --out $L/gen.json
  T 210 rl_compile python bench/rl_step.py --gen-batch 512 --compile --no-profile --out $L/rl_compile.json ) &
( export CUDA_VISIBLE_DEVICES=2
  T 240 rl_eager python bench/rl_step.py --gen-batch 512 --out $L/rl_eager.json ) &
( export CUDA_VISIBLE_DEVICES=3
  T 240 rl_compile_nockpt python bench/rl_step.py --gen-batch 512 --compile --no-checkpointing --no-profile --out $L/rl_compile_nockpt.json ) &
wait
echo "phase 1 done $(date -u)" >> $L/times.txt
# phase 2: sp2 on GPUs 0,1 (vs ts06 sp1 above); the default job on GPUs 2,3, eager then --compile
( export CUDA_VISIBLE_DEVICES=0,1
  T 90 sp2_eager torchrun --standalone --nproc-per-node 2 $TS --sp 2 --tokens 32768 --profile --out $L/sp2_eager.json
  T 150 sp2_compile torchrun --standalone --nproc-per-node 2 $TS --sp 2 --tokens 32768 --compile --out $L/sp2_compile.json ) &
( export CUDA_VISIBLE_DEVICES=2,3
  T 100 dj_eager torchrun --standalone --nproc-per-node 2 train.py --out-dir $L/dj_eager --no-export
  T 140 dj_compile torchrun --standalone --nproc-per-node 2 train.py --compile --out-dir $L/dj_compile --no-export ) &
wait
rm -rf $L/dj_*/checkpoints $L/dj_*/final
tar czf $OUT/A.tgz -C /tmp A
cat $L/times.txt
for f in $L/ts*.log $L/sp2*.log; do echo "== $f"; grep -A8 "^training step" $f | grep -v "^---"; done
for f in $L/rl_*.log $L/gen.log; do echo "== $f"; grep -B2 -A12 "^RL step\|^decode\|tok/s" $f | tail -14; done
for f in $L/dj_*.log; do echo "== $f"; grep -E "held-out|step 30|finished|error" $f | tail -4; done
