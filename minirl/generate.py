"""Batched generation with a static KV cache and continuous batching (the "naive" rollout backend),
and the inference copy of the policy that the trainer streams its weights into.

The cache has B rows ("slots"); requests wait in a queue and take a slot when one is free. A call
repeats three moves until every request is done:
- admit: waiting requests take the free slots (always the last ones, see `compact`); their prompts,
  right-padded, run through the model together (prefill) into those rows of the cache. Padding writes
  junk above a short prompt, which is harmless: a query at position p reads slots 0..p of its row
  only, and slot p is written by the step that reads it.
- decode: one token per row per step, each row at its own position and step index t (its t-th token is
  drawn with its t-th uniform number), until it samples a stop id or reaches its own limit. The step
  reads and writes only fixed tensors, so on a GPU it is captured as a CUDA graph (one per batch size).
  The host looks every SYNC_EVERY steps; a row finished in between steps on, uncounted.
- retire: finished rows are copied out and their slots freed; `compact` moves the rows in use onto the
  first slots, and the step runs on the smallest batch of B, ..., 16, 8 that holds them.
A completion depends on its prompt, seed and limit only, not on its slot or neighbours.

On a GPU attention reads each row's own filled slots (FlexAttention, kvcache.py), the layers' norms, RoPE
and activation and the sampler's passes run as torch.compile'd kernels, and the inference copy fuses its
projections (fused.py). Each token comes with its log-prob under `process_logits`' distribution, the one
the trainer scores with: the two differ only by numerics, which importance sampling corrects.
"""

import functools
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch

from minirl.backend import Completion, SamplingParams, check_limits, check_request, checked_weights
from minirl.fused import fuse_projections
from minirl.logprobs import compiled, process_logits
from minirl.kvcache import FLEX_BLOCK, KVCache, free_memory, rows_for_memory
from minirl.model import Block, ModelConfig, Transformer

SYNC_EVERY = 16  # decode steps between two looks (host syncs) at which rows have finished
MIN_BATCH = 8  # the smallest batch a shrinking tail steps at: a smaller step costs about the same
CPU_BATCH_SIZE = 64  # rows on a CPU when no batch size is given


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] (the head's dtype) -> probabilities [B, V] fp32 of the processed distribution."""
    return process_logits(logits.float(), temperature, top_k, top_p).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, u: torch.Tensor):
    """logits [B, V], u [B] float64 in (0, 1] -> (tokens [B], their log-probs [B] fp32).

    Inverse-CDF sampling with one uniform number per row (ignored when greedy), from the row's own Python
    RNG (`draw_uniforms`): a row's samples depend on its seed alone, not on its batch nor on the device.
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
    """[B, steps] float64 in (0, 1]: row b's number for its token t is the t-th draw of rngs[b]."""
    return torch.tensor([[1.0 - rng.random() for _ in range(steps)] for rng in rngs], dtype=torch.float64)


@dataclass
class Rows:
    """The decode state of the cache's B rows, device tensors updated in place (a CUDA graph replays a step
    on fixed memory: batch b's on `first(b)`, a view of rows 0..b-1). A row has finished once it is
    `stopped` or `t` reached its `limit`; a free slot holds limit 0. Column T takes finished rows' writes."""

    cur: torch.Tensor  # [B] the token the row feeds next
    pos: torch.Tensor  # [B] its position
    t: torch.Tensor  # [B] tokens sampled so far
    limit: torch.Tensor  # [B] the row's own max_new_tokens
    stopped: torch.Tensor  # [B] bool: it sampled a stop id (EOS or one of params.stop_token_ids)
    uniforms: torch.Tensor  # [B, T + 1] float64, see draw_uniforms
    tokens: torch.Tensor  # [B, T + 1] sampled tokens
    logprobs: torch.Tensor  # [B, T + 1] fp32, their log-probs

    @classmethod
    def empty(cls, B: int, T: int, device) -> "Rows":
        long = dict(dtype=torch.long, device=device)
        return cls(torch.zeros(B, **long), torch.zeros(B, **long), torch.zeros(B, **long), torch.zeros(B, **long),
                   torch.zeros(B, dtype=torch.bool, device=device),
                   torch.zeros(B, T + 1, dtype=torch.float64, device=device), torch.zeros(B, T + 1, **long),
                   torch.zeros(B, T + 1, device=device))

    def first(self, b: int) -> "Rows":
        return Rows(*(getattr(self, f.name)[:b] for f in fields(self)))

    def move(self, src: torch.Tensor, dst: torch.Tensor):
        """Rows src -> rows dst (index tensors of the same length, disjoint)."""
        for f in fields(self):
            x = getattr(self, f.name)
            x[dst] = x[src]


