"""Decode throughput of minirl's naive generator (eager and CUDA graphs) against transformers' generate.

Rollouts dominate an RL step, and minirl generates with its own static-KV-cache loop
(`minirl.generate.generate`, continuous batching). This measures how fast that loop decodes at a fixed
length (eager, and the whole step as one CUDA graph; bench/rollouts.py measures long-tailed lengths),
for random-weight bf16 models (q/k/v and gate/up fused, as the trainer's Generator
holds them) of two shapes (Qwen3-0.6B, and a Qwen2.5-1.5B-like one), at several batch sizes, with --prompt-len
prompt tokens and --new-tokens sampled tokens per row (temperature 1, no EOS: every row decodes all
its tokens, so the work is fixed):

- decode time per step = (t(new_tokens) - t(1)) / (new_tokens - 1), where t(n) is the wall time of a
  whole generate call producing n tokens per row (after a full-length warm-up call, whose time is
  reported too: it includes torch.compile of the decoder block on first use; fastest of 3 calls for
  t(1), of --reps for t(new_tokens)); prefill, graph capture and result copies cancel;
- tokens/s = batch / decode step time;
- roofline fraction = floor / measured step, the floor being the fewest bytes a decode step must read,
  weights (2 bytes a parameter; a tied embedding counts once, as the output head) plus the KV cache
  filled so far (mean context over the run), divided by the device-to-device copy bandwidth measured
  at the start (bytes read + written per second). Reading the whole static cache every step instead
  (what a mask over the full width costs) would be `kv_bytes_static` in the JSON;
- transformers: the same weights loaded into `AutoModelForCausalLM.from_config(ModelConfig.to_hf())`,
  `generate(do_sample=True, temperature=1, top_k=0)` with its default dynamic cache, eager, SDPA
  attention (its static cache is meant for torch.compile, whose compilation per batch size would not
  fit the time budget), timed the same way; ratios = ours (each mode) tokens/s / transformers'. A logits
  check first confirms both hold the same model.

    python bench/generate.py                    # > 10 min on an H100 (eager is the slow part); no transformers at 256
    python bench/generate.py --modes graphs     # ~3.5 min on an H100 (session 4)
    python bench/generate.py --tiny             # CPU smoke run (no CUDA graphs on CPU)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from bench.common import (copy_bandwidth, csv_ints, csv_strs, device_info, default_device, median, model_config,
                          out_path, param_counts, print_table, profile_table, random_model, sync, write_json)
from minirl.generate import SamplingParams, fuse_projections, generate
from minirl.hf import ours_to_hf
from minirl.model import KVCache, ModelConfig, Transformer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=csv_strs, default=["qwen3-0.6b", "qwen2.5-1.5b"])
    p.add_argument("--batches", type=csv_ints, default=[1, 16, 64, 256])
    p.add_argument("--modes", type=csv_strs, default=["eager", "graphs"],
                   help="eager; graphs (the whole decode step as one CUDA graph; CUDA only)")
    p.add_argument("--hf-batches", type=csv_ints, default=[1, 16, 64],
                   help="batches to run transformers at (empty: none); 256 is left out to fit ~4 min")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--reps", type=int, default=1, help="timed full-length generate calls per case (median)")
    p.add_argument("--profile", type=int, default=0, metavar="BATCH",
                   help="also profile 33 eager decode steps of the first shape at this batch: top GPU kernels")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/generate.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shapes, args.batches, args.hf_batches, args.prompt_len, args.new_tokens = ["tiny"], [1, 4], [4], 16, 32
    return args


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def wall_s(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def decode_step_s(run, new_tokens: int, reps: int, device) -> tuple[float, float]:
    """Seconds per decode step from generate calls of new_tokens (median) and of 1 token, after a warm-up.

    The warm-up is a full-length call: the first call of a shape pays one-time costs that a training
    run pays once (cuDNN builds an attention plan per cache length, cuBLAS picks its kernels), and a
    long call meets cache lengths a short one never does. The 1-token call (prefill, graph capture,
    copies) is cheap, so it is always timed 3 times, and the fastest counts: the first short calls after
    a long one still pay for new shapes (0.67, 0.42, 0.26 s at batch 256 on an H100). Returns (seconds
    per step, seconds of the warm-up call), the second including any torch.compile the first call of a
    process triggers.
    """
    warm_up = wall_s(lambda: run(new_tokens), device)
    t1 = min(wall_s(lambda: run(1), device) for _ in range(3))
    tn = median([wall_s(lambda: run(new_tokens), device) for _ in range(reps)])
    return (tn - t1) / (new_tokens - 1), warm_up


def ours_runner(model: Transformer, prompts, mode: str, **generate_kwargs):
    def run(n):
        params = SamplingParams(max_new_tokens=n, temperature=1.0, seed=0)
        outs = generate(model, prompts, params, eos_ids=[], pad_id=0, max_batch_size=len(prompts),
                        cuda_graphs=mode == "graphs", **generate_kwargs)
        assert all(len(o.token_ids) == n for o in outs), "a row stopped early: the workload is not fixed"
    return run


def hf_model(model: Transformer, device):
    """transformers' model of the same config holding the same bf16 weights."""
    hf_dict = model.cfg.to_hf()
    hf_cfg = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    missing, unexpected = hf.load_state_dict({ours_to_hf(k): v for k, v in model.state_dict().items()},
                                             strict=False)
    tied_head = ["lm_head.weight"] if model.cfg.tie_word_embeddings else []
    if sorted(missing) != tied_head or unexpected:
        raise RuntimeError(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    return hf.eval()


@torch.inference_mode()
def logits_gap(model: Transformer, hf, prompts) -> float:
    """Max |ours - transformers| of the last position's logits for the first two prompts (same model?)."""
    ids = torch.tensor(prompts[:2], device=model.embed_tokens.weight.device)  # [b, S]
    cache = KVCache.empty(model.cfg, ids.shape[0], ids.shape[1], torch.bfloat16, ids.device)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    ours = model.forward_step(ids, pos, cache)[:, -1].float()  # [b, V]
    theirs = hf(input_ids=ids).logits[:, -1].float()  # [b, V]
    return (ours - theirs).abs().max().item()


def hf_runner(hf, prompts):
    ids = torch.tensor(prompts, device=hf.device)  # [B, S], every row the same length: no padding

    @torch.inference_mode()
    def run(n):
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
    return run


def roofline(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, bandwidth_gbs: float) -> dict:
    """The fewest bytes of an average decode step and the time they take at the measured bandwidth."""
    counts = param_counts(cfg)
    weights = 2 * (counts["total"] if cfg.tie_word_embeddings else counts["total"] - counts["embedding"])
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, bf16
    mean_context = prompt_len + (new_tokens - 1) / 2
    kv = batch * mean_context * kv_per_token
    slots = -(-(prompt_len + new_tokens - 1) // 64) * 64  # generate rounds the cache up to 64 slots
    kv_static = batch * slots * kv_per_token  # the whole cache, every step
    return {"weight_bytes": weights, "kv_bytes": kv, "kv_bytes_static": kv_static,
            "floor_s": (weights + kv) / (bandwidth_gbs * 1e9)}


def profile_decode(shape: str, batch: int, prompt_len: int, device, path: str) -> str:
    """Top kernels of 33 eager decode steps (the profiler sees each kernel, and their GPU time is what a
    graph replays) and one prefill forward (each of its kernels is 1 call in 33); written to `path`."""
    cfg = model_config(shape)
    model = random_model(cfg, device).to(torch.bfloat16).eval()
    fuse_projections(model)
    prompts = random_prompts(batch, prompt_len, cfg.vocab_size, seed=batch)
    run = ours_runner(model, prompts, "eager", prefill_tokens=batch * prompt_len)
    run(33)
    return profile_table(lambda: run(33), device, f"{shape}, batch {batch}, prompt {prompt_len}: 33 eager decode "
                         "steps + 1 prefill forward", path, rows=25)


def bench_shape(shape: str, args, device, bandwidth: float) -> list[dict]:
    cfg = model_config(shape)
    model = random_model(cfg, device).to(torch.bfloat16).eval()
    hf = hf_model(model, device) if args.hf_batches else None
    fuse_projections(model)  # as the trainer's Generator holds it
    rows = []
    for batch in args.batches:
        prompts = random_prompts(batch, args.prompt_len, cfg.vocab_size, seed=batch)
        floor = roofline(cfg, batch, args.prompt_len, args.new_tokens, bandwidth)
        row = {"shape": shape, "batch": batch, **floor}
        for mode in args.modes:
            step, row[f"{mode}_warm_up_s"] = decode_step_s(ours_runner(model, prompts, mode), args.new_tokens,
                                                           args.reps, device)
            row[f"{mode}_step_ms"] = step * 1e3
            row[f"{mode}_tokens_per_s"] = batch / step
            row[f"{mode}_roofline_frac"] = floor["floor_s"] / step
        if hf is not None and batch in args.hf_batches:
            row["hf_logits_max_diff"] = logits_gap(model, hf, prompts)
            step, _ = decode_step_s(hf_runner(hf, prompts), args.new_tokens, args.reps, device)
            row["hf_step_ms"] = step * 1e3
            row["hf_tokens_per_s"] = batch / step
            for mode in args.modes:
                row[f"{mode}_over_hf"] = row[f"{mode}_tokens_per_s"] / row["hf_tokens_per_s"]
        print(row, flush=True)
        rows.append(row)
    del model, hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = default_device()
    if device.type != "cuda" and set(args.modes) - {"eager"}:
        print("note: CUDA graphs need CUDA; only mode 'eager' runs", flush=True)
        args.modes = ["eager"]
    bandwidth = copy_bandwidth(device, nbytes=2**26 if args.tiny else 2**30)
    info = {**device_info(device), "transformers": transformers.__version__}
    print(f"device: {info}; copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    if args.profile:
        path = os.path.join(os.path.dirname(out_path("generate", args.out)), "generate_profile.txt")
        print(profile_decode(args.shapes[0], args.profile, args.prompt_len, device, path), flush=True)
    rows = [r for shape in args.shapes for r in bench_shape(shape, args, device, bandwidth)]

    best = args.modes[-1]  # graphs on a GPU
    summary = [{"what": f"decode {r['shape']} batch {r['batch']} ({best}): tokens/s | roofline | ours/HF",
                "value": f"{r[best + '_tokens_per_s']:.0f} | {100 * r[best + '_roofline_frac']:.0f}% | "
                         + (f"{r[best + '_over_hf']:.2f}x" if best + "_over_hf" in r else "-"), "unit": ""}
               for r in rows]
    write_json(out_path("generate", args.out), {
        "bench": "generate", "args": vars(args), "device": info, "copy_bandwidth_gbs": bandwidth,
        "hf_setup": "AutoModelForCausalLM.from_config, bf16, attn sdpa, eager, default dynamic cache, "
                    "do_sample temperature 1 top_k 0, min_new_tokens = max_new_tokens",
        "results": rows, "summary": summary})
    cols = ["shape", "batch"]
    for mode in args.modes:
        cols += [f"{mode} ms/step", f"{mode} tok/s", f"{mode} roof%"]
    cols += ["HF ms/step", "HF tok/s"] + [f"{mode}/HF" for mode in args.modes]
    table = []
    for r in rows:
        line = [r["shape"], r["batch"]]
        for mode in args.modes:
            line += [r[f"{mode}_step_ms"], r[f"{mode}_tokens_per_s"], 100 * r[f"{mode}_roofline_frac"]]
        table.append(line + [r.get("hf_step_ms"), r.get("hf_tokens_per_s")]
                     + [r.get(f"{mode}_over_hf") for mode in args.modes])
    print_table(f"decode, prompt {args.prompt_len} + {args.new_tokens} new tokens, temperature 1, bf16; "
                f"roofline at copy bandwidth {bandwidth:.0f} GB/s", cols, table)


if __name__ == "__main__":
    main()
