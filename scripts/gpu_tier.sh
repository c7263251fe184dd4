#!/usr/bin/env bash
# The GPU test tier: every test marked `gpu` (CUDA kernels, NCCL, multi-GPU layouts, the hang reproducer
# under NCCL) in one run, then a short summary. Multi-rank tests need 2 (or 4) GPUs and skip with fewer.
# About 11 minutes on 4 H200s (12 tests; 5.5 on 2 H200s, where the 4-GPU test skips), tests/GPU_TIER.md.
#
#   bash scripts/gpu_tier.sh [OUT_DIR]      # default OUT_DIR: $OUT, else /tmp/minirl-gpu-tier
#
# Writes OUT_DIR/gpu_tier.log (everything) and OUT_DIR/gpu_tier_summary.txt (device, versions, one
# line per test, the measured figures the tests print); tests/GPU_TIER.md holds the last one kept.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/minirl-gpu-tier}}
mkdir -p "$out"
start=$(date +%s)
python -m pytest -m gpu tests -v -s -p no:cacheprovider 2>&1 | tee "$out/gpu_tier.log"
rc=${PIPESTATUS[0]}
{
  echo "GPU tier, $(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - start )) s, exit $rc"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'NCCL', '.'.join(map(str, torch.cuda.nccl.version())))"
  grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)" "$out/gpu_tier.log" | sed -E 's/ *\[ *[0-9]+%\]$//'
  echo "figures printed by the tests:"
  grep -oE "[[:alnum:]/_.-]+: relative error [0-9.e+-]+|([0-9] GPUs )?sp[0-9] step 1: .*" "$out/gpu_tier.log" \
    | sed 's/^/  /'
  tail -n 1 "$out/gpu_tier.log"
} > "$out/gpu_tier_summary.txt"
cat "$out/gpu_tier_summary.txt"
exit "$rc"