def decode_step(model: Transformer, rows: Rows, cache: KVCache, params: SamplingParams, stops: torch.Tensor,
                block_step):
    """Feed each row's current token, sample its next one and record it. `stops` [V] bool marks the ids
    that end a row (a table lookup: any number of ids, and no host sync, which graph capture forbids)."""
    live = ~rows.stopped & (rows.t < rows.limit)  # [b]
    logits = model.forward_step(rows.cur[:, None], rows.pos[:, None], cache, block_step=block_step)[:, 0]  # [b, V]
    u = rows.uniforms.gather(1, rows.t[:, None]).squeeze(1)  # [b]
    tokens, logprobs = sample(logits, params, u)  # [b], [b]
    rows.tokens.scatter_(1, rows.t[:, None], tokens[:, None])
    rows.logprobs.scatter_(1, rows.t[:, None], logprobs[:, None])
    rows.stopped |= live & stops[tokens]
    rows.t += live
    rows.pos += live  # a finished row stays where it is, rewriting one slot of its own
    rows.cur.copy_(tokens)


def cuda_graph(fn, reset, pool):
    """Capture fn() once as a CUDA graph (one launch for the whole step); returns the function that replays
    it. Capture must not see lazy initialisation (cuBLAS handles, workspaces, compilation), so fn first runs
    once for real, on a side stream, and reset() undoes that run (the capture itself runs nothing). Graphs
    that never run at the same time share one memory `pool` for their temporaries."""
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


