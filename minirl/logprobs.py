"""Per-token log-probs and entropy of target tokens, computed in chunks over the sequence.

The policy-gradient loss needs log p(target) for every token, but the full logits of a micro-batch are
huge (16k tokens x 151,936 vocab in fp32 is 9.9 GB, and autograd would keep a softmax of the same size).
Here each chunk of tokens is projected, reduced to two numbers per token and dropped;
`torch.utils.checkpoint` recomputes the chunk's logits in backward instead of storing them.
`process_logits` is the one definition of the sampling distribution (temperature, top-k, top-p): the
generator samples from it and the trainer scores with it, so the two log-probs agree by construction.
"""

import functools

import torch
from torch.utils.checkpoint import checkpoint


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Logits [N, V] -> logits of the distribution actually sampled; removed tokens become -inf.
    temperature <= 0 (greedy decoding, which picks the argmax) leaves the logits unscaled."""
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    return logits


@torch.compiler.disable
def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p; the others become -inf.
    Eager even inside a compiled caller: inductor cannot generate the cumsum over a 150k-token vocabulary."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token if the mass before it already reaches top_p.
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _chunk_logprobs(h, weight, targets, temperature, top_k, top_p):
    logits = process_logits((h @ weight.t()).float(), temperature, top_k, top_p)  # [c, V]
    logp = logits.log_softmax(-1)
    target_logp = logp.gather(-1, targets[:, None]).squeeze(-1)  # [c]
    # Removed tokens have p = 0 and log p = -inf; zero their log p so 0 * -inf cannot make a NaN.
    entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)  # [c]
    return target_logp, entropy


@functools.cache
def compiled(fn):
    """torch.compile(fn, dynamic=True), created on first use (by a CUDA caller) and then reused: compiling
    imports inductor, seconds of CPU that processes that never compile (CPU runs, tests) do not pay."""
    return torch.compile(fn, dynamic=True)


def token_logprobs(hidden, weight, targets, temperature=1.0, top_k=0, top_p=1.0, chunk_size=2048):
    """hidden [T, D], weight [V, D], targets [T] -> (log p(target) [T], entropy [T]), both fp32. Peak
    extra memory is one chunk's [chunk_size, V] fp32 logits (and its softmax), not [T, V]."""
    # On GPUs the chunk's dozen elementwise passes over [chunk, V] fp32 (scale, softmax, gather, entropy)
    # are memory-bound; torch.compile fuses them into a few kernels. Compiled lazily, on first CUDA use.
    chunk_fn = compiled(_chunk_logprobs) if hidden.is_cuda else _chunk_logprobs
    out_lp, out_ent = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        args = (hidden[sl], weight, targets[sl], temperature, top_k, top_p)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            lp, ent = checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            lp, ent = chunk_fn(*args)
        out_lp.append(lp)
        out_ent.append(ent)
    return torch.cat(out_lp), torch.cat(out_ent)
