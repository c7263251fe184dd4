"""rollout.py end to end, as a user runs it (subprocesses), on a tiny model directory with a tokenizer."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers_models import save_hf_model
from helpers_tokenizer import make_test_tokenizer

from minirl.generate import SamplingParams, generate
from minirl.hf import load_model
from minirl.tokenizer import Tokenizer
from rollout import logprob_mismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"index", "sample", "prompt", "prompt_token_ids", "completion", "completion_token_ids", "logprobs",
          "finish_reason"}
QUESTIONS = ["What is 2 + 3?", "Hello, world!", "The quick brown fox", "def add(a, b):"]


def run(*args, torchrun=0):
    # On the CPU, also on a GPU machine; one thread per process: the suite may share two cores with
    # other pytest workers.
    # --standalone: torchrun binds a free port itself; one picked here could be picked by a launch beside it.
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, os.path.join(REPO, "rollout.py"), *args]
    if torchrun:
        cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc-per-node={torchrun}", "--standalone"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def read_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 with the test tokenizer, and prompts whose first answer is its greedy completion."""
    tmp = tmp_path_factory.mktemp("rollout")
    model_dir = str(tmp / "model")
    save_hf_model(model_dir, "qwen2", seed=1, vocab_size=320)
    make_test_tokenizer(model_dir)
    tok = Tokenizer.from_dir(model_dir)
    first = generate(load_model(model_dir), [tok.encode_prompt(QUESTIONS[0], chat=True)],
                     SamplingParams(max_new_tokens=6, temperature=0), tok.eos_ids, tok.pad_id)[0]
    answers = [tok.decode(first.token_ids), "no", 7, "no"]  # the first is right under --temperature 0
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    return model_dir, str(data), tok, tmp


BAD_DATA = {  # test_bad_data_is_one_clear_error: file content -> the error it must give
    '{"prompt": "a"}\n\n{"prompt": "b"\n': r"data\.jsonl:3: malformed JSON",
    '{"prompt": "a"}\n{"question": "b"}\n': r"row 2 has no field 'prompt'",
}


@pytest.fixture(scope="module")
def started(setup):
    """The module's independent rollout.py runs (all but the SIGTERM one, which times its signal), started
    together when first asked for: name -> Future of the CompletedProcess. Start-up (`import torch`) is
    most of each run's time and is serial, so running them side by side uses both cores."""
    model_dir, data, _, tmp = setup
    runs = {
        "greedy": dict(args=("--model", model_dir, "--data", data, "--out", str(tmp / "greedy.jsonl"), "--n-samples", "2",
                             "--temperature", "0", "--max-new-tokens", "6", "--reward", "exact", "--check-logprobs",
                             "--gen-batch-size", "3")),
        "sampled": dict(args=("--model", model_dir, "--data", data, "--out", str(tmp / "sampled" / "sampled.jsonl"),
                              "--n-samples", "3", "--temperature", "0.8", "--top-p", "0.9", "--max-new-tokens", "8",
                              "--check-logprobs", "--seed", "5"), torchrun=2),
        "missing": dict(args=("--model", "/does/not/exist", "--data", data, "--out", str(tmp / "missing.jsonl")),
                        torchrun=2),
        "unwritable": dict(args=("--model", model_dir, "--data", data, "--out",
                                 str(tmp / "no_such_dir" / "out.jsonl"))),
    }
    for i, content in enumerate(BAD_DATA):
        bad = tmp / f"bad{i}" / "data.jsonl"
        bad.parent.mkdir()
        bad.write_text(content)
        runs[content] = dict(args=("--model", model_dir, "--data", str(bad), "--out", str(bad.parent / "out.jsonl")))
    # The NaN reward, and an OUT from an earlier run that must be gone afterwards.
    (tmp / "nan_reward.py").write_text(
        'def f(prompt, completion, answer):\n    return float("nan") if answer == "7" else 1.0\n')
    (tmp / "nan.jsonl").write_text('{"stale": true}\n')
    runs["nan"] = dict(args=("--model", model_dir, "--data", data, "--out", str(tmp / "nan.jsonl"), "--max-new-tokens",
                             "4", "--reward", f"{tmp / 'nan_reward.py'}:f", "--gen-batch-size", "1"), torchrun=2)
    (tmp / "sampled").mkdir()  # its own folder: the test checks that no .rank part is left in it
    with ThreadPoolExecutor(4) as pool:
        yield {name: pool.submit(run, *r["args"], torchrun=r.get("torchrun", 0)) for name, r in runs.items()}


