"""Parsing, the default task, validation and the derived settings of minirl/config.py."""

import os
from dataclasses import fields

import pytest

from minirl.config import (DEFAULT_TASK, TASKS, RolloutConfig, TrainConfig, build_parser, compiled_blocks,
                           loss_config, parse_config, sample_budget, sampling_params, validate)

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
    (["--prompts-per-step", "0"], r"--prompts-per-step must be in \[1, inf\), got 0"),
    (["--n-samples", "0"], r"--n-samples must be in \[1, inf\)"),
    (["--steps", "0"], r"--steps must be in \[1, inf\)"),
    (["--prompts-per-step", "4", "--n-samples", "3", "--mini-batches", "5"],
     "prompts_per_step x n_samples = 12 samples do not split into --mini-batches 5"),
    (["--mini-batches", "0"], r"--mini-batches must be in \[1, inf\), got 0"),
    (["--backend", "sglang"], "unknown --backend 'sglang'"),
    (["--schedule", "linear"], "unknown --schedule 'linear'"),
    (["--loss-agg", "mean"], "agg must be one of"),
    (["--dual-clip-c", "0.5"], r"--dual-clip-c must be 0 or \(1, inf\), got 0.5"),
    (["--tis-cap", "-1"], r"--tis-cap must be in \[0, inf\)"),
    (["--temperature", "-0.5"], r"--temperature must be 0 or \[0.01, inf\)"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "-1"], r"--top-k must be in \[0, inf\)"),
    (["--max-new-tokens", "0"], r"--max-new-tokens must be in \[1, inf\)"),
    (["--seed", "2147483648"], r"--seed must be in \[0, 2147483647\]"),
    # Values that passed and did harm: flipped or NaN gradients, NaN or underflowing sampling, a NaN clip
    # range, a division by zero, a crash mid-run.
    (["--grad-clip=-1"], r"--grad-clip must be in \[0, inf\), got -1.0"),
    (["--grad-clip", "nan"], r"--grad-clip must be in \[0, inf\), got nan"),
    (["--temperature", "nan"], r"--temperature must be 0 or \[0.01, inf\), got nan"),
    (["--temperature", "1e-40"], r"--temperature must be 0 or \[0.01, inf\), got 1e-40"),
    (["--temperature", "inf"], r"--temperature must be 0 or \[0.01, inf\), got inf"),
    (["--clip-eps-low", "nan"], r"--clip-eps-low must be in \[0, 1\]"),
    (["--clip-eps-high", "nan"], r"--clip-eps-high must be in \[0, inf\)"),
    (["--mini-batches=-1"], r"--mini-batches must be in \[1, inf\), got -1"),
    (["--lr", "inf"], r"--lr must be in \(0, inf\), got inf"),
    (["--kl-coef=-0.1"], r"--kl-coef must be in \[0, inf\)"),
    (["--timeout-s", "0"], r"--timeout-s must be in \[1, inf\)"),
    (["--vllm-memory", "1.5"], r"--vllm-memory must be in \(0, 1\]"),
])
def test_validate_rejects(flags, message):
    with pytest.raises(ValueError, match=message):
        validate(parse_config(TASK + flags))


def numeric_fields():
    return [(section, f) for section in vars(TrainConfig()).values() for f in fields(section)
            if f.type in (int, float)]


@pytest.mark.parametrize("name", [f.name for _, f in numeric_fields()])
def test_every_numeric_setting_has_a_range_that_help_shows(name):
    """NaN and inf pass for no float setting (NaN passes every `<` test that is not written for it), and
    `--help` says each setting's range."""
    section, f = next((s, f) for s, f in numeric_fields() if f.name == name)
    assert f.metadata.get("range"), f"{name} has no range"
    flag = "--" + name.replace("_", "-")
    if f.type is float:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError, match=f"{flag} must be"):
                validate(parse_config(TASK + [f"{flag}={bad}"]))
    help_text = next(a.help for a in build_parser(TrainConfig(), "")._actions if a.dest == name)
    assert f"range {f.metadata['range']}" in help_text, help_text


def test_infinity_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "job.json"
    path.write_text('{"lr": Infinity, "model": "/some/model", "data": "d.jsonl"}')  # Python's json reads it
    with pytest.raises(ValueError, match=r"--lr must be in \(0, inf\), got inf"):
        validate(parse_config(["--config", str(path)]))


def test_the_task_in_a_config_file_is_used(tmp_path):
    """{"task": "tools"} in --config picks the tools task as --task tools does, its own settings under
    the file's: it was silently ignored (the default task ran)."""
    path = tmp_path / "job.json"
    path.write_text('{"task": "tools", "steps": 3}')
    cfg, flag = parse_config(["--config", str(path)]), parse_config(["--task", "tools"])
    assert cfg.data.model == flag.data.model == TASKS["tools"] and cfg.data.data == flag.data.data
    assert cfg.rollout.env == flag.rollout.env != "" and cfg.run.steps == 3
    path.write_text('{"task": "nope"}')
    with pytest.raises(ValueError, match="unknown --task 'nope'"):
        parse_config(["--config", str(path)])


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
    assert "default: 80 from the built-in task's train_config.json, 100 with --model)" in text
    assert "default: 1e-05 from the built-in task's train_config.json, 1e-06 with --model)" in text
    assert "to 10% of lr) (may change on --resume; default: 'constant')" in text  # --schedule: not in the task's file
