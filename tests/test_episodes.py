"""Multi-turn rollouts (minirl/episodes.py) and how the trainer trains on them.

A random model and a byte-level BPE tokenizer: random token sequences rarely survive
decode -> encode, which is what the raw-ids check needs. The environment answers every turn with
an observation until its third turn, so every trajectory interleaves policy turns and observations.
"""

import json
import os
import re
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from minirl.algorithms import LossConfig, policy_loss, token_weights
from minirl.backend import SamplingParams, sample_seed
from minirl.config import TrainConfig, derive
from minirl.data import Prompt
from minirl.generate import Generator
from minirl.hf import load_model, read_config
from minirl.packing import micro_logprobs, pack
from minirl.rollouts import Sample, complete
from minirl.tokenizer import Tokenizer

from helpers_dist import REPO, gpus, torchrun
from helpers_models import save_hf_model
from helpers_tokenizer import make_test_tokenizer

# Three turns: " ok 1", " ok 2" come back as observations, the third ends the episode. The reward
# (vowels written) is dense, so a random model's episodes differ and step 1 has a gradient.
ENVS = '''
class Echo:
    stop = "!"
    def start(self, prompt, answer):
        self.turn = 0
    def step(self, text, token_ids):
        self.turn += 1
        reward = float(sum(c in "aeiou" for c in text))
        return (f" ok {self.turn}", reward, False) if self.turn < 3 else (None, reward, True)

class Forever(Echo):
    def step(self, text, token_ids):
        return (" more", 0.0, False)

class Raises(Echo):
    def step(self, text, token_ids):
        raise ZeroDivisionError("tool crashed")

class RaisesOnPrompt3(Echo):
    def start(self, prompt, answer):
        super().start(prompt, answer)
        self.bad = prompt == "1+3="
    def step(self, text, token_ids):
        if self.bad:
            raise RuntimeError("tool crashed")
        return super().step(text, token_ids)

class NotText(Echo):
    def step(self, text, token_ids):
        return (42, 0.0, False)
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    model = str(root / "model")
    make_test_tokenizer(model)
    save_hf_model(model, "qwen3", vocab_size=320)
    (root / "envs.py").write_text(ENVS)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(1, 5) for b in range(1, 4)))
    return root, model, str(data)


@pytest.fixture(scope="module")
def parts(task):
    root, model_dir, _ = task
    tok = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir)  # fp32: generator and trainer share the weights
    gen = Generator(read_config(model_dir), tok.eos_ids, tok.pad_id, dtype=torch.float32)
    gen.update_weights(model.named_parameters())
    prompts = [Prompt(i, f"{i}+{i}=", tok.encode(f"{i}+{i}="), str(2 * i)) for i in range(6)]
    return tok, model, gen, prompts


def rollout(task, parts, env="Echo", **rc):
    """(samples, "") from `rollouts.complete`, or ([], the error) when it raises one."""
    root = task[0]
    tok, _, gen, prompts = parts
    cfg = TrainConfig()
    for k, v in {"env": f"{root}/envs.py:{env}", "max_new_tokens": 5, "max_turns": 4, "episode_tokens": 40,
                 **rc}.items():
        setattr(cfg.rollout, k, v)
    cfg.data.reward = ""
    seeds = [sample_seed(0, 0, p.index, 0) for p in prompts]
    params = SamplingParams(cfg.rollout.max_new_tokens, temperature=1.0)
    try:
        return complete(gen, prompts, seeds, params, derive(cfg, tok), tok), ""
    except ValueError as e:
        return [], str(e)


def spans(s: Sample):
    """The trajectory cut where the mask changes: [(is_policy, ids)]."""
    out = []
    for t, m in zip(s.completion_ids, s.mask):
        if out and out[-1][0] == (m == 1.0):
            out[-1][1].append(t)
        else:
            out.append((m == 1.0, [t]))
    return out


def test_trajectory_holds_sampled_ids_and_tokenised_observations(task, parts):
    tok, _, gen, prompts = parts
    samples, error = rollout(task, parts)
    assert error == ""
    redone = 0
    for p, s in zip(prompts, samples):
        assert len(s.mask) == len(s.completion_ids) == len(s.gen_logprobs)
        parts_ = spans(s)
        assert [policy for policy, _ in parts_] == [True, False, True, False, True]
        assert s.turns == 3 and s.finish_reason == "done"
        # Observations: tokenised on their own, no generator log-prob.
        assert parts_[1][1] == tok.encode(" ok 1") and parts_[3][1] == tok.encode(" ok 2")
        assert all(lp == 0.0 for lp, m in zip(s.gen_logprobs, s.mask) if m == 0.0)
        # Policy turns: exactly the ids the generator samples from that context and seed, even
        # where decode -> encode gives other ids.
        context, seed = list(p.token_ids), sample_seed(0, 0, p.index, 0)
        for turn, (policy, ids) in enumerate(parts_):
            if policy:
                want = gen.generate([context], SamplingParams(5, 1.0, stop_token_ids=(tok.encode("!")[0],)),
                                    seeds=[sample_seed(seed, 0, turn // 2, 0)])[0]
                assert ids == want.token_ids
                redone += tok.encode(tok.decode(ids, skip_special_tokens=False)) != ids
            context += ids
        assert s.reward == sum(float(sum(c in "aeiou" for c in tok.decode(ids))) for pol, ids in parts_ if pol)
    assert redone > 0, "no turn that re-tokenising would change: the raw-ids check means nothing"


def test_turns_through_two_slots_make_the_same_episodes(task, parts):
    """With two slots, an episode's next turn waits for a free one and decodes beside other episodes'
    turns of other numbers (continuous batching); with 64, every first turn starts at once. The
    episodes are the same, the third turn's limit (what is left of the budget) included: each turn
    samples from its own seed."""
    assert_two_slots_same_as_wide(task, parts, "cpu")


@gpus(1)
def test_turns_through_two_slots_make_the_same_episodes_on_cuda(task, parts):
    """The same on a GPU: CUDA graphs, and FlexAttention's decode over each row's own length."""
    assert_two_slots_same_as_wide(task, parts, "cuda", atol=1e-4)  # as test_generate's GPU equality


def assert_two_slots_same_as_wide(task, parts, device, atol=1e-5):
    tok, model, gen, prompts = parts
    wide_gen, two = (Generator(gen.cfg, tok.eos_ids, tok.pad_id, device, torch.float32, max_batch_size=b)
                     for b in (0, 2))
    for g in (wide_gen, two):
        g.update_weights(model.named_parameters())
    wide, _ = rollout(task, (tok, model, wide_gen, prompts), episode_tokens=22)
    narrow, _ = rollout(task, (tok, model, two, prompts), episode_tokens=22)
    assert all(s.turns == 3 and s.finish_reason == "length" and len(s.completion_ids) == 22 for s in wide)
    for a, b in zip(wide, narrow):
        assert (a.completion_ids, a.mask, a.turns, a.finish_reason, a.reward) == \
            (b.completion_ids, b.mask, b.turns, b.finish_reason, b.reward)
        torch.testing.assert_close(torch.tensor(a.gen_logprobs), torch.tensor(b.gen_logprobs), rtol=0, atol=atol)


def test_trainer_logprobs_match_the_generator_across_turns(task, parts):
    tok, model, _, _ = parts
    samples, _ = rollout(task, parts)
    d = types.SimpleNamespace(sp_rank=0, sp_size=1, sp_group=None, device=torch.device("cpu"))
    mb = pack(samples, list(range(len(samples))), tok.pad_id, d, "sdpa")
    with torch.no_grad():
        lp, _ = micro_logprobs(model, mb, temperature=1.0)
    m = mb.mask.bool()
    assert int(m.sum()) == sum(s.n_policy for s in samples) < sum(len(s.completion_ids) for s in samples)
    assert torch.equal(mb.gen_logprobs[m].nonzero().squeeze(1), torch.arange(int(m.sum())))  # all policy lps given
    torch.testing.assert_close(lp[m], mb.gen_logprobs[m], atol=1e-5, rtol=0)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_observation_tokens_have_no_weight_and_no_gradient(task, parts, agg):
    """The last token of a trajectory cut at --max-turns is an observation's and is nobody's input,
    so only its loss term could depend on it: the loss and every gradient must be the same whatever
    that token is. Under an all-ones mask (observations trained on) they differ."""
    tok, model, _, _ = parts
    samples, _ = rollout(task, parts, max_turns=2)
    assert all(s.finish_reason == "max_turns" and s.mask[-1] == 0.0 for s in samples)
    d = types.SimpleNamespace(sp_rank=0, sp_size=1, sp_group=None, device=torch.device("cpu"))

    def loss_and_grads(last_token: int, mask_observations: bool):
        for s in samples:
            s.completion_ids[-1] = last_token
        saved = [s.mask for s in samples]
        if not mask_observations:
            for s in samples:
                s.mask = None
        mb = pack(samples, list(range(len(samples))), tok.pad_id, d, "sdpa")
        mb.advantages = mb.seq_ids.float() - 2.5  # sample i: i - 2.5
        lens = torch.tensor([float(s.n_policy) for s in samples])
        for s, m in zip(samples, saved):
            s.mask = m
        w = token_weights(mb.mask, mb.seq_ids, lens, len(samples), lens.sum(), agg, 10.0)
        if mask_observations:
            assert torch.all(w[mb.mask == 0] == 0) and w.sum() > 0
            if agg != "seq-mean-token-sum-norm":
                torch.testing.assert_close(w.sum(), torch.tensor(1.0))  # normalised over policy tokens only
        model.zero_grad()
        lp, _ = micro_logprobs(model, mb, 1.0)
        loss, _ = policy_loss(lp, lp.detach(), mb.advantages, w, LossConfig(agg=agg))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    a, b = tok.encode(" ok")[0], tok.encode("x")[0]
    loss_a, grads_a = loss_and_grads(a, True)
    loss_b, grads_b = loss_and_grads(b, True)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    wrong_a, wrong_b = loss_and_grads(a, False)[1], loss_and_grads(b, False)[1]
    assert not all(torch.equal(x, y) for x, y in zip(wrong_a, wrong_b))
    model.zero_grad()


def test_limits_end_an_episode_and_say_which(task, parts):
    samples, error = rollout(task, parts, env="Forever", max_turns=3)
    assert error == "" and all(s.finish_reason == "max_turns" and s.turns == 3 for s in samples)
    samples, error = rollout(task, parts, env="Forever", max_turns=50, episode_tokens=23)
    assert error == "" and all(s.finish_reason == "length" and len(s.completion_ids) <= 23 for s in samples)
    assert all(s.turns < 50 for s in samples)


@pytest.mark.parametrize("env, message", [
    ("Raises", "step raised ZeroDivisionError: tool crashed"),
    ("NotText", "observation 42 \\(int\\) is not a string or None"),
])
def test_env_error_names_the_env_and_the_prompt(task, parts, env, message):
    """A ValueError that the caller agrees on over the ranks (`dist.agree`) and raises on every rank."""
    samples, error = rollout(task, parts, env=env)
    assert samples == []
    assert error.startswith(f"env '{task[0]}/envs.py:{env}' on prompt 0: ") and message.replace("\\", "") in error


def train_args(task, out, *extra):
    root, model, data = task
    return ["train.py", "--model", model, "--data", data, "--no-chat-template", "--env", f"{root}/envs.py:Echo",
            "--prompts-per-step", "4", "--n-samples", "3", "--max-new-tokens", "5", "--max-turns", "4",
            "--lr", "1e-3", "--micro-batch-tokens", "40", "--out-dir", str(out), "--no-export", "--steps", "1",
            *extra]


def step1(out) -> dict:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "loss" in line][0]


def check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# The module's launches, independent of each other, so they are started together (start-up is mostly
# serial, and a one-rank run leaves a core idle): train.py (ranks, extra flags) and rollout.py (env, flags).
RUNS = {"w1": (1, []), "dp2": (2, []), "sp2": (2, ["--sp", "2"]), "env_error": (1, ["--env", "{root}/envs.py:Raises"])}
ROLLOUTS = {"rollout_echo": ("Echo", ["--check-logprobs", "--gen-batch-size", "5"]),
            "rollout_raises": ("RaisesOnPrompt3", ["--gen-batch-size", "1"])}


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory) -> dict:
    """name -> (CompletedProcess, out dir) of each of RUNS (train.py's OUT) and ROLLOUTS (rollout.py's
    OUT file)."""
    def one(name):
        if name in ROLLOUTS:
            env_name, extra = ROLLOUTS[name]
            out = tmp_path_factory.mktemp(name) / "episodes.jsonl"
            return run_rollout_py(task, out, env_name, *extra), out
        n, extra = RUNS[name]
        out = tmp_path_factory.mktemp(name) / "out"
        return torchrun(n, train_args(task, out, *(x.format(root=task[0]) for x in extra))), out

    names = [*RUNS, *ROLLOUTS]
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(one, names)))


def test_multi_turn_step_is_the_same_on_w1_dp2_sp2(runs):
    """The micro-batch plan, packing, Ulysses and FSDP treat trajectories like any sample: step 1
    (rewards, loss, gradient norm) is the same on one rank, two dp ranks and two sp ranks."""
    rows = {}
    for name in ("w1", "dp2", "sp2"):
        proc, out = runs[name]
        check(proc)
        rows[name] = step1(out)
    ref = rows["w1"]
    assert ref["grad_norm"] > 0 and ref["turns"] > 1 and ref["policy_tokens"] < ref["response_len"]
    for name in ("dp2", "sp2"):
        for k in ("reward_mean", "loss", "grad_norm", "entropy", "response_len", "turns", "policy_tokens"):
            assert rows[name][k] == pytest.approx(ref[k], rel=1e-4, abs=1e-6), (name, k)


def test_env_error_in_training_is_one_line(task, runs):
    root = task[0]
    proc, _ = runs["env_error"]
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: env '{root}/envs.py:Raises' on prompt ")
    assert errors[0].endswith(": step raised ZeroDivisionError: tool crashed")


def run_rollout_py(task, out, env_name, *extra):
    root, model, data = task
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, os.path.join(REPO, "rollout.py"), "--model", model, "--data", data,
                           "--out", str(out), "--n-samples", "2", "--max-new-tokens", "5", "--episode-tokens", "40",
                           "--no-chat-template", "--env", f"{root}/envs.py:{env_name}", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_rollout_py_writes_turns_and_mask(runs):
    proc, out = runs["rollout_echo"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 24
    for d in lines:
        assert [t["role"] for t in d["turns"]] == ["policy", "env", "policy", "env", "policy"]
        assert sum((t["token_ids"] for t in d["turns"]), []) == d["completion_token_ids"]
        assert d["mask"] == [float(t["role"] == "policy") for t in d["turns"] for _ in t["token_ids"]]
        assert [t["text"] for t in d["turns"][1::2]] == [" ok 1", " ok 2"]
        assert d["finish_reason"] == "done" and d["reward"] >= 0
        for m, g, t in zip(d["mask"], d["logprobs"], d["trainer_logprobs"], strict=True):
            assert (g is None and t is None) if m == 0.0 else abs(g - t) < 1e-4
    report = re.search(r"logprob check vs float32 trainer over (\d+) tokens: mean \|dlogprob\| (\S+)", proc.stdout)
    assert report and int(report[1]) == sum(sum(d["mask"]) for d in lines) and float(report[2]) < 1e-5


def test_rollout_py_env_error_keeps_the_episodes_before_it(task, runs):
    """Record 3 (prompt "1+3=") breaks the env: one error line, and the batches before it stay written."""
    proc, out = runs["rollout_raises"]
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rollout.py: error: env '{task[0]}/envs.py:RaisesOnPrompt3' on prompt 2: step raised RuntimeError: "
        f"tool crashed; the completions before it are in {out}")
    assert [(d["index"], d["sample"]) for d in map(json.loads, open(out))] == [(0, 0), (0, 1), (1, 0), (1, 1)]
