"""Multi-rank checks of minirl/dist.py, fsdp.py and ulysses.py against single-process references.

`torchrun --nproc-per-node 2 parallel_worker.py --out DIR`: layouts dp2 and sp2 (also with LoRA adapters),
iter_full_params.
`torchrun --nproc-per-node 4 parallel_worker.py --out DIR`: layouts dp2 x sp2 and sp4 (the 2 kv heads
repeated to 4), and the ledger of collectives (minirl/ledger.py). Every rank writes DIR/rank{r}.json (see common.py).

The reference for every layout is the same single-process, unsharded model taking one SGD step on the
whole global batch (both micro-batches), with clipping done by hand; it runs on each rank, no
collectives involved.
"""

import os
import sys

import torch
import torch.distributed as dist
from common import MICRO_BATCHES, Report, full_meta, make_model, parse_args, packed, rel_err, tiny_config

from minirl import dist as mdist
from minirl import lora
from minirl.attention import varlen_attention
from minirl.fsdp import clip_grad_norm_, iter_full_params, shard_model
from minirl.ledger import Ledger
from minirl.ulysses import _seq_to_head, attention, local_slice, shard_micro_batch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts"))
from repro_recompute_hang import gather_tokens  # noqa: E402  (the reproducer's all-gather of the peers' way)

SEED, LR, TOL = 0, 0.5, 1e-5


def adapted_model(cfg):
    """The test model with LoRA adapters on every projection, base frozen; B random, so that A's
    gradient is not zero (it is B^T G)."""
    model = lora.add_adapters(make_model(cfg, SEED), lora.AdapterSpec(rank=4, alpha=8.0, seed=SEED))
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    lora.freeze_base(model)
    return model


def reference_step(cfg, device="cpu", adapters=False):
    """Loss, gradients, gradient norm, clipped gradients and SGD-updated parameters, unsharded.
    With `adapters`, only the adapters have gradients, and the updated base equals the initial one."""
    model = (adapted_model(cfg) if adapters else make_model(cfg, SEED)).to(device)
    batches = [[x.to(device) for x in packed(lengths, seed=i)] for i, lengths in enumerate(MICRO_BATCHES)]
    n_tokens = sum(mask.sum() for *_, mask in batches)
    loss = 0.0
    for ids, pos, tgt, mask in batches:
        lp, _ = model(ids, pos, full_meta(pos), targets=tgt)
        mb_loss = (mask / n_tokens * -lp).sum()
        mb_loss.backward()
        loss += mb_loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    max_norm = 0.5 * norm.item()  # so that clipping really scales
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    clipped = {n: g * scale for n, g in grads.items()}
    params = {n: p.detach() - LR * clipped[n] if n in clipped else p.detach() for n, p in model.named_parameters()}
    return dict(loss=loss, grads=grads, norm=norm.item(), max_norm=max_norm, clipped=clipped, params=params)


def local_batches(d: mdist.Dist, backend="sdpa"):
    """This rank's slices of its dp group's micro-batches, loss weights normalised by the GLOBAL count."""
    local = []
    for i in range(d.dp_rank, len(MICRO_BATCHES), d.dp_size):
        ids, pos, tgt, mask = (x.to(d.device) for x in packed(MICRO_BATCHES[i], seed=i))
        lids, lpos, meta, _ = shard_micro_batch(ids, pos, d.sp_rank, d.sp_size, backend, d.sp_group)
        local.append((lids, lpos, meta, local_slice(tgt, d.sp_rank, d.sp_size),
                      local_slice(mask, d.sp_rank, d.sp_size, fill=0.0)))
    count = torch.stack([mask.sum() for *_, mask in local]).sum()
    dist.all_reduce(count)  # every target token lives on exactly one rank
    return [(ids, pos, meta, tgt, mask / count) for ids, pos, meta, tgt, mask in local]


def forward_backward(model, batches) -> torch.Tensor:
    """Sum of this rank's shares of the loss over its micro-batches (gradients accumulate)."""
    losses = []
    for ids, pos, meta, tgt, weight in batches:
        lp, _ = model(ids, pos, meta, targets=tgt)
        loss = (weight * -lp).sum()
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def worst(got: dict, want: dict) -> tuple[float, str]:
    return max((rel_err(got[n], want[n]), n) for n in want)


