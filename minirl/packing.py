"""Packing a step's samples into micro-batches: which tokens go to which rank, in which forward.

Each mini-batch is planned over the dp ranks (`plan_micro_batches`), identically on every rank with no
communication; the sp ranks of a dp group run the same micro-batches, each on its slice of the tokens
(Ulysses). Every rank gets as many micro-batches (empty ones run as zero-weight dummies), so the
collectives inside forward and backward always pair up.
"""

from dataclasses import dataclass

import torch

from minirl import ulysses
from minirl.attention import AttnMeta
from minirl.dist import Dist
from minirl.rollouts import Sample


@dataclass
class MicroBatch:
    """Per-token tensors of one packed micro-batch, already sliced for this sp rank ([t] each)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    meta: AttnMeta
    targets: torch.Tensor
    mask: torch.Tensor  # 1.0 where the target is a completion token
    seq_ids: torch.Tensor  # index of the token's sequence among the step's samples
    gen_logprobs: torch.Tensor
    advantages: torch.Tensor | None = None  # per token, from the step's rewards (trainer.set_advantages)
    old_logprobs: torch.Tensor | None = None  # before the step's first update, when needed (trainer)
    ref_logprobs: torch.Tensor | None = None  # under the frozen reference model, with a KL penalty


def split_mini_batches(n_samples: int, n_mini: int) -> list[list[int]]:
    """Consecutive, equal mini-batches of sample indices (config.validate made n_mini divide n_samples)."""
    size = n_samples // n_mini
    return [list(range(k * size, (k + 1) * size)) for k in range(n_mini)]


def plan_micro_batches(lengths: list[int], dp_size: int, token_budget: int) -> list[list[list[int]]]:
    """Assign sequences (by index) to dp ranks and pack each rank's share into micro-batches: returns
    plan[rank][micro_batch] = sequence indices. Longest first, each to the rank with the fewest tokens so
    far, then first-fit decreasing under `token_budget`; ranks with fewer micro-batches get empty ones."""
    if max(lengths, default=0) > token_budget:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds micro_batch_tokens={token_budget}; "
                         f"raise --micro-batch-tokens or lower --max-new-tokens/--max-prompt-len")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shares, loads = [[] for _ in range(dp_size)], [0] * dp_size
    for i in order:
        r = min(range(dp_size), key=lambda k: (loads[k], k))
        shares[r].append(i)
        loads[r] += lengths[i]
    plan = []
    for share in shares:  # already longest first
        bins, room = [], []
        for i in share:
            fit = next((b for b in range(len(bins)) if room[b] >= lengths[i]), None)
            if fit is None:
                bins.append([])
                room.append(token_budget)
                fit = len(bins) - 1
            bins[fit].append(i)
            room[fit] -= lengths[i]
        plan.append(bins)
    n_micro = max(1, max(len(b) for b in plan))
    return [bins + [[] for _ in range(n_micro - len(bins))] for bins in plan]


def pack(samples: list[Sample], idx: list[int], pad_id: int, d: Dist, attn_backend: str) -> MicroBatch:
    """Concatenate sequences (prompt + completion, shifted by one for next-token targets) and slice
    them for this sp rank. An empty `idx` gives a one-token dummy with zero weight, so a rank with
    fewer micro-batches still joins every collective of forward and backward."""
    ids, pos, tgt, mask, seq, gen = [], [], [], [], [], []
    for i in idx:
        s = samples[i]
        full = s.prompt.token_ids + s.completion_ids
        P, L = len(s.prompt.token_ids), len(full) - 1  # inputs are full[:-1], targets full[1:]
        ids += full[:-1]
        pos += range(L)
        tgt += full[1:]
        mask += [0.0] * (P - 1) + ([1.0] * len(s.completion_ids) if s.mask is None else s.mask)
        seq += [i] * L
        gen += [0.0] * (P - 1) + s.gen_logprobs
    if not idx:
        ids, pos, tgt, mask, seq, gen = [pad_id], [0], [pad_id], [0.0], [0], [0.0]
    T = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    local_ids, local_pos, meta, _ = ulysses.shard_micro_batch(
        T(ids, torch.long), T(pos, torch.long), d.sp_rank, d.sp_size, attn_backend, d.sp_group)
    sl = lambda x, dt=torch.float32: ulysses.local_slice(T(x, dt), d.sp_rank, d.sp_size).to(d.device)  # noqa: E731
    meta.cu_seqlens = meta.cu_seqlens.to(d.device)
    return MicroBatch(local_ids.to(d.device), local_pos.to(d.device), meta, sl(tgt, torch.long), sl(mask),
                      sl(seq, torch.long), sl(gen))


def pack_mini_batch(samples: list[Sample], idx: list[int], d: Dist, token_budget: int, pad_id: int,
                    attn_backend: str) -> list[MicroBatch]:
    """This dp rank's packed micro-batches of the mini-batch `idx` (every rank gets as many)."""
    lengths = [len(samples[i].prompt.token_ids) + len(samples[i].completion_ids) - 1 for i in idx]
    plan = plan_micro_batches(lengths, d.dp_size, token_budget)[d.dp_rank]
    return [pack(samples, [idx[j] for j in micro], pad_id, d, attn_backend) for micro in plan]


def completion_coords(mb: MicroBatch, prompt_lens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each of the micro-batch's tokens sits among the step's completion tokens laid out [N, width]
    (`width` >= the longest completion): (its sample, its place in that completion), [t] each. A prompt
    or padding token (mask 0) gets a place clamped into range: callers leave those out by the mask."""
    col = mb.position_ids - (prompt_lens[mb.seq_ids] - 1)  # [t]: the target at position p is full[p + 1]
    return mb.seq_ids, col.clamp(0, width - 1)


def micro_logprobs(model, mb: MicroBatch, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """(log-probs [t], entropy [t]) of the micro-batch's targets under the processed distribution.
    Training passes the temperature only: a bf16 generator can sample a token just outside the fp32
    trainer's top-k/top-p set (log-prob -inf there); --tis-cap corrects the remaining gap."""
    return model(mb.input_ids, mb.position_ids, mb.meta, targets=mb.targets, temperature=temperature,
                 top_k=top_k, top_p=top_p)
