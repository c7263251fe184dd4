"""The built-in tool-use task end to end: `train.py --task tools` learns to call the calculator.

The warmed-up model (scripts/make_tools_task.py) calls the tool in about a fifth of its sampled
episodes and never greedily, so held-out greedy accuracy starts at 0; a few GRPO steps must make
the tool call its first choice.
"""

import json

from helpers_dist import gpus, torchrun

from minirl.tools_task.calculator import Calculator, calculate


def test_calculator():
    assert calculate("347+285") == 632 and calculate("12+3*4") == 60 and calculate("5-9") == -4
    env = Calculator()
    env.start("347+285=", "632")
    assert env.step("[347+285]", []) == ("=632\n", 0.0, False)
    assert env.step("[347+]", []) == ("=error\n", 0.0, False)
    assert env.step("632", []) == (None, 1.0, True)
    assert env.step("522", []) == (None, 0.0, True)


def test_tools_task_learns_to_use_the_tool(background):
    """10 steps of `train.py --task tools` (conftest.py's BACKGROUND["tools_task"], started in the
    background as the session starts)."""
    future, tmp_path = background["tools_task"]
    proc, _ = future.result()
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    before, after = rows[0]["test_accuracy"], rows[-1]["test_accuracy"]
    assert before < 0.05 and after > before + 0.3, (before, after)
    first, last = steps[0], steps[-1]
    assert last["turns"] > first["turns"] + 0.2  # more episodes call the calculator
    assert sum(r["reward_mean"] for r in steps[-3:]) > sum(r["reward_mean"] for r in steps[:3]) + 0.3


@gpus(1)
def test_multi_turn_steps_on_one_gpu(tmp_path):
    """Three multi-turn RL steps of the tools task on one GPU (512 episodes a step, bf16 generator with
    CUDA graphs, re-prefilled every turn); prints each step's time per phase. Step 1 includes
    torch.compile and graph capture."""
    proc = torchrun(1, ["train.py", "--task", "tools", "--steps", "3", "--eval-every", "0", "--prompts-per-step",
                        "64", "--gen-batch-size", "512", "--out-dir", str(tmp_path), "--no-export"],
                    timeout=900, cuda=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        times = " ".join(f"{k[5:]}={v:.3f}s" for k, v in r.items() if k.startswith("time/"))
        print(f"step {r['step']}: {times} turns={r['turns']:.2f} policy_tokens={r['policy_tokens']:.1f} "
              f"response_len={r['response_len']:.1f} reward={r['reward_mean']:.3f} tokens/s={r['tokens_per_s']:.0f}")
        assert r["turns"] > 1 and r["skipped_updates"] == 0
