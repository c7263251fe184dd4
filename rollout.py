"""Generate and score completions for a file of prompts: the rollout half of RL, on its own.

    python rollout.py --model DIR --data prompts.jsonl --n 4 --reward math --out rollouts.jsonl
    torchrun --nproc-per-node 8 rollout.py --num-samples 4 ...   # data parallel: rank r takes
                                                               # prompts r, r+8, r+16, ...

Each output line is one completion, in prompt order (and sample order within a prompt). Lines are
written and flushed batch by batch, so an interrupted run (Ctrl-C, or SIGTERM as torchrun and
schedulers send it) keeps everything finished so far; under torchrun each rank writes OUT.rank<r> and
rank 0 merges them into OUT at the end (an interrupted run leaves only the OUT.rank<r> parts: an OUT
of an earlier run is removed at the start, and OUT appears only complete).

--check-logprobs recomputes the completions' log-probs with the trainer's packed forward (in
--check-dtype, with the same temperature/top-k/top-p) and reports how far the generator's are. The
per-sequence sum of (generator - trainer) log-probs is the log of the importance ratio that
truncated importance sampling corrects; its mean estimates KL(generator || trainer).
"""

import argparse
import heapq
import json
import math
import os
import signal
import sys
import time
import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl.attention import pick_backend
from minirl.backend import RolloutBackend, SamplingParams, sample_seed
from minirl.data import Prompt, plan_micro_batches, read_records
from minirl.config import RolloutConfig
from minirl.dist import Dist, distributed
from minirl.env import load_env, stop_token_id
from minirl.generate import Generator
from minirl.hf import check_weights, load_model, load_state_dict_from_dir, read_config
from minirl.ledger import start as start_ledger
from minirl.rewards import load_reward
from minirl.tokenizer import Tokenizer
from minirl.trainer import Sample, complete, micro_logprobs, pack, prompt_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Output fields: index, sample, "
                                "prompt, prompt_token_ids, completion, completion_token_ids, logprobs, finish_reason, "
                                "and answer, reward, trainer_logprobs when they apply; with --env also turns and "
                                "mask (1 = the policy's token; observation tokens have null logprobs).")
    p.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--data", required=True, help="prompts, one JSON object per line (.jsonl; .parquet with pyarrow)")
    p.add_argument("--out", required=True, help="output .jsonl, one line per completion (overwritten)")
    p.add_argument("--backend", choices=("naive", "vllm"), default="naive",
                   help="naive (default): minirl's pure-PyTorch generator; vllm: a vLLM engine (pip install vllm)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=4,
                   help="completions per prompt (default 4). Under torchrun spell it --num-samples: torchrun "
                        "takes --n for an abbreviation of its own options")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1; 0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "holding this much probability (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (default 0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion length limit (default 512)")
    p.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the tokenizer's chat template (default: if the tokenizer has one)")
    p.add_argument("--reward", help="score each completion with a built-in reward (math, exact) or module:function "
                   "called as fn(prompt, completion, answer) -> float (default: no reward)")
    p.add_argument("--env", default="", help="multi-turn episodes with an environment, module:Name or file.py:Name "
                   "(minirl/env.py); it gives the rewards. Lines then also hold turns and mask")
    p.add_argument("--max-turns", type=int, default=4, help="with --env: policy turns per episode at most (default 4)")
    p.add_argument("--episode-tokens", type=int, default=0, help="with --env: tokens after the prompt per episode, "
                   "turns and observations (default 0 = max-turns x max-new-tokens)")
    p.add_argument("--prompt-field", default="prompt",
                   help="field holding the prompt, a string or a list of chat messages (default: prompt)")
    p.add_argument("--answer-field", default="answer",
                   help="field holding the reference answer handed to the reward (default: answer)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; a rerun with the same settings repeats the "
                   "samples, on any number of ranks, exactly on CPU, up to GPU kernel nondeterminism (default 0)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="completions generated together and written out after each batch (default 64). naive: "
                        "rows of one KV cache, lower it on out-of-memory; vllm: requests per call, larger is faster")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="generator weights (default auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8,
                   help="vllm: fraction of GPU memory for its weights, activations and KV cache (default 0.8)")
    p.add_argument("--kv-cache-gib", type=float,
                   help="vllm: KV cache size in GiB, instead of --gpu-memory-utilization (default on CPU: 2)")
    p.add_argument("--check-logprobs", action="store_true",
                   help="recompute the log-probs with the trainer's packed forward, store them as "
                        "trainer_logprobs (null: outside the trainer's top-k/top-p set) and report the mismatch "
                        "(mean |dlogprob|, sequence KL estimate)")
    p.add_argument("--check-dtype", choices=tuple(DTYPES), default="float32",
                   help="dtype of the trainer model that --check-logprobs scores with (default float32)")
    p.add_argument("--trace-collectives", action="store_true",
                   help="record every collective of every rank in ledger/ beside --out and report where the "
                        "ranks parted on a hang (minirl/ledger.py)")
    args = p.parse_args(argv)
    for name, value, ok in [("--n", args.n, args.n >= 1), ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--max-turns", args.max_turns, args.max_turns >= 1),
                            ("--episode-tokens", args.episode_tokens, args.episode_tokens >= 0),
                            ("--seed", args.seed, 0 <= args.seed < 2**31)]:
        if not ok:
            p.error(f"{name} {value} is out of range")
    try:
        sampling_params(args).check()
        if args.env:
            load_env(args.env)
    except ValueError as e:
        p.error(str(e))
    if args.env and args.reward:
        p.error("--env gives the rewards: leave out --reward")
    return args


