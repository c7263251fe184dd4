"""One end-to-end RL step on one GPU, timed phase by phase, plus a profile of where the GPU time goes.

A GRPO step of minirl is four phases (see train.py): rollout (the naive generator samples
n completions per prompt), log-probs (the policy scores the rollouts before the update: the "old"
log-probs; only with --mini-batches > 1, since one optimizer step takes them from its own forward,
`trainer.old_logprobs_needed`), train (packed
forward+backward per micro-batch, clip, AdamW) and weight sync (the updated FSDP2 policy streamed
into the generator's bf16 copy). This script runs exactly those phases with minirl's own pieces:
`fsdp.build_sharded`, `generate.Generator`, and the phases of `trainer.rl_step` (`pack_mini_batch`,
`set_advantages`, `logprobs_before_update`, `update`, the weight sync). Only the rollout is composed
here from `Generator.generate`, because `rollouts.rollout` also needs a tokenizer and text rewards.

Workload (synthetic): random-weight Qwen3-0.6B shape, --prompts random-token prompts of random length
around --prompt-len, --samples completions each, reward = fraction of even token ids in the completion
(meaningless, but it varies within a group, so advantages and gradients are not zero). Completion
lengths (--lengths; a random model never ends on its own, so each row's length is its limit):
- fixed: every completion --new-tokens long;
- lognormal: long-tailed, as real ones: drawn from a log-normal of median --median and sigma --sigma,
  capped at --new-tokens (bench.common.lognormal_lengths, seed 0, the same draws every step);
- mean: every completion as long as the mean of those draws (the same tokens, without the tail).
The warm-up step (compilation, CUDA graphs of every batch size) cuts every completion to 1..64 tokens.

Reported: median seconds per phase over --steps timed steps (after one warm-up step), and "other"
(wall minus the phases: scoring, packing micro-batches, releasing the generator), generated tokens/s
of the rollout, trained tokens/s, peak memory per phase; then one more step under
torch.profiler, whose top-15 operators by self GPU time (and by total GPU time) go to a text file
next to the JSON (`rl_step_profile.txt`).

    python bench/rl_step.py                 # 64 prompts x 8 samples x 256 new tokens, ~1.5 min on an H100
    python bench/rl_step.py --lengths lognormal,mean --new-tokens 2048 --no-profile   # the tail's cost
    python bench/rl_step.py --lora-rank 8   # LoRA adapters of rank 8 train, the base frozen (minirl/lora.py)
    python bench/rl_step.py --tiny          # CPU smoke run (gloo, fp32 generator, no CUDA graphs)
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch

from bench.common import (device_info, length_stats, lognormal_lengths, median, model_config, out_path, peak_memory_gb,
                          print_table, profile_table, random_model, reset_peak_memory, write_json)
from minirl import lora, trainer
from minirl.attention import pick_backend
from minirl.backend import SamplingParams
from minirl.config import TrainConfig, derive
from minirl.data import Prompt
from minirl.dist import Dist, distributed
from minirl.fsdp import build_sharded, iter_full_params
from minirl.generate import Generator
from minirl.packing import pack_mini_batch, split_mini_batches
from minirl.report import PhaseTimer
from minirl.rollouts import Sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-0.6b")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (GRPO group)")
    p.add_argument("--prompt-len", type=int, default=128, help="mean prompt length (uniform in [L/2, 3L/2])")
    p.add_argument("--new-tokens", type=int, default=256, help="completion length (lognormal: the cap)")
    p.add_argument("--lengths", default="fixed", help="fixed, lognormal and/or mean (comma-separated: run each)")
    p.add_argument("--median", type=float, default=300.0, help="lognormal lengths: median")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal lengths: sigma of the log")
    p.add_argument("--gen-batch", type=int, default=0, help="generator rows in flight (0: sized by memory, "
                                                             "train.py's default)")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per RL step")
    p.add_argument("--tis-cap", type=float, default=2.0,
                   help="truncated IS cap (0 = off); the old-log-probs phase runs only with --mini-batches > 1")
    p.add_argument("--no-compile", action="store_true", help="eager decoder blocks (train.py compiles them on GPUs)")
    p.add_argument("--no-checkpointing", action="store_true", help="no activation checkpointing in training")
    p.add_argument("--keep-generator", action="store_true", help="keep the generator copy resident in training")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank (0 = full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (updates are scaled by alpha / r)")
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU, seconds")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/rl_step.json or bench/results/)")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.prompts, args.samples, args.prompt_len, args.new_tokens = "tiny", 4, 2, 16, 8
        args.gen_batch, args.micro_batch_tokens, args.steps, args.median = 4, 64, 1, 4
    return args


def rl_config(args) -> TrainConfig:
    """The trainer's configuration for this workload (everything else at train.py's defaults)."""
    cfg = TrainConfig()
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens = args.samples, args.new_tokens
    cfg.rollout.gen_batch_size, cfg.rollout.keep_generator = args.gen_batch, args.keep_generator
    cfg.parallel.micro_batch_tokens = args.micro_batch_tokens
    cfg.parallel.compile = not args.no_compile
    cfg.parallel.checkpointing = "none" if args.no_checkpointing else cfg.parallel.checkpointing
    cfg.algo.mini_batches, cfg.run.prompts_per_step = args.mini_batches, args.prompts
    cfg.algo.tis_cap = args.tis_cap
    return cfg


def synthetic_prompts(n: int, mean_len: int, vocab: int, seed: int) -> list[Prompt]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, mean_len // 2), mean_len * 3 // 2 + 1, (n,), generator=g).tolist()
    return [Prompt(i, "", torch.randint(0, vocab, (L,), generator=g).tolist(), "") for i, L in enumerate(lengths)]


def even_token_reward(token_ids: list[int]) -> float:
    """A stand-in verifiable reward: the fraction of even token ids."""
    return sum(t % 2 == 0 for t in token_ids) / max(1, len(token_ids))


def completion_lengths(args, n: int) -> dict[str, list[int]]:
    """Each --lengths choice's n completion lengths (see the module docstring)."""
    drawn = lognormal_lengths(n, args.median, args.sigma, args.new_tokens, seed=0)
    mean = round(sum(drawn) / n)
    return {"fixed": [args.new_tokens] * n, "lognormal": drawn, "mean": [mean] * n}