def batch_sizes(B: int) -> list[int]:
    """The batches a call steps at: the powers of two from MIN_BATCH up to B, and B (a CUDA graph and a
    FlexAttention compile each; calls of another B share the powers of two)."""
    sizes, b = [], MIN_BATCH
    while b < B:
        sizes.append(b)
        b *= 2
    return sizes + [B]


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, eos_ids: list[int],
             pad_id: int, max_batch_size: int = 0, cuda_graphs: bool = True, prefill_tokens: int = 8192,
             progress=None, seeds: list[int] | None = None, stop=None, limits: list[int] | None = None,
             follow_up=None, max_context: int | None = None) -> list[Completion]:
    """Complete every prompt (a list of token ids): `backend.RolloutBackend.generate` on `model`.

    At most `max_batch_size` rows decode at once; 0 sizes the batch by memory on a GPU (`rows_for_memory`)
    and takes CPU_BATCH_SIZE on a CPU. `stop` is asked whenever the host looks at the rows; once it is
    True the call returns the completions finished before the first unfinished one. Every row holds a
    cache of `max_context` slots (default: the longest prompt + max_new_tokens). Prefill runs at most
    `prefill_tokens` rows x positions per forward, which bounds its activations. Reruns are exact on
    CPU; on GPU some kernels are not bitwise deterministic and a row's numbers depend on its batch size
    through the kernels chosen, so a near-tie between two tokens can flip from run to run.
    """
    seeds = check_request(prompts, params, model.cfg.vocab_size, seeds)
    T, limits = params.max_new_tokens, check_limits(limits, len(prompts), params.max_new_tokens)
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0 (0 = sized by memory), got {max_batch_size}")
    if not prompts:
        return []
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    # A row feeds positions up to len - 1 + limit (the last one once finished); a multiple of FLEX_BLOCK
    # slots, as FlexAttention's block mask wants.
    max_context = max_context or max(len(p) for p in prompts) + T
    width = -(-max_context // FLEX_BLOCK) * FLEX_BLOCK
    B = max_batch_size or (rows_for_memory(model.cfg, width, T, free_memory(device), dtype.itemsize)
                           if device.type == "cuda" else CPU_BATCH_SIZE)
    B = min(B, len(prompts))  # a follow-up takes the slot of the request it follows
    cache, rows = KVCache.empty(model.cfg, B, width, dtype, device), Rows.empty(B, T, device)
    stops = torch.zeros(model.cfg.vocab_size, dtype=torch.bool, device=device)  # [V]
    stops[[i for i in (*eos_ids, *params.stop_token_ids) if 0 <= i < model.cfg.vocab_size]] = True
    # On a GPU a decode step is a chain of small, latency-bound kernels: inductor fuses each layer's norms,
    # RoPE, activation and residual adds (model.cached_attention stays eager); dynamic shapes, so one
    # compile serves every batch size and cache length.
    block_step = compiled(Block.forward_step) if device.type == "cuda" else Block.forward_step  # one layer
    prompts, rngs = list(prompts), [random.Random(seed) for seed in seeds]
    pool = torch.cuda.graph_pool_handle() if cuda_graphs and device.type == "cuda" else None

    held: list[int | None] = [None] * B  # the request each slot holds (None: free)
    out: list[Completion | None] = [None] * len(prompts)
    waiting, steps, sizes, given = deque(range(len(prompts))), {}, batch_sizes(B), len(prompts)
    left = 0  # the most tokens a row in use may still sample (known at each look)
    while waiting or any(r is not None for r in held):
        if stop is not None and stop():
            break
        n = compact(rows, cache, held)
        new = [waiting.popleft() for _ in range(min(len(waiting), B - n))]
        if new:
            admit(model, [prompts[i] for i in new], [limits[i] for i in new], [rngs[i] for i in new], n,
                  rows, cache, params, pad_id, prefill_tokens, block_step)
            held[n:n + len(new)] = new
            left = max(left, *(limits[i] for i in new))
        b = min(s for s in sizes if s >= n + len(new))
        if b not in steps:
            steps[b] = make_step(model, rows.first(b), cache.rows(0, b), params, stops, block_step, pool)
        for _ in range(min(SYNC_EVERY, left)):
            steps[b]()
        finished, left = retire(rows, held, out)
        if progress is not None and finished:
            progress.update(len(finished))
        for i in finished if follow_up is not None else ():
            if (request := follow_up(i, out[i])) is None:
                continue
            prompt, seed, limit = request
            check_request([prompt], params, model.cfg.vocab_size, [seed])
            if not 1 <= limit <= T or len(prompt) + limit > max_context:
                raise ValueError(f"a follow-up of {len(prompt)} + {limit} tokens does not fit: max_new_tokens {T}, "
                                 f"max_context {max_context}")
            waiting.append(len(prompts))
            prompts.append(prompt)
            rngs.append(random.Random(seed))
            limits.append(limit)
            out.append(None)
    done = next((i for i, c in enumerate(out[:given]) if c is None), given)
    return out[:done]


def admit(model: Transformer, prompts: list[list[int]], limits: list[int], rngs: list[random.Random], start: int,
          rows: Rows, cache: KVCache, params: SamplingParams, pad_id: int, prefill_tokens: int, block_step):
    """Requests take the slots start, start + 1, ...: prefill their prompts into those rows of the cache (all
    but the last token, which the row's first decode step feeds) and set the rows' state."""
    device, k, S = cache.k.device, len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((k, S), pad_id, dtype=torch.long)  # [k, S] right-padded
    for j, p in enumerate(prompts):
        tokens[j, :len(p)] = torch.tensor(p)
    tokens, lens = tokens.to(device), torch.tensor([len(p) for p in prompts], device=device)  # [k, S], [k]
    view, positions = cache.rows(start, start + k), torch.arange(S, device=device).expand(k, S)  # [k, S]
    chunk = max(1, prefill_tokens // k)
    for s in range(0, S - 1, chunk):  # positions 0..S-2, each chunk reading the slots filled so far
        e = min(s + chunk, S - 1)
        model.fill_cache(tokens[:, s:e], positions[:, s:e], view, e, block_step)
    sl = slice(start, start + k)
    rows.cur[sl] = tokens.gather(1, (lens - 1)[:, None]).squeeze(1)
    rows.pos[sl] = lens - 1
    rows.t[sl] = 0
    rows.limit[sl] = torch.tensor(limits, device=device)
    rows.stopped[sl] = False
    if params.temperature > 0:  # each row draws the numbers of its own tokens only
        uniforms = torch.zeros(k, rows.uniforms.shape[1], dtype=torch.float64)  # [k, T + 1]
        for j, (rng, n) in enumerate(zip(rngs, limits)):
            uniforms[j, :n] = draw_uniforms([rng], n)[0]
        rows.uniforms[sl] = uniforms.to(device)


def make_step(model: Transformer, rows: Rows, cache: KVCache, params, stops, block_step, pool):
    """One decode step on `rows` (the first b rows) as a function; with a graph `pool`, captured as a
    CUDA graph right away, its warm-up run undone."""
    step = functools.partial(decode_step, model, rows, cache, params, stops, block_step)
    if pool is None:
        return step
    state = (rows.cur, rows.pos, rows.t, rows.stopped)  # what the warm-up run changes for good
    saved = [x.clone() for x in state]
    return cuda_graph(step, lambda: [x.copy_(y) for x, y in zip(state, saved)], pool)


def compact(rows: Rows, cache: KVCache, held: list[int | None]) -> int:
    """Move the rows in use onto slots 0..n-1 and return n: the free slots are then the last ones.
    A moved row takes its state and its cache row along (one layer at a time: a small temporary)."""
    n = sum(r is not None for r in held)
    src = [s for s in range(n, len(held)) if held[s] is not None]
    dst = [s for s in range(n) if held[s] is None][:len(src)]
    if src:
        src_t, dst_t = (torch.tensor(x, device=cache.k.device) for x in (src, dst))
        rows.move(src_t, dst_t)
        for x in (cache.k, cache.v):
            for layer in x:  # [B, Hkv, S_max, D]
                layer[dst_t] = layer[src_t]
        for s, d in zip(src, dst):
            held[d], held[s] = held[s], None
    rows.limit[n:] = 0  # a free slot never counts as live
    return n


def retire(rows: Rows, held: list[int | None], out: list[Completion | None]) -> tuple[list[int], int]:
    """Copy the finished rows out as Completions and free their slots; returns the requests finished and
    the most tokens a row still in use may sample."""
    n = max((s + 1 for s, r in enumerate(held) if r is not None), default=0)
    t, limit, stopped = torch.stack([rows.t[:n], rows.limit[:n], rows.stopped[:n].long()]).tolist()  # a host sync
    finished = [s for s in range(n) if held[s] is not None and (stopped[s] or t[s] >= limit[s])]
    if finished:
        idx = torch.tensor(finished, device=rows.t.device)
        tokens, logprobs = rows.tokens[idx].tolist(), rows.logprobs[idx].tolist()
        for j, s in enumerate(finished):
            out[held[s]] = Completion(tokens[j][:t[s]], logprobs[j][:t[s]], "stop" if stopped[s] else "length")
    done = sorted(held[s] for s in finished)
    for s in finished:
        held[s] = None
    return done, max((limit[s] - t[s] for s in range(n) if held[s] is not None), default=0)


class Generator:
    """The inference copy of the policy (a `backend.RolloutBackend`): an unsharded model in `dtype`.

    The trainer streams the full parameters in with `update_weights`, one tensor at a time, so the sync
    costs one gathered tensor of extra memory, not a second full model. Between rollouts `release()` drops
    the copy so that training gets the memory back (unless `keep_resident`); the next `update_weights`
    rebuilds it. `max_batch_size` 0 sizes the rows in flight by the memory free when a rollout starts.
    """

    def __init__(self, cfg: ModelConfig, eos_ids: list[int], pad_id: int, device="cpu", dtype=torch.bfloat16,
                 max_batch_size: int = 0, cuda_graphs: bool = True, keep_resident: bool = False):
        self.cfg, self.eos_ids, self.pad_id = cfg, list(eos_ids), pad_id
        self.device, self.dtype = torch.device(device), dtype
        self.max_batch_size, self.cuda_graphs, self.keep_resident = max_batch_size, cuda_graphs, keep_resident
        self.model: Transformer | None = None

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        """Copy every parameter, (our name, full tensor), exactly once, into the copy; each is cast and moved
        as it is copied, and may be freed by the caller right after (`backend.checked_weights`)."""
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
                 seeds: list[int] | None = None, stop=None, limits: list[int] | None = None, follow_up=None,
                 max_context: int | None = None) -> list[Completion]:
        if self.model is None:
            raise RuntimeError("the generator holds no weights: call update_weights first")
        return generate(self.model, prompts, params, self.eos_ids, self.pad_id, self.max_batch_size,
                        self.cuda_graphs, progress=progress, seeds=seeds, stop=stop, limits=limits,
                        follow_up=follow_up, max_context=max_context)