def sampling_params(args) -> SamplingParams:
    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def episode_config(args) -> RolloutConfig:
    """The multi-turn settings, in the trainer's form."""
    return RolloutConfig(max_new_tokens=args.max_new_tokens, env=args.env, max_turns=args.max_turns,
                         episode_tokens=args.episode_tokens)


def load_rows(args, tok: Tokenizer, chat: bool, rank: int, world: int) -> tuple[list[tuple[Prompt, int]], int]:
    """This rank's rows, (prompt, sample k), for every world-th prompt and k < --n, and the number of
    prompts. A prompt's index is its record number in the file (0-based); its answer None if absent.

    Every record is checked, not only this rank's, so that all ranks fail alike on a bad file.
    """
    records = read_records(args.data)
    if not records:
        raise ValueError(f"{args.data}: no prompts")
    for i, rec in enumerate(records):
        if args.prompt_field not in rec:
            raise ValueError(f"{args.data}: record {i + 1} has no field {args.prompt_field!r} (fields: {sorted(rec)})")
        if args.reward and args.answer_field not in rec:
            raise ValueError(f"{args.data}: record {i + 1} has no field {args.answer_field!r}, which --reward needs "
                             f"(fields: {sorted(rec)})")
    rows = []
    for i in range(rank, len(records), world):
        rec = records[i]
        try:
            ids = tok.encode_prompt(rec[args.prompt_field], chat=chat)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{args.data}: record {i + 1}: {e}") from None
        if not ids:
            raise ValueError(f"{args.data}: record {i + 1}: the prompt is empty (no tokens to generate from)")
        answer = str(rec[args.answer_field]) if args.answer_field in rec else None
        rows += [(Prompt(i, rec[args.prompt_field], ids, answer), k) for k in range(args.n)]
    return rows, len(records)


