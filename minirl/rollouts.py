"""The rollout phase of a step: generate completions (or multi-turn episodes), score them, gather them.

Every rank draws the same prompts and generates `n_samples` completions for its share (every world-th
prompt; one share per vLLM tensor-parallel group), each from its own seed (`backend.sample_seed`). The
gather gives every rank the whole step's samples in one global order, so advantages and the micro-batch
plan are computed identically everywhere with no more communication. rollout.py runs `complete` alone.
"""

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl.advantages import select_groups, zero_variance_groups
from minirl.backend import RolloutBackend, SamplingParams, sample_seed
from minirl.config import Derived, RolloutConfig, TrainConfig
from minirl.data import Prompt, PromptDataset
from minirl.dist import Dist, agree
from minirl.episodes import Episode, run_episodes
from minirl.generate import Generator
from minirl.model import ModelConfig
from minirl.report import Interrupt


@dataclass
class Sample:
    """One completion and everything the update needs about it."""

    prompt: Prompt
    completion_ids: list[int]
    gen_logprobs: list[float]
    finish_reason: str
    reward: float = 0.0
    # Multi-turn (minirl/episodes.py): 1.0 on the policy's tokens, 0.0 on observations, one per
    # completion token; gen_logprobs hold 0.0 at observations. None: every token is the policy's.
    mask: list[float] | None = None
    turns: int = 1

    @property
    def n_policy(self) -> int:
        """The tokens the loss counts (its normalisers' unit)."""
        return len(self.completion_ids) if self.mask is None else int(sum(self.mask))


def make_generator(cfg: TrainConfig, model_cfg: ModelConfig, tok, device: torch.device,
                   dtype: torch.dtype | None = None, kv_cache_bytes: int | None = None) -> RolloutBackend:
    """The rollout backend, without weights (the caller sends them). `dtype` defaults to bf16 on GPUs
    and fp32 on CPUs; `kv_cache_bytes` sizes vLLM's cache instead of --vllm-memory (2 GiB on CPUs)."""
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    rc = cfg.rollout
    if rc.backend == "vllm":
        from minirl.vllm_backend import VLLMGenerator  # optional extra, imported only when asked for
        return VLLMGenerator(cfg.data.model, tok.eos_ids, tp=rc.tp, seed=cfg.run.seed, dtype=dtype,
                             gpu_memory_utilization=rc.vllm_memory, sleep_mode=not rc.keep_generator,
                             kv_cache_bytes=kv_cache_bytes or (None if cuda else 2 << 30))
    return Generator(model_cfg, tok.eos_ids, tok.pad_id, device=device, dtype=dtype,
                     max_batch_size=rc.gen_batch_size, keep_resident=rc.keep_generator)


def generator_replicas(d: Dist, rc: RolloutConfig) -> tuple[int, int, bool]:
    """(this rank's replica, number of replicas, whether this rank reports its replica's results): a
    naive generator per rank, or a vLLM engine over `tp` consecutive ranks (same prompts; the first reports)."""
    tp = rc.tp if rc.backend == "vllm" else 1
    return d.rank // tp, d.world // tp, d.rank % tp == 0


def prompt_text(p: Prompt) -> str:
    """The prompt as the reward function sees it: the string, or chat messages as JSON."""
    return p.text if isinstance(p.text, str) else json.dumps(p.text)


def complete(generator: RolloutBackend, rows: list[Prompt], seeds: list[int] | None, params: SamplingParams,
             ds: Derived, tok, bar=None, interrupt: Interrupt | None = None) -> list[Sample]:
    """One scored Sample per row: a completion scored by the reward (none without one), or with --env a
    multi-turn episode scored by the environment. A bad reward or environment is a ValueError raised on
    this rank alone (callers `dist.agree` on it). A signal (`interrupt`, read as generation goes) cuts it short."""
    stop = interrupt.requested if interrupt is not None else None
    if ds.episodes is None:
        outs = generator.generate([p.token_ids for p in rows], params, seeds=seeds, progress=bar, stop=stop)
        rewards = [ds.reward(p.index, prompt_text(p), tok.decode(o.token_ids), p.answer) if ds.reward else 0.0
                   for p, o in zip(rows, outs)]
        return [Sample(p, o.token_ids, o.logprobs, o.finish_reason, r) for p, o, r in zip(rows, outs, rewards)]
    seeds = seeds or [sample_seed(params.seed, 0, i, 0) for i in range(len(rows))]
    episodes = [Episode(p.index, p.token_ids, seed, ds.episodes.make_env()) for p, seed in zip(rows, seeds)]
    run_episodes(generator, episodes, [prompt_text(p) for p in rows], [p.answer for p in rows], ds.episodes, tok,
                 params, bar, stop)
    return [Sample(p, e.ids, e.logprobs, e.finish_reason, e.reward, mask=e.mask, turns=e.turns)
            for p, e in zip(rows, episodes)]


