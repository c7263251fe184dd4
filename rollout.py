"""Generate and score completions for a file of prompts: the rollout half of RL, on its own.

    python rollout.py --model DIR --data prompts.jsonl --n-samples 4 --reward math --out rollouts.jsonl
    torchrun --nproc-per-node 8 rollout.py ...   # data parallel: rank r takes prompts r, r+8, r+16, ...

The flags are train.py's (same names, defaults, --config files), plus the output file, --dtype,
--kv-cache-gib and the log-prob check. One output line per completion, in prompt and sample order, flushed
chunk by chunk (4 x --gen-batch-size rows, or 1,024): Ctrl-C or SIGTERM keeps what is finished. Under
torchrun each rank writes OUT.rank<r>, merged into OUT at the end (OUT appears only complete).
--check-logprobs scores the completions with the trainer's packed forward (--check-dtype) and reports
how far the generator's log-probs are: a sequence's summed difference is the log of the importance ratio
that truncated importance sampling corrects, and its mean estimates KL(generator || trainer).
"""

import heapq
import json
import math
import os
import signal
import sys
import time
from itertools import groupby

import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl.attention import pick_backend
from minirl.backend import sample_seed
from minirl.config import Derived, TrainConfig, build_parser, config_from_args, derive, validate
from minirl.data import PromptDataset
from minirl.dist import Dist, agree, distributed
from minirl.hf import check_weights, load_model, load_state_dict_from_dir, read_config
from minirl.packing import micro_logprobs, pack, plan_micro_batches
from minirl.rollouts import Sample, complete, make_generator
from minirl.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# train.py's settings that rollout.py takes, by config section.
FIELDS = {"data": ("task", "model", "data", "prompt_field", "answer_field", "chat_template", "max_prompt_len",
                   "reward"),
          "rollout": ("backend", "n_samples", "temperature", "top_p", "top_k", "max_new_tokens", "gen_batch_size",
                      "vllm_memory", "env", "max_turns", "episode_tokens"),
          "run": ("seed",), "parallel": ("timeout_s", "trace_collectives")}
RENAMED = {"--n": "--n-samples", "--num-samples": "--n-samples", "--batch-size": "--gen-batch-size",
           "--gpu-memory-utilization": "--vllm-memory"}


def parse_args(argv=None) -> tuple[TrainConfig, dict]:
    """(the settings shared with train.py, rollout.py's own options); a bad one exits 2 with one line.
    Without --reward nothing is scored, and the generator keeps its weights (there is no training)."""
    base = TrainConfig()
    base.data.reward = ""
    p = build_parser(base, __doc__.split("\n\n")[0], FIELDS)
    p.epilog = ("Output fields: index, sample, prompt, prompt_token_ids, completion, completion_token_ids, logprobs, "
                "finish_reason, answer, and reward, trainer_logprobs when they apply; with --env also turns and mask "
                "(1 = the policy's token; observation tokens have null logprobs).")
    own = p.add_argument_group("rollout.py")
    own.add_argument("--out", required=True, help="output .jsonl, one line per completion (overwritten)")
    own.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                     help="generator weights (default auto: bfloat16 on GPU, float32 on CPU)")
    own.add_argument("--kv-cache-gib", type=float, help="vllm: KV cache size in GiB, instead of --vllm-memory "
                     "(default on CPU: 2)")
    own.add_argument("--check-logprobs", action="store_true",
                     help="recompute the log-probs with the trainer's packed forward, store them as trainer_logprobs "
                          "(null: outside the trainer's top-k/top-p set) and report the mismatch (mean |dlogprob|, "
                          "sequence KL estimate)")
    own.add_argument("--check-dtype", choices=tuple(DTYPES), default="float32",
                     help="dtype of the trainer model that --check-logprobs scores with (default float32)")
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.split("=")[0] in RENAMED:
            p.error(f"{arg.split('=')[0]} is now {RENAMED[arg.split('=')[0]]}, as in train.py")
    args = vars(p.parse_args(argv))
    # The parser leaves out a flag not given (build_parser's SUPPRESS default): None, as for --kv-cache-gib.
    mine = {k: args.pop(k, None) for k in ("out", "dtype", "kv_cache_gib", "check_logprobs", "check_dtype")}
    try:
        cfg = config_from_args(args, base)
        cfg.rollout.keep_generator = True
        validate(cfg)
        check_out(mine["out"], cfg)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if cfg.rollout.env and cfg.data.reward and "reward" in args:
        p.error("--env gives the rewards: leave out --reward")
    return cfg, mine


