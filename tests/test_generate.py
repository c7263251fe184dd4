"""Generation against transformers' greedy search, and sampled log-probs against the trainer's packed forward."""

import random
import types
from dataclasses import fields

import pytest
import torch
from helpers_dist import gpus, run_worker
from helpers_models import FAMILIES, VOCAB, hf_model, minirl_model, save_hf_model

from minirl.attention import AttnMeta, cu_seqlens_from_positions
from minirl.backend import sample_seed
from minirl.fused import fuse_projections
from minirl.generate import (Completion, Generator, Rows, SamplingParams, batch_sizes, compact, draw_uniforms,
                             generate, sample)
from minirl.hf import load_model
from minirl.kvcache import KVCache, flex_decode_works, rows_for_memory
from minirl.logprobs import process_logits
from minirl.model import ModelConfig

PROMPT_LENS = [5, 1, 9, 3]


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    save_hf_model(str(path), "qwen3", seed=3)
    return load_model(str(path))


def trainer_logprobs(model, prompts, completions: list[Completion], params: SamplingParams) -> list[torch.Tensor]:
    """Log-probs of the completion tokens from the packed (training) forward, one tensor per completion."""
    seqs = [torch.tensor(p + c.token_ids) for p, c in zip(prompts, completions)]
    ids = torch.cat([s[:-1] for s in seqs])  # [T]
    targets = torch.cat([s[1:] for s in seqs])  # [T]
    pos = torch.cat([torch.arange(len(s) - 1) for s in seqs])  # [T]
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(pos)
    with torch.no_grad():
        logp, _ = model(ids, pos, AttnMeta(cu_seqlens, max_seqlen, "sdpa"), targets=targets,
                        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    ends = cu_seqlens[1:].tolist()
    return [logp[end - len(c.token_ids):end] for end, c in zip(ends, completions)]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family, tmp_path):
    hf = save_hf_model(str(tmp_path), family, seed=1)
    model = load_model(str(tmp_path))
    prompts, T = random_prompts(PROMPT_LENS, seed=2), 12

    def hf_greedy(eos):
        out = []
        for p in prompts:  # one prompt at a time: no padding conventions to match
            ids = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=T, do_sample=False, eos_token_id=eos, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
        return out

    # An EOS id that greedy decoding hits in some rows but not in others (found without any EOS).
    free = hf_greedy(eos=None)
    seen = [set(row[:-1]) for row in free]  # hit before the last step: that row stops early
    eos = next(t for t in range(VOCAB) if any(t in s for s in seen) and not all(t in row for row in free))
    never = next(t for t in range(VOCAB) if not any(t in row for row in free))
    ref = hf_greedy(eos=[eos, never])

    outs = generate(model, prompts, SamplingParams(max_new_tokens=T, temperature=0), eos_ids=[eos, never], pad_id=0)
    assert [o.token_ids for o in outs] == ref
    reasons = [o.finish_reason for o in outs]
    assert reasons == ["stop" if row[-1] == eos else "length" for row in ref]
    assert "stop" in reasons and "length" in reasons
    assert any(len(row) < T for row in ref)  # some row stopped early


def test_sampled_logprobs_match_trainer(model):
    prompts = random_prompts(PROMPT_LENS, seed=4)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=5)
    outs = generate(model, prompts, params, eos_ids=[0], pad_id=0)
    ref = trainer_logprobs(model, prompts, outs, params)
    for o, r in zip(outs, ref):
        torch.testing.assert_close(torch.tensor(o.logprobs), r, rtol=0, atol=1e-5)
    # The check can fail: without top-p the same tokens have visibly different log-probs.
    untruncated = trainer_logprobs(model, prompts, outs, SamplingParams(temperature=0.7))
    assert max((torch.tensor(o.logprobs) - r).abs().max() for o, r in zip(outs, untruncated)) > 1e-3


