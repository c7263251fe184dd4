"""Low-rank adapters (LoRA): train a small update B A next to each frozen weight W of the blocks.

A targeted projection computes y = x W^T + b + (alpha / r) (x A^T) B^T, with A [r, in] and B [out, r] the
only trainable parameters: gradients, their reduction and AdamW state are adapter-sized, while W stays
frozen, sharded by FSDP2 like any parameter. B starts at zero, so the adapted model starts as the base
model. `LoRALinear` is an nn.Linear that keeps W and b under their usual names and adds `lora_A` /
`lora_B`, so loading HF weights, FSDP2 sharding and the weight names the generators expect do not change.

Around the trainer:
- rollouts sample from merged weights W + (alpha / r) B A (`merged`), folded in as each full parameter
  is gathered: both generators stay plain models;
- the KL reference is the base model itself, the adapters switched off (`adapters_off`): no second copy;
- checkpoints hold the trainable parameters only; the export writes the merged model and the adapters in
  PEFT's format (`save_adapter`), which `peft.PeftModel.from_pretrained` loads onto the base model.
No dropout on the adapters: the trainer's log-probs must be those of the distribution the generator
sampled from (the first PPO ratio must be 1).
"""

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from minirl.hf import ours_to_hf

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear of a block
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapters a model gets: rank r, alpha (the update is scaled by alpha / r), the projections of
    every block that get one, and the seed of A's random start (the same on every rank)."""

    rank: int
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    seed: int = 0

    @classmethod
    def from_flags(cls, rank: int, alpha: float, targets: str, seed: int) -> "AdapterSpec | None":
        """From --lora-rank (0: None, full fine-tuning), --lora-alpha, --lora-targets (comma-separated), checked."""
        if rank == 0:
            return None
        spec = cls(rank, alpha, tuple(t.strip() for t in targets.split(",") if t.strip()), seed)
        spec.check()
        return spec

    def check(self):
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"--lora-targets: {', '.join(unknown) or 'none given'}; choose among {', '.join(TARGETS)}")
        if self.rank < 1:
            raise ValueError(f"--lora-rank must be >= 1 for adapters (0: none), got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0, got {self.alpha}")


class LoRALinear(nn.Linear):
    """A linear layer with a trainable low-rank update; `base`'s own weight and bias are kept, not copied."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        # Values come from `initial_adapters` (or a checkpoint); allocated where W is (meta: nothing).
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, **like))  # [out, r]
        self.scale = alpha / rank
        self.adapter_on = True

    def forward(self, x):  # x [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        if not self.adapter_on:
            return y
        return y + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_adapters(model: nn.Module, spec: AdapterSpec) -> nn.Module:
    """Swap every target projection of every block for a LoRALinear (in place; returns `model`). On the
    meta device nothing is allocated (a sharded model gets `initial_adapters` in its state dict)."""
    spec.check()
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if name in spec.targets:
                    setattr(parent, name, LoRALinear(child, spec.rank, spec.alpha))
    if next(model.parameters()).device.type != "meta":
        with torch.no_grad():
            for name, t in initial_adapters(model, spec.seed).items():
                model.get_parameter(name).copy_(t)
    return model


def initial_adapters(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor} of every adapter's starting value, the same on every rank for a seed: A
    uniform in +-1/sqrt(in) (nn.Linear's and PEFT's default), B zero (B A = 0; A lets B's gradient be non-zero)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            bound = 1 / math.sqrt(m.in_features)
            out[f"{name}.lora_A"] = torch.empty(m.lora_A.shape).uniform_(-bound, bound, generator=g)
            out[f"{name}.lora_B"] = torch.zeros(m.lora_B.shape)
    return out


def is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def freeze_base(model: nn.Module) -> None:
    """Only the adapters train: every other parameter gets no gradient (so no optimizer state either)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter(name))


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model, for the KL reference: every adapter skipped while inside (a no-op without adapters)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.adapter_on = False
    try:
        yield model
    finally:
        for m in layers:
            m.adapter_on = True


@torch.no_grad()
def merged(model: nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]],
           adapters: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Fold every adapter of `model` into its weight, in a stream of its full parameters
    (`fsdp.iter_full_params`): (name, W + (alpha/r) B A) instead of W, A and B, the base model's names.

    A module's W (and bias) come before its A and B (registration order) and are held until B does: one
    gathered tensor more, never a model. Consume it to the end on every rank (the gathers are collectives).
    With `adapters` (a dict), the full A and B are also put there under their names, for `save_adapter`.
    """
    scales = {name: m.scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    held = {}  # the current adapted module's tensors until its lora_B comes
    for name, t in named_tensors:
        module, _, leaf = name.rpartition(".")
        if module not in scales:
            yield name, t
        elif leaf != "lora_B":  # weight, bias, lora_A
            held[leaf] = t
        else:
            w, a = held.pop("weight"), held.pop("lora_A")
            if adapters is not None:
                adapters[f"{module}.lora_A"], adapters[name] = a.cpu(), t.cpu()
            # Out of place: from an unsharded model, iter_full_params yields the parameter itself.
            yield f"{module}.weight", torch.addmm(w, t, a, alpha=scales[module])  # [out, in]
            if "bias" in held:
                yield f"{module}.bias", held.pop("bias")


def save_adapter(out_dir: str, adapters: dict[str, torch.Tensor], model: nn.Module, base_model: str) -> None:
    """Write `adapters` (our names -> full tensors, as `merged` collects them) as a PEFT LoRA adapter
    directory for `base_model` (a path or hub id). PEFT names a tensor `base_model.model.<HF module
    name>.lora_A.weight`; A and B are stored as they are, and PEFT's scale lora_alpha / r is ours."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    rank = layers[0].lora_A.shape[0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": layers[0].scale * rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({name.rpartition(".")[2] for name, m in model.named_modules()
                                  if isinstance(m, LoRALinear)}),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    tensors = {f"base_model.model.{ours_to_hf(name)}.weight": t.contiguous() for name, t in adapters.items()}
    save_file(tensors, os.path.join(out_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