def rollout(generator: Generator, prompts: list[Prompt], cfg: TrainConfig, seed: int, lengths: list[int],
            max_new_tokens: int) -> list[Sample]:
    """n completions per prompt, in the trainer's order (a prompt's group together), rewarded; completion
    i ends at lengths[i] tokens (max_new_tokens sizes the cache)."""
    rc = cfg.rollout
    rows = [p for p in prompts for _ in range(rc.n_samples)]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                            top_k=rc.top_k, seed=seed)
    outs = generator.generate([p.token_ids for p in rows], params, limits=lengths)
    return [Sample(p, o.token_ids, o.logprobs, o.finish_reason, even_token_reward(o.token_ids))
            for p, o in zip(rows, outs)]


def rl_step(step: int, policy: trainer.Policy, generator, prompts, cfg, d: Dist, lengths: list[int],
            max_new_tokens: int | None = None) -> dict:
    """One step as trainer.rl_step runs it; returns phase times (s), peak memory (GiB) and token counts."""
    timer, ds = PhaseTimer(d.device), derive(cfg, None)
    reset_peak_memory(d.device)
    with timer.phase("rollout"):
        samples = rollout(generator, prompts, cfg, step, lengths, max_new_tokens or max(lengths))
    mem = {"rollout": peak_memory_gb(d.device)}
    generator.release()
    reset_peak_memory(d.device)
    minis = split_mini_batches(len(samples), cfg.algo.mini_batches)
    batches = [pack_mini_batch(samples, mb, d, cfg.parallel.micro_batch_tokens, 0, policy.attn_backend)
               for mb in minis]
    trainer.set_advantages(samples, batches, ds.advantage)
    with timer.phase("logprobs"):
        need_old = trainer.old_logprobs_needed(len(minis), cfg.algo.ppo_epochs)
        trainer.logprobs_before_update(policy, batches, need_old, cfg.rollout.temperature, progress=False)
    with timer.phase("train"):
        trainer.update(policy, samples, minis, batches, d, ds, cfg.optim.grad_clip, cfg.algo.ppo_epochs,
                       progress=False)
    mem["logprobs+train"] = peak_memory_gb(d.device)
    reset_peak_memory(d.device)
    with timer.phase("weight_sync"):
        generator.update_weights(lora.merged(policy.model, iter_full_params(policy.model, generator.dtype)))
    mem["weight_sync"] = peak_memory_gb(d.device)
    times = {k.removeprefix("time/"): v for k, v in timer.summary().items()}
    generated = sum(len(s.completion_ids) for s in samples)
    trained = sum(len(s.prompt.token_ids) + len(s.completion_ids) - 1 for s in samples)
    return {"times": times, "peak_mem_gb": mem, "generated_tokens": generated, "trained_tokens": trained}


