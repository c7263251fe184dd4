#!/usr/bin/env bash
# LoRA against full fine-tuning on one GPU (issue #30), about 3 minutes on an H100 or H200:
#   1. the training step of the Qwen3-4B shape at 16k tokens: LoRA rank 8, rank 64, then full fine-tuning
#      (reported as out of memory if it does not fit on the card: that is a figure too);
#   2. the 0.6B RL step (64 prompts x 8 samples x 256 new tokens, generator batch 512) with LoRA rank 8,
#      then the same with full fine-tuning.
# (tests/test_lora.py's GPU test, train.py --lora-rank 8 on one GPU, is in the GPU tier: scripts/gpu_tier.sh.)
#
#   bash bench/lora.sh           # results in $OUT (else bench/results): JSON, one log per part, a table last
#   bash bench/lora.sh --tiny    # the same on a CPU in a minute (numbers meaningless)
#
# Each part has a time limit, so the script ends within 4 minutes whatever happens; a part cut short
# says so in the table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
TINY="${1:-}"

part() {  # part NAME SECONDS COMMAND...: run one part with $TINY appended, its output in $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: $* $TINY ($(date +%T))"
  timeout "$limit" "$@" $TINY > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - start)) s (124: cut at $limit s)" | tee -a "$OUT/parts.txt"
}

: > "$OUT/parts.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: CPU run"
part train_step_lora 90 python bench/train_step.py --shape qwen3-4b --tokens 16384 --lora-rank 8,64,0 --ckpt full --no-compile \
  --warmup 1 --steps 3 --out "$OUT/train_step_lora.json"
part rl_step_lora8 80 python bench/rl_step.py --lora-rank 8 --gen-batch 512 --steps 1 --no-profile \
  --out "$OUT/rl_step_lora8.json"
part rl_step_full 60 python bench/rl_step.py --gen-batch 512 --steps 1 --no-profile --out "$OUT/rl_step_full.json"

python - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.isfile(path) else None


ts = load("train_step_lora.json")
if ts:
    print(f"\ntraining step, {ts['device'].get('name')}: {ts['args']['shape'][0]}, {ts['args']['tokens']} tokens, "
          f"activation checkpointing, AdamW")
    print(f"{'variant':>9}  {'step ms':>8}  {'tok/s':>7}  {'peak GiB':>8}  {'adapter params':>14}")
    for r in ts["results"]:
        name = f"LoRA r{r['lora_rank']}" if r["lora_rank"] else "full"
        if "oom" in r:
            print(f"{name:>9}  out of memory")
        else:
            print(f"{name:>9}  {r['step_ms']:8.0f}  {r['tokens_per_s']:7.0f}  {r['peak_mem_gb'] or 0:8.1f}  "
                  f"{r['adapter_params']:14,}")
for name in ("rl_step_lora8.json", "rl_step_full.json"):
    rl = load(name)
    if rl:
        rl = next(iter(rl["results"].values()))  # one length mode: fixed
        phases = " ".join(f"{k} {v:.2f}" for k, v in rl["median_phase_s"].items())
        mem = rl["steps"][-1]["peak_mem_gb"]
        print(f"RL step {name.removesuffix('.json')}: {rl['median_wall_s']:.2f} s ({phases}); peak GiB "
              + " ".join(f"{k} {v:.1f}" if v is not None else f"{k} -" for k, v in mem.items()))
print(open(os.path.join(out, "parts.txt")).read().rstrip())
EOF
