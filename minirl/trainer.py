"""One RL step, top to bottom (`rl_step`): rollout -> packing -> old/ref log-probs -> advantages ->
micro-batched policy updates -> weight sync -> a metrics row. train.py sets up and loops over steps.

Every rank's loss is its exact share of the mini-batch loss (weights normalised by mini-batch counts)
and FSDP sums the gradients, so the update equals a single process's on the whole mini-batch. No
`.item()` or logging inside the micro-batch loop: metrics and phase times are read once per step.
"""

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from minirl import lora
from minirl.advantages import AdvantageConfig, advantages, zero_variance_groups
from minirl.algorithms import Sequences, policy_loss, token_weights
from minirl.backend import RolloutBackend
from minirl.config import AlgoConfig, Derived, TrainConfig
from minirl.data import PromptDataset
from minirl.dist import Dist
from minirl.fsdp import clip_grad_norm_, iter_full_params
from minirl.model import Transformer
from minirl.packing import MicroBatch, completion_coords, micro_logprobs, pack_mini_batch, split_mini_batches
from minirl.report import Interrupt, PhaseTimer
from minirl.rollouts import Sample, rollout_groups, rollout_stats


@dataclass
class Policy:
    """The trained model (FSDP2-sharded) with its optimizer and lr schedule, the attention kernel it runs
    with (attention.pick_backend), and the frozen reference model when a KL penalty needs one (with LoRA:
    the trained model itself, its adapters switched off)."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ref_model: Transformer | None = None
    attn_backend: str = "sdpa"


def rl_step(policy: Policy, generator: RolloutBackend, data: PromptDataset, step: int, d: Dist, cfg: TrainConfig,
            ds: Derived, tok, progress: bool, interrupt: Interrupt | None = None) -> dict[str, float]:
    """One RL step on prompts drawn from `data`; returns its metrics row (a line of metrics.jsonl).

    With `interrupt`, a signal ends the step early: `Interrupted` on every rank together, at the end of the
    rollout or at a micro-batch before the step's first optimizer step, so nothing of the step has reached
    the model, optimizer or scheduler. After that the step runs to its end: it has changed the model.
    """
    timer, t0, n = PhaseTimer(d.device), time.perf_counter(), cfg.rollout.n_samples
    with timer.phase("rollout"):
        samples, draws = rollout_groups(generator, data, step, d, cfg, ds, tok, progress, interrupt)
    generator.release()  # training gets the memory back (unless --keep-generator)

    trained = trained_samples(samples, n, cfg.algo)
    minis = [[i for i in mb if trained[i]] for mb in split_mini_batches(len(samples), cfg.algo.mini_batches)]
    batches = [pack_mini_batch(samples, mb, d, cfg.parallel.micro_batch_tokens, tok.pad_id, policy.attn_backend)
               for mb in minis]
    # The KL in the reward needs the log-probs of every sample, those left out of the loss too.
    kl_in_reward, left_out = ds.advantage.kl_coef != 0.0, [i for i, t in enumerate(trained) if not t]
    scored = batches + ([pack_mini_batch(samples, left_out, d, cfg.parallel.micro_batch_tokens, tok.pad_id,
                                         policy.attn_backend)] if kl_in_reward and left_out else [])
    with timer.phase("logprobs"):
        logprobs_before_update(policy, scored, kl_in_reward or old_logprobs_needed(len(minis), cfg.algo.ppo_epochs),
                               ds.sampling.temperature, progress, interrupt)
    shaping = set_advantages(samples, batches, ds.advantage, scored if kl_in_reward else None)
    with timer.phase("train"):
        sums = update(policy, samples, minis, batches, d, ds, cfg.optim.grad_clip, cfg.algo.ppo_epochs, progress,
                      interrupt)
    with timer.phase("weight_sync"):
        sync_weights(policy, generator)

    row = {"step": step + 1, **rollout_stats(samples, n), **draws, **shaping, **{k: v.item() for k, v in sums.items()},
           "lr": policy.scheduler.get_last_lr()[0], **timer.summary()}
    tokens = sum(len(s.prompt.token_ids) + len(s.completion_ids) for s in samples)
    row["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    if d.device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def trained_samples(samples: list[Sample], n: int, algo: AlgoConfig) -> list[bool]:
    """Which samples the loss and its normalisers count: all but, with --skip-zero-var, the groups whose
    rewards are all equal and, with --overlong-filter (DAPO), the completions cut off by the length
    limit. The others still count in their group's baseline and the batch's statistics."""
    keep = [True] * len(samples)
    if algo.skip_zero_var:
        zero = zero_variance_groups(torch.tensor([s.reward for s in samples]), n).repeat_interleave(n)  # [N]
        keep = [k and not z for k, z in zip(keep, zero.tolist())]
    if algo.overlong_filter:
        keep = [k and s.finish_reason != "length" for k, s in zip(keep, samples)]
    return keep


def set_advantages(samples: list[Sample], batches: list[list[MicroBatch]], ac: AdvantageConfig,
                   scored: list[list[MicroBatch]] | None = None) -> dict[str, float]:
    """Set each micro-batch's per-token advantages from the step's rewards (`advantages.advantages`);
    returns the reward shaping's metrics. With the KL in the reward, `scored` are micro-batches holding
    every sample's old and reference log-probs (`completion_logprobs`)."""
    device = batches[0][0].mask.device
    prompt_lens = torch.tensor([len(s.prompt.token_ids) for s in samples], device=device)  # [N]
    width = max(len(s.completion_ids) for s in samples)
    mask = torch.zeros(len(samples), width)  # [N, L]
    for i, s in enumerate(samples):
        mask[i, :len(s.completion_ids)] = torch.tensor(s.mask or [1.0] * len(s.completion_ids))
    lps = completion_logprobs(scored, prompt_lens, width) if scored is not None else (None, None)
    lengths = torch.tensor([len(s.completion_ids) for s in samples])
    adv, stats = advantages(torch.tensor([s.reward for s in samples]), lengths, mask, ac, *lps)
    adv = adv.to(device)
    for mb in (mb for mbs in batches for mb in mbs):
        rows, cols = completion_coords(mb, prompt_lens, width)
        mb.advantages = torch.where(mb.mask > 0, adv[rows, cols].to(mb.mask.dtype), 0.0)
    return stats


