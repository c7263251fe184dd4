"""Parsing, the default task, validation and the derived settings of minirl/config.py."""

import os

import pytest

from minirl.config import (DEFAULT_TASK, RolloutConfig, compiled_blocks, loss_config, parse_config, sample_budget,
                           sampling_params, validate)

TASK = ["--model", "/some/model", "--data", "d.jsonl"]


def test_bare_command_line_is_the_default_task():
    cfg = parse_config([])
    assert cfg.data.model == DEFAULT_TASK
    assert cfg.data.data == os.path.join(DEFAULT_TASK, "train.jsonl")
    assert cfg.data.test_data == os.path.join(DEFAULT_TASK, "test.jsonl")
    assert (cfg.run.steps, cfg.rollout.max_new_tokens) == (80, 8)  # from its train_config.json
    validate(cfg)
    # Flags still override the default task's settings; its own data stays unless replaced.
    cfg = parse_config(["--steps", "3", "--data", "mine.jsonl"])
    assert (cfg.run.steps, cfg.data.data, cfg.data.model) == (3, "mine.jsonl", DEFAULT_TASK)


def test_a_model_without_the_default_job():
    cfg = parse_config(TASK)
    assert (cfg.data.model, cfg.data.test_data, cfg.run.steps) == ("/some/model", "", 100)
    with pytest.raises(ValueError, match="--data is required with --model"):
        validate(parse_config(["--model", "/some/model"]))


@pytest.mark.parametrize("flags, message", [
    (["--prompts-per-step", "0"], "must be >= 1"),
    (["--n-samples", "0"], "must be >= 1"),
    (["--steps", "0"], "must be >= 1"),
    (["--prompts-per-step", "4", "--n-samples", "3", "--mini-batches", "5"],
     "prompts_per_step x n_samples = 12 samples do not split into --mini-batches 5"),
    (["--mini-batches", "0"], "--mini-batches must be >= 1"),
    (["--backend", "sglang"], "unknown --backend 'sglang'"),
    (["--schedule", "linear"], "unknown --schedule 'linear'"),
    (["--loss-agg", "mean"], "agg must be one of"),
    (["--dual-clip-c", "0.5"], "dual_clip_c must be > 1"),
    (["--tis-cap", "-1"], "tis_cap must be > 0"),
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_validate_rejects(flags, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_config(TASK + flags))


def test_derived_settings():
    cfg = parse_config(TASK + ["--dual-clip-c", "3", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5",
                               "--max-new-tokens", "20"])
    lc = loss_config(cfg.algo)
    assert (lc.dual_clip_c, lc.tis_cap, lc.agg) == (3.0, None, "token-mean")  # tis_cap 0 = off = None
    p = sampling_params(cfg.rollout)
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k) == (20, 0.7, 0.9, 5)
    g = sampling_params(cfg.rollout, greedy=True)
    assert (g.max_new_tokens, g.temperature, g.top_p, g.top_k) == (20, 0.0, 1.0, 0)


def test_blocks_compile_on_gpus_by_default_also_for_the_ledger():
    assert compiled_blocks(parse_config(TASK).parallel, "cuda")
    assert not compiled_blocks(parse_config(TASK).parallel, "cpu")
    assert not compiled_blocks(parse_config(TASK + ["--no-compile"]).parallel, "cuda")
    assert compiled_blocks(parse_config(TASK + ["--trace-collectives"]).parallel, "cuda")


def test_sample_budget_is_the_episode_budget_with_an_env():
    """What a sample may hold after its prompt, and seq-mean-token-sum-norm's constant length: a
    completion's max_new_tokens, or an episode's budget (turns and observations), never one turn's limit."""
    rc = RolloutConfig(max_new_tokens=10, max_turns=3)
    assert sample_budget(rc) == 10
    rc.env = "minirl.tools_task.calculator:Calculator"
    assert sample_budget(rc) == 30  # max_turns x max_new_tokens
    rc.episode_tokens = 25
    assert sample_budget(rc) == 25


def test_help_shows_what_a_bare_run_uses(capsys):
    """A bare `train.py` runs the built-in task with its train_config.json: --help names those values."""
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 80 from the built-in task's train_config.json, 100 with --model)" in text
    assert "(default: 1e-05 from the built-in task's train_config.json, 1e-06 with --model)" in text
    assert "to 10% of lr) (default: 'constant')" in text  # --schedule: not in the task's file
