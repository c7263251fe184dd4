"""Training-step throughput of minirl's policy model: tokens/s and model-FLOPs utilisation (MFU).

One step is what the trainer does per mini-batch: for each micro-batch, the packed forward with
targets (chunked log-probs) and backward of loss = token-mean of -log p(target), then gradient
clipping and AdamW. The model is FSDP2-sharded by `minirl.fsdp.shard_model` (bf16 compute, fp32
gradient reduction, fp32 master weights), with train.py's defaults unless told otherwise: blocks
compiled on GPUs, selective activation checkpointing, the best attention kernel installed. Weights
are random; documents of --doc-len random tokens fill --tokens per micro-batch.

Measured after --warmup steps, over --steps steps each between two CUDA events: median step time,
tokens/s (all ranks), achieved model TFLOP/s per GPU, and MFU against (a) the bf16 matmul rate
measured at the start of the run and (b) the datasheet dense bf16 rate (989 TFLOP/s for H100/H200).
Model FLOPs per step (recompute NOT counted, so the ratio is MFU, not hardware utilisation):
    6 * N * T                                  N = non-embedding parameters (blocks + final norm)
  + 6 * T * D * V                              the output-head matmul, forward and backward
  + 3 * layers * 4 * sum(L^2 / 2) * H * Dh     causal attention, forward 1x + backward 2x
The "hardware" FLOPs that full checkpointing adds (one more forward of the blocks; one more head
matmul in the chunked log-probs, always) are in the JSON as `hfu` (selective checkpointing's
recompute is elementwise work, not counted). Peak memory is torch.cuda.max_memory_allocated.

With --lora-rank r, LoRA adapters of rank r on every projection train and the base weights are frozen
(minirl/lora.py): no weight gradients for the base, so its model FLOPs are 4 * N * T, not 6 * N * T.
Several variants run in one process, one after the other (comma-separated --shape, --attn, --ckpt,
--lora-rank; a variant that runs out of memory is reported as such and the others go on):
    python bench/train_step.py                                   # Qwen3-0.6B shape, train.py's defaults
    python bench/train_step.py --shape qwen3-0.6b,qwen3-1.7b --ckpt selective,full,none --attn varlen
    torchrun --nproc-per-node 2 bench/train_step.py --sp 2       # Ulysses over 2 GPUs (dp = world / sp)
    torchrun --nproc-per-node 2 bench/train_step.py --sp 2 --sp-head-chunks 2   # all-to-alls overlapping attention
    python bench/train_step.py --shape qwen3-4b --lora-rank 8,64,0  # LoRA ranks 8 and 64, then full
    python bench/train_step.py --tiny                            # CPU smoke run (gloo, sdpa, fp32)
Plain `python` forms a one-rank job (minirl.dist.init_process_group); under torchrun every rank
runs the step on its own micro-batch (dp) or its slice of one (sp), and rank 0 reports.
"""

import argparse
import gc
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

from bench.common import (causal_attention_flops, csv_ints, csv_strs, datasheet_bf16, device_info, matmul_tflops,
                          median, model_config, out_path, param_counts, peak_memory_gb, print_table, profile_table,
                          random_model, reset_peak_memory, time_ms, write_json)
from minirl import lora, ulysses
from minirl.attention import pick_backend
from minirl.dist import Dist, distributed, validate_parallel
from minirl.fsdp import clip_grad_norm_, shard_model
from minirl.model import CHECKPOINTING, ModelConfig


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=csv_strs, default=["qwen3-0.6b"],
                   help="comma-separated: qwen3-0.6b, qwen3-1.7b, qwen3-4b, qwen2.5-1.5b")
    p.add_argument("--ckpt", type=csv_strs, default=["selective"],
                   help=f"activation checkpointing, comma-separated: {', '.join(CHECKPOINTING)}")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (per dp group)")
    p.add_argument("--doc-len", type=int, default=2048, help="length of each packed document")
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--chunk", type=int, default=4096, help="log-probs chunk size (tokens)")
    p.add_argument("--attn", type=csv_strs, default=[""],
                   help="attention backend, comma-separated: varlen, sdpa, flash (default: the best installed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile every decoder block on GPUs, as train.py does (--no-compile: eager)")
    p.add_argument("--lora-rank", type=csv_ints, default=[0],
                   help="comma-separated LoRA ranks to run, 0 = full fine-tuning (e.g. 8,64,0)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (updates are scaled by alpha / r)")
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree (under torchrun)")
    p.add_argument("--sp-head-chunks", type=int, default=1,
                   help="Ulysses: each rank's heads in this many chunks whose all-to-alls overlap attention")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile", action="store_true",
                   help="profile one more step of each variant: top operators to <out>_<shape>_profile.txt")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/train_step.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.tokens, args.doc_len, args.chunk, args.warmup, args.steps = ["tiny"], 256, 64, 128, 1, 2
    if any(c not in CHECKPOINTING for c in args.ckpt):
        p.error(f"--ckpt takes {', '.join(CHECKPOINTING)} (comma-separated); got {args.ckpt}")
    return args


