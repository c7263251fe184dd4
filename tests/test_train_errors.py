"""train.py under bad inputs and faults: one `error:` line, the right exit code, nothing lost or poisoned.

Inputs are checked before any process group starts (exit 2, checked in-process here: fast). Faults that
surface mid-run (a reward's NaN on one rank, non-finite gradients) are raised on every rank together
(exit 1, one line from rank 0) and never reach a checkpoint.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers_dist import REPO, torchrun

import train
from minirl.outdir import OutDir, check_out_dir
from minirl.config import parse_config


def args(task, out, *extra, reward="nan_on_3"):
    """train.py's arguments for the tiny task; `reward` is one of TASK/rewards.py's, or a module:function."""
    return ["train.py", "--model", str(task / "model"), "--data", str(task / "train.jsonl"), "--no-chat-template",
            "--reward", reward if ":" in reward else f"{task}/rewards.py:{reward}", "--prompts-per-step", "4", "--n-samples", "2",
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


def edited_model(task, tmp_path, name: str, edit) -> str:
    """A copy of the model whose file `name` went through `edit` (text -> text)."""
    model = tmp_path / f"model_{name}"
    shutil.copytree(task / "model", model)
    (model / name).write_text(edit((model / name).read_text()))
    return str(model)


def without_hidden_size(text: str) -> str:
    return json.dumps({k: v for k, v in json.loads(text).items() if k != "hidden_size"})


@pytest.mark.parametrize("case, message", [
    ("lr", "--lr must be in (0, inf), got -1e-06"),
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
    ("data_dir", "is a directory, not a data file"),
    ("data_latin1", "train.jsonl:2: not UTF-8 text (byte 0xe9"),
    ("empty_prompt", "train.jsonl: row 2, field 'prompt': the prompt is empty"),
    ("no_hidden_size", "config.json: no 'hidden_size'"),
    ("bad_config_json", "/config.json:36:20: malformed JSON"),
    ("bad_tokenizer_json", "tokenizer.json: the tokenizers library cannot read it"),
    ("reward_exits", "cannot import"),
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
        "data_dir": lambda: ["--data", str(tmp_path)],
        "data_latin1": lambda: ["--data", str(tmp_path / "train.jsonl")],
        "empty_prompt": lambda: ["--data", write(tmp_path / "train.jsonl", '{"prompt": "1+1=", "answer": "2"}\n'
                                                                            '{"prompt": "", "answer": "0"}\n')],
        "no_hidden_size": lambda: ["--model", edited_model(task, tmp_path, "config.json", without_hidden_size)],
        "bad_config_json": lambda: ["--model", edited_model(task, tmp_path, "config.json", lambda t: t[:-3])],
        "bad_tokenizer_json": lambda: ["--model", edited_model(task, tmp_path, "tokenizer.json", lambda t: t[:100])],
        "reward_exits": lambda: ["--reward", write(tmp_path / "quits.py", "import sys\nsys.exit(0)\n") + ":f"],
    }[case]()
    if case == "data_latin1":  # the file as a latin-1 editor saves it
        (tmp_path / "train.jsonl").write_bytes('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "caf\u00e9"}\n'
                                               .encode("latin-1"))
    if case == "used_out_dir":  # an earlier run's results must survive a rerun without --resume
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    with pytest.raises(SystemExit) as e:
        train.main(args(task, out, *extra)[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in one_error_line(err), err
    if case == "reward_exits":
        assert "quits.py" in err and "sys.exit(0)" in err
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


# Rank 0's disk fills as step 2 is scored (a rank scores 4 completions a step: 4 prompts x 2 samples over
# 2 ranks): its files may grow by 10 more bytes, so step 2's metrics row is cut short with EFBIG.
DISK_FULL_REWARD = """import os, resource, signal, sys
calls = 0


