"""train.py end to end on a tiny model: layouts agree with one process, checkpoints resume, bad input fails.

The step-1 metrics of a run depend on the rollouts (per-completion seeds, so the same on any layout),
the advantages, the loss weights and the gradient. `grad_norm` at step 1 is the norm of the first
gradient: equal across world 1, dp 2, sp 2 and two single-rank torchrun agents (a two-"node" job) only
if micro-batch planning, padding micro-batches, Ulysses and FSDP's summed reduction are all right.
"""

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers_dist import REPO, free_port, torchrun

import train
from minirl import trainer
from minirl.advantages import AdvantageConfig
from minirl.config import TrainConfig, derive
from minirl.data import Prompt
from minirl.packing import pack_mini_batch, split_mini_batches
from minirl.rollouts import Sample
from minirl.model import ModelConfig, Transformer, init_weights


def args(task, out, *extra):
    """The `task` fixture (conftest.py) with a dense reward; --reward path.py:function is exercised too."""
    # Budget 24 tokens: several micro-batches per rank, and uneven counts that need a padding one.
    return ["train.py", "--model", str(task / "model"), "--data", str(task / "train.jsonl"), "--no-chat-template",
            "--reward", f"{task}/rewards.py:vowels",
            "--prompts-per-step", "4", "--n-samples", "3", "--max-new-tokens", "6", "--lr", "1e-3",
            "--micro-batch-tokens", "24", "--out-dir", str(out), "--no-export", *extra]


def metrics(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "loss" in r}


def check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


LAYOUTS = {"dp2": ["--sp", "1"], "sp2": ["--sp", "2"]}


