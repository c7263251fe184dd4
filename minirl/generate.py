"""Batched generation with a static KV cache (the "naive" rollout backend), and the inference copy
of the policy that the trainer streams its weights into.

One batch of prompts is generated in two phases, as in gpt-fast:
- prefill: all prompts, right-padded to the longest, run through the model together and fill the KV
  cache. Padding writes junk into the cache above a row's prompt, which is harmless: a query at
  position p only reads slots 0..p of its row, and slot p is written by the step that reads it.
- decode: one token per row per step, each row at its own position (its current length). Shapes never
  change, so on a GPU the step is captured once as a CUDA graph and replayed, removing the per-kernel
  launch overhead that otherwise dominates one-token steps.

Every sampled token comes with its log-prob under the distribution it was drawn from, the one
`process_logits` defines (temperature, top-k, top-p). The trainer scores with the same function, so
the two log-probs differ only by numerics (bf16 vs fp32, kernels), which is what importance sampling
has to correct.
"""

import random
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from minirl.logprobs import process_logits
from minirl.model import KVCache, ModelConfig, Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0  # row i of a generate call samples from the stream of (seed, i), unless given its own

    def check(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")


@dataclass
class Completion:
    token_ids: list[int]  # ends with the EOS id when finish_reason == "stop" (as vLLM returns it)
    logprobs: list[float]  # log-prob of each token under the processed distribution it was sampled from
    finish_reason: str  # "stop" (an EOS id) or "length" (max_new_tokens)


def sample(logits: torch.Tensor, params: SamplingParams, rngs: list[random.Random]):
    """logits [B, V] fp32 -> (tokens [B], their log-probs [B]) under `process_logits`' distribution.

    Inverse-CDF sampling with one uniform number per row, drawn from that row's own RNG: a row's
    samples depend on its seed alone, not on the other rows of its batch, nor on the device (CPU and
    GPU draw the same numbers; only their probabilities differ by rounding).
    """
    logp = process_logits(logits, params.temperature, params.top_k, params.top_p).log_softmax(-1)  # [B, V]
    if params.temperature == 0:
        tokens = logp.argmax(-1)  # [B]
    else:
        u = torch.tensor([1.0 - rng.random() for rng in rngs], dtype=torch.float64, device=logits.device)  # (0, 1]
        cdf = logp.exp().double().cumsum(-1)  # [B, V]
        # The first token whose cumulative probability reaches u x total: token i is picked with
        # probability p_i, and a token of probability 0 (cdf flat there) never is.
        tokens = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:]).squeeze(-1)  # [B]
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


class CUDAGraphStep:
    """`model.forward_step` of one token per row, captured once as a CUDA graph and replayed.

    A graph replays fixed kernels on fixed memory, so inputs are copied into static buffers and the
    logits come back in a static buffer, overwritten by the next call. Build it BEFORE prefill: the
    warm-up runs write junk into cache slot 0 of every row, which prefill then overwrites.
    """

    def __init__(self, model: Transformer, cache: KVCache, batch: int):
        device = cache.k.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        # Warm up on a side stream, as capture requires (lazy initialisation must not be captured).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.forward_step(self.tokens, self.pos, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.forward_step(self.tokens, self.pos, cache)  # [B, 1, V]

    def __call__(self, tokens, pos):
        self.tokens.copy_(tokens)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_ids: list[int],
             pad_id: int, max_batch_size: int = 64, cuda_graphs: bool = True, prefill_tokens: int = 2048,
             progress=None, seeds: list[int] | None = None) -> list[Completion]:
    """Complete every prompt (a list of token ids); returns one Completion per prompt, in order.

    Prompts are generated `max_batch_size` rows at a time. Pick it from the KV cache a batch needs:
        2 * layers * kv_heads * head_dim * bytes * (longest prompt + max_new_tokens) per row,
    e.g. Qwen2.5-7B in bf16 (28 layers, 4 KV heads of 128) is 56 KiB a token, so 1.5k tokens take
    84 MiB a row and 64 rows 5.3 GiB; add the decode step's [B, V] fp32 logits and sampling buffers.
    Prefill runs at most `prefill_tokens` rows x positions per forward, because forward_step returns
    fp32 logits for every position ([rows, positions, V]: 2048 x 152k vocab is 1.2 GB), which prefill
    throws away. `progress` is anything with tqdm's `update(n)`; it counts finished completions.
    Each prompt samples from its own random stream: `seeds[i]` if given (one per prompt), else the
    stream of (params.seed, i). A completion thus depends on its prompt and seed only, not on
    max_batch_size or its neighbours, and a trainer can make rollouts independent of how prompts are
    spread over ranks by seeding each (step, prompt, sample) itself. Reruns are exact on CPU.
    On GPU some kernels are not bitwise deterministic (memory-efficient attention splits the keys), so
    a near-tie between two tokens can flip from run to run; torch.use_deterministic_algorithms(True)
    makes reruns exact, at a cost in speed.
    """
    params.check()
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    vocab = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has a token id outside the model's vocabulary [0, {vocab})")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    # A string seed is hashed (sha512), so every (seed, row) pair gets its own stream.
    rngs = [random.Random(f"{params.seed}:{i}" if seeds is None else seeds[i]) for i in range(len(prompts))]
    use_graph = cuda_graphs and model.embed_tokens.weight.device.type == "cuda"
    completions = []
    for start in range(0, len(prompts), max_batch_size):
        end = start + max_batch_size
        completions += _generate_batch(model, prompts[start:end], params, eos_ids, pad_id, rngs[start:end],
                                       use_graph, prefill_tokens, progress)
    return completions


