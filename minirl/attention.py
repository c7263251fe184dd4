"""Causal attention over packed sequences ("varlen"), with the backend chosen once per run.

A packed batch concatenates several documents into one [T, H, D] tensor; `cu_seqlens` ([B+1], int32)
marks where each document starts, so no token attends across a document boundary and no padding is
wasted. Three backends compute the same thing:
- "flash":  flash-attn-4's kernels (optional extra, CUDA only; docs/flash_attn.md), registered here as
            the torch op `minirl::flash_varlen_attn`;
- "varlen": torch's own `torch.nn.attention.varlen.varlen_attn` (CUDA only; causal is a sliding window
            reaching all the way left and zero to the right, `(-1, 0)`);
- "sdpa":   `scaled_dot_product_attention` once per document (runs everywhere; the CPU path).
`pick_backend` chooses the first that works on the device, unless an argument or the MINIRL_ATTN
environment variable forces one. flash-attn-4 comes first because it was never slower (on an H200,
1.14 ms vs varlen's 2.06 for 16k tokens in 2k-token documents; bench/RESULTS.md).
"""

import functools
import importlib.util
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("flash", "varlen", "sdpa")


@dataclass
class AttnMeta:
    """What every attention layer needs to know about the packed micro-batch, computed once per batch and
    passed through the model's forward (no module state): a checkpointed layer recomputes with the same."""

    cu_seqlens: torch.Tensor  # [B+1] int32 over the FULL packed sequence (all SP ranks)
    max_seqlen: int
    backend: str = "sdpa"
    sp_group: object = None  # a ProcessGroup: Ulysses sequence parallelism when not None
    sp_head_chunks: int = 1  # Ulysses: each rank's heads in this many chunks, transfers overlapping attention


def _available(backend: str, device: torch.device) -> bool:
    if backend == "sdpa":
        return True
    if device.type != "cuda":
        return False
    if backend == "flash":
        return _flash_kernels() is not None
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _flash_kernels():
    """flash-attn-4's forward and backward functions (the building blocks under its autograd.Function), or
    None where they cannot be imported. Importing them, not finding a `flash_attn` package, is the check:
    flash-attn-4's `flash_attn` is a namespace package, and its CuTe DSL (`cutlass`) may be missing."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except ImportError:
        return None
    return _flash_attn_fwd, _flash_attn_bwd


def pick_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend to use on `device`: `requested`, else $MINIRL_ATTN, else the fastest available."""
    requested = requested or os.environ.get("MINIRL_ATTN") or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
        if not _available(requested, device):
            raise ValueError(f"attention backend {requested!r} is not available on {device} "
                             f"(flash needs CUDA and flash-attn-4, see docs/flash_attn.md; varlen needs CUDA)")
        return requested
    return next(b for b in BACKENDS if _available(b, device))


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, backend: str) -> torch.Tensor:
    """Causal attention within each packed document. q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D]."""
    if backend == "flash":
        return flash_varlen_attn(q, k, v, cu_seqlens, max_seqlen)[0]  # (out, lse)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn
        gqa = {"enable_gqa": True} if _varlen_takes_enable_gqa() else {}  # also fine with equal head counts
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=(-1, 0), **gqa)
    return _sdpa_per_document(q, k, v, cu_seqlens)


# ---------------------------------------------------------------------------------------------------
# flash-attn-4 as a torch op
#
# flash-attn-4's public function is an autograd.Function around Python that compiles CuTe kernels on the
# fly, which dynamo cannot trace. Registered as an opaque op with its backward and its output shapes
# ("fake" functions), a compiled block compiles around it, and checkpoint policies can name it.


@torch.library.custom_op("minirl::flash_varlen_attn", mutates_args=())
def flash_varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn-4's causal varlen forward: q [T, H, D], k/v [T, Hkv, D] -> (out [T, H, D], lse [H, T] fp32)."""
    forward, _ = _flash_kernels()
    out, lse = forward(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                       max_seqlen_k=max_seqlen, causal=True, return_lse=True)[:2]
    return out, lse


@flash_varlen_attn.register_fake
def _(q, k, v, cu_seqlens, max_seqlen):  # contiguous, as the kernel allocates them
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("minirl::flash_varlen_attn_backward", mutates_args=())
def flash_varlen_attn_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `flash_varlen_attn` from the forward's inputs, output and lse."""
    _, backward = _flash_kernels()
    dq, dk, dv = backward(q, k, v, out, dout, lse, causal=True, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                          max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)[:3]
    return dq, dk, dv


@flash_varlen_attn_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_seqlen = max_seqlen


def _flash_backward(ctx, dout, dlse):  # lse is a by-product: nothing downstream differentiates it
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_varlen_attn_backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None


flash_varlen_attn.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def kernel_ops() -> set:
    """The attention kernels as the ops a dispatcher sees (torch's varlen op, flash-attn-4's, SDPA's
    fused ones): what selective activation checkpointing keeps rather than recomputes (model.py)."""
    aten = torch.ops.aten
    ops = {torch.ops.minirl.flash_varlen_attn.default, aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default}
    if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
        importlib.import_module("torch.nn.attention.varlen")  # registers torch_attn::_varlen_attn
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    return ops


@functools.cache
def _varlen_takes_enable_gqa() -> bool:
    """torch 2.11's varlen_attn takes fewer kv heads as they come; from 2.13 (at the latest) it refuses
    them unless called with enable_gqa=True, an argument 2.11 does not have."""
    from torch.nn.attention.varlen import varlen_attn
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _sdpa_per_document(q, k, v, cu_seqlens) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # host sync; fine on CPU, where this runs
    out = []
    # split (not slicing in a loop): its backward is one concatenation, not a zero-filled
    # full-size gradient per document.
    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        od = F.scaled_dot_product_attention(qd.transpose(0, 1), kd.transpose(0, 1), vd.transpose(0, 1),
                                            is_causal=True, enable_gqa=True)  # [H, L, D]
        out.append(od.transpose(0, 1))  # [L, H, D]
    return torch.cat(out, dim=0)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries of a packed batch, where position ids are 0: position_ids [T] over the full
    packed sequence -> (cu_seqlens [B+1] int32, max_seqlen)."""
    T = position_ids.numel()
    starts = torch.nonzero(position_ids == 0).flatten()
    end = torch.tensor([T], device=position_ids.device)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # one host sync per batch
    return cu_seqlens, max_seqlen
