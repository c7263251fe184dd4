"""Packed causal attention: are the CUDA varlen kernels right, and how fast beside SDPA per document?

minirl trains on packed micro-batches (many documents in one [T, H, D] tensor). On CUDA it uses
torch's own varlen kernel ("varlen") or, where installed, flash-attn-4's ("flash", docs/flash_attn.md);
everywhere else it loops over the documents with SDPA ("sdpa"), which is also the readable
reference. This script measures, at Qwen3-0.6B head shapes (16 query heads, 8 kv heads, head_dim
128) in bf16, each backend the device has:

1. accuracy: relative error ||x - ref|| / ||ref|| of the output and of dq, dk, dv against a float64
   reference written out explicitly (softmax(q k^T / sqrt(D) + causal mask) v, per document, kv heads
   repeated), so it shares no code with either backend. The check uses RAGGED documents (random
   lengths, fresh random inputs each run) so that a wrong document boundary shows; at most 16k
   tokens in documents of at most 4k, so the float64 reference fits whatever --doc-len is timed.
   bf16 inputs should land between 1e-3 and 1e-2; NaN fails;
2. speed: forward (no grad) and forward+backward time for T tokens in documents of --doc-len
   (default 16k tokens in 2k documents), median of CUDA-event-timed runs, and the achieved rate
   counting causal FLOPs only: forward 4 * sum(L^2/2) * H * D, backward 2.5x that.

    python bench/attention.py            # on a GPU: every backend it has
    python bench/attention.py --tokens 131072 --doc-len 131072 --backends flash,varlen --warmup 3 --reps 10
    python bench/attention.py --doc-len 512,2048,16384 --backends flash,varlen   # which kernel wins per length
    python bench/attention.py --tiny     # CPU smoke run (flash and varlen need CUDA and are skipped)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

from bench.common import (causal_attention_flops, csv_ints, csv_strs, default_device, device_info, matmul_tflops, median,
                          out_path, print_table, time_ms, write_json)
from minirl.attention import pick_backend, varlen_attention

BACKENDS = ("flash", "varlen", "sdpa")
CHECK_TOKENS, CHECK_DOC_LEN = 16384, 4096  # the accuracy check's size: the float64 reference must fit


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="packed tokens T")
    p.add_argument("--doc-len", type=csv_ints, default=[2048],
                   help="document length for the timing runs; comma-separated: one timing per length")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--backends", type=csv_strs, default=list(BACKENDS), help=f"comma-separated, of {BACKENDS}")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/attention.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.doc_len, args.heads, args.kv_heads, args.head_dim = 512, [128], 4, 2, 32
        args.warmup, args.reps = 1, 3
    return args


def uniform_lengths(total: int, doc_len: int) -> list[int]:
    """Documents of doc_len tokens (the last one shorter if doc_len does not divide total)."""
    return [min(doc_len, total - s) for s in range(0, total, doc_len)]


def ragged_lengths(total: int, doc_len: int, generator: torch.Generator) -> list[int]:
    """Random lengths in [1, doc_len] that sum to total (never longer than the timed documents)."""
    lengths = []
    while sum(lengths) < total:
        n = int(torch.randint(1, doc_len + 1, (1,), generator=generator))
        lengths.append(min(n, total - sum(lengths)))
    return lengths


def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    """[B+1] int32 document starts plus the end, as the attention backends take them."""
    return torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)


def random_qkv(T, heads, kv_heads, head_dim, device, generator):
    """q [T, H, D], k/v [T, Hkv, D] in fp32, O(1) entries (never zeros: they hide wrong indexing)."""
    shape_q, shape_kv = (T, heads, head_dim), (T, kv_heads, head_dim)
    return tuple(torch.randn(s, generator=generator).to(device) for s in (shape_q, shape_kv, shape_kv))


def reference_attention(q, k, v, lengths: list[int]) -> torch.Tensor:
    """Float64 causal attention per document by the textbook formula; q [T, H, D], k/v [T, Hkv, D]."""
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for L in lengths:
        qd = q[start:start + L].transpose(0, 1)  # [H, L, D]
        kd = k[start:start + L].transpose(0, 1).repeat_interleave(group, 0)  # [H, L, D]
        vd = v[start:start + L].transpose(0, 1).repeat_interleave(group, 0)  # [H, L, D]
        scores = qd @ kd.transpose(1, 2) / qd.shape[-1] ** 0.5  # [H, L, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out.append((probs @ vd).transpose(0, 1))  # [L, H, D]
        start += L
    return torch.cat(out)


def output_and_grads(attn, q, k, v, dout):
    """(out, dq, dk, dv) of attn(q, k, v) with upstream gradient dout; inputs become leaves here."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    out = attn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_accuracy(backend: str, args, device, generator) -> dict:
    """Relative errors of one backend in bf16 against the float64 reference, on fresh ragged inputs."""
    tokens = min(args.tokens, CHECK_TOKENS)
    lengths = ragged_lengths(tokens, min(max(args.doc_len), CHECK_DOC_LEN), generator)
    q, k, v = random_qkv(tokens, args.heads, args.kv_heads, args.head_dim, device, generator)
    dout = torch.randn(q.shape, generator=generator).to(device)
    cu, max_len = cu_seqlens(lengths, device), max(lengths)
    ref = output_and_grads(lambda *x: reference_attention(*x, lengths), q.double(), k.double(), v.double(),
                           dout.double())
    got = output_and_grads(lambda *x: varlen_attention(*x, cu, max_len, backend),
                           q.bfloat16(), k.bfloat16(), v.bfloat16(), dout.bfloat16())
    errs = {name: rel_err(x, r) for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref)}
    errs["ok"] = all(e < 1e-2 for e in errs.values())  # NaN compares False: fails
    errs["docs"] = len(lengths)
    return errs


