"""Ulysses sequence parallelism: attention over a packed micro-batch split across the sp ranks of a group.

Each of the sp ranks holds a contiguous slice of t = T/sp tokens of the same packed micro-batch.
Everything in a decoder layer works token by token except attention, which needs all earlier tokens of
the document. So just around attention, an all-to-all turns "my tokens, all heads" [t, H, D] into "all
tokens, my heads" [T, H/sp, D] (q, k and v together, in one call); attention runs on whole documents for
H/sp heads; a second all-to-all turns the output back. Nothing else crosses ranks.

Metadata without collectives: attention needs the document boundaries (cu_seqlens) of the FULL
micro-batch, which every rank of the group has before slicing it: `shard_micro_batch` computes them
once, before the model call, and they travel in AttnMeta through forward. A checkpointed layer thus
recomputes with the very metadata its forward saw, and backward issues nothing on the sp group but
all-to-alls. (The peers' way, an all_gather of position_ids inside every attention call, re-run in
recompute, lives in scripts/repro_recompute_hang.py.)
"""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from minirl.attention import AttnMeta, cu_seqlens_from_positions, varlen_attention


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Block j of x (dim 0, sp equal blocks) goes to rank j; block j of the result came from rank j.
    Differentiable (the gradient takes the reverse trip) and asynchronous: the result is waited for where
    it is first used, so transfers started together overlap the compute before it (`attention`)."""
    return funcol.all_to_all_single_autograd(x.contiguous(), None, None, group)


def _seq_to_head(xs: list[torch.Tensor], group) -> list[torch.Tensor]:
    """[t, h_i, D] for each x_i (my tokens, all heads) -> [T, h_i/sp, D] (all tokens, my heads), in ONE
    all-to-all: rank j's block holds head group j of every x_i side by side (q, k, v: one latency)."""
    sp = dist.get_world_size(group)
    t, D = xs[0].shape[0], xs[0].shape[-1]
    heads = [x.shape[1] // sp for x in xs]
    send = torch.cat([x.reshape(t, sp, h, D).transpose(0, 1) for x, h in zip(xs, heads)], dim=2)  # [sp, t, sum h, D]
    recv = _all_to_all(send, group)  # [sp, t, sum h, D]: block j holds rank j's tokens
    return list(recv.reshape(sp * t, sum(heads), D).split(heads, dim=1))  # [T, h_i, D]


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """[T, h, D] (all tokens, my heads) -> [t, h*sp, D] (my tokens, all heads); the reverse move."""
    sp = dist.get_world_size(group)
    T, h, D = x.shape
    recv = _all_to_all(x.reshape(sp, T // sp, h, D), group)  # [sp, t, h, D]: block j holds head group j of my tokens
    return recv.transpose(0, 1).reshape(T // sp, sp * h, D)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
    """Causal attention for this rank's slice. q [t, H, D], k/v [t, Hkv, D] -> [t, H, D].

    meta.sp_head_chunks > 1 splits each rank's share of the heads (its kv heads too) into that many chunks
    and starts every chunk's all-to-all at once: chunk c's attention computes while chunk c+1's q/k/v and
    chunk c-1's output are in flight (forward and recompute; backward waits where autograd issues them).
    """
    group, head_chunks = meta.sp_group, meta.sp_head_chunks
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
    if (k.shape[1] // sp) % head_chunks:
        raise ValueError(f"{head_chunks} head chunks do not divide the {k.shape[1] // sp} kv heads of a rank")
    # Chunk c of every rank's share: [t, sp, heads per rank, D] -> [t, sp * heads per chunk, D]
    chunks = [x.unflatten(1, (sp, head_chunks, -1)).unbind(2) for x in (q, k, v)]
    moved = [_seq_to_head([qc.flatten(1, 2), kc.flatten(1, 2), vc.flatten(1, 2)], group)
             for qc, kc, vc in zip(*chunks)]  # every transfer started: [T, H/sp/chunks, D], ...
    outs = [_head_to_seq(varlen_attention(qc, kc, vc, meta.cu_seqlens, meta.max_seqlen, meta.backend), group)
            for qc, kc, vc in moved]  # [t, sp * H/sp/chunks, D] each
    return torch.stack([o.unflatten(1, (sp, -1)) for o in outs], dim=2).flatten(1, 3)  # [t, H, D]


def local_slice(x: torch.Tensor, sp_rank: int, sp_size: int, fill=0) -> torch.Tensor:
    """This rank's contiguous slice of a per-token tensor [T, ...], padded with `fill` to a multiple of sp:
    for what goes with the tokens (targets, loss weights: 0 for padding), lined up with `shard_micro_batch`."""
    pad = -x.shape[0] % sp_size
    if pad:
        x = torch.cat([x, x.new_full((pad, *x.shape[1:]), fill)])
    t = x.shape[0] // sp_size
    return x[sp_rank * t:(sp_rank + 1) * t]  # [t, ...]


def shard_micro_batch(input_ids: torch.Tensor, position_ids: torch.Tensor, sp_rank: int, sp_size: int,
                      backend: str, sp_group=None):
    """Pad, slice and describe one packed micro-batch for this SP rank: input_ids, position_ids [T], the FULL
    micro-batch, identical on every rank of the sp group -> (input_ids [t], position_ids [t], meta, pad),
    t = (T + pad) / sp. The `pad` padding tokens (id 0) form a document of their own, so they never attend
    to real tokens nor real tokens to them. With sp_size == 1 nothing is padded and meta has no group.
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
