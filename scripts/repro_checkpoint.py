"""The reproducer's checkpoint-recompute scenarios (scripts/README.md): `count`, `tail_skew`, `fsdp_moe`.

Each runs one forward + backward of minirl's own model (all ranks one SP group, FSDP over all of
them, every block checkpointed): as is, with a tail whose saved tensors depend on the rank's tokens
(mechanism A, early stop), or with a mixture of experts that skips idle experts (mechanism B).
"""

from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import set_checkpoint_early_stop

from minirl import dist as mdist
from minirl.attention import AttnMeta, cu_seqlens_from_positions, pick_backend
from minirl.fsdp import shard_model
from minirl.ledger import Ledger
from minirl.model import MLP, Attention, Block, ModelConfig, Transformer, init_weights
from minirl.ulysses import local_slice, shard_micro_batch
from repro_launch import Scenario

LONG_DOC = 4  # tail_skew: documents at least this long get the extra tail op
N_EXPERTS, TOP_K = 4, 2  # fsdp_moe
MARKER = 1  # fsdp_moe: the token id routed to the last expert; it only occurs in rank 0's slice
HAS_REDUCE_UNUSED = hasattr(FSDPModule, "set_reduce_scatter_unused_params")  # torch 2.13 has it, 2.11 not


def gather_tokens(x_local: torch.Tensor, group, pad: int = 0) -> torch.Tensor:
    """Per-token values of the whole micro-batch from every rank's slice: [t, ...] -> [T, ...], without
    the last `pad` entries (the padding `shard_micro_batch` added). The peers' way to get document
    boundaries inside attention: an all-gather that activation recompute issues again."""
    sp = dist.get_world_size(group)
    x_local = x_local.detach().contiguous()
    out = x_local.new_empty((sp * x_local.shape[0], *x_local.shape[1:]))  # [T, ...]
    dist.all_gather_into_tensor(out, x_local, group=group)
    return out[:out.shape[0] - pad]


def tiny_config(n_layers: int) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, qk_norm=True, rope_theta=1000.0)


@dataclass
class InLayerMeta(AttnMeta):
    """AttnMeta plus this rank's own position_ids, for attention that rebuilds the boundaries itself."""

    local_position_ids: torch.Tensor | None = None  # [t]


def in_layer_meta(meta: AttnMeta, local_position_ids: torch.Tensor) -> InLayerMeta:
    return InLayerMeta(**{f.name: getattr(meta, f.name) for f in fields(AttnMeta)},
                       local_position_ids=local_position_ids)


def gathered_meta(meta: InLayerMeta) -> AttnMeta:
    """The peers' way: all_gather the position_ids of the whole micro-batch and find the documents
    again, here, inside the layer (and so inside its checkpoint: it runs again in recompute)."""
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(gather_tokens(meta.local_position_ids, meta.sp_group))
    return AttnMeta(cu_seqlens, max_seqlen, meta.backend, meta.sp_group)


class GatheringAttention(Attention):
    """minirl's attention, but ignoring the precomputed boundaries: the naive mode's attention."""

    def forward(self, x, cos, sin, meta: InLayerMeta):
        return super().forward(x, cos, sin, gathered_meta(meta))


class DocTail(nn.Module):
    """tail_skew's layer tail: an extra op on tokens of long documents, skipped where there are none.

    Skipping work that no token needs is an ordinary shortcut, but it makes the number of tensors
    the checkpointed region saves depend on this rank's tokens. The document lengths come from the
    FULL micro-batch's boundaries: precomputed (pregather) or rebuilt from an all_gather of the
    position_ids right here (naive), i.e. after the rank's last unconditionally saved tensor.
    """

    long_tokens = 0  # of the last call, for the report

    def forward(self, x: torch.Tensor, meta: AttnMeta) -> torch.Tensor:  # [t, D] -> [t, D]
        if isinstance(meta, InLayerMeta):
            meta = gathered_meta(meta)
        lengths = meta.cu_seqlens.diff()  # [B]
        per_token = lengths.repeat_interleave(lengths)  # [T]: each token's document length
        sp_rank, sp = dist.get_rank(meta.sp_group), dist.get_world_size(meta.sp_group)
        long = local_slice(per_token, sp_rank, sp) >= LONG_DOC  # [t]
        self.long_tokens = int(long.sum())  # for the report
        if self.long_tokens:  # data-dependent: saves silu's input and the mask only on some ranks
            x = x + F.silu(x) * long[:, None]
        return x


