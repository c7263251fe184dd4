"""The reproducer's scenarios where ranks issue the same collectives in a different order or number
because of what differs between them (scripts/README.md): `compile_reorder`, `recompute_order`,
`rank_metrics`. Each has a naive mode that fails and a fixed mode that completes.

- compile_reorder: minirl's model with compiled blocks and operator-based (selective) checkpointing
  that keeps the Ulysses all-to-all's output, naming the op as a compiled graph calls it. The rank
  that holds the padding reads it on the host inside the block, which breaks its graph: that rank
  runs its blocks eagerly, where the peers' all-to-all (c10d) is another op, so its checkpoint
  recomputes the all-to-all while the compiled rank goes on to the backward all-to-alls and FSDP's
  reduce-scatter. minirl's all-to-all is the functional op in eager code too: the same decision.
- recompute_order: two expert-parallel MoE layers (an all_to_all each way) in checkpoints of their
  own, one per modality; each rank backpropagates its per-modality losses one at a time, in the order
  the modalities first appear in its batch, so the ranks recompute the two layers in opposite orders.
- rank_metrics: each rank reduces its metrics dict with one all_reduce over its own sorted keys (the
  shape of minirl's trainer.update), and one rank has no sample of a task this step: its vector is
  shorter.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.distributed.nn.functional import all_to_all_single
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from minirl import dist as mdist
from minirl import ulysses
from minirl.attention import AttnMeta
from minirl.config import ParallelConfig
from minirl.fsdp import shard_model
from minirl.ledger import Ledger
from minirl.model import MLP, Attention, Block, Transformer, init_weights
from minirl.ulysses import shard_micro_batch
from repro_checkpoint import tiny_config
from repro_launch import Scenario

# ---------------------------------------------------------------------------------------------------
# compile_reorder

CHECKPOINTING = ParallelConfig().checkpointing  # minirl's default ("selective")


class PeersAllToAll(torch.autograd.Function):
    """The all-to-all as the peers write it (an autograd Function around c10d's `dist.all_to_all_single`,
    minirl's own before it moved to functional collectives): eager code issues c10d's `alltoall_base_`,
    while dynamo turns the call into the functional `all_to_all_single` in a compiled graph."""

    @staticmethod
    def forward(ctx, x, group):  # [sp, ...]: block j goes to rank j
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # equal blocks: the move is its own adjoint
        return PeersAllToAll.apply(grad, ctx.group), None


def to_heads(xs: list[torch.Tensor], group, exchange: str) -> list[torch.Tensor]:
    """[t, h_i, D] -> [T, h_i/sp, D], q, k and v in one all-to-all: minirl's own (`functional`) or the
    same packing through PeersAllToAll (`c10d`)."""
    if exchange == "functional":
        return ulysses._seq_to_head(xs, group)
    sp, t, D = dist.get_world_size(group), xs[0].shape[0], xs[0].shape[-1]
    heads = [x.shape[1] // sp for x in xs]
    send = torch.cat([x.reshape(t, sp, h, D).transpose(0, 1) for x, h in zip(xs, heads)], dim=2)  # [sp, t, sum h, D]
    return list(PeersAllToAll.apply(send, group).reshape(sp * t, sum(heads), D).split(heads, dim=1))


def to_tokens(x: torch.Tensor, group, exchange: str) -> torch.Tensor:
    """[T, h, D] -> [t, h*sp, D], the reverse move."""
    if exchange == "functional":
        return ulysses._head_to_seq(x, group)
    sp, (T, h, D) = dist.get_world_size(group), x.shape
    recv = PeersAllToAll.apply(x.reshape(sp, T // sp, h, D), group)  # [sp, t, h, D]
    return recv.transpose(0, 1).reshape(T // sp, sp * h, D)


class DenseUlyssesAttention(Attention):
    """minirl's Ulysses attention for one causal sequence, SDPA over all of it. torch.compile traces it
    on CPUs (minirl's CPU path, SDPA per document, reads the lengths on the host and breaks the graph)."""

    def __init__(self, cfg, exchange: str):
        super().__init__(cfg)
        self.exchange = exchange

    def forward(self, x, cos, sin, meta):
        q, k, v = self.qkv(x, cos, sin)  # [t, H, Dh], [t, Hkv, Dh]
        sp = dist.get_world_size(meta.sp_group)
        if k.shape[1] < sp:  # as ulysses.attention does: repeat kv heads up to one per rank
            k, v = k.repeat_interleave(sp // k.shape[1], dim=1), v.repeat_interleave(sp // v.shape[1], dim=1)
        q, k, v = to_heads([q, k, v], meta.sp_group, self.exchange)  # [T, H/sp, Dh], [T, Hkv/sp, Dh]
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                           enable_gqa=True).transpose(0, 1)  # [T, H/sp, Dh]
        return self.o_proj(to_tokens(o, meta.sp_group, self.exchange).flatten(-2))  # [t, D]


class PaddedMeta(AttnMeta):
    """AttnMeta plus this rank's padding rows, [t] bool (none on most ranks)."""

    def __init__(self, meta: AttnMeta, pad_rows: torch.Tensor):
        super().__init__(meta.cu_seqlens, meta.max_seqlen, meta.backend, meta.sp_group, meta.sp_head_chunks)
        self.pad_rows = pad_rows
        self.has_pad = bool(pad_rows.any())  # a Python bool: torch.compile specialises on it


def keep_matmuls_and_all_to_all():
    """Operator-based checkpointing's contexts: keep the matmuls' outputs and the all-to-all's, as a
    compiled graph calls it (the functional op); recompute the rest."""
    aten = torch.ops.aten
    return create_selective_checkpoint_contexts([aten.mm.default, aten.addmm.default,
                                                 torch.ops._c10d_functional.all_to_all_single.default])


class ReorderBlock(Block):
    """minirl's decoder layer with DenseUlyssesAttention. The rank holding padding zeroes its rows,
    reading their count on the host (`int(...)`): inside a compiled block that is a graph break, so
    on that rank alone the block runs eagerly. naive: the peers' all-to-all, operator-based
    checkpointing; fixed: minirl's all-to-all, the same checkpointing; minirl: minirl's all-to-all
    and the Block's own checkpointing (minirl's default)."""

    def __init__(self, cfg, mode: str):
        super().__init__(cfg)
        self.self_attn = DenseUlyssesAttention(cfg, exchange="c10d" if mode == "naive" else "functional")
        self.mode = mode

    def _forward(self, x, cos, sin, meta):
        if meta.has_pad:
            n = int(meta.pad_rows.sum())  # the host read: a graph break
            x = torch.cat([x[:x.shape[0] - n], x.new_zeros(n, x.shape[1])])
        return super()._forward(x, cos, sin, meta)

    def forward(self, x, cos, sin, meta):
        if self.mode == "minirl":
            return super().forward(x, cos, sin, meta)
        return checkpoint(self._forward, x, cos, sin, meta, use_reentrant=False,
                          context_fn=keep_matmuls_and_all_to_all)


def compile_reorder_step(model, T: int, d: mdist.Dist, ledger: Ledger | None = None):
    """Forward + backward of one micro-batch of T tokens."""
    ids = torch.randint(2, model.embed_tokens.num_embeddings, (T,), generator=torch.Generator().manual_seed(T))
    lids, lpos, meta, _ = shard_micro_batch(ids.to(d.device), torch.arange(T, device=d.device), d.sp_rank, d.sp_size,
                                            "sdpa", d.sp_group)
    t = lids.shape[0]
    meta = PaddedMeta(meta, torch.arange(d.sp_rank * t, (d.sp_rank + 1) * t, device=d.device) >= T)
    if ledger is not None:
        ledger.note(f"step 2: padding rows here {int(meta.pad_rows.sum())}")
    logprobs, _ = model(lids, lpos, meta, targets=torch.roll(lids, -1))
    (-logprobs.sum()).backward()


def prepare_compile_reorder(args, d: mdist.Dist):
    """A 2-layer model over one SP group of all ranks, blocks compiled, and a first step with no
    padding: every rank compiles the same graphs (at start-up, before the ledger and its clock)."""
    cfg = tiny_config(n_layers=2)
    model = Transformer(cfg)
    model.layers = nn.ModuleList(ReorderBlock(cfg, args.mode) for _ in range(cfg.num_hidden_layers))
    init_weights(model, std=0.1, seed=0)
    for block in model.layers:  # as fsdp.build_sharded does: compiled inside its FSDP unit
        block.compile(backend=args.compile_backend)
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=False,
                checkpointing=CHECKPOINTING)  # the training default; only minirl's mode uses it
    compile_reorder_step(model, 4 * d.sp_size, d)
    return model


def run_compile_reorder(args, d: mdist.Dist, ledger: Ledger, model):
    """The second step, one token short: the last rank holds padding, and its blocks break."""
    ledger.note(f"step 1 compiled {counters['stats']['unique_graphs']} graph(s), "
                f"{sum(counters['graph_break'].values())} graph break(s)")
    compile_reorder_step(model, 4 * d.sp_size - 1, d, ledger)
    ledger.note(f"step 2: graph breaks so far {sum(counters['graph_break'].values())}")


# ---------------------------------------------------------------------------------------------------
# recompute_order

CAPACITY = {"text": 4, "image": 2}  # tokens each rank sends to each expert, per modality


class ExpertParallelMoE(nn.Module):
    """One expert per rank: every rank sends CAPACITY tokens to each rank's expert and gets the
    results back, an all_to_all each way (differentiable: their backward is an all_to_all too),
    and scales each token's result by its routing weight. That product saves the returned tokens,
    so backward begins by recomputing the layer, both all_to_alls included."""

    def __init__(self, cfg, group):
        super().__init__()
        self.router, self.expert, self.group = nn.Linear(cfg.hidden_size, 1), MLP(cfg), group

    def forward(self, x):  # [world * c, D]: block j goes to rank j's expert
        y = self.expert(all_to_all_single(torch.empty_like(x), x, group=self.group))
        return all_to_all_single(torch.empty_like(y), y, group=self.group) * self.router(x).sigmoid()


def modalities_in_order(rank: int) -> list[str]:
    """The modalities of this rank's batch in the order they first appear: text first on rank 0,
    image first on the others (their first sample is an image)."""
    return ["text", "image"] if rank == 0 else ["image", "text"]


def run_recompute_order(args, d: mdist.Dist, ledger: Ledger, state=None):
    """Both MoE layers run forward in the same order on every rank (text, then image), each in a
    non-reentrant checkpoint; backward follows the per-modality losses."""
    cfg = tiny_config(n_layers=1)
    torch.manual_seed(0)
    moe = nn.ModuleDict({m: ExpertParallelMoE(cfg, dist.group.WORLD) for m in CAPACITY}).to(d.device)
    g = torch.Generator().manual_seed(d.rank)
    out = {}
    for m, c in CAPACITY.items():
        x = torch.randn(d.world * c, cfg.hidden_size, generator=g).to(d.device)
        out[m] = checkpoint(moe[m], x, use_reentrant=False)
    losses = {m: out[m].float().square().mean() for m in modalities_in_order(d.rank)}
    ledger.note(f"per-modality losses, in batch order: {list(losses)}")
    if args.mode == "naive":  # one backward per loss, in this rank's order
        for loss in losses.values():
            loss.backward()
    else:  # one backward of their sum: autograd orders the layers by the graph, the same on every rank
        sum(losses[m] for m in sorted(losses)).backward()


# ---------------------------------------------------------------------------------------------------
# rank_metrics


def rank_samples(rank: int, step: int) -> list[tuple[str, float]]:
    """(task, reward) of this rank's samples: in step 2 only rank 0 drew a code prompt."""
    samples = [("math", 1.0), ("math", 0.0)]
    return samples + [("code", 1.0)] * (step == 1 or rank == 0)


def step_metrics(samples, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"loss": loss.float()}
    for task in sorted({task for task, _ in samples}):
        rewards = [r for t, r in samples if t == task]
        out[f"reward/{task}"] = loss.new_tensor(sum(rewards) / len(rewards), dtype=torch.float32)
    return out


def reduce_own_keys(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The naive reduction: this rank's keys, sorted, in one all_reduce (mean over ranks)."""
    keys = sorted(metrics)
    vec = torch.stack([metrics[k] for k in keys])  # [K]: K differs between ranks when keys do
    dist.all_reduce(vec)
    return dict(zip(keys, vec / dist.get_world_size()))


def reduce_agreed_keys(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Agree on the union of keys first (one small all_gather_object), then one all_reduce of
    (sum, count) per key: each key's mean over the ranks that have it."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(metrics))
    keys = sorted(set().union(*everyone))
    one = next(iter(metrics.values()))
    vec = torch.stack([torch.stack([metrics[k], one.new_ones(())]) if k in metrics else one.new_zeros(2)
                       for k in keys])  # [K, 2]: the same K everywhere
    dist.all_reduce(vec)
    return {k: s / c for k, (s, c) in zip(keys, vec)}


def run_rank_metrics(args, d: mdist.Dist, ledger: Ledger, state=None):
    """Two training steps, data parallel over every rank; each ends in its metrics reduction."""
    cfg = tiny_config(n_layers=1)
    model = Transformer(cfg)
    init_weights(model, std=0.1, seed=0)
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=False, checkpointing="none")
    g = torch.Generator().manual_seed(d.rank)
    for step in (1, 2):
        ids = torch.randint(2, cfg.vocab_size, (8,), generator=g).to(d.device)
        meta = AttnMeta(torch.tensor([0, 8], dtype=torch.int32, device=d.device), 8, "sdpa")
        logprobs, _ = model(ids, torch.arange(8, device=d.device), meta, targets=torch.roll(ids, -1))
        loss = -logprobs.mean()
        loss.backward()
        metrics = step_metrics(rank_samples(d.rank, step), loss.detach())
        ledger.note(f"step {step} metric keys: {sorted(metrics)}")
        reduced = (reduce_own_keys if args.mode == "naive" else reduce_agreed_keys)(metrics)
        ledger.note(f"step {step} reduced: {({k: round(v.item(), 4) for k, v in reduced.items()})}")


SCENARIOS = {
    "compile_reorder": Scenario(run_compile_reorder, ("naive", "fixed", "minirl"), prepare=prepare_compile_reorder),
    "recompute_order": Scenario(run_recompute_order, ("naive", "fixed"), sp_all=False),
    "rank_metrics": Scenario(run_rank_metrics, ("naive", "fixed"), sp_all=False),
}
