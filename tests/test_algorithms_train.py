"""train.py end to end with the algorithm flags, on the built-in default task, 2 ranks.

Step 1 of a run starts from the same weights and rollouts on any layout (per-completion seeds), so
its metrics check the plumbing of each mode:
- GSPO and sequence-level masked IS under sp2 equal one process (the per-sequence sums cross the
  sp ranks through an all-reduce, forward and backward);
- --skip-zero-var only renormalises: zero-variance groups have zero advantages, so without it the
  seq-mean loss's gradient is the same times the share of groups kept;
- --ppo-epochs counts its optimizer steps in the lr schedule;
- one run with the second round's flags together (REINFORCE++-baseline, CISPO, the KL in the reward,
  DAPO's dynamic sampling, overlong filter and penalty) under sp2.
Also in process: each algorithm flag's published defaults, dynamic sampling's draws (the same on a
rerun, and after a resume), and the errors of bad combinations.
"""

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers_dist import torchrun

import train
from minirl.config import derive, parse_config
from minirl.data import PromptDataset
from minirl.hf import load_state_dict_from_dir, read_config
from minirl.rollouts import make_generator, rollout_groups
from minirl.tokenizer import Tokenizer

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
    # 3 new tokens: 3-digit answers (and rambling wrong ones) are cut off, so the filter and penalty act
    "second_round": (2, ["--steps", "2", "--sp", "2", "--max-new-tokens", "3", "--advantage", "reinforce++-baseline",
                         "--policy-loss", "cispo", "--kl-coef", "0.01", "--kl-placement", "reward",
                         "--dynamic-sampling", "3", "--overlong-filter", "--overlong-buffer", "2"]),
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


def test_second_round_flags_together(runs):
    rows = rows_of(runs, "second_round")
    assert sorted(rows) == [1, 2]
    for r in rows.values():
        assert r["truncated"] > 0 and r["overlong_penalty"] < 0  # some completions cut off, shaped and filtered
        assert 0 <= r["extra_draws"] <= 3 and r["drawn_groups"] >= 8
        assert r["filled_groups"] == round(8 * r["zero_var_groups"])  # only fill-ins have equal rewards
        assert r["grad_norm"] > 0 and math.isfinite(r["loss"]) and r["skipped_updates"] == 0
    # the KL to the initial policy, in the reward: none before the first update, some after
    assert abs(rows[1]["kl_penalty"]) < 1e-6 and rows[2]["kl_penalty"] != 0 and rows[2]["kl_ref"] != 0
    assert sum(r["extra_draws"] for r in rows.values()) > 0  # dynamic sampling redrew


# ---- in process ----


def test_published_defaults_from_the_flags():
    """A flag that names an algorithm brings that algorithm's published defaults; explicit settings stay."""
    gspo = derive(parse_config(["--ratio-level", "sequence"]), None)
    assert (gspo.loss.agg, gspo.loss.clip_eps_low, gspo.loss.clip_eps_high) == ("seq-mean-token-mean", 3e-4, 4e-4)
    kept = derive(parse_config(["--ratio-level", "sequence-token", "--loss-agg", "token-mean", "--clip-eps-low",
                                "0.1", "--clip-eps-high", "0.3"]), None)
    assert (kept.loss.agg, kept.loss.clip_eps_low, kept.loss.clip_eps_high) == ("token-mean", 0.1, 0.3)
    grpo = derive(parse_config([]), None)
    assert (grpo.loss.agg, grpo.loss.clip_eps_low, grpo.advantage.std_norm) == ("token-mean", 0.2, True)
    assert derive(parse_config(["--advantage", "rloo"]), None).advantage.std_norm is False
    assert derive(parse_config(["--advantage", "rloo", "--std-norm"]), None).advantage.std_norm is True
    assert derive(parse_config(["--no-std-norm"]), None).advantage.std_norm is False
    cispo = derive(parse_config(["--policy-loss", "cispo"]), None).loss
    assert (cispo.policy_loss, cispo.clip_eps_low, cispo.clip_eps_high) == ("cispo", 1.0, 3.0)
    rpp = derive(parse_config(["--advantage", "reinforce++", "--kl-coef", "0.1"]), None)
    assert (rpp.advantage.kl_coef, rpp.advantage.kl_estimator, rpp.loss.kl_coef) == (0.1, "k1", 0.0)  # in the reward
    in_loss = derive(parse_config(["--advantage", "reinforce++", "--kl-coef", "0.1", "--kl-placement", "loss"]), None)
    assert (in_loss.advantage.kl_coef, in_loss.loss.kl_coef, in_loss.loss.kl_estimator) == (0.0, 0.1, "k3")