class TailSkewBlock(Block):
    """minirl's decoder layer followed by DocTail, all inside the block's checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tail = DocTail()

    def _forward(self, x, cos, sin, meta):
        return self.tail(super()._forward(x, cos, sin, meta), meta)


class MoE(nn.Module):
    """Top-k mixture of minirl MLPs that, like HF's MoE layers, runs only experts that got tokens.

    An expert that runs on no token of this rank has no gradient here; with `run_idle` it runs on
    an empty batch instead, so its gradient exists (all zeros) on every rank.
    """

    def __init__(self, cfg: ModelConfig, run_idle: bool):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, N_EXPERTS, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(N_EXPERTS))
        self.run_idle = run_idle
        self.tokens_per_expert: list[int] = []  # of the last call, for the report

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [t, D] -> [t, D]
        weight, chosen = self.gate(x).float().softmax(-1).topk(TOP_K, dim=-1)  # [t, k], [t, k]
        out = torch.zeros_like(x)
        self.tokens_per_expert = []
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # [n_e] each
            self.tokens_per_expert.append(token.numel())
            if token.numel() == 0 and not self.run_idle:
                continue
            y = expert(x[token]) * weight[token, slot, None].to(x.dtype)  # [n_e, D]
            out = out.index_add(0, token, y)
        return out


def route_marker_to_last_expert(model: Transformer):
    """Make fsdp_moe's routing certain: the last expert takes the MARKER tokens and nothing else.

    Channel 0 of every token embedding is -1, +1 for MARKER, and dominates the RMS-normalised hidden
    state; the last expert's gate row reads channel 0 only, so its score is large for MARKER tokens
    and very negative for all others. (In a real run an expert goes idle on one rank by chance.)
    """
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = -1.0
        model.embed_tokens.weight[MARKER, 0] = 1.0
        for layer in model.layers:
            row = layer.mlp.gate.weight[-1]
            row.zero_()
            row[0] = 2.0


def build_model(scenario: str, run_idle: bool, gather_in_layer: bool) -> Transformer:
    cfg = tiny_config(n_layers=2)
    model = Transformer(cfg)
    if scenario == "tail_skew":
        model.layers = nn.ModuleList(TailSkewBlock(cfg) for _ in range(cfg.num_hidden_layers))
    if gather_in_layer:
        for layer in model.layers:
            layer.self_attn = GatheringAttention(cfg)
    if scenario == "fsdp_moe":
        for layer in model.layers:
            layer.mlp = MoE(cfg, run_idle)
    init_weights(model, std=0.1, seed=0)
    if scenario == "fsdp_moe":
        route_marker_to_last_expert(model)
    return model


def micro_batch(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], position_ids [T]) of one packed micro-batch, the same on every rank.

    tail_skew: a long document fills the first half, short ones the second, so the ranks of the
    second half hold no long document. fsdp_moe: MARKER tokens at positions 1 and 3 only, which
    are in rank 0's slice for any sp up to 4.
    """
    lengths = {"count": [7, 1, 11], "tail_skew": [8, 2, 2, 2, 2], "fsdp_moe": [9, 7]}[scenario]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(MARKER + 1, 97, (sum(lengths),), generator=g)
    if scenario == "fsdp_moe":
        ids[[1, 3]] = MARKER
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids, pos


def run(args, d: mdist.Dist, ledger: Ledger, state=None):
    """One forward + backward of the scenario's model on this rank's slice, every collective recorded."""
    naive = args.mode == "naive"
    model = build_model(args.scenario, run_idle=args.all_experts, gather_in_layer=naive)
    # As training runs: bf16 compute on GPUs (torch's varlen kernel takes 16-bit inputs only), fp32 on CPU.
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=False, checkpointing="full")
    if args.reduce_unused:
        model.set_reduce_scatter_unused_params(True)
    ids, pos = (x.to(d.device) for x in micro_batch(args.scenario))
    lids, lpos, meta, _ = shard_micro_batch(ids, pos, d.sp_rank, d.sp_size, pick_backend(d.device), d.sp_group)
    if naive:
        meta = in_layer_meta(meta, lpos)
    targets = torch.roll(lids, -1)  # [t]: any tokens do, only the collectives of backward matter
    with set_checkpoint_early_stop(not args.no_early_stop):
        logprobs, _ = model(lids, lpos, meta, targets=targets)
        if args.scenario == "count":
            ledger.note(f"loss share: {-logprobs.sum().item():.6f}")
        if args.scenario == "tail_skew":
            ledger.note(f"tokens of documents >= {LONG_DOC} long: {model.layers[0].tail.long_tokens}")
        if args.scenario == "fsdp_moe":
            load = [block.mlp.tokens_per_expert for block in model.layers]
            ledger.note(f"tokens per expert, per layer: {load}")
        (-logprobs.sum()).backward()


SCENARIOS = {name: Scenario(run, ("naive", "pregather")) for name in ("count", "tail_skew", "fsdp_moe")}
