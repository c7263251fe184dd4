"""Decode attention alone: one query per row against a static KV cache, four ways of calling it.

A decode step's attention reads every filled cache slot of every row once, so at large batches it is
the step's biggest cost and should run at copy bandwidth. This times one layer of Qwen3-0.6B's shape
(16 query heads sharing 8 kv heads of 128; cache of 768 slots or twice the filled length, bf16) with
`filled` slots per row in use (with --lengths varied, row lengths drawn uniformly from 1..2 x filled, as in a
continuous batch: a kernel that reads the batch's longest row pays for it), each call replayed from a
CUDA graph (as the generator runs it):

- fold:   the G query heads of a kv head folded into G queries of that head, additive mask, SDPA
          (minirl's decode attention in session 2);
- gqa:    SDPA with `enable_gqa=True` and an additive mask over the longest row's slots rounded up to
          64 (minirl's decode attention until continuous batching);
- flex:   FlexAttention's decoding kernel with the block mask of `kvcache.decode_blocks` (each row
          reads its own blocks of 64 slots), compiled per batch size: minirl's decode attention on GPUs;
- varlen: flash attention's varlen kernel with `seqused_k` (reads exactly the filled slots, split-KV
          for small batches) on the cache laid out [B, slots, Hkv, D] as flash wants it; through
          `torch.nn.attention.varlen.varlen_attn` where it takes `seqused_k` (torch >= 2.12), else the
          private `torch.ops.aten._flash_attention_forward` it wraps. Timed with no window and with a
          causal one, which flash treats differently for one query.

Reported: microseconds per call and GB/s of filled KV bytes read; the outputs are checked against
`fold` first (bf16 tolerance).

    python bench/decode_attention.py            # ~20 s on an H100
    python bench/decode_attention.py --tiny     # CPU smoke run: SDPA variants only, no graphs
"""

import argparse
import inspect
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch
import torch.nn.functional as F

from bench.common import csv_ints, default_device, device_info, out_path, print_table, write_json
from minirl.kvcache import compiled_flex_decode, decode_blocks, decode_mask

HQ, HKV, D, SLOTS = 16, 8, 128, 768


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=csv_ints, default=[1, 16, 64, 256])
    p.add_argument("--filled", type=csv_ints, default=[300, 512, 700], help="cache slots in use per row")
    p.add_argument("--lengths", default="fixed", help="fixed (every row `filled`) and/or varied (each row's drawn "
                                                       "from 1..2 x filled), comma-separated")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/decode_attention.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.batches, args.filled, args.reps = [1, 4], [100], 3
    return args


