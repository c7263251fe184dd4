"""One RL step, top to bottom (`rl_step`): rollout -> advantages -> packing -> old/ref log-probs ->
micro-batched PPO updates -> weight sync -> a metrics row. train.py sets up and loops over steps.

Every rank holds the whole step's samples (minirl/rollouts.py) and plans the same micro-batches
(minirl/packing.py). Every rank's loss is its exact share of the mini-batch loss (weights normalised by
mini-batch counts), and FSDP sums the gradients, so the update equals a single process's update on
the whole mini-batch. No `.item()` or logging inside the micro-batch loop: metrics stay on the device
and are reduced once per step, phase times come from events read once per step.
"""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl.algorithms import Sequences, group_advantages, policy_loss, token_weights, zero_variance_groups
from minirl.backend import RolloutBackend
from minirl.config import Derived, TrainConfig
from minirl.data import Prompt
from minirl.dist import Dist
from minirl.fsdp import clip_grad_norm_, iter_full_params
from minirl.model import Transformer
from minirl.packing import MicroBatch, micro_logprobs, pack_mini_batch, split_mini_batches
from minirl.report import Interrupt, PhaseTimer
from minirl.rollouts import Sample, rollout, rollout_stats


@dataclass
class Policy:
    """The trained model (FSDP2-sharded) with its optimizer and lr schedule, the attention kernel it runs
    with (attention.pick_backend), and the frozen reference model when a KL penalty needs one."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ref_model: Transformer | None = None
    attn_backend: str = "sdpa"


def rl_step(policy: Policy, generator: RolloutBackend, prompts: list[Prompt], step: int, d: Dist, cfg: TrainConfig,
            ds: Derived, tok, progress: bool, interrupt: Interrupt | None = None) -> dict[str, float]:
    """One RL step on this step's prompts; returns its metrics row (a line of metrics.jsonl).

    With `interrupt`, a signal ends the step early: `Interrupted` on every rank together, at the end of
    the rollout or at a micro-batch before the step's first optimizer step, so nothing of the step has
    reached the model, optimizer or scheduler. Later (mini-batches after the first, PPO epochs after
    the first, the weight sync) the step runs to its end, since it has already changed the model.
    """
    timer, t0, n = PhaseTimer(d.device), time.perf_counter(), cfg.rollout.n_samples
    with timer.phase("rollout"):
        samples = rollout(generator, prompts, step, d, cfg, ds, tok, progress, interrupt)
    generator.release()  # training gets the memory back (unless --keep-generator)
    set_advantages(samples, n, cfg.algo.std_norm, cfg.algo.advantage)

    minis = split_mini_batches(len(samples), cfg.algo.mini_batches)
    if cfg.algo.skip_zero_var:  # their advantages are 0: out of the normalisers, and no backward for them
        flat = zero_variance_groups(torch.tensor([s.reward for s in samples]), n).repeat_interleave(n).tolist()  # [N]
        minis = [[i for i in mb if not flat[i]] for mb in minis]
    batches = [pack_mini_batch(samples, mb, d, cfg.parallel.micro_batch_tokens, tok.pad_id, policy.attn_backend)
               for mb in minis]
    with timer.phase("logprobs"):
        logprobs_before_update(policy, batches, old_logprobs_needed(len(minis), cfg.algo.ppo_epochs),
                               ds.sampling.temperature, progress, interrupt)
    with timer.phase("train"):
        sums = update(policy, samples, minis, batches, d, ds, cfg.optim.grad_clip, cfg.algo.ppo_epochs, progress,
                      interrupt)
    with timer.phase("weight_sync"):
        generator.update_weights(iter_full_params(policy.model, generator.dtype))  # a collective

    row = {"step": step + 1, **rollout_stats(samples, n), **{k: v.item() for k, v in sums.items()},
           "lr": policy.scheduler.get_last_lr()[0], **timer.summary()}
    tokens = sum(len(s.prompt.token_ids) + len(s.completion_ids) for s in samples)
    row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    if d.device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def set_advantages(samples: list[Sample], n_samples: int, std_norm: bool, estimator: str):
    """GRPO/RLOO advantages: rewards relative to each prompt's group of n completions."""
    adv = group_advantages(torch.tensor([s.reward for s in samples]), n_samples, std_norm=std_norm,
                           estimator=estimator)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a


def old_logprobs_needed(n_minis: int, epochs: int) -> bool:
    """A pass for the pre-update log-probs is needed only if some micro-batch trains after an optimizer
    step. Otherwise the update's forward runs on the same weights: its detached log-probs are the old
    ones (`update` falls back to them) for the PPO ratio and TIS alike."""
    return n_minis > 1 or epochs > 1


@torch.no_grad()
def logprobs_before_update(policy: Policy, batches: list[list[MicroBatch]], need_old: bool, temperature: float,
                           progress: bool, interrupt: Interrupt | None = None):
    """Set each micro-batch's `old_logprobs` (when `need_old`) and `ref_logprobs` (with a reference
    model). `interrupt` is checked before each micro-batch (every dp rank runs as many)."""
    if not need_old and policy.ref_model is None:
        return
    for mb in tqdm([mb for mbs in batches for mb in mbs], desc="logprobs", leave=False, disable=not progress):
        if interrupt is not None:
            interrupt.check()
        if need_old:
            mb.old_logprobs = micro_logprobs(policy.model, mb, temperature)[0]
        if policy.ref_model is not None:
            mb.ref_logprobs = micro_logprobs(policy.ref_model, mb, temperature)[0]


def update(policy: Policy, samples: list[Sample], minis: list[list[int]], batches: list[list[MicroBatch]], d: Dist,
           ds: Derived, grad_clip: float, epochs: int, progress: bool,
           interrupt: Interrupt | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step per mini-batch, for each of `epochs` passes over the same mini-batches in the
    same order (PPO epochs); returns the metrics averaged over updates and ranks.

    A mini-batch emptied by --skip-zero-var runs one zero-weight dummy micro-batch (so collectives
    still pair up) and skips its optimizer step. A mini-batch whose gradient norm is NaN or inf skips
    its optimizer step on every rank (the norm is global), counted in `skipped_updates`. `interrupt` is
    checked before each micro-batch of the first mini-batch: after its optimizer step the model has
    changed, and the step can no longer be abandoned."""
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(total=epochs * sum(len(mbs) for mbs in batches), desc="train", leave=False, disable=not progress,
               unit="mb")
    # Counted (policy) tokens of every sample [N]; with the mini-batch's totals these are the global
    # normalisers of the loss weights, identical on every rank.
    comp_lens = torch.tensor([s.n_policy for s in samples], dtype=torch.float32, device=d.device)
    passes = list(zip(minis, batches)) * epochs
    for k, (mb_idx, mbs) in enumerate(passes):
        n_tokens = comp_lens[mb_idx].sum().clamp_min(1)
        for mb in mbs:
            if interrupt is not None and k == 0:
                interrupt.check()
            lp, ent = micro_logprobs(policy.model, mb, ds.sampling.temperature)
            w = token_weights(mb.mask, mb.seq_ids, comp_lens, max(1, len(mb_idx)), n_tokens, ds.loss.agg,
                              float(ds.sample_budget))
            seqs = Sequences(mb.seq_ids, mb.mask, comp_lens, d.sp_group)  # for sequence-level ratios
            old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
            loss, metrics = policy_loss(lp, old, mb.advantages, w, ds.loss, ref_logprobs=mb.ref_logprobs,
                                        gen_logprobs=mb.gen_logprobs, entropy=ent, seqs=seqs)
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