def test_gspo_with_token_mean_warns(tmp_path, capsys):
    train.load_inputs(parse_config(["--out-dir", str(tmp_path), "--ratio-level", "sequence", "--loss-agg",
                                    "token-mean"]))
    err = capsys.readouterr().err
    assert "warning: --loss-agg token-mean under GSPO" in err and len(err.strip().splitlines()) == 1
    train.load_inputs(parse_config(["--out-dir", str(tmp_path), "--ratio-level", "sequence"]))
    assert "GSPO" not in capsys.readouterr().err


def test_dynamic_sampling_draws_are_reproducible_and_resume_exactly(gloo_rank):
    """Dynamic sampling on the default task's model: the step holds the requested groups, those of equal
    rewards only as fill-ins; the draws advance the data order, so a run resumed from the saved position
    draws what a straight run draws."""
    cfg = parse_config(["--prompts-per-step", "8", "--n-samples", "4", "--dynamic-sampling", "2"])
    tok = Tokenizer.from_dir(cfg.data.model)
    ds = derive(cfg, tok)
    generator = make_generator(cfg, read_config(cfg.data.model), tok, gloo_rank.device)
    generator.update_weights(load_state_dict_from_dir(cfg.data.model).items())

    def dataset():
        return PromptDataset(cfg.data.data, tok, chat=False, seed=cfg.run.seed)

    def step(data, k):
        samples, draws = rollout_groups(generator, data, k, gloo_rank, cfg, ds, tok, progress=False)
        return [(s.prompt.index, s.completion_ids, s.reward) for s in samples], draws

    data = dataset()
    first, draws = step(data, 0)
    assert data.state_dict() == {"epoch": 0, "pos": draws["drawn_groups"]}  # every drawn prompt is used up
    saved = data.state_dict()
    second, draws2 = step(data, 1)
    assert draws["extra_draws"] + draws2["extra_draws"] > 0
    for samples, d in ((first, draws), (second, draws2)):
        rewards = torch.tensor([r for _, _, r in samples]).view(8, 4)
        assert int((rewards.amax(1) == rewards.amin(1)).sum()) == d["filled_groups"]
    assert step(dataset(), 0) == (first, draws)  # a rerun draws the same
    resumed = dataset()
    resumed.load_state_dict(saved)
    assert step(resumed, 1) == (second, draws2)


@pytest.mark.parametrize("extra, message", [
    (["--tis-level", "sequence"], "error: tis_level, tis_mode and tis_low need tis_cap"),
    (["--tis-cap", "2", "--tis-low", "0.5"], "error: tis_low is the lower bound of tis_mode mask"),
    (["--ratio-level", "seq"], "error: ratio_level must be one of"),
    (["--advantage", "rloo", "--n-samples", "1"], "error: rloo advantages need a group of at least 2"),
    (["--ppo-epochs", "0"], "error: --ppo-epochs must be in [1, inf), got 0"),
    (["--advantage", "reinforce++-baseline", "--n-samples", "1"],
     "error: reinforce++-baseline advantages need a group of at least 2"),
    (["--advantage", "ppo"], "error: advantage must be one of"),
    (["--policy-loss", "cispo", "--ratio-level", "sequence"], "error: policy_loss cispo weights each token"),
    (["--policy-loss", "cispo", "--dual-clip-c", "3"], "error: policy_loss cispo weights each token"),
    (["--kl-placement", "reward"], "error: --kl-placement and --kl-estimator need --kl-coef > 0"),
    (["--kl-coef", "0.1", "--kl-estimator", "k4"], "error: --kl-placement is one of"),
    (["--dynamic-sampling", "2", "--n-samples", "1"], "error: --dynamic-sampling K redraws groups of equal rewards"),
    (["--overlong-buffer", "9"], r"error: --overlong-buffer must be in [1, 8]"),
    (["--clip-eps-low", "-0.1"], "error: --clip-eps-low must be in [0, 1], got -0.1"),
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
                 "--ppo-epochs", "--policy-loss", "--kl-estimator", "--kl-placement", "--dynamic-sampling",
                 "--overlong-filter", "--overlong-buffer", "--overlong-penalty", "--std-norm, --no-std-norm"):
        assert flag in out, flag
    text = re.sub(r"-\s+", "-", " ".join(out.split()))  # argparse wraps lines at hyphens too
    for auto in ("GSPO 3e-4", "GSPO 4e-4", "GSPO seq-mean-token-mean", "off for rloo", "reward for reinforce++"):
        assert auto in text, auto  # --help says what auto means