@torch.no_grad()
def completion_logprobs(scored: list[list[MicroBatch]], prompt_lens: torch.Tensor,
                        width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The old and reference log-probs of every sample's completion tokens, [N, width] each, on every rank:
    each rank writes its own tokens' (dp share, sp slice) into zeros, and one all-reduce sums the parts."""
    micro = [mb for mbs in scored for mb in mbs]
    out = torch.zeros(2, len(prompt_lens), width, dtype=micro[0].old_logprobs.dtype, device=prompt_lens.device)
    for mb in micro:
        rows, cols = completion_coords(mb, prompt_lens, width)
        for k, lp in enumerate((mb.old_logprobs, mb.ref_logprobs)):
            out[k].index_put_((rows, cols), torch.where(mb.mask > 0, lp, 0.0), accumulate=True)
    dist.all_reduce(out)
    return out[0].cpu(), out[1].cpu()


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
            with lora.adapters_off(policy.ref_model):  # LoRA: the base model (a no-op for a frozen copy)
                mb.ref_logprobs = micro_logprobs(policy.ref_model, mb, temperature)[0]


def update(policy: Policy, samples: list[Sample], minis: list[list[int]], batches: list[list[MicroBatch]], d: Dist,
           ds: Derived, grad_clip: float, epochs: int, progress: bool,
           interrupt: Interrupt | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step per mini-batch, for each of `epochs` passes over the same mini-batches in the
    same order (PPO epochs); returns the metrics averaged over updates and ranks.

    A mini-batch emptied by --skip-zero-var runs one zero-weight dummy micro-batch (so collectives still
    pair up) and skips its optimizer step; so does, on every rank, one whose gradient norm is NaN or inf
    (the norm is global; counted in `skipped_updates`). `interrupt` is checked before each micro-batch of
    the first mini-batch, the last point where the step can be abandoned."""
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


def sync_weights(policy: Policy, generator: RolloutBackend):
    """Stream the policy's full weights into the generator, LoRA adapters merged (a collective)."""
    generator.update_weights(lora.merged(policy.model, iter_full_params(policy.model, generator.dtype)))
