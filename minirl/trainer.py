"""One RL step, top to bottom (`rl_step`): rollout -> rewards -> advantages -> old/ref log-probs ->
micro-batched PPO updates -> weight sync -> a metrics row. train.py sets up and loops over steps.

Data layout through a step:
- Prompts: every rank draws the same `prompts_per_step` prompts (same seeded order) and generates
  `n_samples` completions for its share (every world-th prompt; one share per vLLM tensor-parallel
  group), each completion from its own seed (`backend.sample_seed` of step, prompt and sample). The
  completions are then gathered so every rank holds the whole step's samples in the same global
  order: advantages, mini-batches and the micro-batch plan are computed identically everywhere, with
  no further communication.
- Training: each mini-batch is planned over the dp ranks (`plan_micro_batches`); the sp ranks of one
  dp group run the same micro-batches, each on its slice of the tokens (Ulysses). Every rank's loss is
  its exact share of the mini-batch loss (weights normalised by mini-batch counts), and FSDP sums the
  gradients, so the update equals a single process's update on the whole mini-batch.
No `.item()` or logging inside the micro-batch loop: metrics stay on the device and are reduced once
per step, phase times come from events read once per step.
"""

import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl import lora, ulysses
from minirl.algorithms import (LossConfig, Sequences, group_advantages, policy_loss, token_weights,
                               zero_variance_groups)
from minirl.attention import pick_backend
from minirl.backend import RolloutBackend, sample_seed
from minirl.config import RolloutConfig, TrainConfig, loss_config, sample_budget, sampling_params
from minirl.data import Prompt, plan_micro_batches
from minirl.dist import Dist
from minirl.env import load_env, stop_token_id
from minirl.episodes import Episode, episode_stats, run_episodes
from minirl.fsdp import clip_grad_norm_, iter_full_params
from minirl.model import Transformer
from minirl.report import Interrupted, PhaseTimer, StopFlag


@dataclass
class Sample:
    """One completion and everything the update needs about it."""

    prompt: Prompt
    completion_ids: list[int]
    gen_logprobs: list[float]
    finish_reason: str
    reward: float = 0.0
    advantage: float = 0.0
    # Multi-turn (minirl/episodes.py): 1.0 on the policy's tokens, 0.0 on observations, one per
    # completion token; gen_logprobs hold 0.0 at observations. None: every token is the policy's.
    mask: list[float] | None = None
    turns: int = 1

    @property
    def n_policy(self) -> int:
        """The tokens the loss counts (its normalisers' unit)."""
        return len(self.completion_ids) if self.mask is None else int(sum(self.mask))


@dataclass
class MicroBatch:
    """Per-token tensors of one packed micro-batch, already sliced for this sp rank ([t] each)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    meta: object  # AttnMeta
    targets: torch.Tensor
    mask: torch.Tensor  # 1.0 where the target is a completion token
    seq_ids: torch.Tensor  # index of the token's sequence within the mini-batch
    advantages: torch.Tensor
    gen_logprobs: torch.Tensor


@dataclass
class Policy:
    """The trained model (FSDP2-sharded) with its optimizer and lr schedule; the frozen reference
    model when a KL penalty needs one (with LoRA: the trained model itself, its adapters switched off)."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ref_model: Transformer | None = None


