"""Batched generation with a static KV cache (the "naive" rollout backend), and the inference copy
of the policy that the trainer streams its weights into.

One batch of prompts is generated in two phases, as in gpt-fast:
- prefill: all prompts, right-padded to the longest, run through the model together and fill the KV
  cache. Padding writes junk into the cache above a row's prompt, which is harmless: a query at
  position p only reads slots 0..p of its row, and slot p is written by the step that reads it.
- decode: one token per row per step, each row at its own position (its current length). The step
  (model, sampling, bookkeeping) reads and writes only fixed tensors, so on a GPU it is captured once
  as a CUDA graph and replayed, removing the per-kernel launch overhead that otherwise dominates
  one-token steps; the host checks for finished rows only every few steps. Attention reads the part
  of the cache filled so far, rounded up to one of a few lengths (a graph for each). Each layer's
  norms, RoPE and activation run as torch.compile'd kernels on a GPU, as do the sampler's passes over
  the vocabulary; the inference copy fuses its q/k/v and gate/up projections.

Every sampled token comes with its log-prob under the distribution it was drawn from, the one
`process_logits` defines (temperature, top-k, top-p). The trainer scores with the same function, so
the two log-probs differ only by numerics (bf16 vs fp32, kernels), which is what importance sampling
has to correct.
"""

import functools
import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minirl.backend import Completion, SamplingParams, check_request, checked_weights
from minirl.logprobs import compiled, process_logits
from minirl.model import MLP, Attention, Block, KVCache, ModelConfig, Transformer

SYNC_EVERY = 16  # decode steps between two looks (host syncs) at which rows have finished

def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] (the head's dtype) -> probabilities [B, V] fp32 of the processed distribution."""
    return process_logits(logits.float(), temperature, top_k, top_p).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor):
    """logits [B, V], u [B] float64 in (0, 1] -> (tokens [B], their log-probs [B] fp32).

    Inverse-CDF sampling with one uniform number per row (ignored when greedy). The numbers come from
    each row's own Python RNG (`draw_uniforms`), so a row's samples depend on its seed alone, not on
    the other rows of its batch, nor on the device (CPU and GPU draw the same numbers; only their
    probabilities differ by rounding).
    """
    # On a GPU the upcast, processing and softmax (passes over [B, V] fp32: 0.6 GB at batch 1024 of a 150k
    # vocabulary) are fused by torch.compile into a few kernels.
    probs_fn = compiled(sampling_probs) if logits.is_cuda else sampling_probs
    probs = probs_fn(logits, params.temperature, params.top_k, params.top_p)  # [B, V] fp32
    if params.temperature == 0:
        tokens = logits.argmax(-1)  # [B]
    else:
        cdf = probs.cumsum(-1)  # [B, V]
        # The first token whose cumulative probability reaches u x total: token i is picked with
        # probability p_i (to fp32 rounding of the sums), and a token of probability 0 (cdf flat
        # there) never is. u x total <= total, so some token always qualifies.
        tokens = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).float()).squeeze(-1)  # [B]
    # log of an fp32 probability: exact to ~1e-7 relative down to p ~ 1e-38, far below any token
    # that is ever drawn or is the argmax.
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()


def draw_uniforms(rngs: list[random.Random], steps: int) -> torch.Tensor:
    """[B, steps] float64 in (0, 1]: row b's number for decode step t is the t-th draw of rngs[b]."""
    return torch.tensor([[1.0 - rng.random() for _ in range(steps)] for rng in rngs], dtype=torch.float64)


@dataclass
class DecodeState:
    """Everything a decode step reads and writes, as fixed device tensors updated in place.

    Nothing leaves the device between steps, so on a GPU the whole step (model, sampling and
    bookkeeping) is captured once as a CUDA graph and replayed.
    """

    cur: torch.Tensor  # [B] the token each row feeds next
    pos: torch.Tensor  # [B] its position
    t: torch.Tensor  # [1] index of the step
    uniforms: torch.Tensor  # [B, T] float64, see draw_uniforms
    tokens: torch.Tensor  # [B, T] sampled tokens
    logprobs: torch.Tensor  # [B, T] their log-probs
    n_new: torch.Tensor  # [B] tokens a row really generated (finished rows keep decoding, uncounted)
    done: torch.Tensor  # [B] the row has sampled an EOS id

    @classmethod
    def empty(cls, B: int, T: int, device) -> "DecodeState":
        long = dict(dtype=torch.long, device=device)
        return cls(torch.zeros(B, **long), torch.zeros(B, **long), torch.zeros(1, **long),
                   torch.zeros(B, T, dtype=torch.float64, device=device), torch.zeros(B, T, **long),
                   torch.zeros(B, T, device=device), torch.zeros(B, **long),
                   torch.zeros(B, dtype=torch.bool, device=device))

    def reset(self, cur: torch.Tensor, pos: torch.Tensor, uniforms: torch.Tensor):
        self.cur.copy_(cur)
        self.pos.copy_(pos)
        self.uniforms.copy_(uniforms)
        for x in (self.t, self.n_new, self.done):
            x.zero_()