def rollout(generator: RolloutBackend, prompts: list[Prompt], step: int, d: Dist, cfg: TrainConfig, ds: Derived,
            tok, progress: bool, interrupt: Interrupt | None = None) -> list[Sample]:
    """Generate n completions for this replica's share of the prompts, score them, gather all replicas'.
    A rank that got a signal leaves its remaining batches out and says so in the check all ranks join."""
    n = cfg.rollout.n_samples
    replica, n_replicas, reports = generator_replicas(d, cfg.rollout)
    mine = list(range(replica, len(prompts), n_replicas))
    rows = [prompts[i] for i in mine for _ in range(n)]
    seeds = [sample_seed(cfg.run.seed, step, prompts[i].index, k) for i in mine for k in range(n)]
    local, error = [], ""
    with tqdm(total=len(rows), desc="rollout", leave=False, disable=not progress, unit="seq") as bar:
        try:
            local = complete(generator, rows, seeds, ds.sampling, ds, tok, bar, interrupt) if rows else []
        except ValueError as e:
            error = str(e)
    if interrupt is not None:
        interrupt.check()
    if error := agree(error):
        raise ValueError(error)
    gathered = [None] * d.world
    dist.all_gather_object(gathered, local if reports else None)
    gathered = [g for g in gathered if g is not None]  # one list per replica, in replica order
    # Global order: prompt slot by slot, its n completions together (a GRPO group).
    samples = [None] * (len(prompts) * n)
    for r, replica_samples in enumerate(gathered):
        slots = list(range(r, len(prompts), n_replicas))
        for j, sample in enumerate(replica_samples):
            samples[slots[j // n] * n + j % n] = sample
    return samples


def rollout_groups(generator: RolloutBackend, data: PromptDataset, step: int, d: Dist, cfg: TrainConfig,
                   ds: Derived, tok, progress: bool, interrupt: Interrupt | None = None) -> tuple[list[Sample], dict]:
    """The step's samples, `prompts_per_step` groups of n drawn from `data`, and the draws' metrics.

    With --dynamic-sampling K (DAPO), a group whose rewards are all equal carries no signal: as many
    prompts as such groups are drawn again, at most K more times, and the step keeps the first groups of
    unequal rewards (`advantages.select_groups`). Every rank draws the same prompts and sees the same
    rewards, so all decide alike; the extra draws advance `data`, whose position the checkpoint saves.
    """
    n, need = cfg.rollout.n_samples, cfg.run.prompts_per_step
    samples = rollout(generator, data.next_batch(need), step, d, cfg, ds, tok, progress, interrupt)
    if not cfg.algo.dynamic_sampling:
        return samples, {}
    informative, draws = [], 0
    while True:
        rewards = torch.tensor([s.reward for s in samples[len(informative) * n:]])
        informative += (~zero_variance_groups(rewards, n)).tolist()
        if sum(informative) >= need or draws == cfg.algo.dynamic_sampling:
            break
        draws += 1
        samples += rollout(generator, data.next_batch(need - sum(informative)), step, d, cfg, ds, tok, progress,
                           interrupt)
    groups = select_groups(informative, need)
    return [samples[g * n + k] for g in groups for k in range(n)], {
        "extra_draws": draws, "drawn_groups": len(informative), "filled_groups": need - min(need, sum(informative))}


def evaluate(generator: RolloutBackend, prompts: list[Prompt], d: Dist, rc: RolloutConfig, ds: Derived,
             tok) -> float:
    """Greedy accuracy (reward > 0) on held-out prompts, each replica a share, summed over replicas."""
    replica, n_replicas, reports = generator_replicas(d, rc)
    mine, rewards, error = prompts[replica::n_replicas], [], ""
    try:
        rewards = [s.reward for s in complete(generator, mine, None, ds.greedy, ds, tok)] if mine else []
    except ValueError as e:
        error = str(e)
    if error := agree(error):
        raise ValueError(error)
    counts = torch.tensor([float(sum(r > 0 for r in rewards)), float(len(mine))], device=d.device) * reports
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()


def rollout_stats(samples: list[Sample], group_size: int) -> dict[str, float]:
    """The step's rollout metrics; with --env also turns per episode, policy tokens, and how often
    --max-turns ended one (`truncated` counts the token budget)."""
    r = torch.tensor([s.reward for s in samples])
    lens = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    n = len(samples)
    stats = {"reward_mean": r.mean().item(), "reward_std": r.std(correction=0).item(),
             "solved": (r > 0).float().mean().item(), "response_len": lens.mean().item(),
             "truncated": sum(s.finish_reason == "length" for s in samples) / n,
             "zero_var_groups": zero_variance_groups(r, group_size).float().mean().item()}
    if samples[0].mask is not None:
        stats |= {"turns": sum(s.turns for s in samples) / n, "policy_tokens": sum(s.n_policy for s in samples) / n,
                  "max_turns": sum(s.finish_reason == "max_turns" for s in samples) / n}
    return stats