def rl_step(policy: Policy, generator: RolloutBackend, prompts: list[Prompt], step: int, d: Dist, cfg: TrainConfig,
            reward_fn, tok, progress: bool, stop: StopFlag | None = None) -> dict[str, float]:
    """One RL step on this step's prompts; returns its metrics row (a line of metrics.jsonl).

    With `stop`, a signal ends the step early: `Interrupted` on every rank together, at the end of the
    rollout or at a micro-batch before the step's first optimizer step, so nothing of the step has
    reached the model, optimizer or scheduler. Later (mini-batches after the first, PPO epochs after
    the first, the weight sync) the step runs to its end, since it has already changed the model.
    """
    timer, t0 = PhaseTimer(d.device), time.perf_counter()
    timer.start("rollout")
    samples = rollout(generator, prompts, step, d, cfg.rollout, cfg.run.seed, reward_fn, tok, progress, stop)
    timer.stop("rollout")
    generator.release()  # training gets the memory back (unless --keep-generator)
    score_samples(samples, cfg.rollout.n_samples, cfg.algo.std_norm, cfg.algo.advantage)

    backend = pick_backend(d.device, cfg.parallel.attn_backend or None)
    minis = split_mini_batches(len(samples), cfg.run.mini_batches)
    if cfg.algo.skip_zero_var:  # their advantages are 0: out of the normalisers, and no backward for them
        zero = zero_variance_groups(torch.tensor([s.reward for s in samples]), cfg.rollout.n_samples)
        flat = zero.repeat_interleave(cfg.rollout.n_samples).tolist()  # [N]
        minis = [[i for i in mb if not flat[i]] for mb in minis]
    batches = [pack_mini_batch(samples, mb, d, cfg.parallel.micro_batch_tokens, tok.pad_id, backend) for mb in minis]
    lcfg = loss_config(cfg.algo)
    timer.start("logprobs")
    old, ref = logprobs_before_update(policy, batches, old_logprobs_needed(len(minis), cfg.run.ppo_epochs),
                                      cfg.rollout.temperature, progress, stop)
    timer.stop("logprobs")
    timer.start("train")
    sums = update(policy, samples, minis, batches, old, ref, d, lcfg, cfg.rollout, cfg.optim.grad_clip,
                  cfg.run.ppo_epochs, progress, stop)
    timer.stop("train")
    timer.start("weight_sync")
    sync_weights(policy, generator)
    timer.stop("weight_sync")

    row = {"step": step + 1, **rollout_stats(samples, cfg.rollout.n_samples), **{k: v.item() for k, v in sums.items()},
           "lr": policy.scheduler.get_last_lr()[0], **timer.summary()}
    tokens = sum(len(s.prompt.token_ids) + len(s.completion_ids) for s in samples)
    row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    if d.device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


# ---------------------------------------------------------------------------------------------------
# Rollout


def generator_replicas(d: Dist, rc: RolloutConfig) -> tuple[int, int, bool]:
    """(this rank's replica, number of replicas, whether this rank reports its replica's results).

    The naive generator is one replica per rank. A vLLM engine with tensor parallelism spans `tp`
    consecutive ranks that must all be given the same prompts; the first of them reports.
    """
    tp = rc.tp if rc.backend == "vllm" else 1
    return d.rank // tp, d.world // tp, d.rank % tp == 0


def prompt_text(p: Prompt) -> str:
    """The prompt as the reward function sees it: the string, or chat messages as JSON."""
    return p.text if isinstance(p.text, str) else json.dumps(p.text)


def score(reward_fn, prompts: list[Prompt], completions: list[str]) -> tuple[list[float], str]:
    """(rewards, "") for the completions, or ([], the error) when the reward fails on one of them.

    `reward_fn` is a checked reward (`rewards.load_reward`): a NaN, a None or an exception is a
    ValueError naming the reward and prompt. It happens on the rank that scored that completion alone,
    so the error is returned, carried through the caller's next collective, and raised on every rank
    together (`raise_first`); raising it here would leave the other ranks waiting in that collective.
    """
    try:
        return [reward_fn(p.index, prompt_text(p), c, p.answer) for p, c in zip(prompts, completions)], ""
    except ValueError as e:
        return [], str(e)


def raise_first(errors: list[str]):
    """Raise the first non-empty error of a gathered list (every rank holds the same list)."""
    if first := next((e for e in errors if e), ""):
        raise ValueError(first)


def complete(generator: RolloutBackend, rows: list[Prompt], seeds: list[int] | None, params, rc: RolloutConfig,
             reward_fn, tok, bar=None, stop=None) -> tuple[list[Sample], str]:
    """(one scored Sample per row, "") or ([], the error): single-turn completions scored by the
    reward, or with --env, multi-turn episodes scored by the environment (minirl/episodes.py).
    `stop() == True` (a stop signal, read between generation batches or turns) gives ([], "")."""
    if not rc.env:
        outs = generator.generate([p.token_ids for p in rows], params, seeds=seeds, progress=bar, stop=stop)
        if stop is not None and stop():
            return [], ""
        rewards, error = score(reward_fn, rows, [tok.decode(o.token_ids) for o in outs])
        return [Sample(p, o.token_ids, o.logprobs, o.finish_reason, r) for p, o, r in zip(rows, outs, rewards)], error
    make_env = load_env(rc.env)
    seeds = seeds or [sample_seed(params.seed, 0, i, 0) for i in range(len(rows))]
    episodes = [Episode(p.index, p.token_ids, seed, make_env()) for p, seed in zip(rows, seeds)]
    error = run_episodes(generator, episodes, [prompt_text(p) for p in rows], [p.answer for p in rows], rc.env, tok,
                         params, stop_token_id(rc.env, tok), rc.max_turns, sample_budget(rc), bar, stop)
    if error or (stop is not None and stop()):
        return [], error
    return [Sample(p, e.ids, e.logprobs, e.finish_reason, e.reward, mask=e.mask, turns=e.turns)
            for p, e in zip(rows, episodes)], ""


