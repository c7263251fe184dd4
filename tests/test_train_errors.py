"""train.py under bad inputs and faults: one `error:` line, the right exit code, nothing lost or poisoned.

Inputs are checked before any process group starts (exit 2, checked in-process here: fast). Faults that
surface mid-run (a reward's NaN on one rank, non-finite gradients) are raised on every rank together
(exit 1, one line from rank 0) and never reach a checkpoint.
"""

import importlib.util
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers_dist import REPO, torchrun

import train
from minirl.config import parse_config


def args(task, out, *extra, reward="nan_on_3"):
    return ["train.py", "--model", str(task / "model"), "--data", str(task / "train.jsonl"), "--no-chat-template",
            "--reward", f"{task}/rewards.py:{reward}", "--prompts-per-step", "4", "--n-samples", "2",
            "--max-new-tokens", "4", "--micro-batch-tokens", "64", "--out-dir", str(out), "--no-export", *extra]


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def bad_model(task, tmp_path) -> str:
    """A copy of the model whose weights file is cut in half (a broken download)."""
    model = tmp_path / "broken_model"
    shutil.copytree(task / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(model)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("lr", "--lr must be > 0"),
    ("gen_batch", "--gen-batch-size"),
    ("attn", "--attn-backend 'bogus'"),
    ("keep", "--keep-checkpoints"),
    ("micro_batch", "--micro-batch-tokens 4"),
    ("weights", "truncated safetensors"),
    ("unknown_key", "unknown config keys ['no_such_key']"),
    ("bad_json", "malformed JSON"),
    ("json_list", "expected a JSON object"),
    ("json_type", "'steps' must be int"),
    ("out_file", "is not a directory"),
    ("used_out_dir", "already holds a run"),
])
def test_bad_input_fails_before_start_up(task, tmp_path, capsys, case, message):
    out = tmp_path / "out"
    extra = {
        "lr": lambda: ["--lr=-1e-6"],
        "gen_batch": lambda: ["--gen-batch-size=-1"],
        "attn": lambda: ["--attn-backend", "bogus"],
        "keep": lambda: ["--keep-checkpoints=-1"],
        "micro_batch": lambda: ["--micro-batch-tokens", "4"],
        "weights": lambda: ["--model", bad_model(task, tmp_path)],
        "unknown_key": lambda: ["--config", write(tmp_path / "c.json", '{"no_such_key": 1}')],
        "bad_json": lambda: ["--config", write(tmp_path / "c.json", '{"lr": ')],
        "json_list": lambda: ["--config", write(tmp_path / "c.json", "[1, 2]")],
        "json_type": lambda: ["--config", write(tmp_path / "c.json", '{"steps": "2"}')],
        "out_file": lambda: ["--out-dir", write(tmp_path / "a_file", "")],
        "used_out_dir": lambda: [],
    }[case]()
    if case == "used_out_dir":  # an earlier run's results must survive a rerun without --resume
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(SystemExit) as e:
        train.main(args(task, out, *extra)[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in one_error_line(err), err
    if case == "used_out_dir":
        assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_one_line(task, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(args(task, tmp_path, "--backend", "vllm")[1:])
    assert e.value.code == 2 and "pip install vllm" in one_error_line(capsys.readouterr().err)


def test_resume_nothing_and_no_learning_warnings(task, tmp_path, capsys):
    """--resume into an empty dir says it starts fresh; --n-samples 1 and rows without an answer warn.
    All three are printed while the inputs are read, before start-up (the launch that starts fresh
    from --resume is in test_resume_past_a_corrupt_newest_checkpoint_matches_a_straight_run)."""
    data = tmp_path / "data.jsonl"
    data.write_text((task / "train.jsonl").read_text() + json.dumps({"prompt": "9+9="}) + "\n")
    cfg = parse_config(args(task, tmp_path / "out", "--data", str(data), "--resume", "--n-samples", "1",
                            "--steps", "1", reward="length")[1:])
    train.load_inputs(cfg)
    out, err = capsys.readouterr()
    assert "nothing to resume" in out
    assert "--n-samples 1" in err and "1 of" in err and "'answer'" in err


@pytest.fixture(scope="module")
def two_rank_faults(task, tmp_path_factory):
    """The two-rank fault runs, started together in the background when first asked for: name -> Future
    of (CompletedProcess, out dir). The one-rank resume test (first of the three) runs meanwhile."""
    runs = {"nan": (["--steps", "6", "--save-every", "1"], "nan_on_3"), "non_finite": (["--steps", "4"], "huge")}
    outs = {name: tmp_path_factory.mktemp(name) / "out" for name in runs}

    def launch(name):
        extra, reward = runs[name]
        return torchrun(2, args(task, outs[name], *extra, reward=reward), timeout=300), outs[name]

    with ThreadPoolExecutor(len(runs)) as pool:
        yield {name: pool.submit(launch, name) for name in runs}


def test_resume_past_a_corrupt_newest_checkpoint_matches_a_straight_run(task, tmp_path, two_rank_faults):
    """step_3 is cut short (a full disk): --resume walks back to step_2, reruns step 3 exactly as the
    straight run did, and metrics.jsonl holds each step once. The straight run passes --resume too,
    into an empty out-dir: it starts fresh."""
    out = tmp_path / "out"
    run = ["--steps", "3", "--save-every", "1", "--lr", "1e-3"]
    proc = torchrun(1, args(task, out, *run, "--resume", reward="length"), timeout=300)  # nothing yet: fresh
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to resume" in proc.stdout
    straight = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    shard = next(f for f in (out / "checkpoints" / "step_3").iterdir() if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = torchrun(1, args(task, out, *run, "--resume", reward="length"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout and "truncated" in proc.stderr, proc.stderr[-3000:]
    resumed = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward_mean", "loss", "grad_norm"):
        assert resumed[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key


def test_nan_reward_on_one_rank_is_one_error_and_no_checkpoint(two_rank_faults):
    """The NaN comes from the prompts with answer 3, scored on one rank; every rank stops, no hang."""
    proc, out = two_rank_faults["nan"].result()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    line = one_error_line(text)
    assert "nan_on_3" in line and "returned nan" in line, line
    assert f'File "{REPO}/train.py"' not in text, text[-3000:]
    # Only steps before the NaN one checkpointed, and every metrics line is JSON.
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()] if (
        out / "metrics.jsonl").exists() else []
    saved = sorted(os.listdir(out / "checkpoints")) if (out / "checkpoints").exists() else []
    assert [f"step_{r['step']}" for r in rows] == [s for s in saved if s.startswith("step_")]


def test_non_finite_gradients_skip_updates_then_stop(two_rank_faults):
    proc, out = two_rank_faults["non_finite"].result()
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "skipped an update for a NaN or inf" in one_error_line(text)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped_updates"] == 1 for r in rows)
    assert rows[0]["grad_norm"] is None  # written as null: the file stays JSON
    assert not (out / "checkpoints").exists() or not any(
        n.startswith("step_") for n in os.listdir(out / "checkpoints"))