def time_backend(backend: str, doc_len: int, args, device, generator) -> dict:
    """Median forward and forward+backward times (ms) on uniform documents, and TFLOP/s."""
    lengths = uniform_lengths(args.tokens, doc_len)
    cu, max_len = cu_seqlens(lengths, device), max(lengths)
    q, k, v = (x.bfloat16().requires_grad_(True) for x in
               random_qkv(args.tokens, args.heads, args.kv_heads, args.head_dim, device, generator))
    dout = torch.randn(q.shape, generator=generator).to(device, torch.bfloat16)

    def forward():
        with torch.no_grad():
            varlen_attention(q, k, v, cu, max_len, backend)

    def forward_backward():
        out = varlen_attention(q, k, v, cu, max_len, backend)
        torch.autograd.grad(out, (q, k, v), dout)

    fwd_ms = median(time_ms(forward, device, args.warmup, args.reps))
    fb_ms = median(time_ms(forward_backward, device, args.warmup, args.reps))
    flops = causal_attention_flops(lengths, args.heads, args.head_dim)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "fwd_tflops": flops / (fwd_ms * 1e-3) / 1e12,
            "fwd_bwd_tflops": 3.5 * flops / (fb_ms * 1e-3) / 1e12, "fwd_gflop": flops / 1e9}


def available_backends(device, wanted: list[str]) -> list[str]:
    found = []
    for b in wanted:
        try:
            pick_backend(device, b)
            found.append(b)
        except ValueError as e:
            print(f"note: skipping backend {b!r}: {e}", flush=True)
    return found


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    generator = torch.Generator().manual_seed(0)
    peak = matmul_tflops(device, n=256 if args.tiny else 8192)
    print(f"device: {device_info(device)}; measured matmul peak {peak:.1f} TFLOP/s", flush=True)
    results = {}
    for backend in available_backends(device, args.backends):
        acc = check_accuracy(backend, args, device, generator)
        print(f"{backend}: accuracy {acc}", flush=True)
        speed = {}
        for doc_len in args.doc_len:
            speed[doc_len] = time_backend(backend, doc_len, args, device, generator)
            print(f"{backend}, docs of {doc_len}: speed {speed[doc_len]}", flush=True)
        results[backend] = {"accuracy": acc, "speed": speed}

    errs = ("out", "dq", "dk", "dv")
    rows = [[b, L, *(r["accuracy"][x] for x in errs), "yes" if r["accuracy"]["ok"] else "NO",
             t["fwd_ms"], t["fwd_bwd_ms"], t["fwd_tflops"], t["fwd_bwd_tflops"], 100 * t["fwd_bwd_tflops"] / peak]
            for b, r in results.items() for L, t in r["speed"].items()]
    summary = [{"what": f"attention {b}, {args.tokens} tok in {L}-tok docs: fwd+bwd ms | TFLOP/s | max rel err",
                "value": f"{t['fwd_bwd_ms']:.3f} | {t['fwd_bwd_tflops']:.1f} | "
                         f"{max(r['accuracy'][x] for x in errs):.1e}", "unit": ""}
               for b, r in results.items() for L, t in r["speed"].items()]
    write_json(out_path("attention", args.out), {
        "bench": "attention", "args": vars(args), "device": device_info(device), "matmul_peak_tflops": peak,
        "results": results, "summary": summary})
    print_table(f"attention, bf16, T={args.tokens}, H={args.heads} Hkv={args.kv_heads} D={args.head_dim}; "
                f"err vs float64 on ragged docs; matmul peak {peak:.0f} TFLOP/s",
                ["backend", "doc len", "err out", "err dq", "err dk", "err dv", "ok", "fwd ms", "f+b ms", "fwd TF/s",
                 "f+b TF/s", "f+b % peak"], rows)

if __name__ == "__main__":
    main()