def rollout(generator: RolloutBackend, prompts: list[Prompt], step: int, d: Dist, rc: RolloutConfig, seed: int,
            reward_fn, tok, progress: bool, stop: StopFlag | None = None) -> list[Sample]:
    """Generate n completions for this replica's share of the prompts, score them, gather all replicas'.

    A rank that got a stop signal leaves its remaining generation batches out (`stop.raised` is read
    between them, no collective) and says so in the gather every rank joins: all raise Interrupted."""
    n = rc.n_samples
    replica, n_replicas, reports = generator_replicas(d, rc)
    mine = list(range(replica, len(prompts), n_replicas))
    rows = [prompts[i] for i in mine for _ in range(n)]
    seeds = [sample_seed(seed, step, prompts[i].index, k) for i in mine for k in range(n)]
    bar = tqdm(total=len(rows), desc="rollout", leave=False, disable=not progress, unit="seq")
    raised = (lambda: stop.raised) if stop is not None else None
    local, error = complete(generator, rows, seeds, sampling_params(rc), rc, reward_fn, tok, bar, stop=raised)
    bar.close()
    stopped = stop is not None and stop.raised  # this rank's view: the gather below makes it every rank's
    gathered = [None] * d.world
    dist.all_gather_object(gathered, (local if reports and not stopped else None, error, stopped))
    if any(s for _, _, s in gathered):
        raise Interrupted
    raise_first([e for _, e, _ in gathered])
    gathered = [g for g, _, _ in gathered if g is not None]  # one list per replica, in replica order
    # Global order: prompt slot by slot, its n completions together (a GRPO group).
    samples = [None] * (len(prompts) * n)
    for r, replica_samples in enumerate(gathered):
        slots = list(range(r, len(prompts), n_replicas))
        for j, sample in enumerate(replica_samples):
            samples[slots[j // n] * n + j % n] = sample
    return samples


# ---------------------------------------------------------------------------------------------------
# Packing a micro-batch


def pack(samples: list[Sample], idx: list[int], pad_id: int, d: Dist, backend: str) -> MicroBatch:
    """Concatenate sequences (prompt + completion, shifted by one for next-token targets) and slice
    them for this sp rank. An empty `idx` gives a one-token dummy with zero weight, so a rank with
    fewer micro-batches still joins every collective of forward and backward."""
    ids, pos, tgt, mask, seq, adv, gen = [], [], [], [], [], [], []
    for i in idx:
        s = samples[i]
        full = s.prompt.token_ids + s.completion_ids
        P, L = len(s.prompt.token_ids), len(full) - 1  # inputs are full[:-1], targets full[1:]
        ids += full[:-1]
        pos += range(L)
        tgt += full[1:]
        mask += [0.0] * (P - 1) + ([1.0] * len(s.completion_ids) if s.mask is None else s.mask)
        seq += [i] * L
        adv += [s.advantage] * L
        gen += [0.0] * (P - 1) + s.gen_logprobs
    if not idx:
        ids, pos, tgt, mask, seq, adv, gen = [pad_id], [0], [pad_id], [0.0], [0], [0.0], [0.0]
    T = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)  # noqa: E731
    local_ids, local_pos, meta, _ = ulysses.shard_micro_batch(
        T(ids, torch.long), T(pos, torch.long), d.sp_rank, d.sp_size, backend, d.sp_group)
    sl = lambda x, dt=torch.float32: ulysses.local_slice(T(x, dt), d.sp_rank, d.sp_size).to(d.device)  # noqa: E731
    meta.cu_seqlens = meta.cu_seqlens.to(d.device)
    return MicroBatch(local_ids.to(d.device), local_pos.to(d.device), meta, sl(tgt, torch.long), sl(mask),
                      sl(seq, torch.long), sl(adv), sl(gen))


def micro_logprobs(model, mb: MicroBatch, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """(log-probs [t], entropy [t]) of the micro-batch's targets under the processed distribution.

    Training passes the sampling temperature only: top-k/top-p are deliberately left out, because a
    bf16 generator can sample a token just outside the trainer's fp32 nucleus, whose log-prob there
    would be -inf. The full-support distribution keeps every ratio finite; the remaining
    generator/trainer gap is what --tis-cap corrects. (rollout.py's check passes all three.)
    """
    return model(mb.input_ids, mb.position_ids, mb.meta, targets=mb.targets, temperature=temperature,
                 top_k=top_k, top_p=top_p)


def pack_mini_batch(samples: list[Sample], idx: list[int], d: Dist, token_budget: int, pad_id: int,
                    backend: str) -> list[MicroBatch]:
    """This dp rank's packed micro-batches of the mini-batch `idx` (every rank gets as many)."""
    lengths = [len(samples[i].prompt.token_ids) + len(samples[i].completion_ids) - 1 for i in idx]
    plan = plan_micro_batches(lengths, d.dp_size, token_budget)[d.dp_rank]
    return [pack(samples, [idx[j] for j in micro], pad_id, d, backend) for micro in plan]


# ---------------------------------------------------------------------------------------------------
# Advantages, log-probs, updates


def score_samples(samples: list[Sample], n_samples: int, std_norm: bool, estimator: str):
    """GRPO/RLOO advantages: rewards relative to each prompt's group of n completions."""
    rewards = torch.tensor([s.reward for s in samples])
    adv = group_advantages(rewards, n_samples, std_norm=std_norm, estimator=estimator)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a


def split_mini_batches(n_samples: int, n_mini: int) -> list[list[int]]:
    """Consecutive, equal mini-batches of sample indices (config.validate made n_mini divide n_samples)."""
    size = n_samples // n_mini
    return [list(range(k * size, (k + 1) * size)) for k in range(n_mini)]


def old_logprobs_needed(n_minis: int, epochs: int) -> bool:
    """A pass for the pre-update log-probs is needed only if some micro-batch trains after an optimizer
    step. Otherwise the update's forward runs on the same weights: its detached log-probs are the old
    ones (`update` falls back to them) for the PPO ratio and TIS alike (bench/RESULTS.md section 8)."""
    return n_minis > 1 or epochs > 1


@torch.no_grad()
def logprobs_before_update(policy: Policy, batches: list[list[MicroBatch]], need_old: bool, temperature: float,
                           progress: bool, stop: StopFlag | None = None) -> tuple[dict, dict]:
    """({(mini, micro): old log-probs}, {(mini, micro): reference log-probs}), each empty when not needed.
    `stop` is checked before each micro-batch (every dp rank runs as many: `plan_micro_batches`)."""
    old, ref = {}, {}
    if not need_old and policy.ref_model is None:
        return old, ref
    bar = tqdm(total=sum(len(mbs) for mbs in batches), desc="logprobs", leave=False, disable=not progress)
    for m, mbs in enumerate(batches):
        for j, mb in enumerate(mbs):
            if stop is not None:
                stop.check()
            if need_old:
                old[m, j] = micro_logprobs(policy.model, mb, temperature)[0]
            if policy.ref_model is not None:
                with lora.adapters_off(policy.ref_model):  # LoRA: the base model (a no-op for a frozen copy)
                    ref[m, j] = micro_logprobs(policy.ref_model, mb, temperature)[0]
            bar.update()
    bar.close()
    return old, ref


def update(policy: Policy, samples: list[Sample], minis: list[list[int]], batches: list[list[MicroBatch]],
           old: dict, ref: dict, d: Dist, lcfg: LossConfig, rc: RolloutConfig, grad_clip: float, epochs: int,
           progress: bool, stop: StopFlag | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step per mini-batch, for each of `epochs` passes over the same mini-batches in the
    same order (PPO epochs; `old` was computed once, before the first); returns the metrics averaged
    over updates and ranks. A mini-batch emptied by --skip-zero-var runs one zero-weight dummy
    micro-batch (so collectives still pair up) and skips its optimizer step. A mini-batch whose
    gradient norm is NaN or inf skips its optimizer step on every rank (the norm is global), and
    `skipped_updates` counts it; train.py stops a run that keeps doing that. `stop` is checked before
    each micro-batch of the first mini-batch: after its optimizer step the model has changed, and the
    step can no longer be abandoned."""
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(total=epochs * sum(len(mbs) for mbs in batches), desc="train", leave=False, disable=not progress,
               unit="mb")
    # Counted (policy) tokens of every sample [N]; with the mini-batch's totals these are the global
    # normalisers of the loss weights, identical on every rank.
    comp_lens = torch.tensor([s.n_policy for s in samples], dtype=torch.float32, device=d.device)
    passes = list(enumerate(zip(minis, batches))) * epochs
    for k, (m, (mb_idx, mbs)) in enumerate(passes):
        n_tokens = comp_lens[mb_idx].sum().clamp_min(1)
        for j, mb in enumerate(mbs):
            if stop is not None and k == 0:
                stop.check()
            lp, ent = micro_logprobs(policy.model, mb, rc.temperature)
            w = token_weights(mb.mask, mb.seq_ids, comp_lens, max(1, len(mb_idx)), n_tokens, lcfg.agg,
                              float(sample_budget(rc)))
            seqs = Sequences(mb.seq_ids, mb.mask, comp_lens, d.sp_group)  # for sequence-level ratios
            loss, metrics = policy_loss(lp, old.get((m, j), lp.detach()), mb.advantages, w, lcfg,
                                        ref_logprobs=ref.get((m, j)), gen_logprobs=mb.gen_logprobs, entropy=ent,
                                        seqs=seqs)
            loss.backward()
            metrics["loss"] = loss.detach()
            for name, v in metrics.items():
                sums[name] = sums.get(name, 0) + v / len(passes)
            bar.update()
        grad_norm = clip_grad_norm_(policy.model.parameters(), grad_clip or float("inf"))
        sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach() / len(passes)
        # A NaN/inf loss on any rank makes the global norm non-finite on every rank: all skip together.
        # The one sync per mini-batch is the price of never writing a NaN into the weights.
        if not torch.isfinite(grad_norm).item():
            sums["skipped_updates"] = sums.get("skipped_updates", 0) + torch.ones((), device=d.device)
        elif mb_idx:  # an emptied mini-batch has no gradient; every rank holds every sample, so all agree
            policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)
    bar.close()
    # Every rank summed its share: all_reduce SUM gives mini-batch means (grad_norm is replicated).
    keys = sorted(sums)
    vec = torch.stack([sums[k].float().to(d.device) for k in keys])
    dist.all_reduce(vec)
    out = dict(zip(keys, vec))
    out["grad_norm"] = out["grad_norm"] / d.world  # replicated values, summed over ranks
    out["skipped_updates"] = out.get("skipped_updates", torch.zeros((), device=d.device)) / d.world
    return out


def sync_weights(policy: Policy, generator: RolloutBackend):
    """Stream the policy's full weights into the generator, LoRA adapters merged (a collective)."""
    generator.update_weights(lora.merged(policy.model, iter_full_params(policy.model, generator.dtype)))


# ---------------------------------------------------------------------------------------------------
# Reporting


def rollout_stats(samples: list[Sample], group_size: int) -> dict[str, float]:
    r = torch.tensor([s.reward for s in samples])
    lens = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    return {"reward_mean": r.mean().item(), "reward_std": r.std(correction=0).item(),
            "solved": (r > 0).float().mean().item(), "response_len": lens.mean().item(),
            "truncated": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "zero_var_groups": zero_variance_groups(r, group_size).float().mean().item(),
            **({} if samples[0].mask is None else episode_stats(samples))}


def evaluate(generator: RolloutBackend, prompts: list[Prompt], d: Dist, rc: RolloutConfig, reward_fn, tok) -> float:
    """Greedy accuracy (reward > 0) on held-out prompts, each replica a share, summed over replicas."""
    replica, n_replicas, reports = generator_replicas(d, rc)
    mine = prompts[replica::n_replicas]
    scored, error = complete(generator, mine, None, sampling_params(rc, greedy=True), rc, reward_fn, tok) \
        if mine else ([], "")
    rewards = [s.reward for s in scored]
    errors = [""] * d.world
    dist.all_gather_object(errors, error)
    raise_first(errors)
    correct = sum(r > 0 for r in rewards)
    counts = torch.tensor([float(correct), float(len(mine))], device=d.device) * reports
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()
