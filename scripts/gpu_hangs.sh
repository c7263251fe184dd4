#!/usr/bin/env bash
# The hang work that needs 2-4 GPUs (issue #31), in one script that a session with the GPUs runs as is:
#   train    minirl's compiled path: train.py with compiled blocks (the GPU default) and --sp 2 (and --sp 4
#            on 4 GPUs), many micro-batches per step, every step checked by --trace-collectives (whose
#            ledger now sees the compiled blocks' all-to-alls), and the same run without the ledger.
#   repro    every case of scripts/repro_recompute_hang.py under NCCL (--nproc 2, and 4 on 4 GPUs),
#            compile_reorder with inductor.
#   ledger   what the ledger costs per step with compiled blocks: dispatch and flight_recorder sources.
#
#   bash scripts/gpu_hangs.sh [all|train|repro|ledger] [OUT_DIR]   # default: all, $OUT or /tmp/minirl-gpu-hangs
#
# Each part prints its rows last (also in OUT_DIR/rows.txt) and keeps its logs in OUT_DIR. Parts take
# about 4-9 minutes each on 2 H200s (estimates: not yet run), so one part per device call (repro on
# 4 GPUs: NPROC=4 bash scripts/gpu_hangs.sh repro, a call of its own).
# GPU_HANGS_CPU=1 runs every part with gloo on 2 CPU ranks and tiny sizes: a check of this script.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-all}
out=${2:-${OUT:-/tmp/minirl-gpu-hangs}}
mkdir -p "$out"
rows="$out/rows.txt"
if [ "${GPU_HANGS_CPU:-0}" = 1 ]; then
  gpus=2 steps=2 mbt=256 layers=2 hidden=256 tokens=1024 timeout=30 backend=aot_eager
  export CUDA_VISIBLE_DEVICES=
else
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  steps=30 mbt=512 layers=28 hidden=1024 tokens=16384 timeout=60 backend=inductor
fi
export PYTHONFAULTHANDLER=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
row() { echo "$*" | tee -a "$rows"; }
{
  echo "# gpu_hangs.sh $part, $(date -u '+%Y-%m-%d %H:%M UTC'), $gpus device(s)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sort | uniq -c
  python -c "import torch; print('torch', torch.__version__)"
} | tee -a "$rows"

train_run() {  # train_run NAME NPROC SP [EXTRA...]: one train.py run, then its row
  local name=$1 nproc=$2 sp=$3; shift 3
  local dir="$out/train_$name" start=$SECONDS
  rm -rf "$dir"
  timeout 560 torchrun --nproc-per-node "$nproc" train.py --out-dir "$dir" --sp "$sp" --steps "$steps" \
    --micro-batch-tokens "$mbt" --mini-batches 2 --eval-every 0 --no-export --timeout-s "$timeout" "$@" \
    > "$dir.log" 2>&1
  local rc=$?
  local last; last=$(grep -oE "step=[0-9]+ reward_mean" "$dir.log" | tail -n 1 | cut -d' ' -f1)
  local checks; checks=$(cat "$dir"/ledger/rank0.jsonl 2>/dev/null | grep -c '"ok": true')
  local per_step=""
  [ -d "$dir/ledger" ] && per_step=$(python - "$dir" <<'EOF'
import sys
sys.path.insert(0, ".")
from minirl.ledger import read_ledgers
ledgers = read_ledgers(sys.argv[1] + "/ledger")
ops = [e for e in ledgers[0] if "op" in e] if ledgers else []
names = sorted({e["op"] for e in ops if "all_to_all" in e["op"] or "alltoall" in e["op"]})
checks = max(1, sum(1 for e in (ledgers[0] if ledgers else []) if "check" in e))
print(f", {len(ops) // checks} collectives/step, all-to-all as {'+'.join(names) or '-'}")
EOF
)
  row "train $name: exit $rc, last ${last:-no step}, $((SECONDS - start)) s, ledger checks passed: ${checks:-0}$per_step"
}

if [ "$part" = all ] || [ "$part" = train ]; then
  train_run sp2_traced 2 2 --trace-collectives
  train_run sp2_plain 2 2
  if [ "$gpus" -ge 4 ]; then
    train_run sp4_traced 4 4 --trace-collectives
    train_run sp2dp2_traced 4 2 --trace-collectives
  fi
fi

if [ "$part" = all ] || [ "$part" = repro ]; then
  for n in ${NPROC:-2 4}; do
    [ "$gpus" -ge "$n" ] || continue
    # Every case, compile_reorder with aot_eager (the graphs and checkpoint decisions, no code generation),
    # then compile_reorder with inductor and a timeout that leaves room for the ranks' compiles.
    timeout 480 python scripts/repro_recompute_hang.py --all --nproc "$n" --timeout 15 --jobs 2 \
      --compile-backend aot_eager --out-dir "$out/repro_$n" > "$out/repro_$n.log" 2>&1
    row "repro --nproc $n: exit $? (0: every case as expected)"
    grep "^|" "$out/repro_$n.log" | tee -a "$rows"
    for mode in naive fixed minirl; do
      timeout 300 python scripts/repro_recompute_hang.py --scenario compile_reorder --mode "$mode" --nproc "$n" \
        --timeout 60 --compile-backend "$backend" --out-dir "$out/compile_reorder_${mode}_$n" \
        > "$out/compile_reorder_${mode}_$n.log" 2>&1
      row "compile_reorder $mode ($backend, --nproc $n): exit $?, $(grep -E '^(completed|failed)' \
        "$out/compile_reorder_${mode}_$n.log" | tail -n 1)"
    done
  done
fi

if [ "$part" = all ] || [ "$part" = ledger ]; then
  for source in dispatch flight_recorder; do
    timeout 280 torchrun --nproc-per-node 2 scripts/ledger_overhead.py --sp 2 --layers "$layers" --hidden "$hidden" \
      --tokens "$tokens" --rounds 3 --steps 3 --compile --source "$source" > "$out/ledger_$source.log" 2>&1
    row "ledger $source: exit $?, $(grep -E '^(dispatch|flight_recorder) ledger' "$out/ledger_$source.log")"
  done
fi
echo "rows: $rows"
