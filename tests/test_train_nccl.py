"""train.py on GPUs with NCCL, launched as a user launches it (GPU tier: `python -m pytest -m gpu tests`).

The rollout of step 1 does not depend on the layout (every completion is seeded by (seed, step, prompt,
sample)), so its rewards must be identical for --sp 1 and --sp 2; the update's metrics (loss, entropy,
gradient norm) come from bf16 forward/backward passes that split attention differently, so they agree to
bf16 rounding. The figures are printed for tests/GPU_TIER.md.
"""

import json

from helpers_dist import gpus, torchrun

ROLLOUT_KEYS = ("reward_mean", "reward_std", "solved", "response_len", "truncated")
UPDATE_KEYS = ("loss", "pg_loss", "entropy", "grad_norm")
BF16_TOL = 2e-2  # relative, plus 1e-4 absolute for metrics near zero


def step_row(out_dir, step: int) -> dict:
    with open(out_dir / "metrics.jsonl") as f:
        return next(row for row in map(json.loads, f) if row["step"] == step and "reward_mean" in row)


def check_step_one_across_sp(tmp_path, world: int, sps: tuple[int, ...]):
    rows = {}
    for sp in sps:
        out = tmp_path / f"sp{sp}"
        proc = torchrun(world, ["train.py", "--sp", str(sp), "--steps", "1", "--out-dir", str(out), "--no-export"],
                        timeout=300, cuda=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[sp] = step_row(out, 1)
        print(f"{world} GPUs sp{sp} step 1: "
              + " ".join(f"{k}={rows[sp][k]:.6g}" for k in ROLLOUT_KEYS + UPDATE_KEYS))
    for sp in sps[1:]:
        for k in ROLLOUT_KEYS:
            assert rows[1][k] == rows[sp][k], (sp, k)
        for k in UPDATE_KEYS:
            assert abs(rows[1][k] - rows[sp][k]) <= BF16_TOL * abs(rows[1][k]) + 1e-4, (sp, k, rows[1][k], rows[sp][k])


@gpus(2)
def test_step_one_metrics_equal_across_sp(tmp_path):
    check_step_one_across_sp(tmp_path, 2, (1, 2))


@gpus(4)
def test_step_one_metrics_equal_across_sp_on_four_gpus(tmp_path):
    check_step_one_across_sp(tmp_path, 4, (1, 2, 4))