def check_layout(report: Report, ref: dict, cfg, sp: int, checkpointing: str, mixed_precision=False,
                 cpu_offload=False, tol=TOL, backend="sdpa", adapters=False):
    d = mdist.build_dist(sp)
    name = f"equiv/{'lora-' * adapters}dp{d.dp_size}-sp{sp}-ckpt_{checkpointing}" + "-bf16" * mixed_precision \
        + "-offload" * cpu_offload + f"-{backend}" * (backend != "sdpa")
    first = d.dp_rank * sp  # the sp ranks of a group are adjacent
    sp_ranks = None if sp == 1 else dist.get_process_group_ranks(d.sp_group)
    report.check(f"{name}/grid", d.rank == first + d.sp_rank and d.is_main == (d.rank == 0)
                 and sp_ranks == (None if sp == 1 else list(range(first, first + sp))),
                 f"rank {d.rank} dp {d.dp_rank} sp {d.sp_rank} sp group {sp_ranks}")
    model = shard_model(adapted_model(cfg) if adapters else make_model(cfg, SEED), d.fsdp_mesh, mixed_precision,
                        cpu_offload, checkpointing)
    loss = forward_backward(model, local_batches(d, backend=backend))
    dist.all_reduce(loss)  # the global loss is the SUM of the rank shares
    report.close(abs(loss.item() - ref["loss"]) / abs(ref["loss"]), tol, f"{name}/loss")

    def full_grads():  # .to(device): with CPU offload on GPUs the shards are on the CPU, NCCL gathers on the GPU
        return {n: p.grad.to(d.device).full_tensor() for n, p in model.named_parameters() if p.requires_grad}

    grads = full_grads()
    err, pname = worst(grads, ref["grads"])
    report.close(err, tol, f"{name}/grads", pname)
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}  # a frozen base has none
    report.check(f"{name}/frozen", with_grad == ref["grads"].keys(),
                 f"gradients reached {sorted(with_grad ^ ref['grads'].keys())[:3]}, unlike the reference")
    norm = clip_grad_norm_(model.parameters(), ref["max_norm"])
    report.close(abs(norm.item() - ref["norm"]) / ref["norm"], tol, f"{name}/grad_norm")
    err, pname = worst(full_grads(), ref["clipped"])
    report.close(err, tol, f"{name}/clipped", pname)
    torch.optim.SGD(model.parameters(), lr=LR).step()
    err, pname = worst(dict(iter_full_params(model, torch.float32)), ref["params"])
    report.close(err, tol, f"{name}/updated", pname)


def check_iter_full_params(report: Report, cfg):
    d = mdist.build_dist(1)
    full = make_model(cfg, SEED).state_dict()
    model = shard_model(make_model(cfg, SEED), d.fsdp_mesh, False, False, "none")
    fp32 = list(iter_full_params(model, torch.float32))
    report.check("iter_full_params/names", [n for n, _ in fp32] == list(full), "names or order differ")
    report.check("iter_full_params/fp32", all(torch.equal(t, full[n]) for n, t in fp32), "values differ")
    report.check("iter_full_params/bf16", all(t.dtype == torch.bfloat16 and torch.equal(t, full[n].bfloat16())
                                             for n, t in iter_full_params(model)), "bf16 values differ")


