"""Ulysses sequence parallelism: attention over a packed micro-batch split across the sp ranks of a group.

Each of the sp ranks holds a contiguous slice of t = T/sp tokens of the same packed micro-batch.
Everything in a decoder layer works token by token except attention, which needs all earlier tokens
of the document. So just around attention, an all-to-all turns "my tokens, all heads" [t, H, D] into
"all tokens, my heads" [T, H/sp, D]; attention runs on whole documents for H/sp heads; a second
all-to-all turns the output back. Per layer each rank sends (sp-1)/sp of its own q, k, v and attention
output; nothing else crosses ranks.

Metadata without collectives: attention needs document boundaries (cu_seqlens) of the FULL
micro-batch. Every rank of the group already has the full micro-batch before slicing it, so
`shard_micro_batch` computes them once, before the model call, and they travel in AttnMeta through
forward. A checkpointed layer therefore recomputes with the very metadata its forward saw, and
backward issues nothing on the sp group but all-to-alls. (The peers' way, an all_gather of
position_ids inside every attention call, re-run in recompute, lives in scripts/repro_recompute_hang.py.)
"""

import torch
import torch.distributed as dist

from minirl.attention import AttnMeta, cu_seqlens_from_positions, varlen_attention


def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """[t, H, D] (my tokens, all heads) -> [T, H/sp, D] (all tokens, my heads)."""
    sp = dist.get_world_size(group)
    t, H, D = x.shape
    send = x.reshape(t, sp, H // sp, D).transpose(0, 1).contiguous()  # [sp, t, H/sp, D]: block j to rank j
    recv = torch.empty_like(send)  # [sp, t, H/sp, D]: block j holds rank j's tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape(sp * t, H // sp, D)


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[T, H/sp, D] (all tokens, my heads) -> [t, H, D] (my tokens, all heads)."""
    sp = dist.get_world_size(group)
    T, h, D = x.shape
    send = x.reshape(sp, T // sp, h, D).contiguous()  # [sp, t, H/sp, D]: block j = rank j's tokens
    recv = torch.empty_like(send)  # [sp, t, H/sp, D]: block j holds head group j of my tokens
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(T // sp, sp * h, D)


class SeqToHead(torch.autograd.Function):
    """The all-to-all as an autograd op: it only moves numbers, so its backward is the reverse move."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group), None


class HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group), None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """Causal attention for this rank's slice. q [t, H, D], k/v [t, Hkv, D] -> [t, H, D]."""
    group = meta.sp_group
    sp = dist.get_world_size(group)
    H, Hkv = q.shape[1], k.shape[1]
    if H % sp or (Hkv % sp and sp % Hkv):
        raise ValueError(f"Ulysses with sp={sp} needs sp to divide the {H} heads and to divide, "
                         f"or be a multiple of, the {Hkv} kv heads")
    if Hkv < sp:
        # Too few kv heads to split: repeat each in place, so rank j's one kv head is the one its
        # query heads j*H/sp .. (j+1)*H/sp - 1 use.
        k = k.repeat_interleave(sp // Hkv, dim=1)  # [t, sp, D]
        v = v.repeat_interleave(sp // Hkv, dim=1)
    q, k, v = (SeqToHead.apply(x, group) for x in (q, k, v))  # [T, H/sp, D], [T, max(Hkv/sp, 1), D]
    o = varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, meta.backend)  # [T, H/sp, D]
    return HeadToSeq.apply(o, group)  # [t, H, D]


def local_slice(x: torch.Tensor, sp_rank: int, sp_size: int, fill=0) -> torch.Tensor:
    """This rank's contiguous slice of a per-token tensor [T, ...], padded with `fill` to a multiple of sp.

    Use it for everything that goes with the tokens (targets, loss weights, advantages), so it lines
    up with the ids from `shard_micro_batch`; give padding a zero loss weight.
    """
    pad = -x.shape[0] % sp_size
    if pad:
        x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
    t = x.shape[0] // sp_size
    return x[sp_rank * t:(sp_rank + 1) * t]  # [t, ...]


def shard_micro_batch(input_ids: torch.Tensor, position_ids: torch.Tensor, sp_rank: int, sp_size: int,
                      backend: str, sp_group=None):
    """Pad, slice and describe one packed micro-batch for this SP rank.

    input_ids, position_ids: [T], the FULL micro-batch, identical on every rank of the sp group.
    Returns (input_ids [t], position_ids [t], meta, pad) with t = (T + pad) / sp.

    The `pad` padding tokens (id 0) form a document of their own, positions 0..pad-1, so they never
    attend to real tokens nor real tokens to them. cu_seqlens covers the full padded batch. With
    sp_size == 1 nothing is padded and meta has no group: plain attention.
    """
    if position_ids.numel() == 0 or int(position_ids[0]) != 0:
        raise ValueError("a packed micro-batch must be non-empty and start a document (position_ids[0] == 0)")
    if sp_size > 1 and sp_group is None:
        raise ValueError(f"sp_size={sp_size} needs the sp process group")
    pad = -position_ids.numel() % sp_size
    full_pos = torch.cat([position_ids, torch.arange(pad, dtype=position_ids.dtype, device=position_ids.device)])
    ids = local_slice(input_ids, sp_rank, sp_size)  # [t]
    pos = local_slice(full_pos, sp_rank, sp_size)  # [t]
    meta = AttnMeta(*cu_seqlens_from_positions(full_pos), backend=backend, sp_group=sp_group if sp_size > 1 else None)
    return ids, pos, meta, pad


def gather_tokens(x_local: torch.Tensor, group, pad: int = 0) -> torch.Tensor:
    """Per-token values of the whole micro-batch from every rank's slice: [t, ...] -> [T, ...].

    Drops the last `pad` entries (the padding `shard_micro_batch` added). For scoring and
    logging only; it is not differentiable: train on each rank's own tokens (see fsdp.py).
    """
    sp = dist.get_world_size(group)
    x_local = x_local.detach().contiguous()
    out = x_local.new_empty((sp * x_local.shape[0], *x_local.shape[1:]))  # [T, ...]
    dist.all_gather_into_tensor(out, x_local, group=group)
    return out[:out.shape[0] - pad]