def at_step_2(prompt, completion, answer):
    global calls
    calls += 1
    if calls == 5 and os.environ["RANK"] == "0":
        metrics = os.path.join(sys.argv[sys.argv.index("--out-dir") + 1], "metrics.jsonl")
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = os.path.getsize(metrics) + 10
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return float(len(completion))
"""


@pytest.fixture(scope="module")
def two_rank_faults(task, tmp_path_factory):
    """The two-rank fault runs, started together in the background when first asked for: name -> Future
    of (CompletedProcess, out dir). The one-rank resume test (first of the three) runs meanwhile."""
    disk_full = tmp_path_factory.mktemp("rewards") / "disk_full.py"
    disk_full.write_text(DISK_FULL_REWARD)
    runs = {"nan": (["--steps", "6", "--save-every", "1"], "nan_on_3"), "non_finite": (["--steps", "4"], "huge"),
            "disk_full": (["--steps", "3"], f"{disk_full}:at_step_2")}
    outs = {name: tmp_path_factory.mktemp(name) / "out" for name in runs}

    def launch(name):
        extra, reward = runs[name]
        return torchrun(2, args(task, outs[name], *extra, reward=reward), timeout=300), outs[name]

    with ThreadPoolExecutor(len(runs)) as pool:
        yield {name: pool.submit(launch, name) for name in runs}


RESUMED = ["--steps", "3", "--save-every", "1", "--lr", "1e-3", "--resume"]  # the straight run's settings


@pytest.fixture(scope="module")
def resumed(task, tmp_path_factory, two_rank_faults):
    """A straight 3-step run on one rank (passing --resume too, into an empty out-dir: it starts fresh),
    its newest checkpoint cut short (a full disk), then resumed with a new --lr for one step more:
    (straight run's rows, the resume's CompletedProcess, out dir). The two-rank fault runs go meanwhile."""
    out = tmp_path_factory.mktemp("resumed") / "out"
    proc = torchrun(1, args(task, out, *RESUMED, reward="length"), timeout=300)  # nothing yet: fresh
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to resume" in proc.stdout
    straight = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    shard = next(f for f in (out / "checkpoints" / "step_3").iterdir() if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = torchrun(1, args(task, out, *RESUMED, "--steps", "4", "--lr", "2e-3", reward="length"), timeout=300)
    return straight, proc, out


def test_resume_past_a_corrupt_newest_checkpoint_matches_a_straight_run(resumed):
    """step_3 is cut short: --resume walks back to step_2, reruns step 3 exactly as the straight run did,
    and metrics.jsonl holds each step once."""
    straight, proc, out = resumed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout and "truncated" in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward_mean", "loss", "grad_norm"):  # before step 3's update: its lr does not count yet
        assert rows[2][key] == pytest.approx(straight[2][key], rel=1e-5, abs=1e-7), key


def test_resume_applies_a_new_lr_and_steps_and_says_so(resumed):
    """The checkpoint holds the saved run's lr (optimizer and schedule): the new one must replace it."""
    straight, proc, out = resumed
    assert "note: resuming after step 2, with --lr 0.001 -> 0.002, --steps 3 -> 4" in proc.stdout, proc.stdout
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in straight] == [1e-3] * 3 and [r["lr"] for r in rows[2:]] == [2e-3, 2e-3]


@pytest.mark.parametrize("case, message", [
    ("task", "--task 'default' -> 'tools'"),
    ("model", "--model '"),
    ("reward", "--reward '"),
    ("kl_coef", "--kl-coef 0.0 -> 0.1"),
    ("fewer_prompts", "the prompts (12 usable rows then, 8 in "),
    ("other_answers", "the prompts (12 usable rows then, 12 in "),
    ("steps_below", "--steps 3 is below step 4"),
])
def test_resume_refuses_another_run(task, resumed, tmp_path, capsys, case, message):
    """Settings that make another run (another model, task, reward, algorithm, prompts), and --steps below
    the checkpoint, are one error line before start-up (exit 2), and the run is left as it was."""
    _, _, out = resumed
    data, lines = tmp_path / "train.jsonl", (task / "train.jsonl").read_text().splitlines(keepends=True)
    extra = {
        "task": lambda: ["--task", "tools"],
        "model": lambda: ["--model", edited_model(task, tmp_path, "config.json", lambda t: t)],  # another path
        "reward": lambda: ["--reward", f"{task}/rewards.py:vowels"],
        "kl_coef": lambda: ["--kl-coef", "0.1"],
        "fewer_prompts": lambda: ["--data", write(data, "".join(lines[:8]))],
        "other_answers": lambda: ["--data", write(data, "".join(lines).replace('"answer": "2"', '"answer": "22"'))],
        "steps_below": lambda: ["--steps", "3"],
    }[case]()
    before = (out / "metrics.jsonl").read_text(), (out / "run.json").read_text()
    with pytest.raises(SystemExit) as e:
        train.main(args(task, out, *RESUMED, "--steps", "5", "--lr", "2e-3", *extra, reward="length")[1:])
    assert e.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert ((out / "metrics.jsonl").read_text(), (out / "run.json").read_text()) == before


def test_resuming_a_finished_run_does_nothing(task, resumed, capsys):
    """All 4 steps are done: a rerun with --resume (a job script run twice) says so and exits 0 before
    start-up, with no row written twice."""
    _, _, out = resumed
    before = (out / "metrics.jsonl").read_text()
    train.main(args(task, out, *RESUMED, "--steps", "4", "--lr", "2e-3", reward="length")[1:])
    assert "finished its 4 steps: nothing to resume" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before


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


