"""Memory and time of per-token log-probs over a 152k vocabulary: chunked (minirl) vs full logits.

The policy loss needs log p(target) of every token of a micro-batch. The obvious code,
`(h @ W.T).float().log_softmax(-1).gather(...)`, materialises [T, V] logits: at T = 16k tokens and
Qwen's V = 151,936 that is 5 GB in bf16 plus 10 GB in fp32 plus a 10 GB log-softmax that autograd
keeps for backward. `minirl.logprobs.token_logprobs` projects one chunk of tokens at a time and
recomputes the chunk's logits in backward (checkpoint), so its extra memory is one chunk's worth.

For each variant (naive, and chunked at each --chunks size) this measures, with bf16 hidden states
[T, D] and a bf16 output weight [V, D], both requiring grad, loss = -mean(log p(target)):
- peak memory of one forward+backward: torch.cuda.max_memory_allocated after a reset, reported as
  the peak and as the extra over what was allocated before (inputs; the gradients count as extra);
- median forward+backward time over CUDA-event-timed repetitions;
- agreement with the naive version: max |log p| difference and relative error of dh and dW.
The chunked version also computes the entropy (the trainer's bonus term); it is not in the loss here.

    python bench/logprobs_memory.py           # T=16k, V=151,936, D=1024 on a GPU
    python bench/logprobs_memory.py --tiny    # CPU smoke run (no memory figures on CPU)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

from bench.common import (csv_ints, default_device, device_info, median, out_path, print_table,
                          reset_peak_memory, sync, time_ms, write_json)
from minirl.logprobs import token_logprobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--chunks", type=csv_ints, default=[1024, 2048, 4096, 8192], help="comma-separated sizes")
    p.add_argument("--no-naive", action="store_true", help="skip the full-logits version (it needs ~30 GB)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/logprobs_memory.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.tokens, args.vocab, args.hidden, args.chunks, args.warmup, args.reps = 512, 1000, 64, [64, 256], 1, 2
    return args


def naive_logprobs(h, w, targets):
    """The full-logits version: [T, V] logits in bf16, then fp32, then a [T, V] log-softmax."""
    return (h @ w.t()).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # [T]


def chunked_logprobs(chunk_size):
    def fn(h, w, targets):
        return token_logprobs(h, w, targets, chunk_size=chunk_size)[0]  # [T]
    return fn


def forward_backward(fn, h, w, targets):
    """One loss evaluation and backward; gradients land in h.grad and w.grad (freshly allocated)."""
    h.grad = w.grad = None
    lp = fn(h, w, targets)
    (-lp.mean()).backward()
    return lp.detach()


def measure(name, fn, h, w, targets, device, args, ref) -> dict:
    """Peak/extra memory of one forward+backward, median time, and agreement with `ref` (the naive run)."""
    h.grad = w.grad = None
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    lp = forward_backward(fn, h, w, targets)
    sync(device)
    row = {"variant": name}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_gb=peak / 2**30, extra_gb=(peak - before) / 2**30)
    else:
        row.update(peak_gb=None, extra_gb=None)
    if ref is not None:
        row.update(max_abs_dlogp=(lp - ref["lp"]).abs().max().item(),
                   rel_err_dh=((h.grad.float() - ref["dh"]).norm() / ref["dh"].norm()).item(),
                   rel_err_dw=((w.grad.float() - ref["dw"]).norm() / ref["dw"].norm()).item())
    row["ms"] = median(time_ms(lambda: forward_backward(fn, h, w, targets), device, args.warmup, args.reps))
    h.grad = w.grad = None
    return row


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    g = torch.Generator().manual_seed(0)
    T, V, D = args.tokens, args.vocab, args.hidden
    # Logits of O(1): h ~ N(0, 1), W ~ N(0, 1/D).
    h = torch.randn(T, D, generator=g).to(device, torch.bfloat16).requires_grad_(True)  # [T, D]
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device, torch.bfloat16).requires_grad_(True)  # [V, D]
    targets = torch.randint(0, V, (T,), generator=g).to(device)  # [T]
    print(f"device: {device_info(device)}; T={T} V={V} D={D}; full fp32 logits would be "
          f"{T * V * 4 / 2**30:.2f} GiB", flush=True)
    if device.type != "cuda":
        print("note: peak memory needs CUDA (torch.cuda.max_memory_allocated); CPU rows show '-'", flush=True)

    variants = ([] if args.no_naive else [("naive", naive_logprobs)]) + \
        [(f"chunk {c}", chunked_logprobs(c)) for c in args.chunks]
    ref = None
    if not args.no_naive:  # the agreement reference: the naive version's outputs and gradients
        lp = forward_backward(naive_logprobs, h, w, targets)
        ref = {"lp": lp, "dh": h.grad.float(), "dw": w.grad.float()}
    rows = []
    for name, fn in variants:
        rows.append(measure(name, fn, h, w, targets, device, args, ref))
        print(rows[-1], flush=True)

    summary = [{"what": f"logprobs fwd+bwd {r['variant']} (T={T}, V={V}): ms | peak GiB | extra GiB",
                "value": f"{r['ms']:.1f} | " + ("-" if r["peak_gb"] is None else
                                                  f"{r['peak_gb']:.2f} | {r['extra_gb']:.2f}"),
                "unit": ""} for r in rows]
    write_json(out_path("logprobs_memory", args.out), {
        "bench": "logprobs_memory", "args": vars(args), "device": device_info(device), "results": rows,
        "summary": summary})
    print_table(f"token log-probs fwd+bwd, T={T}, V={V}, D={D}, bf16 h/W; extra = peak - allocated before",
                ["variant", "peak GiB", "extra GiB", "ms", "max|dlogp|", "err dh", "err dW"],
                [[r["variant"], r["peak_gb"], r["extra_gb"], r["ms"], r.get("max_abs_dlogp"),
                  r.get("rel_err_dh"), r.get("rel_err_dw")] for r in rows])


if __name__ == "__main__":
    main()