def call_us(fn, reps: int, device) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph on a GPU (plain calls on CPU)."""
    fn()
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # capture must not see lazy initialisation
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        fn = graph.replay
        fn()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e6


def flash_varlen(q, k, v, cu_q, cu_k, max_k, used, causal: bool):
    """q [B, Hq, D], k/v [B * slots, Hkv, D]: flash varlen attention over the first used[b] keys of row b."""
    from torch.nn.attention.varlen import varlen_attn
    window = (-1, 0) if causal else (-1, -1)
    if "seqused_k" in inspect.signature(varlen_attn).parameters:
        return varlen_attn(q, k, v, cu_q, cu_k, 1, max_k, window_size=window, enable_gqa=True, seqused_k=used)
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, 1, max_k, 0.0, causal, False,
                                                   window_size_left=window[0], window_size_right=window[1],
                                                   seqused_k=used)[0]


def bench_case(B: int, filled: int, varied: bool, reps: int, device) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(B * 1000 + filled)
    slots = max(SLOTS, -(-2 * filled // 64) * 64)
    used = (torch.randint(1, 2 * filled + 1, (B,), device=device, generator=g) if varied else
            torch.full((B,), filled, device=device))  # [B] filled slots of each row
    k = torch.randn(B, HKV, slots, D, device=device, dtype=dtype, generator=g)  # the generator's cache layout
    v = torch.randn(B, HKV, slots, D, device=device, dtype=dtype, generator=g)
    q = torch.randn(B, HQ, D, device=device, dtype=dtype, generator=g)  # one query per row
    n = -(-int(used.max()) // 64) * 64  # slots read by SDPA: the longest row's, rounded as minirl did
    pos = (used - 1)[:, None]  # [B, 1] each row's query position
    mask = decode_mask(pos, n, dtype)  # [B, 1, 1, n]
    G = HQ // HKV
    fold_mask = mask.expand(B, 1, G, n)
    q_fold = q.view(B, HKV, G, D)  # head h = kv * G + g

    calls = {
        "fold": lambda: F.scaled_dot_product_attention(q_fold, k[:, :, :n], v[:, :, :n], attn_mask=fold_mask),
        "gqa": lambda: F.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n], attn_mask=mask,
                                                      enable_gqa=True),
    }
    if device.type == "cuda":
        blocks = decode_blocks(pos, slots)
        for x, dim in ((k, 2), (v, 2), (blocks[1], 3)):
            torch._dynamo.maybe_mark_dynamic(x, dim)
        calls["flex"] = lambda: compiled_flex_decode()(q[:, :, None], k, v, *blocks, pos)
        cu_q = torch.arange(B + 1, device=device, dtype=torch.int32)
        # flash wants each row's slots contiguous: a [B, slots, Hkv, D] copy, flattened to [B * slots, Hkv, D]
        flat_k, flat_v = (x.transpose(1, 2).contiguous().flatten(0, 1) for x in (k, v))
        used32 = used.to(torch.int32)
        for causal in (False, True):
            calls["varlen_causal" if causal else "varlen"] = (
                lambda causal=causal: flash_varlen(q, flat_k, flat_v, cu_q, cu_q * slots, slots, used32, causal))

    ref = calls["fold"]().reshape(B, HQ, D).float()
    row = {"batch": B, "filled": filled, "varied": varied, "mean_filled": used.double().mean().item(),
           "read_by_sdpa": n}
    kv_bytes = 2 * int(used.sum()) * HKV * D * k.element_size()
    for name, fn in calls.items():
        err = (fn().reshape(B, HQ, D).float() - ref).abs().max().item()
        if err > 2e-2:
            raise RuntimeError(f"{name} differs from fold by {err} at batch {B}, filled {filled}")
        us = call_us(fn, reps, device)
        row[f"{name}_us"], row[f"{name}_gbs"] = us, kv_bytes / us / 1e3
    print(row, flush=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    info = device_info(device)
    print(f"device: {info}", flush=True)
    rows = [bench_case(B, f, kind == "varied", args.reps, device)
            for kind in args.lengths.split(",") for B in args.batches for f in args.filled]
    names = [k[:-3] for k in rows[0] if k.endswith("_us")]
    summary = [{"what": f"decode attention batch {r['batch']}, {r['filled']} slots"
                        f"{' (varied)' if r['varied'] else ''}: " + " | ".join(names),
                "value": " | ".join(f"{r[n + '_us']:.1f}" for n in names), "unit": "us"}
               for r in rows if r["filled"] == 512]
    write_json(out_path("decode_attention", args.out), {"bench": "decode_attention", "args": vars(args),
                                                         "device": info, "results": rows, "summary": summary})
    cols = ["lengths", "batch", "filled", "SDPA reads"] + [f"{n} {u}" for n in names for u in ("us", "GB/s")]
    print_table(f"decode attention, one layer: {HQ} q heads, {HKV} kv heads of {D}; GB/s of filled KV bytes (varied: "
                "row lengths uniform in 1..2 x filled)", cols,
                [["varied" if r["varied"] else "fixed", r["batch"], r["filled"], r["read_by_sdpa"]]
                 + [r[f"{n}_{u}"] for n in names for u in ("us", "gbs")] for r in rows])

if __name__ == "__main__":
    main()