def agents(cmd: list[str]) -> list[tuple[int, str]]:
    """Two torchrun agents of one rank each, as two nodes start them: (exit code, stderr) of each."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errs)]


def train_then_resume(task, out, layout) -> tuple:
    """3 steps, then --resume to 5: (first run, its metrics, its `latest`, the resumed run)."""
    first = torchrun(2, args(task, out, "--steps", "3", *layout))
    if first.returncode != 0:
        return first, None, None, None
    rows, latest = metrics(out), (out / "checkpoints" / "latest").read_text().strip()
    return first, rows, latest, torchrun(2, args(task, out, "--steps", "5", "--resume", *layout))


@pytest.fixture(scope="module")
def launched(task, tmp_path_factory) -> dict:
    """The module's launches, independent of each other and started together when first asked for (start-up
    is mostly serial, and a one-rank run leaves a core idle): name -> (Future, out dir)."""
    outs = {name: tmp_path_factory.mktemp(name) for name in ("world1", "dp2", "sp2", "agents", "missing")}
    port = free_port()
    agent_cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                 "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=minirl-test",
                 *args(task, outs["agents"], "--steps", "1")]
    missing = ["train.py", "--model", "/does/not/exist", "--data", str(task / "train.jsonl"), "--out-dir",
               str(outs["missing"])]
    with ThreadPoolExecutor(3) as pool:
        yield {
            "world1": (pool.submit(torchrun, 1, args(task, outs["world1"], "--steps", "1")), outs["world1"]),
            **{name: (pool.submit(train_then_resume, task, outs[name], layout), outs[name])
               for name, layout in LAYOUTS.items()},
            "agents": (pool.submit(agents, agent_cmd), outs["agents"]),
            "missing": (pool.submit(torchrun, 2, missing, timeout=180), outs["missing"]),
        }


@pytest.fixture(scope="module")
def reference(launched):
    future, out = launched["world1"]
    check(future.result())
    return metrics(out)[1]


STEP1_KEYS = ("reward_mean", "loss", "grad_norm", "entropy", "response_len")


def assert_step1_equal(row, ref):
    for k in STEP1_KEYS:
        assert row[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_match_one_and_resume(reference, launched, layout):
    assert reference["grad_norm"] > 0  # the comparison below means something
    future, out = launched[layout]
    first, rows, latest, resumed = future.result()
    check(first)
    assert sorted(rows) == [1, 2, 3]
    assert_step1_equal(rows[1], reference)
    assert latest == "step_3"
    # Resume: continues at step 4 from the saved state and data position.
    check(resumed)
    assert sorted(metrics(out)) == [1, 2, 3, 4, 5]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_5"


def test_two_torchrun_agents_form_one_job(reference, launched):
    """Multi-node is plain torchrun: two agents of one rank each, rendezvous over c10d on localhost."""
    future, out = launched["agents"]
    for code, err in future.result():
        assert code == 0, err[-4000:]
    assert_step1_equal(metrics(out)[1], reference)


@pytest.mark.parametrize("extra, message", [
    (["--data", "/nonexistent/data.jsonl"], "error: data file not found: /nonexistent/data.jsonl"),
    (["--reward", "no_such_module:fn"], "error: "),
    (["--mini-batches", "5"], "error: prompts_per_step x n_samples = 12 samples do not split"),
    (["--loss-agg", "mean"], "error: agg must be one of"),
])
def test_bad_input_is_one_clear_line(task, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train.main(args(task, tmp_path, *extra)[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err


def test_malformed_jsonl_names_the_line(task, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n')
    with pytest.raises(SystemExit):
        train.main(args(task, tmp_path, "--data", str(bad))[1:])
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: malformed JSON (Expecting value)"


def test_missing_model_on_two_ranks_is_one_line_from_rank_0(launched):
    """Under torchrun every rank finds the same bad input: one `error:` line (rank 0's), a non-zero
    exit within the timeout, and no traceback through our code (torchrun's own failure summary stays)."""
    proc = launched["missing"][0].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/does/not/exist" in errors[0], out[-3000:]
    assert f'File "{REPO}/train.py"' not in out and f'File "{REPO}/minirl/' not in out, out[-3000:]


# ---------------------------------------------------------------------------------------------------
# The old-log-prob pass, in process (one gloo rank)


def test_one_update_per_step_skips_the_old_logprob_pass_and_trains_the_same(gloo_rank):
    """With TIS on and one optimizer step per RL step, `update` takes the old log-probs from its own
    forward: the update (metrics, weights) equals the one fed by the separate pass, in float64."""
    assert not trainer.old_logprobs_needed(1, 1)
    assert trainer.old_logprobs_needed(2, 1) and trainer.old_logprobs_needed(1, 2)
    cfg = TrainConfig()
    cfg.algo.tis_cap = 1.2
    torch.manual_seed(0)
    model = Transformer(ModelConfig("qwen3", vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, qk_norm=True))
    init_weights(model)
    model.double()
    g = torch.Generator().manual_seed(1)
    samples = [Sample(Prompt(i // 2, "", torch.randint(0, 50, (5,), generator=g).tolist(), ""),
                              torch.randint(0, 50, (7,), generator=g).tolist(),
                              (-4 * torch.rand(7, generator=g, dtype=torch.float64)).tolist(), "length",
                              reward=float(i % 3)) for i in range(8)]
    minis = split_mini_batches(len(samples), 1)
    batches = [pack_mini_batch(samples, mb, gloo_rank, 40, 0, "sdpa") for mb in minis]
    for mbs in batches:  # the packed floats follow the model (float64)
        for mb in mbs:
            mb.gen_logprobs, mb.mask = mb.gen_logprobs.double(), mb.mask.double()
    trainer.set_advantages(samples, batches, AdvantageConfig(group_size=2))
    assert len(batches[0]) > 1  # several micro-batches, as in a real step

    def one_update(with_pass: bool):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        policy = trainer.Policy(m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
        for mb in batches[0]:
            mb.old_logprobs = None
        trainer.logprobs_before_update(policy, batches, with_pass, 1.0, progress=False)
        old = [mb.old_logprobs for mb in batches[0] if mb.old_logprobs is not None]
        assert bool(old) == with_pass
        sums = trainer.update(policy, samples, minis, batches, gloo_rank, derive(cfg, None), 1.0, 1, progress=False)
        return {k: v.item() for k, v in sums.items()}, torch.cat([p.detach().flatten() for p in m.parameters()])

    (with_pass, weights_a), (skipped, weights_b) = one_update(True), one_update(False)
    assert with_pass["tis_weight"] < 0.99  # the correction is active: truncated weights below 1 on average
    assert with_pass.keys() == skipped.keys()
    for k in with_pass:
        assert skipped[k] == pytest.approx(with_pass[k], rel=1e-12, abs=1e-12), k
    assert torch.allclose(weights_a, weights_b, rtol=0, atol=1e-12)
    assert not torch.equal(weights_a, torch.cat([p.detach().flatten() for p in model.parameters()]))