def _generate_batch(model, prompts, params, eos_ids, pad_id, rngs, use_graph, prefill_tokens, progress):
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    B, S, T = len(prompts), max(len(p) for p in prompts), params.max_new_tokens
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    tokens = torch.full((B, S), pad_id, dtype=torch.long)  # [B, S] right-padded
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = torch.tensor(p)
    tokens = tokens.to(device)

    # The last token ever fed back sits at position len_b - 1 + T - 1 <= S + T - 2.
    cache = KVCache.empty(model.cfg, B, S + T - 1, dtype, device)
    if use_graph:
        step = CUDAGraphStep(model, cache, B)
    else:
        def step(tok, pos):
            return model.forward_step(tok, pos, cache)

    # Prefill positions 0..S-2. Each row's LAST prompt token is fed by the first decode step instead,
    # at its own position, which yields the logits of its first new token without picking them out
    # of the prefill's [B, S, V] logits.
    positions = torch.arange(S, device=device).expand(B, S)  # [B, S]
    chunk = max(1, prefill_tokens // B)
    for s in range(0, S - 1, chunk):
        e = min(s + chunk, S - 1)
        model.forward_step(tokens[:, s:e], positions[:, s:e], cache)

    cur = tokens.gather(1, (lens - 1)[:, None]).squeeze(1)  # [B] token to feed
    pos = lens - 1  # [B] its position
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    out_tokens = torch.zeros(B, T, dtype=torch.long, device=device)  # [B, T]
    out_logprobs = torch.zeros(B, T, device=device)  # [B, T]
    n_new = torch.zeros(B, dtype=torch.long, device=device)  # [B] tokens each row really generated
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    n_done = 0
    for t in range(T):
        logits = step(cur[:, None], pos[:, None])[:, 0]  # [B, V]
        cur, logprob = sample(logits, params, rngs)
        out_tokens[:, t], out_logprobs[:, t] = cur, logprob
        n_new += ~done  # finished rows keep decoding (fixed shapes) but their tokens are not counted
        done |= torch.isin(cur, eos)
        pos = pos + 1
        now = int(done.sum())  # one host sync per step; it buys the early exit
        if progress is not None:
            progress.update(now - n_done)
        n_done = now
        if n_done == B:
            break
    if progress is not None:
        progress.update(B - n_done)

    out_tokens, out_logprobs, n_new, done = (x.tolist() for x in (out_tokens, out_logprobs, n_new, done))
    return [Completion(out_tokens[b][:n_new[b]], out_logprobs[b][:n_new[b]], "stop" if done[b] else "length")
            for b in range(B)]


class Generator:
    """The inference copy of the policy: an unsharded model in `dtype` that rollouts are sampled from.

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
        Every parameter must arrive exactly once: a partial sync would silently mix two policies.
        """
        if self.model is None:
            with torch.device("meta"):
                model = Transformer(self.cfg).to(self.dtype)
            self.model = model.to_empty(device=self.device).requires_grad_(False)  # allocated, not initialised
        params = dict(self.model.named_parameters())
        seen = set()
        try:
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"update_weights: {name!r} is not a parameter of the model")
                if name in seen:
                    raise ValueError(f"update_weights: {name!r} was sent twice")
                if tensor.shape != params[name].shape:
                    raise ValueError(f"update_weights: {name!r} has shape {list(tensor.shape)}, "
                                     f"expected {list(params[name].shape)}")
                params[name].copy_(tensor)
                seen.add(name)
            if missing := params.keys() - seen:
                raise ValueError(f"update_weights: {len(missing)} parameters were not sent, "
                                 f"e.g. {sorted(missing)[0]!r}")
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
        """Drop the inference copy for good (the same interface as the vLLM backend's close)."""
        self.model = None

    def generate(self, prompts: list[list[int]], params: SamplingParams, progress=None,
                 seeds: list[int] | None = None) -> list[Completion]:
        if self.model is None:
            raise RuntimeError("the generator holds no weights: call update_weights first")
        return generate(self.model, prompts, params, self.eos_ids, self.pad_id, self.max_batch_size,
                        self.cuda_graphs, progress=progress, seeds=seeds)