def main(argv=None):
    args = parse_args(argv)
    with distributed(1) as d:
        run(args, d)


def build(args, d: Dist, dtype):
    """The FSDP2 policy (random weights), its AdamW and schedule, the generator holding a synced copy."""
    cfg, model_cfg = rl_config(args), model_config(args.shape)
    weights = random_model(model_cfg, d.device).state_dict()
    adapters = lora.AdapterSpec(args.lora_rank, args.lora_alpha) if args.lora_rank else None
    model = build_sharded(model_cfg, weights, d, cfg.parallel, train=True, adapters=adapters)
    del weights
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: 1.0)  # train.py's default: constant
    generator = Generator(model_cfg, eos_ids=[], pad_id=0, device=d.device, dtype=dtype,
                          max_batch_size=cfg.rollout.gen_batch_size, keep_resident=cfg.rollout.keep_generator)
    generator.update_weights(lora.merged(model, iter_full_params(model, dtype)))
    return cfg, trainer.Policy(model, optimizer, scheduler, attn_backend=pick_backend(d.device)), generator


def run(args, d: Dist):
    if d.world != 1:
        raise SystemExit("rl_step.py measures one GPU: run it with plain python or --nproc-per-node 1")
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32  # as train.py
    print(f"device: {device_info(d.device)}", flush=True)
    t0 = time.perf_counter()
    cfg, policy, generator = build(args, d, dtype)
    prompts = synthetic_prompts(args.prompts, args.prompt_len, policy.model.cfg.vocab_size, seed=0)
    print(f"built policy and generator in {time.perf_counter() - t0:.1f} s", flush=True)
    n = args.prompts * args.samples
    choices = completion_lengths(args, n)
    results = {}
    for name in args.lengths.split(","):
        lengths = choices[name]
        t0 = time.perf_counter()  # warm-up: the same cache width, completions of 1..64 tokens
        rl_step(0, policy, generator, prompts, cfg, d, [min(1 + i % 64, max(lengths)) for i in range(n)], max(lengths))
        print(f"{name}: warm-up step {time.perf_counter() - t0:.1f} s", flush=True)
        steps = []
        for i in range(1, args.steps + 1):
            t0 = time.perf_counter()
            steps.append(rl_step(i, policy, generator, prompts, cfg, d, lengths))
            steps[-1]["wall_s"] = time.perf_counter() - t0
            print(steps[-1], flush=True)
        results[name] = {"lengths": length_stats(lengths, args.new_tokens), **medians(steps)}
    json_path = out_path("rl_step", args.out)
    report(args, results, "see rl_step_profile.txt" if not args.no_profile else "off (--no-profile)", d.device,
           json_path)  # written before profiling: the timings stand whatever the profiler does
    if not args.no_profile:
        # Profiling hundreds of decode steps records millions of kernels; 32 new tokens show the same
        # rollout kernels, and the training phases are unchanged.
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        profile_path = os.path.join(os.path.dirname(json_path), "rl_step_profile.txt")
        try:  # the timings above stand even if the profiler fails on this machine
            print(profile_table(lambda: rl_step(args.steps + 1, policy, generator, prompts, cfg, d, [32] * n),
                                d.device, "one RL step", profile_path, rows=15))
        except RuntimeError as e:
            print(f"note: profiler failed: {e}", flush=True)


