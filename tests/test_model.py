"""The model against transformers, and the chunked log-probs against a naive float64 computation."""

import collections

import pytest
import torch
from helpers_dist import gpus
from helpers_flash import REFERENCE_KERNELS, fake_flash_attn  # noqa: F401  (a fixture)
from helpers_models import FAMILIES, hf_config, hf_model, minirl_model, packed_batch
from torch.utils._python_dispatch import TorchDispatchMode

from minirl.attention import AttnMeta, _available, cu_seqlens_from_positions
from minirl.logprobs import process_logits, token_logprobs
from minirl.model import KVCache, ModelConfig


def packed_meta(position_ids) -> AttnMeta:
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(position_ids)
    return AttnMeta(cu_seqlens, max_seqlen, backend="sdpa")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logits_match_transformers(family):
    hf = hf_model(family, seed=1)
    model = minirl_model(hf)
    ids, pos, docs = packed_batch([7, 1, 12, 4], seed=2)
    with torch.no_grad():
        ref = torch.cat([hf(doc[None]).logits[0] for doc in docs])  # [T, V], each document alone
        hidden = model(ids, pos, packed_meta(pos))  # [T, D]
        logits = hidden @ model.output_weight().t()
        # With targets the model returns the log-probs of the tempered distribution, in chunks.
        targets = torch.randint(0, ref.shape[1], ids.shape, generator=torch.Generator().manual_seed(3))
        logp, entropy = model(ids, pos, packed_meta(pos), targets=targets, temperature=0.7, chunk_size=5)
    assert (logits - ref).abs().max() <= 1e-4
    ref_logp = (ref.double() / 0.7).log_softmax(-1)  # [T, V]
    torch.testing.assert_close(logp.double(), ref_logp.gather(-1, targets[:, None])[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(ref_logp.exp() * ref_logp).sum(-1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_step_matches_transformers(family):
    """Prefill right-padded prompts of different lengths, then decode each row at its own position."""
    hf = hf_model(family, seed=4)
    model = minirl_model(hf)
    g = torch.Generator().manual_seed(5)
    prompt_lens, n_decode, pad = [3, 6, 1], 3, 0
    B, S = len(prompt_lens), max(prompt_lens)
    seqs = [torch.randint(1, hf.config.vocab_size, (n + n_decode,), generator=g) for n in prompt_lens]
    with torch.no_grad():
        refs = [hf(seq[None]).logits[0] for seq in seqs]  # [L_b + n_decode, V], each row alone

        tokens = torch.full((B, S), pad)
        for b, n in enumerate(prompt_lens):
            tokens[b, :n] = seqs[b][:n]
        cache = KVCache.empty(model.cfg, B, max_len=S + n_decode, dtype=torch.float32, device="cpu")
        logits = model.forward_step(tokens, torch.arange(S).expand(B, S), cache)  # [B, S, V]
        for b, n in enumerate(prompt_lens):
            assert (logits[b, :n] - refs[b][:n]).abs().max() <= 1e-4

        # Row b's next token goes to position L_b + j, overwriting what its padding left in the cache.
        for j in range(n_decode):
            pos = torch.tensor(prompt_lens)[:, None] + j  # [B, 1]
            step_tokens = torch.stack([seqs[b][pos[b, 0]] for b in range(B)])[:, None]  # [B, 1]
            logits = model.forward_step(step_tokens, pos, cache)  # [B, 1, V]
            for b in range(B):
                assert (logits[b, 0] - refs[b][pos[b, 0]]).abs().max() <= 1e-4


def naive_processed_logprobs(logits, temperature, top_k, top_p):
    """Log-probs [N, V] of the sampled distribution, row by row in plain loops (the reference).

    Top-k keeps the k largest logits; top-p then keeps, in descending order, each token whose
    preceding (top-k renormalised) mass is still below top_p.
    """
    logits = logits / temperature
    keep = torch.ones_like(logits, dtype=torch.bool)
    for i, row in enumerate(logits.detach()):
        order = row.argsort(descending=True).tolist()
        if top_k > 0:
            keep[i, order[top_k:]] = False
        probs = row.masked_fill(~keep[i], float("-inf")).softmax(-1)
        mass_before = 0.0
        for token in order:
            if keep[i, token] and mass_before >= top_p:
                keep[i, token] = False
            mass_before += probs[token].item()
    return logits.masked_fill(~keep, float("-inf")).log_softmax(-1), keep


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 9, 1.0), (1.3, 0, 0.8), (0.6, 12, 0.9)])
def test_chunked_logprobs_match_naive_float64(temperature, top_k, top_p):
    T, D, V = 13, 16, 50
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(T, D, generator=g).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / 2).requires_grad_()
    coef_lp, coef_ent = torch.randn(T, generator=g), torch.randn(T, generator=g)

    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    ref_logp, keep = naive_processed_logprobs(hidden64 @ weight64.t(), temperature, top_k, top_p)  # [T, V]
    # Targets drawn from the processed distribution, as a sampler would: never a removed token.
    targets = torch.multinomial(ref_logp.detach().exp(), 1, generator=g)[:, 0]  # [T]
    ref_lp = ref_logp.gather(-1, targets[:, None])[:, 0]
    ref_ent = -(ref_logp.exp() * ref_logp.masked_fill(~keep, 0.0)).sum(-1)
    ((coef_lp * ref_lp).sum() + (coef_ent * ref_ent).sum()).backward()

    lp, ent = token_logprobs(hidden, weight, targets, temperature, top_k, top_p, chunk_size=4)
    ((coef_lp * lp).sum() + (coef_ent * ent).sum()).backward()

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (T,)
    torch.testing.assert_close(lp.double(), ref_lp.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-4, atol=1e-5)


