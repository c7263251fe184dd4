"""Issue #27's GPU figures in one process (one compile of each kernel), about 4 minutes on one H100:

1. rollouts.py: 512 requests with log-normal lengths, static batches vs continuous batching at 128
   rows in flight, and continuous with rows sized by memory (no flag) vs the flag values given;
2. rl_step.py: one RL step (64 prompts x 8, train.py's defaults) with those lengths vs fixed-length
   rows of the same mean length;
3. generate.py: fixed-length decode at batch 64 and 256 (% of the HBM roofline), and a profile of 33
   eager decode steps at batch 256 (generate_profile.txt: where a step's time goes).
Each part runs only if its usual time fits before --budget seconds from the start; a failing part is
reported and the others still run. JSON and a log land in $OUT (else bench/results); a table of every
part's headline figures comes last.

The static baseline runs this checkout's generator one batch at a time unless --baseline DIR names a
checkout of the generator before continuous batching (DIR/minirl), e.g. main before issue 27:
    mkdir -p .carry/baseline && git -C /work/main archive 6a3f00d minirl | tar -x -C .carry/baseline
(it then runs in a process of its own: two versions of minirl cannot share one).

    python bench/rollouts_gpu.py [--baseline .carry/baseline] [--budget 250]
    python bench/rollouts_gpu.py --tiny     # CPU smoke run of the same parts
"""

import argparse
import os
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import generate, rl_step, rollouts, summary  # noqa: E402
from bench.common import BENCH_DIR  # noqa: E402

# (name, seconds it usually takes on an H100, the arguments of its main)
PARTS = [
    ("rollouts", 130, ["--rows", "128,0,256"]),
    ("rl_step", 80, ["--lengths", "lognormal,mean", "--new-tokens", "2048", "--steps", "1", "--no-profile"]),
    ("generate", 40, ["--shapes", "qwen3-0.6b", "--batches", "64,256", "--modes", "graphs", "--hf-batches", "",
                      "--profile", "256"]),
]
MAINS = {"rollouts": rollouts.main, "rl_step": rl_step.main, "generate": generate.main}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default=None, help="checkout of the static generator (DIR/minirl) for the baseline")
    p.add_argument("--budget", type=float, default=250.0, help="seconds: a part starts only if it fits in them")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run (tiny shapes)")
    args = p.parse_args(argv)
    out = os.environ.get("OUT") or os.path.join(BENCH_DIR, "results")
    os.makedirs(out, exist_ok=True)
    start, tiny = time.monotonic(), ["--tiny"] if args.tiny else []
    for name, seconds, part_args in PARTS:
        if time.monotonic() - start + seconds > args.budget and not args.tiny:
            print(f"=== {name}: skipped, {seconds} s would pass the {args.budget:.0f} s budget", flush=True)
            continue
        print(f"=== {name} ({time.monotonic() - start:.0f} s)", flush=True)
        part_args = [*part_args, *tiny, "--out", os.path.join(out, f"{name}.json")]
        if name == "rollouts" and args.baseline:  # the static baseline in a process of its own
            static = os.path.join(out, "rollouts_static.json")
            subprocess.run([sys.executable, os.path.join(BENCH_DIR, "rollouts.py"), "--mode", "static", "--rows", "128",
                            "--tree", args.baseline, "--out", static, *tiny], check=False)
            part_args += ["--mode", "continuous", "--static", static]
        try:
            MAINS[name](part_args)
        except Exception:  # the other parts still run
            traceback.print_exc()
            print(f"=== {name}: failed", flush=True)
        if "torch" in sys.modules:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(f"=== all parts: {time.monotonic() - start:.0f} s", flush=True)
    summary.main([out])


if __name__ == "__main__":
    main()