def check_out(out: str, cfg: TrainConfig) -> None:
    """--out must not be a file the run reads, under any name (a link): it is emptied before the prompts are
    read, and under torchrun replaced at the end."""
    if not os.path.exists(out):
        return
    model_files = [os.path.join(cfg.data.model, f) for f in os.listdir(cfg.data.model)] \
        if os.path.isdir(cfg.data.model) else []
    inputs = [(cfg.data.data, f"--data {cfg.data.data}"), *((f, f"{f} of --model") for f in model_files),
              (cfg.data.reward.rpartition(":")[0], "--reward's module"),
              (cfg.rollout.env.rpartition(":")[0], "--env's module")]
    for path, what in inputs:
        if path and os.path.isfile(path) and os.path.samefile(out, path):
            raise ValueError(f"--out {out} is {what}: writing it would destroy it; choose another --out")


@torch.no_grad()
def trainer_logprobs(model, samples: list[Sample], params, d: Dist, attn_backend: str,
                     max_tokens: int = 8192) -> list[list[float | None]]:
    """Each completion's token log-probs from the trainer's packing and forward, same distribution; None
    for a token outside the trainer's top-k/top-p set (-inf there: JSON has no infinity)."""
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
    """Generator vs trainer log-probs, one (generator, trainer) pair of lists per sequence: the mean and max
    |generator - trainer| over tokens, and the mean over sequences of sum(generator - trainer). A trainer
    None (a token outside the trainer's top-k/top-p set: an infinite ratio) is counted apart, with its
    sequence, and left out of the means; a generator None is an observation's token, not compared."""
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


def output_line(s: Sample, k: int, tok, scored: bool, trainer_lp) -> dict:
    """The jsonl line of completion `k` of its prompt."""
    p = s.prompt
    logprobs = [lp if m else None for lp, m in zip(s.gen_logprobs, policy_mask(s))]  # none for observations
    line = {"index": p.index, "sample": k, "prompt": p.text, "prompt_token_ids": p.token_ids,
            "completion": tok.decode(s.completion_ids), "completion_token_ids": s.completion_ids,
            "logprobs": logprobs, "finish_reason": s.finish_reason, "answer": p.answer}
    if scored:
        line["reward"] = s.reward
    if s.mask is not None:  # an episode: its turns in order, and which tokens are the policy's
        line |= {"turns": turns(s, tok), "mask": s.mask}
    if trainer_lp is not None:
        line["trainer_logprobs"] = trainer_lp
    return line


def turns(s: Sample, tok) -> list[dict]:
    """The trajectory cut where the mask changes: [{"role": "policy" or "env", "text", "token_ids"}]."""
    runs = [(m, [t for t, _ in run]) for m, run in groupby(zip(s.completion_ids, s.mask), key=lambda tm: tm[1])]
    return [{"role": "policy" if m == 1.0 else "env", "text": tok.decode(ids, skip_special_tokens=False),
             "token_ids": ids} for m, ids in runs]


def interrupt(signum, frame):
    raise KeyboardInterrupt(signum)  # Ctrl-C's has no signal number


def main(argv=None):
    """Parse (a bad flag exits 2), then generate inside the process group (`run`)."""
    cfg, own = parse_args(argv)
    traced = None
    if cfg.parallel.trace_collectives:  # started before the process group: also NCCL's flight recorder
        from minirl import ledger
        traced = ledger.start(os.path.join(os.path.dirname(os.path.abspath(own["out"])), "ledger"))
    with distributed(timeout_s=cfg.parallel.timeout_s) as d:  # gloo on CPUs, NCCL on GPUs; one rank without torchrun
        run(cfg, own, d)
        if traced is not None:
            traced.stop()


def load_inputs(cfg: TrainConfig, out: str, d: Dist) -> tuple[Tokenizer, list[tuple], int, Derived, str]:
    """(tokenizer, this rank's rows (prompt, sample k) for every world-th prompt, the number of prompts, the
    derived settings, this rank's output file). Every rank reads every prompt, so that all fail alike on
    a bad file; the output must be writable before minutes of model loading."""
    tok = Tokenizer.from_dir(cfg.data.model)
    ds = derive(cfg, tok)
    scored = ds.reward is not None or ds.episodes is not None
    data = PromptDataset(cfg.data.data, tok, cfg.data.prompt_field, cfg.data.answer_field,
                         cfg.data.chat_template and tok.has_chat_template, cfg.data.max_prompt_len,
                         need_answers=scored)
    if cfg.rollout.backend == "naive":
        check_weights(cfg.data.model)
    path = out if d.world == 1 else f"{out}.rank{d.rank}"
    open(path, "w").close()
    if d.world > 1 and d.is_main and os.path.isfile(out):
        os.remove(out)  # an earlier run's OUT must not sit beside this run's parts
    if d.is_main and data.dropped:
        print(f"data: dropped {data.dropped} prompts longer than {cfg.data.max_prompt_len} tokens", file=sys.stderr)
    if d.is_main and scored and data.missing_answers:
        print(f"warning: {data.missing_answers} rows have no {cfg.data.answer_field!r} field; they are scored "
              f"against an empty answer", file=sys.stderr)
    rows = [(p, k) for p in data.prompts[d.rank::d.world] for k in range(cfg.rollout.n_samples)]
    return tok, rows, len(data.prompts), ds, path