def medians(steps: list[dict]) -> dict:
    """Median seconds per phase over the timed steps, "other" (wall minus the phases: scoring, packing
    micro-batches, releasing the generator), token rates and peak memory."""
    phase_s = {k: median([s["times"][k] for s in steps]) for k in steps[0]["times"]}
    wall = median([s["wall_s"] for s in steps])
    phase_s["other"] = wall - sum(phase_s.values())
    return {"steps": steps, "median_phase_s": phase_s, "median_wall_s": wall,
            "rollout_tokens_per_s": steps[0]["generated_tokens"] / phase_s["rollout"],
            "train_tokens_per_s": steps[0]["trained_tokens"] / phase_s["train"],
            "peak_mem_gb": steps[-1]["peak_mem_gb"]}


def report(args, results: dict, profile_note: str, device, json_path: str):
    """JSON, then one phase table per length choice (and the step time of each over the mean-length
    step's, if one ran, else over the first's)."""
    lora_note = f" LoRA r{args.lora_rank}" if args.lora_rank else ""
    workload = f"{args.shape} {args.prompts}x{args.samples}{lora_note}, "
    ref = results.get("mean", next(iter(results.values())))["median_wall_s"]
    summary = []
    for name, r in results.items():
        what = workload + (f"{args.new_tokens} new tokens" if name == "fixed" else
                           f"{name} lengths (mean {r['lengths']['mean']:.0f}, cap {args.new_tokens})")
        phase_s = r["median_phase_s"]
        summary += [{"what": f"RL step {what}: wall = " + " + ".join(phase_s), "unit": "s",
                     "value": f"{r['median_wall_s']:.2f} = " + " + ".join(f"{v:.2f}" for v in phase_s.values())},
                    {"what": f"RL step {what}: rollout generated tok/s | train tok/s | step / reference's", "unit": "",
                     "value": f"{r['rollout_tokens_per_s']:.0f} | {r['train_tokens_per_s']:.0f} | "
                              f"{r['median_wall_s'] / ref:.2f}x"}]
    write_json(json_path, {"bench": "rl_step", "args": vars(args), "device": device_info(device), "results": results,
                           "profile": profile_note, "summary": summary})
    for name, r in results.items():
        wall, mem = r["median_wall_s"], r["peak_mem_gb"]  # log-probs and train share one memory figure
        rows = [[k, v, 100 * v / wall, mem.get(k, mem["logprobs+train"] if k in ("logprobs", "train") else None)]
                for k, v in r["median_phase_s"].items()]
        rows.append(["(wall)", wall, 100.0, None])
        stats = r["lengths"]
        print_table(f"RL step, {workload}{name} lengths (mean "
                    f"{stats['mean']:.0f}, p50 {stats['p50']:.0f}, p99 {stats['p99']:.0f}, max {args.new_tokens}): "
                    f"rollout {r['rollout_tokens_per_s']:.0f} generated tok/s, train {r['train_tokens_per_s']:.0f} "
                    f"tok/s; step {wall / ref:.2f}x the reference's",
                    ["phase", "median s", "% of step", "peak GiB"], rows)


if __name__ == "__main__":
    main()
