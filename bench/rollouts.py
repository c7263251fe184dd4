"""Rollouts with long-tailed completion lengths: static batches against continuous batching.

Real RL completions are long-tailed: most end after a few hundred tokens, a few run to the limit.
Workload (seeded, the same for every generator compared): --requests prompts of --prompt-len random
tokens, Qwen3-0.6B shape with random bf16 weights (q/k/v and gate/up fused, as the trainer's
Generator holds them), temperature 1, and for each request a completion length drawn from a
log-normal of median --median and sigma --sigma (seed --seed), capped at --max-new-tokens
(`bench.common.lognormal_lengths`; by default median 300, sigma 0.8, cap 2,048: for these 512 draws
mean 412, p50 300, p90 825, p99 2,048, 1.6 % capped). A random-weight model never ends on its own at
those lengths, so each request's length is imposed:
- continuous (this checkout's generator): one generate call, `limits` = the drawn lengths, --rows rows
  in flight (0: sized by memory, the default of the trainer's generator);
- static (any generator: --tree DIR imports minirl from DIR/minirl, e.g. a copy of main's): the
  requests in order in batches of the first --rows value, each batch one generate call with
  max_new_tokens = its longest drawn length, no EOS: what a static batch costs when its rows end at
  those lengths (it decodes until its longest row ends).
Reported after a warm-up call of each setting (compilation, once per process): wall seconds, useful tokens (the drawn
lengths, summed) per second, GPU microseconds per useful token (one GPU), and the decode floor of the
useful work over the measured time: each useful token reads its KV cache (prompt + tokens before it)
and each step reads the weights once, at least max(longest, useful tokens / rows) steps, at the
device-to-device copy bandwidth measured at the start (prefill, ~1 % of the floor, left out).

    python bench/rollouts.py --mode static --tree /tmp/main --out $OUT/rollouts_static.json
    python bench/rollouts.py --mode continuous --rows 128,0 --static $OUT/rollouts_static.json
    python bench/rollouts.py --tiny            # CPU smoke run, both modes, seconds
"""

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="continuous,static", help="continuous and/or static (comma-separated)")
    p.add_argument("--tree", default=None, help="import minirl from DIR/minirl (a copy of main's, for static)")
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=2048, help="the cap of the drawn lengths")
    p.add_argument("--median", type=float, default=300.0)
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default="128", help="rows in flight, comma-separated (continuous: 0 = sized by memory)")
    p.add_argument("--static", default=None, help="a static run's JSON: continuous / static ratios at equal rows")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/rollouts_<modes>.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.requests, args.prompt_len, args.max_new_tokens, args.median = "tiny", 24, 8, 64, 12
        args.rows = "4,0" if args.rows == "128" else args.rows
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    if args.tree:
        sys.path.insert(0, os.path.abspath(args.tree))  # its minirl first; bench stays this checkout's
    # Imported only now: which minirl depends on --tree.
    import torch
    from bench import common
    from minirl import generate as gen

    device = common.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bandwidth = common.copy_bandwidth(device, nbytes=2**26 if args.tiny else 2**30)
    info = {**common.device_info(device), "minirl": os.path.dirname(gen.__file__)}
    print(f"device: {info}; copy bandwidth {bandwidth:.0f} GB/s (read + write)", flush=True)
    cfg = common.model_config(args.shape)
    model = common.random_model(cfg, device).to(dtype).eval()
    gen.fuse_projections(model)
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(0, cfg.vocab_size, (args.requests, args.prompt_len), generator=g).tolist()
    lengths = common.lognormal_lengths(args.requests, args.median, args.sigma, args.max_new_tokens, args.seed)
    stats = common.length_stats(lengths, args.max_new_tokens)
    print("lengths: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()), flush=True)
    params = gen.SamplingParams(args.max_new_tokens, temperature=1.0, seed=args.seed)
    counts = common.param_counts(cfg)
    weight_bytes = 2 * (counts["total"] if cfg.tie_word_embeddings else counts["total"] - counts["embedding"])

    def timed(fn) -> float:
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        return time.perf_counter() - t0

    def run(mode, prompts, lengths, rows):
        if mode == "continuous":
            outs = gen.generate(model, prompts, params, eos_ids=[], pad_id=0, max_batch_size=rows, limits=lengths)
            assert [len(o.token_ids) for o in outs] == lengths, "a row did not end at its drawn length"
            return
        for start in range(0, len(prompts), rows):  # static: one call per batch, until its longest row ends
            batch = slice(start, start + rows)
            longest = gen.SamplingParams(max(lengths[batch]), temperature=1.0, seed=args.seed)
            gen.generate(model, prompts[batch], longest, eos_ids=[], pad_id=0, max_batch_size=rows)

    results = []
    for mode in args.mode.split(","):
        for rows in [int(r) for r in args.rows.split(",")][:1 if mode == "static" else None]:
            # Warm-up on as many requests as rows in flight, with lengths 1, 2, 3, ...: they end one after
            # another, so a continuous batch steps at every batch size it will meet (a graph and a compile each).
            in_flight = min(args.requests, rows or rows_by_memory(gen, model, args, dtype))
            spread = [min(1 + i, args.max_new_tokens) for i in range(in_flight)]
            warm = timed(lambda: run(mode, prompts[:in_flight], spread, rows))
            wall = timed(lambda: run(mode, prompts, lengths, rows))
            floor = decode_floor_s(cfg, args.prompt_len, lengths, in_flight, weight_bytes, bandwidth)
            row = {"mode": mode, "rows": rows, "rows_in_flight": in_flight, "warm_up_s": warm, "wall_s": wall,
                   "useful_tokens_per_s": stats["total"] / wall, "gpu_us_per_useful_token": wall / stats["total"] * 1e6,
                   "decode_floor_s": floor, "roofline_frac": floor / wall}
            print(row, flush=True)
            results.append(row)
    report(args, info, bandwidth, stats, results, common)


def decode_floor_s(cfg, prompt_len: int, lengths: list[int], rows: int, weight_bytes: int, bandwidth_gbs: float):
    """The fewest bytes the useful work must move, over the bandwidth (see the module docstring)."""
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # k and v, bf16
    kv = sum(L * prompt_len + L * (L - 1) / 2 for L in lengths) * kv_per_token
    steps = max(max(lengths), math.ceil(sum(lengths) / rows))
    return (kv + steps * weight_bytes) / (bandwidth_gbs * 1e9)


def rows_by_memory(gen, model, args, dtype) -> int:
    """The rows a continuous call with max_batch_size 0 holds, as generate sizes them."""
    if model.embed_tokens.weight.device.type != "cuda":
        return min(args.requests, gen.CPU_BATCH_SIZE)
    from minirl.kvcache import FLEX_BLOCK, free_memory, rows_for_memory  # this checkout's (continuous) minirl
    width = -(-(args.prompt_len + args.max_new_tokens) // FLEX_BLOCK) * FLEX_BLOCK
    free = free_memory(model.embed_tokens.weight.device)
    return min(args.requests, rows_for_memory(model.cfg, width, args.max_new_tokens, free, dtype.itemsize))


def report(args, info, bandwidth, stats, results, common):
    static = json.load(open(args.static))["results"] if args.static else [r for r in results if r["mode"] == "static"]
    base = {r["rows_in_flight"]: r["wall_s"] for r in static}
    for r in results:
        if r["mode"] == "continuous" and r["rows_in_flight"] in base:
            r["speedup_vs_static"] = base[r["rows_in_flight"]] / r["wall_s"]
    workload = (f"{args.requests} requests, prompt {args.prompt_len}, lengths log-normal median {args.median:g} "
                f"sigma {args.sigma:g} capped at {args.max_new_tokens}")
    summary = [{"what": f"rollout {args.shape}, {workload}, {r['mode']} {r['rows_in_flight']} rows: useful tok/s | "
                        "roofline | vs static",
                "value": f"{r['useful_tokens_per_s']:.0f} | {100 * r['roofline_frac']:.0f}% | "
                         + (f"{r['speedup_vs_static']:.2f}x" if "speedup_vs_static" in r else "-"), "unit": ""}
               for r in results]
    common.write_json(common.out_path("rollouts_" + args.mode.replace(",", "_"), args.out), {
        "bench": "rollouts", "args": vars(args), "device": info, "copy_bandwidth_gbs": bandwidth,
        "lengths": stats, "results": results, "summary": summary})
    common.print_table(
        f"{workload} (mean {stats['mean']:.0f}, p50 {stats['p50']:.0f}, p90 {stats['p90']:.0f}, "
        f"p99 {stats['p99']:.0f}, "
        f"capped {100 * stats['capped_frac']:.1f} %); {info['name']}, roofline at {bandwidth:.0f} GB/s",
        ["mode", "rows", "wall s", "useful tok/s", "us/useful tok", "roofline", "vs static"],
        [[r["mode"], r["rows_in_flight"], r["wall_s"], r["useful_tokens_per_s"], r["gpu_us_per_useful_token"],
          f"{100 * r['roofline_frac']:.1f}%", r.get("speedup_vs_static")] for r in results])


if __name__ == "__main__":
    main()