def decode_step(model: Transformer, state: DecodeState, cache: KVCache, kv_len: int, params: SamplingParams,
                eos: torch.Tensor, block_step):
    """Feed each row's current token, sample the next one and record it. Attention reads `kv_len` slots."""
    logits = model.forward_step(state.cur[:, None], state.pos[:, None], cache, kv_len, block_step)[:, 0]  # [B, V]
    u = state.uniforms.index_select(1, state.t).squeeze(1)  # [B]
    tokens, logprobs = sample(logits, params, u)  # [B], [B]
    state.tokens.index_copy_(1, state.t, tokens[:, None])
    state.logprobs.index_copy_(1, state.t, logprobs[:, None])
    state.n_new += ~state.done
    state.done |= torch.isin(tokens, eos)
    state.cur.copy_(tokens)
    state.pos += 1
    state.t += 1


def cuda_graph(fn, reset, pool):
    """Capture fn() once as a CUDA graph; returns the function that replays it.

    A graph replays fixed kernels on fixed memory, one launch for the whole step instead of one per
    kernel. Capture must not see lazy initialisation (cuBLAS handles, workspaces), so fn first
    runs for real once, on a side stream; reset() puts the state back after that run (the capture
    itself runs nothing).
    Graphs that never run at the same time can share one memory `pool` for their temporaries.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    reset()
    return graph.replay


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_ids: list[int],
             pad_id: int, max_batch_size: int = 64, cuda_graphs: bool = True, prefill_tokens: int = 8192,
             progress=None, seeds: list[int] | None = None, stop=None) -> list[Completion]:
    """Complete every prompt (a list of token ids); returns one Completion per prompt, in order.

    Prompts are generated `max_batch_size` rows at a time. Pick it from the KV cache a batch needs:
        2 * layers * kv_heads * head_dim * bytes * (longest prompt + max_new_tokens) per row,
    e.g. Qwen2.5-7B in bf16 (28 layers, 4 KV heads of 128) is 56 KiB a token, so 1.5k tokens take
    84 MiB a row and 64 rows 5.3 GiB; add the decode step's [B, V] logits and fp32 sampling buffers.
    Prefill runs at most `prefill_tokens` rows x positions per forward, which bounds its activations
    (the MLP's [tokens, intermediate] tensors and the attention mask). `progress` is anything with
    tqdm's `update(n)`; it counts finished completions. `stop`, a function of no arguments, is asked
    before each batch after the first; once it returns True the rest is left out (fewer Completions).
    Each prompt samples from its own random stream: `seeds[i]` if given (one per prompt), else
    `sample_seed(params.seed, 0, i, 0)` (see backend.py). A completion thus depends on its prompt and
    seed only, not on max_batch_size or its neighbours. Reruns are exact on CPU.
    On GPU some kernels are not bitwise deterministic (memory-efficient attention splits the keys), so
    a near-tie between two tokens can flip from run to run; torch.use_deterministic_algorithms(True)
    makes reruns exact, at a cost in speed.
    The host looks at the finished rows every SYNC_EVERY steps (a sync): a batch whose rows have
    all stopped is noticed at most that many steps late.
    """
    seeds = check_request(prompts, params, model.cfg.vocab_size, seeds)
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    rngs = [random.Random(seed) for seed in seeds]
    use_graph = cuda_graphs and model.embed_tokens.weight.device.type == "cuda"
    completions = []
    for start in range(0, len(prompts), max_batch_size):
        if start and stop is not None and stop():
            break
        end = start + max_batch_size
        completions += _generate_batch(model, prompts[start:end], params, eos_ids, pad_id,
                                       rngs[start:end], use_graph, prefill_tokens, progress)
    return completions


def _generate_batch(model, prompts, params, eos_ids, pad_id, rngs, use_graph, prefill_tokens,
                    progress):
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    B, S, T = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    tokens = torch.full((B, S), pad_id, dtype=torch.long)  # [B, S] right-padded
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    tokens = tokens.to(device)

    # The last token ever fed back sits at position len_b - 1 + T - 1 <= S + T - 2. Lengths read by
    # attention are kept multiples of 64 slots, which the attention kernels' masks want.
    max_len = -(-(S + T - 1) // 64) * 64
    cache = KVCache.empty(model.cfg, B, max_len, dtype, device)
    state = DecodeState.empty(B, T, device)
    # Each row's LAST prompt token is fed by the first decode step, at its own position, which yields
    # the logits of its first new token (prefill computes no logits).
    uniforms = draw_uniforms(rngs, T) if params.temperature > 0 else torch.zeros(B, T, dtype=torch.float64)
    first = (tokens.gather(1, (lens - 1)[:, None]).squeeze(1), lens - 1, uniforms.to(device))
    eos = torch.tensor([*eos_ids, *params.stop_token_ids], dtype=torch.long, device=device)  # ids that end a row
    # Step t reads cache slots 0..S-1+t at most. Instead of the whole cache, attention reads one of a
    # few lengths (multiples of `width`, the last one max_len) that covers them: a graph each.
    width = -(-max_len // 4 // 64) * 64  # at most 4 lengths
    lengths = [min(max_len, width * (i + 1)) for i in range((S - 1) // width, (max_len - 1) // width + 1)]
    # On a GPU a decode step is a chain of small, latency-bound kernels: inductor fuses each layer's norms,
    # RoPE, activation and residual adds (model.cached_attention stays eager); dynamic shapes, so one
    # compile serves every batch size and cache length.
    block_step = compiled(Block.forward_step) if device.type == "cuda" else Block.forward_step  # one layer
    steps = {n: functools.partial(decode_step, model, state, cache, n, params, eos, block_step) for n in lengths}
    state.reset(*first)
    if use_graph:
        # Warm-up runs write junk into cache slot len_b - 1 only, the slot the first real step writes.
        pool = torch.cuda.graph_pool_handle()
        steps = {n: cuda_graph(step, lambda: state.reset(*first), pool) for n, step in steps.items()}

    # Prefill positions 0..S-2 (the padding of short rows writes junk above their prompt, which is
    # harmless: a query at position p reads slots 0..p only, and slot p is written by the step that reads it).
    positions = torch.arange(S, device=device).expand(B, S)  # [B, S]
    chunk = max(1, prefill_tokens // B)
    for s in range(0, S - 1, chunk):
        e = min(s + chunk, S - 1)
        model.fill_cache(tokens[:, s:e], positions[:, s:e], cache, e, block_step)

    n_done = 0
    for t in range(T):
        steps[next(n for n in lengths if n >= S + t)]()
        if (t + 1) % SYNC_EVERY == 0 or t == T - 1:
            now = int(state.done.sum())  # a host sync
            if progress is not None:
                progress.update(now - n_done)
            n_done = now
            if n_done == B:
                break
    if progress is not None:
        progress.update(B - n_done)

    out_tokens, out_logprobs, n_new, done = (x.tolist() for x in (state.tokens, state.logprobs, state.n_new,
                                                                   state.done))
    return [Completion(out_tokens[b][:n_new[b]], out_logprobs[b][:n_new[b]], "stop" if done[b] else "length")
            for b in range(B)]


class FusedLinear(nn.Module):
    """Several nn.Linear on the same input as one matmul, for an inference copy: their weights stacked
    into one [sum of out_features, in_features] tensor (biases likewise), the output split back.

    Each original parameter becomes a view into the stack, so writing a parameter by name (a weight
    sync) writes what the matmul reads. The stacks are non-persistent buffers: no new names in
    named_parameters() or state_dict().
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        self.register_buffer("weight", torch.cat([lin.weight.detach() for lin in linears]), persistent=False)
        has_bias = linears[0].bias is not None
        self.register_buffer("bias", torch.cat([lin.bias.detach() for lin in linears]) if has_bias else None,
                             persistent=False)
        for lin, w in zip(linears, self.weight.split(self.sizes)):
            lin.weight = nn.Parameter(w, requires_grad=False)
        if has_bias:
            for lin, b in zip(linears, self.bias.split(self.sizes)):
                lin.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, x) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, -1)