@torch.no_grad()
def trainer_logprobs(model, samples: list[Sample], params: SamplingParams, d: Dist, attn_backend: str,
                     max_tokens: int = 8192) -> list[list[float | None]]:
    """Each completion's token log-probs from the trainer's packing and forward, same distribution.

    A token the trainer's top-k/top-p set excludes has log-prob -inf there; it is returned as None
    (JSON has no infinity).
    """
    lengths = [len(s.prompt.token_ids) + len(s.completion_ids) - 1 for s in samples]
    out = [None] * len(samples)
    for micro in plan_micro_batches(lengths, 1, max(max_tokens, *lengths))[0]:
        mb = pack(samples, micro, 0, d, attn_backend)
        logp, _ = micro_logprobs(model, mb, params.temperature, params.top_k, params.top_p)  # [t]
        logp = logp[mb.mask.bool()].tolist()  # the policy's tokens, sequence after sequence
        for i in micro:
            n = samples[i].n_policy
            mine, logp = iter([x if x != -math.inf else None for x in logp[:n]]), logp[n:]
            out[i] = [next(mine) if m else None for m in policy_mask(samples[i])]  # None at observations
    return out


def policy_mask(s: Sample) -> list[bool]:
    return [True] * len(s.completion_ids) if s.mask is None else [m == 1.0 for m in s.mask]


def merge(out: str, world: int):
    """Rank 0: interleave the per-rank files (each sorted by prompt, sample) into `out`, then delete them."""
    parts = [f"{out}.rank{r}" for r in range(world)]
    files = [open(p, encoding="utf-8") for p in parts]
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(heapq.merge(*files, key=_order))
    os.replace(out + ".tmp", out)  # an interrupted merge leaves no partial OUT
    for fh, p in zip(files, parts):
        fh.close()
        os.remove(p)


def _order(line: str) -> tuple[int, int]:
    d = json.loads(line)
    return d["index"], d["sample"]


def logprob_mismatch(pairs: list[tuple[list[float], list[float | None]]]) -> dict:
    """Generator vs trainer log-probs of the same tokens: one (generator, trainer) pair of lists per sequence.

    Returns the mean and max |generator - trainer| over tokens, and the mean over sequences of
    sum(generator - trainer): the log importance ratio of a whole sequence, whose mean estimates
    KL(generator || trainer). A trainer log-prob of None is a token the generator sampled but the
    trainer's top-k/top-p set excludes (their numerics put it on opposite sides of the cut): its ratio
    is infinite, so such tokens and their sequences are counted apart and left out of the means.
    A generator log-prob of None is an observation's token (--env): not the policy's, not compared.
    """
    deltas, seq_sums, outside_tokens, outside_seqs = [], [], 0, 0
    for gen, trainer in pairs:
        d = [g - t for g, t in zip(gen, trainer, strict=True) if g is not None and t is not None]
        deltas += d
        if len(d) < sum(g is not None for g in gen):
            outside_tokens += sum(g is not None for g in gen) - len(d)
            outside_seqs += 1
        else:
            seq_sums.append(sum(d))
    return {"tokens": len(deltas), "mean_abs": sum(map(abs, deltas)) / max(len(deltas), 1),
            "max_abs": max(map(abs, deltas), default=0.0), "seq_kl": sum(seq_sums) / max(len(seq_sums), 1),
            "outside_tokens": outside_tokens, "outside_seqs": outside_seqs}


