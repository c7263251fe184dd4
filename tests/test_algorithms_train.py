"""train.py end to end with the algorithm flags of issue 19, on the built-in default task, 2 ranks.

Step 1 of a run starts from the same weights and rollouts on any layout (per-completion seeds), so
its metrics check the plumbing of each mode:
- GSPO and sequence-level masked IS under sp2 equal one process (the per-sequence sums cross the
  sp ranks through an all-reduce, forward and backward);
- --skip-zero-var only renormalises: zero-variance groups have zero advantages, so without it the
  seq-mean loss's gradient is the same times the share of groups kept;
- --ppo-epochs counts its optimizer steps in the lr schedule.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers_dist import torchrun

import train

LR = 1e-5
SEQUENCE_MODES = ["--advantage", "rloo", "--no-std-norm", "--loss-agg", "seq-mean-token-mean",
                  "--ratio-level", "sequence", "--tis-cap", "2", "--tis-level", "sequence", "--tis-mode", "mask",
                  "--tis-low", "0.5"]


@pytest.fixture(scope="module")
def test_data(tmp_path_factory):
    """Two held-out prompts instead of 500: the evaluations before and after cost little."""
    path = tmp_path_factory.mktemp("data") / "test.jsonl"
    path.write_text('{"prompt": "12+34=", "answer": "46"}\n{"prompt": "50+7=", "answer": "57"}\n')
    return str(path)


def run(n_ranks, out, test_data, *flags) -> dict[int, dict]:
    proc = torchrun(n_ranks, ["train.py", "--out-dir", str(out), "--test-data", test_data, "--no-export",
                              "--eval-every", "0", "--prompts-per-step", "8", "--n-samples", "4", "--lr", str(LR),
                              *flags], timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "loss" in r}


# The four runs of this module: ranks and flags. They are independent, so they are launched together
# (a one-rank run leaves a core idle; start-up and the evaluations are mostly serial).
RUNS = {
    "one_rank": (1, ["--steps", "1", "--skip-zero-var", *SEQUENCE_MODES]),
    "sp2": (2, ["--steps", "1", "--sp", "2", "--skip-zero-var", *SEQUENCE_MODES]),
    "dp2": (2, ["--steps", "1", *SEQUENCE_MODES]),  # zero-variance groups kept
    # One group per mini-batch: with --skip-zero-var, the mini-batch of a zero-variance group is empty
    # and runs only a zero-weight dummy micro-batch, without an optimizer step.
    "ppo": (2, ["--steps", "2", "--sp", "2", "--ppo-epochs", "2", "--mini-batches", "8", "--skip-zero-var",
                "--schedule", "cosine", "--ratio-level", "sequence-token", "--tis-cap", "2", "--tis-mode", "mask",
                "--tis-low", "0.5"]),
}


@pytest.fixture(scope="module")
def runs(test_data, tmp_path_factory) -> dict:
    """name -> {step: metrics row} of each of RUNS, or the AssertionError of a failed launch."""
    def one(name):
        n_ranks, flags = RUNS[name]
        try:
            return run(n_ranks, tmp_path_factory.mktemp(name), test_data, *flags)
        except AssertionError as e:  # reported by the tests that use this run
            return e

    with ThreadPoolExecutor(len(RUNS)) as pool:
        return dict(zip(RUNS, pool.map(one, RUNS)))


def rows_of(runs, name) -> dict[int, dict]:
    if isinstance(runs[name], AssertionError):
        raise runs[name]
    return runs[name]


@pytest.fixture(scope="module")
def one_rank(runs):
    return rows_of(runs, "one_rank")[1]


def test_sequence_modes_sp2_match_one_rank(one_rank, runs):
    assert one_rank["grad_norm"] > 0 and 0 < one_rank["zero_var_groups"] < 1  # the comparisons mean something
    row = rows_of(runs, "sp2")[1]
    for k in ("reward_mean", "zero_var_groups", "loss", "grad_norm", "entropy", "tis_weight", "tis_masked"):
        assert row[k] == pytest.approx(one_rank[k], rel=1e-4, abs=1e-6), k


def test_skip_zero_var_renormalises(one_rank, runs):
    row = rows_of(runs, "dp2")[1]  # dp2, zero-variance groups kept
    kept = 1 - one_rank["zero_var_groups"]
    assert row["zero_var_groups"] == one_rank["zero_var_groups"]
    # (the loss itself is ~0 at step 1: ratio 1 and advantages summing to 0 in every group)
    assert row["grad_norm"] == pytest.approx(one_rank["grad_norm"] * kept, rel=1e-4)


def test_ppo_epochs_and_gspo_token(runs):
    rows = rows_of(runs, "ppo")
    assert sorted(rows) == [1, 2] and rows[1]["zero_var_groups"] > 0
    # 2 steps x 8 mini-batches x 2 epochs = 32 updates; after step 1's 16, cosine is half way down.
    assert rows[1]["lr"] == pytest.approx(LR * (0.1 + 0.9 * 0.5))
    assert rows[1]["approx_kl"] > 0  # later passes see a policy that moved since the old log-probs


@pytest.mark.parametrize("extra, message", [
    (["--tis-level", "sequence"], "error: tis_level, tis_mode and tis_low need tis_cap"),
    (["--tis-cap", "2", "--tis-low", "0.5"], "error: tis_low is the lower bound of tis_mode mask"),
    (["--ratio-level", "seq"], "error: ratio_level must be one of"),
    (["--advantage", "rloo", "--n-samples", "1"], "error: rloo advantages need a group of at least 2"),
    (["--ppo-epochs", "0"], "error: --prompts-per-step, --n-samples, --steps and --ppo-epochs must be >= 1"),
])
def test_bad_combination_is_one_clear_line(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(["--out-dir", str(tmp_path), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--advantage", "--skip-zero-var", "--ratio-level", "--tis-level", "--tis-mode", "--tis-low",
                 "--ppo-epochs"):
        assert flag in out, flag
