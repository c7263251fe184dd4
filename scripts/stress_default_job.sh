#!/usr/bin/env bash
# Run the README's default job several times at once, under load, and keep what a crash leaves: the
# Python stacks (PYTHONFAULTHANDLER), C++ stacks of exceptions (TORCH_SHOW_CPP_STACKTRACES) and core
# dumps, with gdb's backtrace of every thread of each core. For the SIGSEGV seen once on torch 2.14.1
# (issue #31; docs/crash_under_load.md): it did not come back in the runs recorded there.
#
#   bash scripts/stress_default_job.sh [PYTHON] [ROUNDS] [JOBS] [STEPS] [OUT_DIR]
#       PYTHON   the interpreter whose torch to test (default: python3)
#       ROUNDS   rounds of JOBS default jobs started together (default 3 x 3), STEPS steps each (80)
#   HOG=N      also keep N busy loops running during each round (default 0)
#
# Prints one line per job (exit status, seconds); exit 1 if any job failed, after the backtraces.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3} rounds=${2:-3} jobs=${3:-3} steps=${4:-80}
out=${5:-${TMPDIR:-/tmp}/minirl-stress-$(date +%s)}
mkdir -p "$out"
ulimit -c unlimited  # the kernel's core_pattern decides where cores go; "core" means the job's directory
failed=0
for r in $(seq 1 "$rounds"); do
  hogs=()
  for _ in $(seq 1 "${HOG:-0}"); do (while :; do :; done) & hogs+=($!); done
  pids=()
  for j in $(seq 1 "$jobs"); do
    dir="$out/r$r-j$j"
    mkdir -p "$dir"
    port=$("$py" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    (
      cd "$dir" && start=$SECONDS
      PYTHONFAULTHANDLER=1 TORCH_SHOW_CPP_STACKTRACES=1 OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= \
        "$py" -m torch.distributed.run --nproc-per-node 2 --master-port "$port" "$OLDPWD/train.py" \
        --out-dir "$dir/out" --steps "$steps" > "$dir/log" 2>&1
      echo "$? $((SECONDS - start))" > "$dir/status"
    ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  for pid in "${hogs[@]}"; do kill "$pid"; done
  for j in $(seq 1 "$jobs"); do
    dir="$out/r$r-j$j"
    read -r rc secs < "$dir/status"
    echo "round $r job $j: exit $rc, $secs s ($dir)"
    if [ "$rc" != 0 ]; then
      failed=1
      grep -E "Fatal Python error|Segmentation fault|SIGSEGV|exitcode|Connection reset" "$dir/log" | head -20
      for core in $(find "$dir" -name 'core*' -type f); do
        echo "--- gdb: $core"
        gdb -batch -ex "info sharedlibrary" -ex "thread apply all bt 30" "$py" "$core" 2>&1 | grep -v "^\[New LWP" \
          > "$core.bt"
        grep -B2 -A30 "SIGSEGV\|signal 11" "$core.bt" | head -80
      done
    fi
  done
done
exit "$failed"