def test_greedy_rollout_with_reward_and_logprob_check(setup, started):
    model_dir, data, tok, tmp = setup
    out = str(tmp / "greedy.jsonl")
    proc = started["greedy"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_lines(out)
    assert [(d["index"], d["sample"]) for d in lines] == [(i, j) for i in range(4) for j in range(2)]
    for d in lines:
        assert FIELDS | {"answer", "reward", "trainer_logprobs"} <= d.keys()
        assert d["prompt"] == QUESTIONS[d["index"]]
        assert d["prompt_token_ids"] == tok.encode_prompt(d["prompt"], chat=True)
        assert d["completion"] == tok.decode(d["completion_token_ids"])
        assert len(d["logprobs"]) == len(d["completion_token_ids"]) <= 6
        assert d["finish_reason"] == ("stop" if d["completion_token_ids"][-1] in tok.eos_ids else "length")
        assert d["reward"] == float(d["completion"].strip() == d["answer"].strip())
    assert [d["reward"] for d in lines[:2]] == [1.0, 1.0] and lines[4]["answer"] == "7"
    mean_reward = sum(d["reward"] for d in lines) / len(lines)
    assert f"mean reward {mean_reward:.4f}" in proc.stdout
    assert "tokens/s" in proc.stdout
    report = re.search(r"mean \|dlogprob\| (\S+) .* estimate (\S+)\n", proc.stdout)
    assert report, proc.stdout
    assert float(report[1]) < 1e-4 and abs(float(report[2])) < 1e-3


def test_sampled_rollout_data_parallel(setup, started):
    """Two ranks, each every other prompt; rank 0 merges into prompt order. The trainer's log-probs
    under temperature 0.8 and top-p 0.9 match the generator's."""
    model_dir, data, tok, tmp = setup
    out = str(tmp / "sampled" / "sampled.jsonl")
    proc = started["sampled"].result()
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = read_lines(out)
    assert [(d["index"], d["sample"]) for d in lines] == [(i, j) for i in range(4) for j in range(3)]
    assert os.listdir(tmp / "sampled") == ["sampled.jsonl"]  # the per-rank parts are merged and removed
    for d in lines:
        assert FIELDS | {"answer", "trainer_logprobs"} <= d.keys() and "reward" not in d
        assert d["prompt"] == QUESTIONS[d["index"]]
        torch.testing.assert_close(torch.tensor(d["logprobs"]), torch.tensor(d["trainer_logprobs"]),
                                   rtol=0, atol=1e-5)
    assert len({tuple(d["completion_token_ids"]) for d in lines}) > 4  # sampled, not greedy
    assert "logprob check vs float32 trainer" in proc.stdout


@pytest.mark.parametrize("content, message", list(BAD_DATA.items()))
def test_bad_data_is_one_clear_error(setup, started, content, message):
    _, _, _, tmp = setup
    data = tmp / f"bad{list(BAD_DATA).index(content)}" / "data.jsonl"
    assert data.read_text() == content
    proc = started[content].result()
    assert proc.returncode != 0
    assert re.fullmatch(rf"rollout\.py: error: .*{message}.*\n", proc.stderr), proc.stderr
    assert str(data) in proc.stderr


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "model_file"])
def test_an_out_that_is_an_input_is_refused(setup, tmp_path, capsys, link):
    """--out naming the prompts file (it was emptied, then overwritten with completions, exit 0), also
    under another name (a symlink, a hard link), or a file of the model: refused before anything is
    written, and before any process group starts on any rank (so in-process here)."""
    import rollout

    model_dir, data, _, _ = setup
    own = tmp_path / "data.jsonl"
    own.write_text(open(data).read())
    out = tmp_path / "out.jsonl"
    if link == "same":
        out = own
    elif link == "symlink":
        out.symlink_to(own)
    elif link == "hardlink":
        os.link(own, out)
    else:
        out = os.path.join(model_dir, "config.json")
    before = open(out).read()
    with pytest.raises(SystemExit) as e:
        rollout.main(["--model", model_dir, "--data", str(own), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {out} is" in err, err
    assert open(out).read() == before


def test_logprob_mismatch_by_hand():
    gen = [[-1.0, -2.0], [-0.5], [-3.0, -1.0]]
    trainer = [[-1.5, -1.75], [-0.5], [None, -1.25]]  # None: outside the trainer's top-p set
    m = logprob_mismatch(list(zip(gen, trainer)))
    # token deltas 0.5, -0.25, 0.0, 0.25 (the None token left out); sequence sums 0.25 and 0.0
    assert m["tokens"] == 4 and m["mean_abs"] == pytest.approx(1.0 / 4) and m["max_abs"] == 0.5
    assert m["seq_kl"] == pytest.approx(0.125)
    assert (m["outside_tokens"], m["outside_seqs"]) == (1, 1)


def test_missing_model_on_two_ranks_is_one_line_from_rank_0(started):
    """Under torchrun every rank finds the same bad input: one error line (rank 0's), a non-zero exit
    within the timeout, and no traceback through our code (torchrun's own failure summary stays)."""
    proc = started["missing"].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("rollout.py: error:")]
    assert len(errors) == 1 and "/does/not/exist" in errors[0], out[-3000:]
    assert f'File "{REPO}/rollout.py"' not in out and f'File "{REPO}/minirl/' not in out, out[-3000:]


def test_unwritable_out_is_one_line_before_the_model_loads(started):
    proc = started["unwritable"].result()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert re.fullmatch(r"rollout\.py: error: .*no_such_dir/out\.jsonl.*\n", proc.stderr), proc.stderr


def test_nan_reward_on_two_ranks_is_one_line_and_no_stale_out(setup, started):
    """The NaN comes from one prompt (answer 7), scored on one rank: every rank stops with rank 0's
    line, the completions written before it stay in the OUT.rank<r> parts, and an OUT from an
    earlier run is gone (it would pass for this run's result)."""
    _, _, _, tmp = setup
    out = tmp / "nan.jsonl"  # held {"stale": true} before the run (`started`)
    proc = started["nan"].result()
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("rollout.py: error:")]
    assert len(errors) == 1 and "nan_reward.py:f" in errors[0] and "prompt 2" in errors[0], text[-3000:]
    assert f'File "{REPO}/rollout.py"' not in text, text[-3000:]
    assert not out.exists()
    for r in range(2):
        assert all("reward" in d for d in read_lines(f"{out}.rank{r}"))


