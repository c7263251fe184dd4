"""Tests for minirl/lora.py, in one process and float64 where exactness is the point.

The references are independent of the adapter code: the base model itself (B = 0, adapters off),
the merged weight written out by hand (W + alpha/r B A), the chain rule through a plain model that
holds the merged weight (the adapters' gradients), transformers + peft loading the PEFT export.
Sharded training with adapters (dp2, sp2 against one process) is in tests/workers/parallel_worker.py,
resume from an adapter checkpoint in tests/workers/checkpoint_worker.py.
"""

import json

import pytest
import torch
from helpers_dist import gpus, torchrun
from helpers_models import FAMILIES, VOCAB, hf_model, minirl_model, packed_batch, save_hf_model

from minirl import lora
from minirl.attention import AttnMeta, cu_seqlens_from_positions
from minirl.fsdp import iter_full_params
from minirl.generate import Generator
from minirl.backend import SamplingParams
from minirl.hf import load_model, save_model
from minirl.model import Transformer

RANK, ALPHA = 4, 8.0


def logprobs(model, lengths=(7, 1, 11), seed=0):
    """Packed forward: log-probs [T] of each document's next tokens (the trainer's path)."""
    ids, pos, _ = packed_batch(lengths, seed=seed)
    targets = torch.roll(ids, -1)
    return model(ids, pos, AttnMeta(*cu_seqlens_from_positions(pos), backend="sdpa"), targets=targets)[0]


def adapted(family="qwen3", seed=0, targets=lora.TARGETS, random_b=True):
    """(base model, the same weights with adapters), float64; B random unless `random_b` is False."""
    base = minirl_model(hf_model(family, seed=seed)).double()
    model = lora.add_adapters(minirl_model(hf_model(family, seed=seed)).double(),
                              lora.AdapterSpec(RANK, ALPHA, tuple(targets), seed=1))
    if random_b:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return base, model


def adapter_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lora.LoRALinear)}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_b_gives_the_base_model(family):
    base, model = adapted(family, random_b=False)
    assert len(adapter_modules(model)) == 7 * base.cfg.num_hidden_layers
    assert all(m.lora_A.abs().sum() > 0 for m in adapter_modules(model).values())  # A random, B zero
    with torch.no_grad():
        assert torch.equal(logprobs(model), logprobs(base))


def test_names_of_the_base_are_kept():
    base, model = adapted()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n in names if not lora.is_adapter(n)] == [n for n, _ in base.named_parameters()]
    assert "layers.1.mlp.down_proj.lora_A" in names and "layers.1.mlp.down_proj.lora_B" in names


def test_gradients_reach_only_the_adapters_and_follow_the_chain_rule():
    """dL/dB = s G A^T and dL/dA = s B^T G, where G = dL/dW' of a plain model holding W' = W + s B A."""
    _, model = adapted()
    lora.freeze_base(model)
    logprobs(model).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == lora.is_adapter(name), name
    merged = Transformer(model.cfg).double()
    merged.load_state_dict(dict(lora.merged(model, model.named_parameters())))
    logprobs(merged).sum().backward()
    s = ALPHA / RANK
    for name, m in adapter_modules(model).items():
        G = merged.get_parameter(f"{name}.weight").grad  # [out, in]
        torch.testing.assert_close(m.lora_B.grad, s * G @ m.lora_A.detach().T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.lora_A.grad, s * m.lora_B.detach().T @ G, rtol=1e-10, atol=1e-12)


def test_merged_weights_are_base_plus_scaled_b_a():
    base, model = adapted("qwen2")  # q/k/v biases: passed through untouched
    got = dict(lora.merged(model, model.named_parameters()))
    assert list(got) == [n for n, _ in base.named_parameters()]  # names and order of the base model
    for name, p in base.named_parameters():
        module = name.removesuffix(".weight")
        if module in adapter_modules(model):
            A, B = (model.get_parameter(f"{module}.lora_{x}").detach() for x in "AB")
            want = p.detach() + (ALPHA / RANK) * (B @ A)
            assert not torch.equal(want, p)
        else:
            want = p
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-15)  # float64 rounding
    merged = Transformer(model.cfg).double()
    merged.load_state_dict(got)
    with torch.no_grad():
        torch.testing.assert_close(logprobs(merged), logprobs(model), rtol=0, atol=1e-12)


def test_merged_stream_collects_the_adapters():
    _, model = adapted()
    collected = {}
    for _ in lora.merged(model, iter_full_params(model, torch.float32), collected):
        pass
    want = {n: p.float() for n, p in model.named_parameters() if lora.is_adapter(n)}
    assert collected.keys() == want.keys() and all(torch.equal(collected[n], want[n]) for n in want)


def test_adapters_off_is_the_base_model():
    base, model = adapted()
    with torch.no_grad():
        on = logprobs(model)
        assert (on - logprobs(base)).abs().max() > 1e-3  # the adapters do change the model
        with lora.adapters_off(model):
            assert torch.equal(logprobs(model), logprobs(base))
        assert torch.equal(logprobs(model), on)


def test_targets_choose_the_projections():
    _, model = adapted(targets=("v_proj", "down_proj"))
    assert sorted({n.rpartition(".")[2] for n in adapter_modules(model)}) == ["down_proj", "v_proj"]


@pytest.mark.parametrize("spec, error", [
    (lora.AdapterSpec(8, targets=("q_proj", "lm_head")), "--lora-targets: lm_head; choose among q_proj"),
    (lora.AdapterSpec(8, targets=()), "--lora-targets: none given"),
    (lora.AdapterSpec(0), "--lora-rank must be >= 1"),
    (lora.AdapterSpec(8, alpha=0.0), "--lora-alpha must be > 0"),
])
def test_bad_specs_are_clear_errors(spec, error):
    with pytest.raises(ValueError, match=error):
        spec.check()