class FusedAttention(Attention):
    """An inference copy's attention: the same submodules, with q/k/v projected by one matmul."""

    def __init__(self, attn: Attention, cfg: ModelConfig):
        with torch.device("meta"):  # the fresh submodules are replaced right away: allocate nothing
            super().__init__(cfg)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.qkv_proj = FusedLinear(self.q_proj, self.k_proj, self.v_proj)

    def project(self, x):
        return self.qkv_proj(x)


class FusedMLP(MLP):
    """An inference copy's MLP: the same submodules, with gate and up projected by one matmul."""

    def __init__(self, mlp: MLP, cfg: ModelConfig):
        with torch.device("meta"):
            super().__init__(cfg)
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.gate_up_proj = FusedLinear(self.gate_proj, self.up_proj)

    def forward(self, x):
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def fuse_projections(model: Transformer):
    """One matmul for q/k/v and one for gate/up in every layer, for an inference copy (no training:
    the fused parameters are views that autograd and FSDP know nothing of).

    A decode step's matmuls are small and bound by launches and tile overheads rather than bytes:
    seven a layer take 44 µs at batch 256 for Qwen3-0.6B on an H100, the fused four 32 µs
    (bench/RESULTS.md, section 4). Each layer's attention and MLP are swapped for fused versions that
    hold the same submodules: parameter names and shapes are unchanged.
    """
    for layer in model.layers:
        layer.self_attn = FusedAttention(layer.self_attn, model.cfg)
        layer.mlp = FusedMLP(layer.mlp, model.cfg)