def test_sigterm_on_two_ranks_leaves_the_parts_and_no_out(setup):
    """torchrun passes a SIGTERM on to its workers: each keeps the batches it finished in its
    OUT.rank<r> part (whole lines, in its order), and no OUT is there: not a partial one, and not
    an earlier run's, which would pass for this run's result."""
    model_dir, _, _, tmp = setup
    many = tmp / "many.jsonl"
    many.write_text("".join(json.dumps({"prompt": QUESTIONS[i % 4]}) + "\n" for i in range(400)))
    out = tmp / "stopped.jsonl"
    out.write_text('{"stale": true}\n')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           os.path.join(REPO, "rollout.py"), "--model", model_dir, "--data", str(many), "--out", str(out),
           "--n-samples", "2", "--max-new-tokens", "8", "--gen-batch-size", "1"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = [tmp / f"stopped.jsonl.rank{r}" for r in range(2)]
    deadline = time.monotonic() + 240
    # Both ranks past their first batches (on a busy machine one rank can start well after the other).
    while not all(p.exists() and p.read_text().count("\n") >= 2 for p in parts) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling for lines the run writes, not waiting for a fixed time
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not out.exists(), err[-3000:]
    for r in range(2):
        done = [(d["index"], d["sample"]) for d in read_lines(f"{out}.rank{r}")]
        assert done == [(i, k) for i in range(r, 400, 2) for k in range(2)][:len(done)]
        assert len(done) < 400  # stopped before the end
        assert f"completions were written to {out}.rank{r}" in err, err[-3000:]