def summarize(out: str, seconds: float, check_dtype: str):
    """Read the finished file back and print throughput, mean reward and the log-prob mismatch."""
    n = tokens = stops = 0
    rewards, pairs = [], []
    with open(out, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            n, tokens = n + 1, tokens + len(d["completion_token_ids"])
            stops += d["finish_reason"] in ("stop", "done")  # "done": the environment ended the episode
            if "reward" in d:
                rewards.append(d["reward"])
            if "trainer_logprobs" in d:
                pairs.append((d["logprobs"], d["trainer_logprobs"]))
    print(f"wrote {n} completions to {out}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s, "
          f"{stops / n:.0%} ended with EOS (or, with --env, by the environment)")
    if rewards:
        print(f"mean reward {sum(rewards) / len(rewards):.4f}")
    if pairs:
        m = logprob_mismatch(pairs)
        print(f"logprob check vs {check_dtype} trainer over {m['tokens']} tokens: mean |dlogprob| {m['mean_abs']:.3e} "
              f"(max {m['max_abs']:.3e}), sequence KL(generator||trainer) estimate {m['seq_kl']:.3e}")
        if m["outside_tokens"]:
            print(f"  {m['outside_tokens']} sampled tokens in {m['outside_seqs']} sequences lie outside the trainer's "
                  f"top-k/top-p set (trainer log-prob -inf, null in the file) and are left out above")


def make_generator(args, tok: Tokenizer, device, dtype) -> RolloutBackend:
    """The chosen backend, holding the model's weights."""
    if args.backend == "naive":
        generator = Generator(read_config(args.model), tok.eos_ids, tok.pad_id, device, dtype,
                              max_batch_size=args.batch_size, keep_resident=True)
        generator.update_weights(load_state_dict_from_dir(args.model).items())
        return generator
    from minirl.vllm_backend import VLLMGenerator  # imported only when asked: vllm is optional
    memory = {"gpu_memory_utilization": args.gpu_memory_utilization}
    if args.kv_cache_gib is not None or device.type == "cpu":  # on CPU vLLM needs an explicit size
        memory = {"kv_cache_bytes": int((args.kv_cache_gib or 2.0) * 2**30)}
    try:
        return VLLMGenerator(args.model, eos_ids=tok.eos_ids, seed=args.seed, dtype=dtype, sleep_mode=False,
                             **memory)
    except ImportError as e:  # vllm not installed: the message says what to install
        sys.exit(f"rollout.py: error: {e}")


def output_line(s: Sample, k: int, text: str, reward_fn, trainer_lp, tok) -> dict:
    p = s.prompt
    logprobs = [lp if m else None for lp, m in zip(s.gen_logprobs, policy_mask(s))]  # none for observations
    line = {"index": p.index, "sample": k, "prompt": p.text, "prompt_token_ids": p.token_ids, "completion": text,
            "completion_token_ids": s.completion_ids, "logprobs": logprobs, "finish_reason": s.finish_reason}
    if p.answer is not None:
        line["answer"] = p.answer
    if reward_fn is not None:  # checked: a NaN, None or exception is a ValueError naming the prompt
        line["reward"] = reward_fn(p.index, prompt_text(p), text, p.answer)
    if s.mask is not None:  # an episode: its turns in order, and which tokens are the policy's
        line |= {"reward": s.reward, "turns": turns(s, tok), "mask": s.mask}
    if trainer_lp is not None:
        line["trainer_logprobs"] = trainer_lp
    return line


def turns(s: Sample, tok) -> list[dict]:
    """The trajectory cut where the mask changes: [{"role": "policy" or "env", "text", "token_ids"}]."""
    out = []
    for t, m in zip(s.completion_ids, s.mask):
        role = "policy" if m == 1.0 else "env"
        if not out or out[-1]["role"] != role:
            out.append({"role": role, "token_ids": []})
        out[-1]["token_ids"].append(t)
    return [{"role": d["role"], "text": tok.decode(d["token_ids"], skip_special_tokens=False),
             "token_ids": d["token_ids"]} for d in out]


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    # Started before the process group, the ledger also switches on NCCL's flight recorder.
    traced = start_ledger(os.path.join(os.path.dirname(os.path.abspath(args.out)), "ledger")) \
        if args.trace_collectives else None
    with distributed() as d:  # a gloo group on CPUs, NCCL on GPUs; one rank without torchrun
        run(args, d)
        if traced is not None:
            traced.stop()


def run(args, d: Dist):
    rank, world = d.rank, d.world
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if d.device.type == "cuda" else "float32")
    # Every input problem surfaces here, before any model is loaded, as one line.
    try:
        tok = Tokenizer.from_dir(args.model)
        chat = tok.has_chat_template if args.chat_template is None else args.chat_template
        reward_fn = load_reward(args.reward) if args.reward else None
        if args.env:
            stop_token_id(args.env, tok)  # the env's stop text is one token of this tokenizer
        rows, n_prompts = load_rows(args, tok, chat, rank, world)
        if args.backend == "naive":
            check_weights(args.model)
        path = args.out if world == 1 else f"{args.out}.rank{rank}"
        open(path, "w").close()  # the output is writable, before minutes of model loading
        if world > 1 and rank == 0 and os.path.isfile(args.out):
            os.remove(args.out)  # an earlier run's OUT must not sit beside this run's parts
    except (OSError, ValueError) as e:  # every rank reads the same inputs: rank 0 speaks for all
        if rank == 0:
            print(f"rollout.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

    generator = make_generator(args, tok, d.device, DTYPES[dtype])
    if args.check_logprobs:
        trainer = load_model(args.model, d.device, DTYPES[args.check_dtype])
        # flash-attn and torch's varlen kernel take 16-bit inputs only: a float32 trainer uses sdpa.
        attn_backend = pick_backend(d.device, "sdpa" if args.check_dtype == "float32" else None)
    if rank == 0:
        print(f"rollout: {n_prompts} prompts x {args.n} samples on {world} rank(s), {args.backend} backend, "
              f"{dtype} on {d.device}, chat template {'on' if chat else 'off'}")

    params = sampling_params(args)
    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: the batches written so far stay
    written, gen_seconds, error = 0, 0.0, ""
    bar = tqdm(total=len(rows), unit="completion", disable=rank != 0, desc="rank 0" if world > 1 else None)
    try:
        with open(path, "w", encoding="utf-8") as f:
            for start in range(0, len(rows), args.batch_size):
                batch = rows[start:start + args.batch_size]
                # The trainer's seed scheme (step 0): a row's samples depend on (seed, prompt, sample) only.
                seeds = [sample_seed(args.seed, 0, p.index, k) for p, k in batch]
                t0 = time.perf_counter()
                if args.env:  # multi-turn episodes (minirl/episodes.py), scored by the environment
                    samples, error = complete(generator, [p for p, _ in batch], seeds, params, episode_config(args),
                                              None, tok, bar)
                    if error:
                        break
                else:
                    completions = generator.generate([p.token_ids for p, _ in batch], params, progress=bar,
                                                     seeds=seeds)
                    samples = [Sample(p, c.token_ids, c.logprobs, c.finish_reason)
                               for (p, _), c in zip(batch, completions)]
                gen_seconds += time.perf_counter() - t0
                checked = trainer_logprobs(trainer, samples, params, d, attn_backend) \
                    if args.check_logprobs else [None] * len(batch)
                try:
                    lines = [output_line(s, k, tok.decode(s.completion_ids), reward_fn, trainer_lp, tok)
                             for s, (_, k), trainer_lp in zip(samples, batch, checked)]
                except ValueError as e:  # a reward error, on this rank alone: agreed on below
                    error = str(e)
                    break
                f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
                f.flush()
                written += len(batch)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {written} completions were written to {path}", file=sys.stderr)
        sys.exit(130)
    bar.close()

    errors = [""] * world
    dist.all_gather_object(errors, error)
    if first := next((e for e in errors if e), ""):
        if rank == 0:
            print(f"rollout.py: error: {first}; the completions before it are in {args.out}"
                  f"{'.rank*' if world > 1 else ''}", file=sys.stderr, flush=True)
        generator.close()
        sys.exit(1)
    slowest = torch.tensor([gen_seconds], device=d.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the ranks generate in parallel
    dist.barrier()  # every part file is complete
    if rank == 0 and world > 1:
        merge(args.out, world)
    generator.close()  # before the process group goes: vLLM's shutdown tears it down
    if rank == 0:
        summarize(args.out, max(slowest.item(), 1e-9), args.check_dtype)


if __name__ == "__main__":
    main()
