#!/usr/bin/env bash
# Every minirl benchmark on one GPU in one go (over 15 minutes on an H100), then one combined table.
#
#   bash bench/run_all.sh            # on the GPU machine; results in $OUT (else bench/results)
#   bash bench/run_all.sh --tiny     # the same sequence as a CPU smoke run (about two minutes)
#
# Writes to $OUT: attention.json, logprobs_memory.json, train_step.json, rl_step.json,
# rl_step_profile.txt, decode_attention.json, generate.json, and log (everything printed here). The
# generator benchmark runs last: it is the longest and the most variable, so a run cut short still
# has the others. One failing benchmark does not stop the rest; the exit status is non-zero if any
# failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
TINY="${1:-}"

bench() {  # bench NAME COMMAND...: run one benchmark (with $TINY appended), report its time and status
  local name=$1 start=$SECONDS
  shift
  echo "=== $name: $* $TINY ($(date +%T))"
  "$@" $TINY
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || FAILED="$FAILED $name"
}

all() {
  FAILED=""
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
    || echo "no nvidia-smi: CPU run"
  bench attention python bench/attention.py
  bench logprobs_memory python bench/logprobs_memory.py
  bench train_step torchrun --standalone --nproc-per-node 1 bench/train_step.py --ckpt selective,full,none
  bench rl_step torchrun --standalone --nproc-per-node 1 bench/rl_step.py
  bench decode_attention python bench/decode_attention.py
  bench generate python bench/generate.py
  python bench/summary.py "$OUT"
  echo "total $SECONDS s"
  [ -z "$FAILED" ] || { echo "FAILED:$FAILED"; return 1; }
}

all 2>&1 | tee "$OUT/log"