class Generator:
    """The inference copy of the policy (a `backend.RolloutBackend`): an unsharded model in `dtype`.

    The trainer owns the policy (fp32 master weights, sharded by FSDP2). After each optimizer step it
    streams the full parameters in with `update_weights`, one tensor at a time, so the sync costs one
    gathered tensor of extra memory, not a second full model. Between rollouts `release()` drops the
    copy so that training gets the memory back; the next `update_weights` rebuilds it.
    `keep_resident=True` keeps it instead (no rebuild, if memory allows).
    """

    def __init__(self, cfg: ModelConfig, eos_ids: list[int], pad_id: int, device="cpu", dtype=torch.bfloat16,
                 max_batch_size: int = 64, cuda_graphs: bool = True, keep_resident: bool = False):
        self.cfg, self.eos_ids, self.pad_id = cfg, list(eos_ids), pad_id
        self.device, self.dtype = torch.device(device), dtype
        self.max_batch_size, self.cuda_graphs, self.keep_resident = max_batch_size, cuda_graphs, keep_resident
        self.model: Transformer | None = None

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        """Copy every parameter, (name as in our model's state_dict, full tensor), into the copy.

        Each tensor is cast and moved as it is copied, and may be freed by the caller right after.
        Every parameter must arrive exactly once (`backend.checked_weights`).
        """
        if self.model is None:
            with torch.device("meta"):
                model = Transformer(self.cfg).to(self.dtype)
            model = model.to_empty(device=self.device).requires_grad_(False)  # allocated, not initialised
            fuse_projections(model)  # one matmul for q/k/v, one for gate/up; parameter names unchanged
            self.model = model
        params = dict(self.model.named_parameters())
        try:
            for name, tensor in checked_weights(named_tensors, {n: p.shape for n, p in params.items()}):
                params[name].copy_(tensor)
        except BaseException:
            self.model = None  # half-updated weights must never be sampled from
            raise

    def release(self):
        """Free the inference model (the KV cache lives only inside `generate`) unless kept resident."""
        if self.keep_resident:
            return
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the cached blocks back for training's own allocations

    def close(self):
        """Drop the inference copy for good."""
        self.model = None

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 seeds: list[int] | None = None, stop=None) -> list[Completion]:
        if self.model is None:
            raise RuntimeError("the generator holds no weights: call update_weights first")
        return generate(self.model, prompts, params, self.eos_ids, self.pad_id, self.max_batch_size,
                        self.cuda_graphs, progress=progress, seeds=seeds, stop=stop)