def test_a_full_disk_during_a_metrics_write_is_one_error_and_leaves_whole_lines(two_rank_faults):
    """Rank 0 alone writes metrics.jsonl; its failure is agreed on, so every rank stops (rank 1 with no
    traceback of its own), the error names the file, and the row cut short is cut off again."""
    proc, out = two_rank_faults["disk_full"].result()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert f"{out}/metrics.jsonl" in one_error_line(text), text[-3000:]
    assert f'File "{REPO}/' not in text, text[-3000:]
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


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


# Scores its first `after` calls with 0.0, then marks that the process got there (step 1's scoring, past
# every check before start-up) and holds it there until the test is done with it.
BLOCKING_REWARD = """import os, time
here, calls = os.path.dirname(os.path.abspath(__file__)), 0


def wait(prompt, completion, answer, after={after}):
    global calls
    calls += 1
    if calls > after:
        open(os.path.join(here, f"reached.{{os.getpid()}}"), "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(os.path.join(here, "done")) and time.monotonic() < deadline:
            time.sleep(0.05)
    return 0.0
"""


def launch(cmd: list[str], log) -> subprocess.Popen:
    """`python CMD` as a user runs it, on the CPU, output to the open file `log`."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until(done, timeout: float = 300):
    """Poll `done()` (the runs' progress, read from files and exit codes) until it holds or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_run_stopped_during_step_1_exits_143_and_can_start_again(task, tmp_path):
    """SIGTERM while step 1 is being scored, after the evaluation before training wrote its step-0 row:
    no step finished, so nothing is saved, and the run exits 143 (128 + SIGTERM), not 0, which a
    scheduler would take for a finished run. The step-0 row does not block the run: started again,
    with or without --resume, it passes every check before start-up."""
    write(tmp_path / "blocking.py", BLOCKING_REWARD.format(after=12))  # the 12 held-out prompts pass
    out = tmp_path / "out"
    run = args(task, out, "--steps", "1", "--test-data", str(task / "train.jsonl"))
    with open(tmp_path / "run.log", "w+") as log:
        proc = launch([*run, "--reward", f"{tmp_path}/blocking.py:wait"], log)
        try:
            wait_until(lambda: (tmp_path / f"reached.{proc.pid}").exists() or proc.poll() is not None)
            assert proc.poll() is None, log.seek(0) or log.read()
            proc.send_signal(signal.SIGTERM)
        finally:
            (tmp_path / "done").touch()
            code = proc.wait(120)
        text = log.seek(0) or log.read()
    assert code == 143, text
    assert "stopped by signal during step 1" in text and "nothing to save" in text, text
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    for again in ([], ["--resume"]):
        train.load_inputs(parse_config([*run[1:], "--reward", f"{task}/rewards.py:length", *again]))


def test_two_runs_started_together_cannot_share_an_out_dir(task, tmp_path):
    """Two `python train.py` into one out-dir, started at once: the first to claim it holds its lock, and
    the other stops before start-up with one error line and exit 2 however close together they came.
    The winner is held in its first reward (before it writes a result, so the plain check of the out-dir
    cannot tell that it is there), then SIGKILLed: the kernel frees its lock, and the out-dir can be
    claimed again at once."""
    write(tmp_path / "blocking.py", BLOCKING_REWARD.format(after=0))
    out = tmp_path / "out"
    run = [*args(task, out, "--steps", "1"), "--reward", f"{tmp_path}/blocking.py:wait"]
    logs = [open(tmp_path / f"run{i}.log", "w+") for i in range(2)]
    procs = [launch(run, log) for log in logs]

    def reached():
        return [p for p in procs if (tmp_path / f"reached.{p.pid}").exists()]

    try:
        wait_until(lambda: len(reached()) == 2 or (any(p.poll() is not None for p in procs) and reached())
                   or all(p.poll() is not None for p in procs))
        texts = [log.seek(0) or log.read() for log in logs]
        assert len(reached()) == 1, f"{len(reached())} runs got past the out-dir check:\n" + "\n".join(texts)
        winner = reached()[0]
        loser, text = next((p, t) for p, t in zip(procs, texts) if p is not winner)
        assert loser.wait(60) == 2, text
        assert f"{out} is in use by another run (pid {winner.pid} on " in one_error_line(text)
        winner.kill()
        winner.wait(60)
        assert check_out_dir(str(out), resume=False, world_size=1, lock=True) == OutDir(0)
    finally:
        (tmp_path / "done").touch()
        for p in procs:
            p.kill()
            p.wait(60)
        for log in logs:
            log.close()
