"""FSDP2 sharding of the model over every rank, and the helpers that have to know about it.

Each decoder block is one FSDP unit (its parameters are gathered just before it runs and freed right
after), and the root unit holds the rest: embeddings, final norm, output head. Parameters become
DTensors sharded on dim 0 over all W ranks, whatever the dp x sp grid.

Gradient scale. FSDP averages gradients over its ranks by default: right when every rank computes the
MEAN loss of its own batch, wrong for us twice, since sp ranks hold different tokens of the same
sequences and the RL losses normalise by counts over the whole step. minirl makes every rank's loss an
exact share of the global loss (per-token weights normalised by GLOBAL counts), so the global loss is
the plain SUM of rank losses and its gradient the SUM of rank gradients: FSDP is told to sum, with
`set_gradient_divide_factor(1.0)` and `set_force_sum_reduction_for_comms(True)` (a plain ReduceOp.SUM
on NCCL and gloo alike; a factor alone would ask for PREMUL_SUM, which gloo lacks). The gradient then
equals a single process's on the same global batch for any dp x sp (tests/test_fsdp.py).
"""

from typing import Iterable, Iterator

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from minirl import lora
from minirl.config import compiled_blocks
from minirl.dist import Dist
from minirl.model import ModelConfig, Transformer


def shard_model(model: Transformer, mesh: DeviceMesh, mixed_precision: bool, cpu_offload: bool,
                checkpointing: str) -> Transformer:
    """Shard `model` in place over the 1-D `mesh` of all ranks (`Dist.fsdp_mesh`); returns it.

    mixed_precision: compute in bf16 (parameters are gathered in bf16), reduce gradients in fp32, keep fp32
    master weights. cpu_offload: the sharded parameters, gradients and optimizer state in CPU memory (the
    optimizer step runs on CPU). checkpointing: what every block recomputes in backward (model.Block).
    """
    if mesh.ndim != 1:
        raise ValueError(f"shard over a 1-D mesh of all ranks (Dist.fsdp_mesh), got a {mesh.ndim}-D mesh")
    model.set_checkpointing(checkpointing)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    # Pinned host memory needs an accelerator.
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else OffloadPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def build_sharded(cfg: ModelConfig, state_dict: dict, d: Dist, pcfg, train: bool,
                  adapters: lora.AdapterSpec | None = None) -> Transformer:
    """A sharded model on this rank's device, filled from a full (CPU) state dict; `pcfg` is the
    run's ParallelConfig (compile, cpu_offload, checkpointing). With `adapters`, LoRA adapters on a
    frozen base: only they train (minirl/lora.py)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if adapters is not None:
        lora.add_adapters(model, adapters)
        state_dict = {**state_dict, **lora.initial_adapters(model, adapters.seed)}
    if compiled_blocks(pcfg, d.device.type):
        for block in model.layers:  # fuses norms, RoPE, SwiGLU; the FSDP hooks stay outside the graph
            block.compile()
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=pcfg.cpu_offload,
                checkpointing=pcfg.checkpointing if train else "none")
    model.to_empty(device="cpu" if pcfg.cpu_offload else d.device)
    # Every rank passes the full tensors; each keeps only its own shard.
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
    model.train(train)
    model.requires_grad_(train)
    if adapters is not None:
        lora.freeze_base(model)
    return model


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most max_norm; returns the norm before clipping, as a
    plain tensor (torch's clip_grad_norm_ combines the DTensor shards' norms and returns a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@torch.no_grad()
def iter_full_params(model: torch.nn.Module, dtype: torch.dtype | None = torch.bfloat16
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full parameter) one at a time, in `named_parameters` order, cast to `dtype`, on the
    compute device (also with CPU offload). Each all-gathers one parameter, so peak extra memory is one
    full tensor, not a model; a collective: EVERY rank iterates to the end, even one that keeps nothing."""
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            # Cast the shard before gathering: a bf16 gather moves half the bytes of an fp32 one.
            p = p.to(device=p.device_mesh.device_type, dtype=dtype or p.dtype).full_tensor()
        yield name, p.detach().to(dtype=dtype or p.dtype)