def model_flops(cfg: ModelConfig, doc_lens: list[int], checkpointing: str, adapter_params: int = 0
                ) -> dict[str, float]:
    """Model FLOPs of forward+backward over one packed micro-batch, and the hardware FLOPs with recompute.
    With LoRA (`adapter_params` > 0) the frozen matmuls skip their weight gradient: 2x forward, not 3x."""
    T, D, V = sum(doc_lens), cfg.hidden_size, cfg.vocab_size
    dense_fwd = 2 * param_counts(cfg)["non_embedding"] * T
    head_fwd = 2 * T * D * V
    attn_fwd = cfg.num_hidden_layers * causal_attention_flops(doc_lens, cfg.num_attention_heads, cfg.head_dim)
    frozen = 2 if adapter_params else 3
    model = frozen * (dense_fwd + head_fwd) + 3 * attn_fwd + 6 * adapter_params * T
    # Recompute: every block's forward once more under full checkpointing; the chunked log-probs always
    # recompute their chunk's logits in backward.
    hardware = model + head_fwd + (dense_fwd + attn_fwd + 2 * adapter_params * T if checkpointing == "full" else 0.0)
    return {"model": model, "hardware": hardware}


def document_lengths(tokens: int, doc_len: int) -> list[int]:
    return [min(doc_len, tokens - s) for s in range(0, tokens, doc_len)]


def micro_batch(cfg: ModelConfig, tokens: int, doc_len: int, seed: int, d: Dist, backend: str, dp_size: int,
                head_chunks: int = 1):
    """One packed micro-batch of random documents, sliced for this sp rank.

    Returns (input_ids [t], position_ids [t], meta, targets [t], weights [t]). The weights make
    each rank's loss its exact share of the global token mean (summed over ranks by FSDP, see fsdp.py):
    1 / (tokens * dp_size) per real token, 0 on the padding Ulysses adds.
    """
    g = torch.Generator().manual_seed(seed)
    doc_lens = document_lengths(tokens, doc_len)
    ids = torch.randint(0, cfg.vocab_size, (tokens + 1,), generator=g)  # one extra for the last target
    pos = torch.cat([torch.arange(n) for n in doc_lens])  # [T]
    local_ids, local_pos, meta, _ = ulysses.shard_micro_batch(ids[:-1], pos, d.sp_rank, d.sp_size, backend,
                                                              d.sp_group)
    targets = ulysses.local_slice(ids[1:], d.sp_rank, d.sp_size)  # [t]
    weights = ulysses.local_slice(torch.full((tokens,), 1.0 / (tokens * dp_size)), d.sp_rank, d.sp_size)  # [t]
    meta.cu_seqlens = meta.cu_seqlens.to(d.device)
    meta.sp_head_chunks = head_chunks
    to = lambda x: x.to(d.device)  # noqa: E731
    return to(local_ids), to(local_pos), meta, to(targets), to(weights)


def build(cfg: ModelConfig, d: Dist, checkpointing: str, compile_blocks: bool, adapters: lora.AdapterSpec | None):
    """Random fp32 model on the device, sharded by FSDP2 (bf16 compute on CUDA), and AdamW (of the
    adapters alone with LoRA)."""
    model = random_model(cfg, d.device, seed=0)
    torch._dynamo.reset()  # each variant compiles afresh, as a new run would
    if adapters is not None:
        lora.add_adapters(model, adapters)
        lora.freeze_base(model)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=False,
                checkpointing=checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    return model, optimizer