def run(cfg: TrainConfig, own: dict, d: Dist):
    """Generate this rank's rows chunk by chunk, appending each chunk's lines to its file; then agree on
    an error (a reward or environment failing on one rank), merge the parts and print a summary."""
    try:  # every input problem surfaces here, before any model is loaded, as one line (rank 0's)
        tok, rows, n_prompts, ds, path = load_inputs(cfg, own["out"], d)
    except (OSError, ValueError) as e:
        if d.is_main:
            print(f"rollout.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    rc, scored = cfg.rollout, ds.reward is not None or ds.episodes is not None
    dtype = None if own["dtype"] == "auto" else DTYPES[own["dtype"]]
    kv_bytes = int(own["kv_cache_gib"] * 2**30) if own["kv_cache_gib"] else None
    generator = make_generator(cfg, read_config(cfg.data.model), tok, d.device, dtype, kv_bytes)
    if rc.backend == "naive":
        generator.update_weights(load_state_dict_from_dir(cfg.data.model).items())
    if own["check_logprobs"]:
        trainer = load_model(cfg.data.model, d.device, DTYPES[own["check_dtype"]])
        # flash-attn and torch's varlen kernel take 16-bit inputs only: a float32 trainer uses sdpa.
        attn_backend = pick_backend(d.device, "sdpa" if own["check_dtype"] == "float32" else None)
    if d.is_main:
        print(f"rollout: {n_prompts} prompts x {rc.n_samples} samples on {d.world} rank(s), {rc.backend} backend, "
              f"{generator.dtype} on {d.device}")

    signal.signal(signal.SIGTERM, interrupt)  # like Ctrl-C: the chunks written so far stay
    written, gen_seconds, error = 0, 0.0, ""
    bar = tqdm(total=len(rows), unit="completion", disable=not d.is_main, desc="rank 0" if d.world > 1 else None)
    try:
        with open(path, "w", encoding="utf-8") as f:
            chunk = 4 * rc.gen_batch_size or 1024  # several batches: finished rows' slots take the chunk's next rows
            for start in range(0, len(rows), chunk):
                batch = rows[start:start + chunk]
                # The trainer's seed scheme (step 0): a row's samples depend on (seed, prompt, sample) only.
                seeds = [sample_seed(cfg.run.seed, 0, p.index, k) for p, k in batch]
                t0 = time.perf_counter()
                try:
                    samples = complete(generator, [p for p, _ in batch], seeds, ds.sampling, ds, tok, bar)
                except ValueError as e:  # a reward or environment error, on this rank alone: agreed on below
                    error = str(e)
                    break
                gen_seconds += time.perf_counter() - t0
                checked = trainer_logprobs(trainer, samples, ds.sampling, d, attn_backend) \
                    if own["check_logprobs"] else [None] * len(batch)
                f.writelines(json.dumps(output_line(s, k, tok, scored, lp), ensure_ascii=False) + "\n"
                             for s, (_, k), lp in zip(samples, batch, checked))
                f.flush()
                written += len(batch)
    except KeyboardInterrupt as e:
        bar.close()
        print(f"\ninterrupted: {written} completions were written to {path}", file=sys.stderr)
        sys.exit(128 + (e.args[0] if e.args else signal.SIGINT))  # 143 for SIGTERM, 130 for Ctrl-C
    bar.close()

    if error := agree(error):
        if d.is_main:
            print(f"rollout.py: error: {error}; the completions before it are in {own['out']}"
                  f"{'.rank*' if d.world > 1 else ''}", file=sys.stderr, flush=True)
        generator.close()
        sys.exit(1)
    slowest = torch.tensor([gen_seconds], device=d.device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # the ranks generate in parallel; every part is complete
    if d.is_main and d.world > 1:
        merge(own["out"], d.world)
    generator.close()  # before the process group goes: vLLM's shutdown tears it down
    if d.is_main:
        summarize(own["out"], max(slowest.item(), 1e-9), own["check_dtype"])


if __name__ == "__main__":
    main()