def check_attention(report: Report, sp: int, H=4, Hkv=2, head_chunks=1):
    """ulysses.attention on slices == varlen attention on the whole sequence, values and gradients."""
    d = mdist.build_dist(sp)
    g = torch.Generator().manual_seed(7)
    lengths, D = [5, 1, 8], 16  # T = 14: padded for sp = 4
    T = sum(lengths)
    q, k, v, r = (torch.randn(T, h, D, generator=g) for h in (H, Hkv, Hkv, H))
    pos = torch.cat([torch.arange(n) for n in lengths])
    q_ref, k_ref, v_ref = (x.clone().requires_grad_() for x in (q, k, v))
    meta_ref = full_meta(pos)
    o_ref = varlen_attention(q_ref, k_ref, v_ref, meta_ref.cu_seqlens, meta_ref.max_seqlen, "sdpa")
    (o_ref * r).sum().backward()
    name = f"attention/sp{sp}" + f"-{head_chunks}chunks" * (head_chunks > 1)
    _, lpos, meta, pad = shard_micro_batch(pos, pos, d.sp_rank, sp, "sdpa", d.sp_group)
    ql, kl, vl = (local_slice(x, d.sp_rank, sp).requires_grad_() for x in (q, k, v))
    meta.sp_head_chunks = head_chunks
    o = attention(ql, kl, vl, meta)
    (o * local_slice(r, d.sp_rank, sp)).sum().backward()
    report.close(rel_err(o, local_slice(o_ref.detach(), d.sp_rank, sp)), TOL, f"{name}/out")
    for x, x_ref, what in ((ql, q_ref, "q"), (kl, k_ref, "k"), (vl, v_ref, "v")):
        report.close(rel_err(x.grad, local_slice(x_ref.grad, d.sp_rank, sp)), TOL, f"{name}/grad_{what}")
    if head_chunks > 1:
        return
    report.check(f"attention/sp{sp}-gather_tokens", torch.equal(gather_tokens(lpos, d.sp_group, pad), pos))
    # The fused all-to-all only moves numbers: rank r gets exactly its head group of the full q, k, v.
    full = (q, *(x.repeat_interleave(max(1, sp // Hkv), dim=1) for x in (k, v)))  # kv repeated as attention does
    moved = _seq_to_head([local_slice(x, d.sp_rank, sp) for x in full], d.sp_group)
    want = (local_slice(x.transpose(0, 1), d.sp_rank, sp).transpose(0, 1) for x in full)  # [T, h/sp, D]
    report.check(f"attention/sp{sp}/qkv_moved", all(torch.equal(m[:T], w) for m, w in zip(moved, want)))


def record_ledger(report: Report, cfg, ledger_dir: str):
    """One forward+backward with checkpointing on dp2 x sp2, every collective recorded by minirl.ledger."""
    d = mdist.build_dist(2)
    model = shard_model(make_model(cfg, SEED), d.fsdp_mesh, False, False, checkpointing="full")
    batches = local_batches(d)
    with Ledger(ledger_dir, d.rank, labels={"sp": d.sp_group, "fsdp": d.fsdp_mesh.get_group()}) as ledger:
        forward_backward(model, batches)
    entries = [(e["op"], ledger.labels.get(e["group"], e["group"]), e["phase"]) for e in ledger.entries]
    report.data["ledger"] = entries
    count = {}
    for op, group, phase in entries:
        if group == "sp":
            count[op, phase] = count.get((op, phase), 0) + 1
    L = cfg.num_hidden_layers
    # q, k, v in (one call) and o out per layer: in forward and reversed for the gradient. The recompute
    # reads the outputs forward kept (model.keep_collectives), as a compiled block does.
    want = {("all_to_all_single", "forward"): 2 * L, ("all_to_all_single", "backward"): 2 * L}
    report.check("ledger", count == want, f"sp-group collectives {count}, expected {want}")


def main():
    args = parse_args()
    with mdist.distributed(sp=1, timeout_s=60) as d:
        report = Report(args.out, d.rank)
        cfg = tiny_config()
        ref = reference_step(cfg)
        if d.world == 2:
            for checkpointing in ("none", "full", "selective"):
                check_layout(report, ref, cfg, sp=1, checkpointing=checkpointing)
                check_layout(report, ref, cfg, sp=2, checkpointing=checkpointing)
            check_layout(report, ref, cfg, sp=2, checkpointing="full", cpu_offload=True)
            check_layout(report, ref, cfg, sp=2, checkpointing="selective", mixed_precision=True, tol=5e-2)
            ref_lora = reference_step(cfg, adapters=True)
            check_layout(report, ref_lora, cfg, sp=1, checkpointing="full", adapters=True)
            check_layout(report, ref_lora, cfg, sp=2, checkpointing="full", adapters=True)
            check_iter_full_params(report, cfg)
            check_attention(report, sp=2)
            check_attention(report, sp=2, H=8, Hkv=4, head_chunks=2)  # 2 kv heads a rank, one a chunk
        else:
            for checkpointing in ("none", "full", "selective"):
                check_layout(report, ref, cfg, sp=2, checkpointing=checkpointing)
                check_layout(report, ref, cfg, sp=4, checkpointing=checkpointing)
            check_attention(report, sp=4)
            record_ledger(report, cfg, os.path.join(args.out, "ledger"))
        report.write()
    os._exit(0)


if __name__ == "__main__":
    main()