class CountOps(TorchDispatchMode):
    """How often each op (by name, overloads merged) runs while the mode is on."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_checkpointing_policies_give_identical_grads_and_recompute_what_they_say(fake_flash_attn):
    """none, full and selective checkpointing give the same gradients; in backward, full reruns every
    block's matmuls, attention and elementwise ops, selective only the elementwise ones (SwiGLU's silu
    here), none nothing. Attention is the flash op around stand-in kernels (tests/helpers_flash.py)."""
    fake_flash_attn(REFERENCE_KERNELS)
    model = minirl_model(hf_model("qwen3", seed=7))
    ids, pos, _ = packed_batch([9, 1, 6], seed=8)
    targets = ids.roll(-1)
    meta = AttnMeta(*cu_seqlens_from_positions(pos), backend="flash")
    grads, ops = {}, {}
    for policy in ("none", "full", "selective"):
        model.set_checkpointing(policy)
        model.zero_grad()
        logp, entropy = model(ids, pos, meta, targets=targets, chunk_size=8)
        with CountOps() as backward_ops:
            (-logp.mean() - 0.1 * entropy.mean()).backward()
        grads[policy] = {n: p.grad.clone() for n, p in model.named_parameters()}
        ops[policy] = backward_ops.counts
        ops[policy]["matmul"] = ops[policy]["mm"] + ops[policy]["addmm"]  # addmm: a Linear with a bias
    for policy in ("full", "selective"):
        for name in grads["none"]:
            torch.testing.assert_close(grads[policy][name], grads["none"][name], rtol=0, atol=0, msg=name)
    # 7 Linears a block; recompute stops once it has what backward needs, before down_proj
    layers, linears = model.cfg.num_hidden_layers, 6
    assert ops["full"]["matmul"] == ops["none"]["matmul"] + layers * linears
    assert ops["full"]["flash_varlen_attn"] == layers and ops["full"]["silu"] == layers
    assert ops["selective"]["matmul"] == ops["none"]["matmul"] and ops["selective"]["flash_varlen_attn"] == 0
    assert ops["selective"]["silu"] == layers and ops["none"]["silu"] == 0
    with pytest.raises(ValueError, match="unknown checkpointing True"):
        model.set_checkpointing(True)  # the old yes/no


def compiled_vs_eager(make_model, ids, pos, meta, targets, backend="inductor"):
    """Log-probs and gradients of one forward+backward with selective checkpointing (train.py's default),
    blocks eager and compiled whole (as fsdp.build_sharded compiles them on GPUs; `fullgraph`: a graph
    break, in attention say, is an error): ((logp, grads), (logp, grads))."""
    out = []
    for compiled in (False, True):
        model = make_model()
        model.set_checkpointing("selective")
        if compiled:
            for block in model.layers:
                block.compile(fullgraph=True, backend=backend)
        logp, entropy = model(ids, pos, meta, targets=targets, chunk_size=8)
        (-logp.mean() - 0.1 * entropy.mean()).backward()
        out.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    return out


def test_compiled_blocks_with_selective_checkpointing_and_the_flash_op_on_cpu(fake_flash_attn):
    """Compiled blocks trace the flash op and selective checkpointing's policy without a graph break,
    and give the eager results in float64 (stand-in kernels, tests/helpers_flash.py). The backend
    stops short of inductor's code generation (C++ compiles cost ~20 s here); the GPU test below
    runs inductor."""
    fake_flash_attn(REFERENCE_KERNELS)
    torch._dynamo.reset()
    ids, pos, _ = packed_batch([9, 1, 6], seed=4)
    meta = AttnMeta(*cu_seqlens_from_positions(pos), backend="flash")
    (eager, eager_grads), (compiled, compiled_grads) = compiled_vs_eager(
        lambda: minirl_model(hf_model("qwen3", seed=3)).double(), ids, pos, meta, ids.roll(-1),
        backend="aot_eager_decomp_partition")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-12)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=0, atol=1e-12)


@gpus(1)
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_compiled_blocks_on_cuda_with_each_attention_kernel(backend):
    """On a GPU in bf16, with torch's varlen kernel and flash-attn-4: compiled blocks under selective
    checkpointing (train.py's default there), traced whole, give the eager results to bf16 accuracy."""
    if not _available(backend, torch.device("cuda")):
        pytest.skip(f"{backend} attention is not installed here")
    torch._dynamo.reset()
    ids, pos, _ = packed_batch([90, 10, 60], seed=4)
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(pos)
    meta = AttnMeta(cu_seqlens.cuda(), max_seqlen, backend=backend)
    (eager, eager_grads), (compiled, compiled_grads) = compiled_vs_eager(
        lambda: minirl_model(hf_model("qwen3", seed=3)).cuda().to(torch.bfloat16), ids.cuda(), pos.cuda(), meta,
        ids.roll(-1).cuda())
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    # All gradients as one vector: a single small one (a norm weight's, summed over tokens) can differ by
    # a few % in bf16 (4.5 % seen with flash-attn-4), the whole by far less.
    rel = (compiled_grads - eager_grads).float().norm() / eager_grads.float().norm()
    assert rel < 2e-2, rel.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_hf_dict(family):
    cfg = ModelConfig.from_hf(hf_config(family).to_dict())
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("change, culprit", [
    ({"model_type": "mistral"}, "mistral"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "yarn"),
])
def test_config_rejects_unsupported_options(change, culprit):
    hf = {**hf_config("llama").to_dict(), **change}
    with pytest.raises(ValueError, match=culprit):
        ModelConfig.from_hf(hf)


@gpus(1)
def test_compiled_logprobs_with_a_full_size_vocabulary():
    """The compiled chunk with Qwen's 151,936-token vocabulary (top-p's cumsum over it once failed to
    compile) against the eager float64 computation on CPU, forward and backward."""
    T, D, V = 64, 32, 151936
    g = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(T, D, generator=g), torch.randn(V, D, generator=g) / 3
    targets = (hidden @ weight.t()).argmax(-1)  # the most likely token: kept by any top-k / top-p
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 50, 0.9)]:
        h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref_logp = process_logits(h64 @ w64.t(), temperature, top_k, top_p).log_softmax(-1)  # [T, V]
        ref_lp = ref_logp.gather(-1, targets[:, None])[:, 0]
        ref_ent = -(ref_logp.exp() * ref_logp.masked_fill(torch.isinf(ref_logp), 0.0)).sum(-1)
        (ref_lp.sum() + ref_ent.sum()).backward()
        h, w = hidden.cuda().requires_grad_(), weight.cuda().requires_grad_()
        lp, ent = token_logprobs(h, w, targets.cuda(), temperature, top_k, top_p, chunk_size=32)
        (lp.sum() + ent.sum()).backward()
        torch.testing.assert_close(lp.cpu().double(), ref_lp.detach(), rtol=0, atol=1e-4)
        torch.testing.assert_close(ent.cpu().double(), ref_ent.detach(), rtol=0, atol=1e-4)
        torch.testing.assert_close(h.grad.cpu().double(), h64.grad, rtol=1e-3, atol=1e-4)