def test_lora_flags_are_checked_before_start():
    from minirl.config import adapter_spec, parse_config, validate

    assert adapter_spec(parse_config([])) is None  # full fine-tuning by default
    cfg = parse_config(["--lora-rank", "4", "--lora-targets", "q_proj, down_proj", "--seed", "3"])
    validate(cfg)
    assert adapter_spec(cfg) == lora.AdapterSpec(4, 32.0, ("q_proj", "down_proj"), seed=3)
    with pytest.raises(ValueError, match="--lora-targets: qproj; choose among"):
        validate(parse_config(["--lora-rank", "4", "--lora-targets", "qproj"]))
    with pytest.raises(ValueError, match=r"--lora-rank must be in \[0, inf\), got -1"):
        validate(parse_config(["--lora-rank", "-1"]))


def test_generator_logprobs_equal_trainer_logprobs_after_a_sync():
    """The generator holds merged weights (fp32); the LoRA model's packed forward scores its samples alike."""
    _, model = adapted()
    model = model.float()
    gen = Generator(model.cfg, eos_ids=[], pad_id=0, dtype=torch.float32)
    gen.update_weights(lora.merged(model, iter_full_params(model, torch.float32)))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 9)]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4)
    outs = gen.generate(prompts, params)
    seqs = [torch.tensor(p + o.token_ids) for p, o in zip(prompts, outs)]
    ids, targets = torch.cat([s[:-1] for s in seqs]), torch.cat([s[1:] for s in seqs])
    pos = torch.cat([torch.arange(len(s) - 1) for s in seqs])
    cu, max_len = cu_seqlens_from_positions(pos)
    with torch.no_grad():
        lp, _ = model(ids, pos, AttnMeta(cu, max_len, "sdpa"), targets=targets)
    ends = cu[1:].tolist()
    want = torch.cat([lp[end - len(o.token_ids):end] for end, o in zip(ends, outs)])
    got = torch.tensor([x for o in outs for x in o.logprobs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with lora.adapters_off(model), torch.no_grad():  # and the check can fail: the base model scores otherwise
        assert (model(ids, pos, AttnMeta(cu, max_len, "sdpa"), targets=targets)[0] - lp).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_peft_export_loads_in_transformers_and_matches_the_merged_export(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_hf_model(str(tmp_path / "base"), family, seed=0)
    _, model = adapted(family, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    model = model.float()
    adapters = {}
    save_model(str(tmp_path / "merged"), model.cfg, lora.merged(model, model.named_parameters(), adapters))
    lora.save_adapter(str(tmp_path / "adapter"), adapters, model, str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (
        RANK, ALPHA, ["down_proj", "q_proj", "up_proj", "v_proj"])

    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():  # the adapter is what makes the difference
            assert (peft_model(ids).logits - want).abs().max() > 1e-3
    # And the merged export is our model: its packed log-probs equal transformers' on the first row.
    ours = load_model(str(tmp_path / "merged"))
    doc = ids[0]
    meta = AttnMeta(*cu_seqlens_from_positions(torch.arange(13)), backend="sdpa")
    with torch.no_grad():
        lp = model(doc, torch.arange(13), meta, targets=torch.roll(doc, -1))[0]
        lp_export = ours(doc, torch.arange(13), meta, targets=torch.roll(doc, -1))[0]
    ref = want[0].log_softmax(-1).gather(-1, torch.roll(doc, -1)[:, None])[:, 0]
    torch.testing.assert_close(lp_export, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-5)


def test_lora_run_of_the_default_task_learns(background):
    """train.py --lora-rank 8 on the default task (conftest.py's BACKGROUND["lora_job"]: lr 1e-3, 10x the
    full fine-tuning rate that learns as fast, 5 steps of 16 prompts) raises held-out accuracy by 20 points
    or more, and exports the merged model and the adapters, which peft loads onto the base model. Its KL
    reference is the base model (adapters off): the KL is exactly 0 before the first update, not after."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minirl.config import DEFAULT_TASK
    from minirl.tokenizer import Tokenizer

    future, out = background["lora_job"]
    proc, _ = future.result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    assert acc[-1] - acc[0] >= 0.20, acc
    kl = [r["kl_ref"] for r in rows if "kl_ref" in r]
    assert kl[0] == 0.0 and kl[-1] > 0, kl
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == DEFAULT_TASK

    tok = Tokenizer.from_dir(DEFAULT_TASK)
    ids = torch.tensor([tok.encode(f"{a}+{b}={a + b}") for a, b in ((47, 85), (99, 99), (38, 87), (56, 66))])
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_TASK, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    with torch.no_grad():
        want = merged(ids).logits
        # Both exports are bf16 and the base weights fp32: equal to bf16 rounding (logits are O(10)).
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=0.15)
        with peft_model.disable_adapter():
            assert (peft_model(ids).logits - want).abs().max() > 1.0


@gpus(1)
def test_lora_job_on_one_gpu(tmp_path):
    """The LoRA job on one GPU: compiled blocks (adapters on, and off for the KL reference), bf16 compute,
    bf16 merged weights for the generator. It learns, and the KL to the base starts at (about) zero."""
    proc = torchrun(1, ["train.py", "--lora-rank", "8", "--lr", "1e-3", "--prompts-per-step", "16", "--steps", "5",
                        "--eval-every", "0", "--kl-coef", "1e-3", "--out-dir", str(tmp_path)], timeout=900, cuda=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    kl = [r["kl_ref"] for r in rows if "kl_ref" in r]
    print(f"held-out accuracy {acc}, kl_ref {kl}")
    assert acc[-1] - acc[0] >= 0.20 and abs(kl[0]) < 1e-4 and kl[-1] > kl[0], (acc, kl)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
