#!/bin/bash
# Device call 2 of perf21 (nvidia-h200-x2): install flash-attn-4 from carried wheels, test it,
# benchmark it beside torch varlen, then Ulysses sp2 vs sp1 with the fused all-to-all and before it.
set -u
export PYTHONUNBUFFERED=1
W=.devrun/perf21/p2; cp -r $W/tree/. .
L=$OUT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $L/env.txt
python3 -c "import torch;print(torch.__version__, torch.version.cuda)" >> $L/env.txt
# --- install (the 92 MB wheel came in two parts, the first carried by the previous call) ---
mkdir -p /tmp/w && cat /root/stash/part.aa $W/part.ab > /tmp/w/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
sha256sum /tmp/w/*.whl >> $L/env.txt
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/w/*.whl $W/*.whl 2>&1 | tail -3
SP=$(python3 -c "import site;print(site.getsitepackages()[0])")
echo "import site; site.addsitedir('/tmp/site')" > $SP/zz_flash_attn_4.pth
python3 -c "from flash_attn.cute import flash_attn_varlen_func; print('flash-attn-4 import ok')" 2>&1 | tail -3 | tee -a $L/env.txt
# --- phase A: GPU 0 and GPU 1 side by side ---
(
export CUDA_VISIBLE_DEVICES=0
timeout 150 python3 -m pytest -q tests/test_attention.py -rs 2>&1 | tail -15
timeout 150 python3 bench/attention.py --out $L/attention_16k.json 2>&1 | tail -9
timeout 150 python3 bench/attention.py --tokens 131072 --doc-len 131072 --backends flash,varlen --warmup 3 --reps 10 --out $L/attention_131k.json 2>&1 | tail -7
) > $L/phaseA_gpu0.log 2>&1 &
A0=$!
(
export CUDA_VISIBLE_DEVICES=1
for attn in varlen flash; do
  for dl in 2048 16384; do
    timeout 120 python3 bench/train_step.py --attn $attn --doc-len $dl --out $L/ts_${attn}_${dl}.json 2>&1 | tail -4
  done
done
) > $L/phaseA_gpu1.log 2>&1 &
A1=$!
wait $A0 $A1
# --- phase B: Ulysses, both GPUs (before = the file as on main before the fused all-to-all) ---
run_sp() {  # name sp tokens
  timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node $2 bench/train_step.py --sp $2 --tokens $3 --out $L/$1.json > $L/$1.log 2>&1
  tail -2 $L/$1.log
}
(
run_sp sp1 1 16384
run_sp sp2_fused 2 32768
cp minirl/ulysses.py /tmp/ulysses_fused.py && cp $W/ulysses_before.py minirl/ulysses.py
run_sp sp2_before 2 32768
cp /tmp/ulysses_fused.py minirl/ulysses.py
run_sp sp2_fused_again 2 32768
timeout 100 python3 -m pytest -q tests/test_fsdp.py -m gpu -k cuda_nccl 2>&1 | tail -3
) > $L/phaseB.log 2>&1
cat $L/phaseA_gpu0.log $L/phaseA_gpu1.log | grep -v "^\s*$" | tail -60
python3 - <<'PY'
import json, os, glob
L = os.environ["OUT"]
print("\n== summary ==")
for f in sorted(glob.glob(f"{L}/*.json")):
    d = json.load(open(f))
    for s in d.get("summary", []):
        print(os.path.basename(f), "|", s["what"], "|", s["value"])
    for r in d.get("results", []) if isinstance(d.get("results"), list) else []:
        print(os.path.basename(f), f"step {r['step_ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, mfu {100*r['mfu_measured']:.1f}%, attn {r['attn']}, sp {r['sp']}, {r['peak_mem_gb']:.1f} GiB")
PY
tail -5 $L/phaseB.log