def test_long_decode_matches_trainer(model):
    """150 new tokens: decode steps move through several cache lengths (64, 128, 192 slots read) and
    every log-prob still equals the trainer's, whose attention sees each whole sequence."""
    prompts = random_prompts(PROMPT_LENS, seed=21)
    params = SamplingParams(max_new_tokens=150, temperature=1.0, seed=22)
    outs = generate(model, prompts, params, eos_ids=[], pad_id=0)
    assert all(len(o.token_ids) == 150 for o in outs)
    for o, r in zip(outs, trainer_logprobs(model, prompts, outs, params)):
        torch.testing.assert_close(torch.tensor(o.logprobs), r, rtol=0, atol=1e-5)


def test_seeded_sampling_is_reproducible(model):
    prompts = random_prompts(PROMPT_LENS, seed=6)

    def run(seed, prompts=prompts, seeds=None):
        return [o.token_ids for o in generate(model, prompts, SamplingParams(16, seed=seed), [0], 0, seeds=seeds)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    # With a seed per prompt, a row's completion does not depend on the other rows of its batch.
    assert run(0, seeds=[11, 12, 13, 14])[2] == run(0, prompts=prompts[2:3], seeds=[13])[0]
    with pytest.raises(ValueError, match="one seed per prompt"):
        run(0, seeds=[1])


def test_sampler_draws_from_the_processed_distribution():
    """Token frequencies over many rows match softmax(process_logits(...)); removed tokens never appear."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(40000, 6)
    params = SamplingParams(temperature=0.8, top_k=4)
    u = draw_uniforms([random.Random(i) for i in range(len(logits))], 1)[:, 0]  # [B]
    tokens, logprobs = sample(logits, params, u)
    want = (logits[0] / 0.8)[:4].softmax(-1)  # top-4, tempered, by hand
    freq = torch.bincount(tokens, minlength=6) / len(tokens)
    torch.testing.assert_close(freq[:4], want, rtol=0, atol=0.01)
    assert freq[4:].sum() == 0
    torch.testing.assert_close(logprobs, want.log()[tokens], rtol=0, atol=1e-6)


def test_top_k_1_is_greedy(model):
    prompts = random_prompts(PROMPT_LENS, seed=9)
    greedy = generate(model, prompts, SamplingParams(8, temperature=0), [0], 0)
    top1 = generate(model, prompts, SamplingParams(8, temperature=1.0, top_k=1, seed=3), [0], 0)
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]
    assert all(lp == 0.0 for o in top1 for lp in o.logprobs)  # the only token left has probability 1


def test_max_new_tokens_and_eos(model):
    prompts = random_prompts([4] * 12, seed=10)
    eos_ids, T = list(range(0, VOCAB, 12)), 9  # 9 of 97 ids stop: some rows stop, others run out
    outs = generate(model, prompts, SamplingParams(T, temperature=1.0, seed=11), eos_ids, pad_id=0)
    for o in outs:
        assert len(o.token_ids) == len(o.logprobs) <= T
        assert not set(o.token_ids[:-1]) & set(eos_ids)  # nothing generated after an EOS
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in eos_ids
        else:
            assert o.finish_reason == "length" and len(o.token_ids) == T and o.token_ids[-1] not in eos_ids
    assert {o.finish_reason for o in outs} == {"stop", "length"}


class Counter:
    n = 0

    def update(self, k):
        self.n += k


def assert_same(outs, ref):
    """The same tokens and finish reasons, and log-probs equal to fp32 rounding (not bitwise: a CPU
    matmul of fewer than 4 rows takes another kernel, and SDPA's CPU kernel rounds with the width it
    reads; both measured)."""
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert [o.finish_reason for o in outs] == [r.finish_reason for r in ref]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(r.logprobs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("params", [SamplingParams(24, temperature=0), SamplingParams(24, temperature=0.9, seed=3)])
def test_continuous_batching_matches_each_prompt_alone(model, params):
    """Rows end at varied positions (EOS ids, per-prompt limits); with 3 slots the finished rows' slots
    take waiting prompts, with 16 the batch first refills, then shrinks to 8 rows (its live rows moved
    onto the first slots). Every completion is the one its prompt gets alone, or in one static batch."""
    prompts = random_prompts([3, 8, 1, 5, 2, 7, 4, 6, 9, 2, 5, 3, 7, 1, 4, 8, 6, 2, 5, 9, 3], seed=12)
    limits = [24, 5, 17, 24, 1, 12, 20, 8, 24, 3, 14, 24, 9, 24, 2, 24, 11, 24, 6, 24, 16]
    eos = list(range(0, VOCAB, 16))  # 7 of 97 ids
    seeds = [sample_seed(params.seed, 0, i, 0) for i in range(len(prompts))]
    alone = [generate(model, [p], params, eos, 0, seeds=[s], limits=[n])[0]
             for p, s, n in zip(prompts, seeds, limits)]
    assert {o.finish_reason for o in alone} == {"stop", "length"}
    assert len({len(o.token_ids) for o in alone if o.finish_reason == "stop"}) >= 3  # EOS at varied positions
    for batch in (3, 16, len(prompts)):
        progress = Counter()
        outs = generate(model, prompts, params, eos, 0, max_batch_size=batch, prefill_tokens=4, progress=progress,
                        limits=limits)
        assert progress.n == len(prompts)
        assert_same(outs, alone)


def test_limits_cut_the_same_completion(model):
    """A prompt's own limit ends its completion where max_new_tokens would: a prefix of the longer one."""
    prompts, params = random_prompts([3, 8, 1, 5], seed=14), SamplingParams(20, temperature=1.0, seed=15)
    full = generate(model, prompts, params, [], 0)
    cut = generate(model, prompts, params, [], 0, limits=[1, 7, 20, 13])
    assert [len(o.token_ids) for o in cut] == [1, 7, 20, 13] and {o.finish_reason for o in cut} == {"length"}
    assert all(c.token_ids == f.token_ids[:len(c.token_ids)] for c, f in zip(cut, full))
    with pytest.raises(ValueError, match="limits"):
        generate(model, prompts, params, [], 0, limits=[1, 2, 3, 21])


def test_stop_returns_the_completions_before_the_first_unfinished(model):
    """`stop` is asked whenever the host looks at the rows; once True the call returns the completions
    finished before the first unfinished one, those of a full run."""
    prompts, params = random_prompts([3, 8, 1, 5, 2, 7, 4], seed=12), SamplingParams(40, temperature=0.9, seed=3)
    limits = [2, 1, 40, 40, 40, 40, 40]
    asked = []
    done = generate(model, prompts, params, [], 0, max_batch_size=3, limits=limits,
                    stop=lambda: asked.append(1) or len(asked) == 2)
    assert len(asked) == 2 and len(done) == 2  # rows 0 and 1 finish at the first look; row 2 does not
    assert_same(done, generate(model, prompts, params, [], 0, limits=limits)[:2])


def test_compact_moves_rows_with_their_cache():
    """Rows in use at slots 1, 4, 5 of 6 (slots 0, 2, 3 free) end up on slots 0..2, each with its own
    state and cache row; the slots left free hold no live row."""
    cfg = types.SimpleNamespace(num_hidden_layers=2, num_key_value_heads=2, head_dim=4)
    cache, rows = KVCache.empty(cfg, 6, 8, torch.float32, "cpu"), Rows.empty(6, 5, "cpu")
    for b in range(6):
        cache.k[:, b], cache.v[:, b] = b, -b
        for f in fields(rows):
            getattr(rows, f.name)[b] = b + 1 if f.name != "stopped" else b % 2
    held = [None, 11, None, None, 14, 15]
    assert compact(rows, cache, held) == 3
    assert held == [14, 11, 15, None, None, None]  # slot 4 moved to 0, slot 5 to 2
    for slot, was in ((0, 4), (1, 1), (2, 5)):
        assert torch.all(cache.k[:, slot] == was) and torch.all(cache.v[:, slot] == -was)
        assert rows.pos[slot] == was + 1 and rows.stopped[slot] == was % 2
        assert torch.all(rows.uniforms[slot] == was + 1) and torch.all(rows.tokens[slot] == was + 1)
    assert rows.limit[3:].tolist() == [0, 0, 0]


def test_many_stop_ids(model):
    """Any number of stop ids end a row (a [V] table, not torch.isin; the GPU tier runs 64 under CUDA
    graphs): each completion ends at its first stop id."""
    prompts, params = random_prompts([3, 8, 1, 5], seed=16), SamplingParams(30, temperature=1.0, seed=17)
    free = generate(model, prompts, params, [], 0)
    stop_ids = sorted({t for o in free for t in o.token_ids[5:]} | set(range(90, 97)))[:64]
    outs = generate(model, prompts, SamplingParams(30, temperature=1.0, seed=17, stop_token_ids=tuple(stop_ids)), [], 0)
    for o, f in zip(outs, free):
        end = next(i for i, t in enumerate(f.token_ids) if t in stop_ids) + 1
        assert o.token_ids == f.token_ids[:end] and o.finish_reason == "stop"


def test_rows_for_memory_is_the_cache_and_step_buffers_a_row_needs():
    """Qwen3-0.6B's shape in bf16, a 2,176-slot cache (128 + 2,048 rounded to 64), 60 GiB free: by hand,
    2 x 28 layers x 8 kv heads x 128 x 2,176 x 2 bytes = 249,561,088 bytes of cache, 151,936 x 14 =
    2,127,104 of vocabulary buffers, 2,049 x 20 = 40,980 of per-token state: 251,729,172 a row, and
    0.9 x 60 GiB holds 230 of them."""
    cfg = ModelConfig("qwen3", 151936, 1024, 3072, 28, 16, 8, 128)
    assert rows_for_memory(cfg, 2176, 2048, 60 * 2**30) == 230
    assert rows_for_memory(cfg, 2176, 2048, 120 * 2**30) == 460
    assert rows_for_memory(cfg, 4224, 4096, 60 * 2**30) == 119  # twice the tokens: about half the rows
    assert rows_for_memory(cfg, 2176, 2048, 2**20) == 1  # never fewer than one row


def test_batch_sizes_are_shared_powers_of_two():
    assert batch_sizes(230) == [8, 16, 32, 64, 128, 230]
    assert batch_sizes(128) == [8, 16, 32, 64, 128]
    assert batch_sizes(5) == [5]


def perturbed(model, seed):
    """A copy of `model` with every parameter changed by noise."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_projections_compute_the_same_and_follow_weight_writes(family):
    """An inference copy's fused q/k/v and gate/up give the model's logits, and writing a parameter by
    name (what a weight sync does) changes what the fused matmul reads."""
    hf = hf_model(family, seed=6)
    model, fused = minirl_model(hf), minirl_model(hf)
    names = [n for n, _ in fused.named_parameters()]
    fuse_projections(fused)
    assert [n for n, _ in fused.named_parameters()] == names and fused.state_dict().keys() == model.state_dict().keys()
    ids = torch.randint(0, hf.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(6).expand(2, 6)

    def logits(m):
        return m.forward_step(ids, pos, KVCache.empty(m.cfg, 2, 6, dtype=torch.float32, device="cpu"))

    with torch.no_grad():
        torch.testing.assert_close(logits(fused), logits(model), rtol=0, atol=1e-5)
        g = torch.Generator().manual_seed(8)
        new = {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in model.named_parameters()
               if any(k in n for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
        before = logits(fused)
        for m in (model, fused):
            params = dict(m.named_parameters())
            for n, t in new.items():
                params[n].copy_(t)
        after = logits(fused)
        assert (after - before).abs().max() > 1e-2
        torch.testing.assert_close(after, logits(model), rtol=0, atol=1e-5)


def test_update_weights_follows_the_policy(model):
    prompts = random_prompts(PROMPT_LENS, seed=13)
    params = SamplingParams(8, temperature=0.8, seed=14)
    gen = Generator(model.cfg, eos_ids=[0], pad_id=0, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="update_weights"):
        gen.generate(prompts, params)

    gen.update_weights(model.state_dict().items())
    before = gen.generate(prompts, params)
    ref = generate(model, prompts, params, [0], 0)
    assert [o.token_ids for o in before] == [o.token_ids for o in ref]
    assert [o.logprobs for o in before] == [o.logprobs for o in ref]

    new_weights = perturbed(model, seed=15)
    gen.update_weights(iter(new_weights.items()))  # streamed: one tensor at a time
    new_model = type(model)(model.cfg)
    new_model.load_state_dict(new_weights)
    after = gen.generate(prompts, params)
    trainer = trainer_logprobs(new_model, prompts, after, params)
    for o, r in zip(after, trainer):
        torch.testing.assert_close(torch.tensor(o.logprobs), r, rtol=0, atol=1e-5)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]

    gen.release()
    assert gen.model is None
    gen.update_weights(new_weights.items())  # rebuilt from nothing
    assert [o.token_ids for o in gen.generate(prompts, params)] == [o.token_ids for o in after]


def test_update_weights_casts_and_rejects_bad_syncs(model):
    gen = Generator(model.cfg, eos_ids=[0], pad_id=0)  # bf16 by default
    gen.update_weights(model.state_dict().items())
    for name, p in gen.model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16))
    items = list(model.state_dict().items())
    with pytest.raises(ValueError, match="not sent"):
        gen.update_weights(items[1:])
    assert gen.model is None  # a partial sync leaves nothing to sample from
    with pytest.raises(KeyError, match="model.norm.weight"):
        gen.update_weights([("model.norm.weight", items[0][1])])
    with pytest.raises(ValueError, match="shape"):
        gen.update_weights([(items[0][0], items[0][1][:1])])
    resident = Generator(model.cfg, eos_ids=[0], pad_id=0, keep_resident=True)
    resident.update_weights(items)
    resident.release()
    assert resident.model is not None


def test_bad_input_is_a_clear_error(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], SamplingParams(4), [0], 0)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[1, VOCAB]], SamplingParams(4), [0], 0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], SamplingParams(4, top_p=0.0), [0], 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], SamplingParams(0), [0], 0)


def cuda_copy(model, dtype=torch.float32):
    gpu = type(model)(model.cfg).to(dtype).cuda()
    gpu.load_state_dict(model.state_dict())
    return gpu


@gpus(1)
def test_cuda_graph_decode_matches_eager(model):
    gpu = cuda_copy(model)
    prompts = random_prompts(PROMPT_LENS, seed=16)
    for params in (SamplingParams(12, temperature=0), SamplingParams(12, temperature=0.9, top_p=0.95, seed=17)):
        eager = generate(gpu, prompts, params, [0], 0, cuda_graphs=False)
        graph = generate(gpu, prompts, params, [0], 0, cuda_graphs=True)
        assert [o.token_ids for o in graph] == [o.token_ids for o in eager]
        for a, b in zip(graph, eager):
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-5)
    # and still the trainer's log-probs, on the GPU too
    outs = generate(gpu, prompts, SamplingParams(12, temperature=0.7, top_p=0.9, seed=18), [0], 0)
    for o, r in zip(outs, trainer_logprobs(model, prompts, outs, SamplingParams(temperature=0.7, top_p=0.9))):
        torch.testing.assert_close(torch.tensor(o.logprobs), r, rtol=0, atol=1e-4)


@gpus(1)
def test_continuous_batching_on_cuda_matches_static(model):
    """On a GPU (CUDA graphs, FlexAttention's decoding kernel over each row's own length): in fp32 a
    continuous batch (3 or 16 slots: refilled, then shrunk) gives each prompt alone's completions; in
    bf16 it matches the static batch within bf16 (where a near-tie flips a token, the rows part) and
    its log-probs are the fp32 trainer's within bf16."""
    prompts = random_prompts([3, 8, 1, 5, 2, 7, 4, 6, 9, 2, 5, 3, 7, 1, 4, 8, 6, 2, 5, 9, 3], seed=12)
    limits = [24, 5, 17, 24, 1, 12, 20, 8, 24, 3, 14, 24, 9, 24, 2, 24, 11, 24, 6, 24, 16]
    params, eos = SamplingParams(24, temperature=0.9, seed=3), list(range(0, VOCAB, 16))
    gpu = cuda_copy(model)
    assert all(flex_decode_works(torch.device("cuda"), dt) for dt in (torch.float32, torch.bfloat16))
    seeds = [sample_seed(params.seed, 0, i, 0) for i in range(len(prompts))]
    alone = [generate(gpu, [p], params, eos, 0, seeds=[s], limits=[n])[0] for p, s, n in zip(prompts, seeds, limits)]
    for batch in (3, 16):
        outs = generate(gpu, prompts, params, eos, 0, max_batch_size=batch, limits=limits)
        assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
        for o, a in zip(outs, alone):
            torch.testing.assert_close(torch.tensor(o.logprobs), torch.tensor(a.logprobs), rtol=0, atol=1e-4)
    half = cuda_copy(model, torch.bfloat16)
    static = generate(half, prompts, params, eos, 0, max_batch_size=len(prompts), limits=limits)
    cont = generate(half, prompts, params, eos, 0, max_batch_size=3, limits=limits)
    same = [c.token_ids == s.token_ids for c, s in zip(cont, static)]
    assert sum(same) >= 0.8 * len(prompts), f"only {sum(same)} of {len(prompts)} completions equal"
    for c, s in zip(cont, static):
        n = next((i for i, (x, y) in enumerate(zip(c.token_ids, s.token_ids)) if x != y), min(len(c.token_ids),
                                                                                              len(s.token_ids)))
        torch.testing.assert_close(torch.tensor(c.logprobs[:n]), torch.tensor(s.logprobs[:n]), rtol=0, atol=0.05)
    ref = trainer_logprobs(model, prompts, cont, params)
    diffs = torch.cat([torch.tensor(c.logprobs) - r for c, r in zip(cont, ref)])
    assert diffs.abs().mean() < 0.02 and diffs.abs().max() < 0.2


@gpus(1)
def test_64_stop_ids_under_cuda_graphs(model):
    """torch.isin in a captured step failed with 32 or more ids; the [V] table takes any number."""
    gpu, prompts = cuda_copy(model), random_prompts([3, 8, 1, 5], seed=16)
    params = SamplingParams(30, temperature=1.0, seed=17)
    free = generate(gpu, prompts, params, [], 0)
    stop_ids = sorted({t for o in free for t in o.token_ids[5:]} | set(range(VOCAB - 64, VOCAB)))[:64]
    assert len(stop_ids) == 64
    outs = generate(gpu, prompts, SamplingParams(30, temperature=1.0, seed=17, stop_token_ids=tuple(stop_ids[1:])),
                    [stop_ids[0]], 0)
    for o, f in zip(outs, free):
        end = next(i for i, t in enumerate(f.token_ids) if t in stop_ids) + 1
        assert o.token_ids == f.token_ids[:end] and o.finish_reason == "stop"


@gpus(1)
def test_compiled_sampler_with_a_full_size_vocabulary():
    """With Qwen's 151,936-token vocabulary (top-p's cumsum over it once failed to compile): the GPU
    draws what the CPU draws from the same uniforms, with the float64 log-probs of those tokens."""
    B, V = 16, 151936
    logits = (torch.randn(B, V, generator=torch.Generator().manual_seed(19)) * 3).bfloat16()
    u = draw_uniforms([random.Random(i) for i in range(B)], 1)[:, 0]  # [B]
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_k=50, top_p=0.9),
                   SamplingParams(temperature=0)):
        tokens, logprobs = sample(logits.cuda(), params, u.cuda())
        assert tokens.cpu().tolist() == sample(logits, params, u)[0].tolist()
        ref = process_logits(logits.double(), params.temperature, params.top_k, params.top_p).log_softmax(-1)
        torch.testing.assert_close(logprobs.cpu().double(), ref.gather(-1, tokens.cpu()[:, None])[:, 0],
                                   rtol=0, atol=1e-4)  # fp32 sums over 152k terms


def test_weight_sync_from_fsdp_matches_updated_model():
    """2 ranks (gloo): after an optimizer step on the FSDP2 model the generator scores like the updated model."""
    for r, report in enumerate(run_worker("weight_sync_worker.py", 2)):
        failed = {k: v for k, v in report["checks"].items() if v}
        assert not failed, f"rank {r}: {failed}"
        assert len(report["checks"]) == 3