def train_step(model, optimizer, batches, chunk: int):
    """Forward+backward of every micro-batch, clip, AdamW, zero grads (as trainer.update)."""
    for ids, pos, meta, targets, weights in batches:
        logprobs, _ = model(ids, pos, meta, targets=targets, chunk_size=chunk)
        (-(logprobs * weights).sum()).backward()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_variant(shape: str, attn: str, checkpointing: str, rank: int, args, d: Dist, peak_tflops: float) -> dict:
    cfg = model_config(shape)
    validate_parallel(d.world, d.sp_size, cfg)
    backend = pick_backend(d.device, attn or None)
    compiled = args.compile and d.device.type == "cuda"
    adapters = lora.AdapterSpec(rank, args.lora_alpha) if rank else None
    model, optimizer = build(cfg, d, checkpointing, compiled, adapters)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter(n))
    reset_peak_memory(d.device)  # the peak of training, not of building (a full fp32 copy before sharding)
    batches = [micro_batch(cfg, args.tokens, args.doc_len, seed=1000 * d.dp_rank + m, d=d, backend=backend,
                           dp_size=d.dp_size, head_chunks=args.sp_head_chunks) for m in range(args.micro_batches)]
    step_ms = median(time_ms(lambda: train_step(model, optimizer, batches, args.chunk), d.device,
                             args.warmup, args.steps))
    if args.profile:  # every rank runs the step (collectives pair up); rank 0 writes the table
        path = f"{out_path('train_step', args.out).removesuffix('.json')}_{shape}_{checkpointing}_{backend}_profile.txt"
        profile_table(lambda: train_step(model, optimizer, batches, args.chunk), d.device,
                      f"train step {shape} {args.tokens} tok, sp {d.sp_size}", path if d.is_main else None)
    flops = model_flops(cfg, document_lengths(args.tokens, args.doc_len), checkpointing, adapter_params)
    # Per GPU: the dp groups' micro-batches are split over all W ranks' compute.
    per_gpu = {k: v * args.micro_batches * d.dp_size / d.world for k, v in flops.items()}
    achieved = per_gpu["model"] / (step_ms * 1e-3) / 1e12
    datasheet = datasheet_bf16(d.device)
    row = {
        "shape": shape, "checkpointing": checkpointing, "lora_rank": rank, "adapter_params": adapter_params,
        "chunk": args.chunk, "attn": backend, "compile": compiled, "world": d.world, "dp": d.dp_size,
        "sp": d.sp_size, "sp_head_chunks": args.sp_head_chunks,
        "tokens_per_step": args.tokens * args.micro_batches * d.dp_size, "doc_len": args.doc_len,
        "step_ms": step_ms, "tokens_per_s": args.tokens * args.micro_batches * d.dp_size / (step_ms * 1e-3),
        "model_tflops_per_gpu": achieved,
        "mfu_measured": achieved / peak_tflops,
        "mfu_datasheet": None if datasheet is None else achieved * 1e12 / datasheet,
        "hfu_measured": per_gpu["hardware"] / (step_ms * 1e-3) / 1e12 / peak_tflops,
        "model_tflop_per_step": per_gpu["model"] / 1e12, "params": param_counts(cfg),
        "peak_mem_gb": peak_memory_gb(d.device),
    }
    del model, optimizer, batches
    gc.collect()
    return row


def main(argv=None):
    args = parse_args(argv)
    with distributed(args.sp) as d:
        run(args, d)


def run(args, d: Dist):
    peak = matmul_tflops(d.device, n=256 if args.tiny else 8192)
    if d.is_main:
        print(f"device: {device_info(d.device)}; world {d.world} = dp {d.dp_size} x sp {d.sp_size}; "
              f"measured matmul peak {peak:.1f} TFLOP/s", flush=True)
    rows = []
    for shape, attn, ckpt, rank in itertools.product(args.shape, args.attn, args.ckpt, args.lora_rank):
        try:
            rows.append(run_variant(shape, attn, ckpt, rank, args, d, peak))
        except torch.OutOfMemoryError as e:  # a figure too: this variant does not fit on the card
            rows.append({"shape": shape, "checkpointing": ckpt, "attn": attn, "lora_rank": rank, "oom": str(e)[:300]})
        gc.collect()
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
        if d.is_main:
            print(rows[-1], flush=True)
    if not d.is_main:
        return
    ran = [r for r in rows if "oom" not in r]
    summary = [{"what": f"train step {r['shape']} ckpt={r['checkpointing']} attn={r['attn']} {variant(r)} "
                        f"{r['tokens_per_step']} tok: tokens/s | MFU measured-peak | MFU datasheet | peak GiB",
                "value": f"{r['tokens_per_s']:.0f} | {100 * r['mfu_measured']:.1f}% | "
                         + ("-" if r["mfu_datasheet"] is None else f"{100 * r['mfu_datasheet']:.1f}%")
                         + f" | {r['peak_mem_gb'] or 0:.1f}",
                "unit": ""} for r in ran]
    summary += [{"what": f"train step {r['shape']} ckpt={r['checkpointing']} attn={r['attn']} {variant(r)}",
                 "value": "out of memory", "unit": ""} for r in rows if "oom" in r]
    write_json(out_path("train_step", args.out), {
        "bench": "train_step", "args": vars(args), "device": device_info(d.device),
        "matmul_peak_tflops": peak, "datasheet_bf16_flops": datasheet_bf16(d.device),
        "results": rows, "summary": summary})
    print_table(f"training step, {args.tokens * d.dp_size} tokens/step in docs of {args.doc_len}, AdamW, "
                f"world {d.world} (dp {d.dp_size} x sp {d.sp_size}); matmul peak {peak:.0f} TFLOP/s",
                ["shape", "ckpt", "train", "attn", "compiled", "step ms", "tok/s", "TFLOP/s/GPU", "MFU meas%",
                 "MFU 989%", "HFU meas%", "peak GiB"],
                [[r["shape"], r["checkpointing"], variant(r), r["attn"], "yes" if r["compile"] else "no", r["step_ms"],
                  r["tokens_per_s"], r["model_tflops_per_gpu"], 100 * r["mfu_measured"],
                  None if r["mfu_datasheet"] is None else 100 * r["mfu_datasheet"], 100 * r["hfu_measured"],
                  r["peak_mem_gb"]] if "oom" not in r else
                 [r["shape"], r["checkpointing"], variant(r), r["attn"] or "auto", "out of memory"] + [None] * 7
                 for r in rows])


def variant(row: dict) -> str:
    return f"lora r{row['lora_rank']}" if row["lora_rank"] else "full"


if __name__ == "__main__":
    main()
