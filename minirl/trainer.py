"""The RL loop. One step: rollout -> rewards -> advantages -> old/ref log-probs -> PPO updates -> weight sync.

Data layout through a step:
- Prompts: every rank draws the same `prompts_per_step` prompts (same seeded order) and generates
  `n_samples` completions for its share (every world-th prompt; one share per vLLM tensor-parallel
  group). The completions are then gathered so
  every rank holds the whole step's samples in the same global order: advantages, mini-batches and
  the micro-batch plan are computed identically everywhere, with no further communication.
- Training: each mini-batch is planned over the dp ranks (`plan_micro_batches`); the sp ranks of one
  dp group run the same micro-batches, each on its slice of the tokens (Ulysses). Every rank's loss is
  its exact share of the mini-batch loss (weights normalised by mini-batch counts), and FSDP sums the
  gradients, so the update equals a single process's update on the whole mini-batch.
No `.item()` or logging inside the micro-batch loop: metrics stay on the device and are reduced once
per step, phase times come from events read once per step.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from tqdm import tqdm

from minirl import checkpoint, ulysses
from minirl.algorithms import LossConfig, group_advantages, policy_loss, token_weights
from minirl.attention import pick_backend
from minirl.config import TrainConfig
from minirl.data import Prompt, plan_micro_batches
from minirl.dist import Dist
from minirl.fsdp import clip_grad_norm_, iter_full_params, shard_model
from minirl.generate import SamplingParams
from minirl.model import ModelConfig, Transformer
from minirl.report import PhaseTimer


@dataclass
class Sample:
    """One completion and everything the update needs about it."""

    prompt: Prompt
    completion_ids: list[int]
    gen_logprobs: list[float]
    finish_reason: str
    reward: float = 0.0
    advantage: float = 0.0


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


# ---------------------------------------------------------------------------------------------------
# Building the policy


def build_policy(cfg: ModelConfig, state_dict: dict, d: Dist, pcfg, train: bool) -> Transformer:
    """An FSDP2-sharded model on this rank's device, filled from a full (CPU) state dict."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if pcfg.compile and d.device.type == "cuda":
        for block in model.layers:  # fuses norms, RoPE, SwiGLU; the FSDP hooks stay outside the graph
            block.compile()
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=pcfg.cpu_offload,
                checkpointing=pcfg.checkpointing and train)
    model.to_empty(device="cpu" if pcfg.cpu_offload else d.device)
    # Every rank passes the full tensors; each keeps only its own shard.
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))
    model.train(train)
    model.requires_grad_(train)
    return model


def lr_lambda(ocfg, total_steps: int):
    """Linear warm-up, then constant or cosine decay to 10% (as a multiplier of the peak lr)."""
    def f(step: int) -> float:
        if step < ocfg.warmup_steps:
            return (step + 1) / ocfg.warmup_steps
        if ocfg.schedule == "constant":
            return 1.0
        progress = (step - ocfg.warmup_steps) / max(1, total_steps - ocfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---------------------------------------------------------------------------------------------------
# Rollout


def sample_seed(seed: int, step: int, prompt_index: int, k: int) -> int:
    """The sampling seed of completion k of a prompt at a step: independent of how rows are batched
    or spread over ranks, so rollouts (and hence the whole run) do not depend on the parallel layout."""
    return (((seed * 1_000_003 + step) * 1_000_033 + prompt_index) * 1_009 + k) % (2**62)


def generator_replicas(d: Dist, cfg: TrainConfig) -> tuple[int, int, bool]:
    """(this rank's replica, number of replicas, whether this rank reports its replica's results).

    The naive generator is one replica per rank. A vLLM engine with tensor parallelism spans `tp`
    consecutive ranks that must all be given the same prompts; the first of them reports.
    """
    tp = cfg.rollout.tp if cfg.rollout.backend == "vllm" else 1
    return d.rank // tp, d.world // tp, d.rank % tp == 0


def prompt_text(p: Prompt) -> str:
    """The prompt as the reward function sees it: the string, or chat messages as JSON."""
    return p.text if isinstance(p.text, str) else json.dumps(p.text)


def rollout(generator, prompts: list[Prompt], step: int, d: Dist, cfg: TrainConfig, reward_fn, tok,
            progress: bool) -> list[Sample]:
    """Generate n completions for this replica's share of the prompts, score them, gather all replicas'."""
    rc, n = cfg.rollout, cfg.rollout.n_samples
    replica, n_replicas, reports = generator_replicas(d, cfg)
    mine = list(range(replica, len(prompts), n_replicas))
    rows = [prompts[i] for i in mine for _ in range(n)]
    seeds = [sample_seed(cfg.run.seed, step, prompts[i].index, k) for i in mine for k in range(n)]
    params = SamplingParams(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                            top_p=rc.top_p, top_k=rc.top_k)
    bar = tqdm(total=len(rows), desc="rollout", leave=False, disable=not progress, unit="seq")
    outs = generator.generate([p.token_ids for p in rows], params, seeds=seeds, progress=bar)
    bar.close()
    local = []
    for p, out in zip(rows, outs):
        reward = reward_fn(prompt_text(p), tok.decode(out.token_ids), p.answer)
        local.append((p.index, out.token_ids, out.logprobs, out.finish_reason, float(reward)))
    gathered = [None] * d.world
    dist.all_gather_object(gathered, local if reports else None)
    gathered = [g for g in gathered if g is not None]  # one list per replica, in replica order
    by_index = {p.index: p for p in prompts}
    # Global order: prompt slot by slot, its n completions together (a GRPO group).
    samples = [None] * (len(prompts) * n)
    for r, rank_rows in enumerate(gathered):
        slots = list(range(r, len(prompts), n_replicas))
        for j, (idx, ids, lps, fin, rew) in enumerate(rank_rows):
            samples[slots[j // n] * n + j % n] = Sample(by_index[idx], ids, lps, fin, rew)
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
        mask += [0.0] * (P - 1) + [1.0] * len(s.completion_ids)
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


def micro_logprobs(model, mb: MicroBatch, rc):
    """(log-probs [t], entropy [t]) of the micro-batch's targets at the sampling temperature.

    Top-k/top-p are deliberately left out: a bf16 generator can sample a token just outside the
    trainer's fp32 nucleus, whose log-prob there would be -inf. The full-support distribution keeps
    every ratio finite; the remaining generator/trainer gap is what --tis-cap corrects.
    """
    return model(mb.input_ids, mb.position_ids, mb.meta, targets=mb.targets, temperature=rc.temperature or 1.0)


# ---------------------------------------------------------------------------------------------------
# One RL step


def loss_config(acfg) -> LossConfig:
    return LossConfig(clip_eps_low=acfg.clip_eps_low, clip_eps_high=acfg.clip_eps_high,
                      dual_clip_c=acfg.dual_clip_c or None, kl_coef=acfg.kl_coef,
                      entropy_coef=acfg.entropy_coef, agg=acfg.loss_agg, tis_cap=acfg.tis_cap or None)


def check_config(cfg: TrainConfig):
    """Batch sizes and choices that would otherwise fail mid-run: one clear ValueError at start-up."""
    n = cfg.run.prompts_per_step * cfg.rollout.n_samples
    if cfg.run.prompts_per_step < 1 or cfg.rollout.n_samples < 1 or cfg.run.steps < 1:
        raise ValueError("--prompts-per-step, --n-samples and --steps must be >= 1")
    if n % cfg.run.mini_batches:
        raise ValueError(f"prompts_per_step x n_samples = {n} samples do not split into "
                         f"--mini-batches {cfg.run.mini_batches}")
    if cfg.rollout.backend not in ("naive", "vllm"):
        raise ValueError(f"unknown --backend {cfg.rollout.backend!r}: naive or vllm")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown --schedule {cfg.optim.schedule!r}: constant or cosine")
    loss_config(cfg.algo)  # validates loss_agg, dual_clip_c, tis_cap
    SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k).check()


def split_mini_batches(n_samples: int, n_mini: int) -> list[list[int]]:
    """Consecutive, equal mini-batches of sample indices (check_config made n_mini divide n_samples)."""
    size = n_samples // n_mini
    return [list(range(k * size, (k + 1) * size)) for k in range(n_mini)]


def train_on_samples(model, ref_model, optimizer, scheduler, samples: list[Sample], d: Dist, cfg: TrainConfig,
                     pad_id: int, timer: PhaseTimer, progress: bool) -> dict[str, torch.Tensor]:
    """Old/ref log-probs, then one optimizer step per mini-batch. Returns summed metric tensors."""
    rc, lcfg = cfg.rollout, loss_config(cfg.algo)
    backend = pick_backend(d.device, cfg.parallel.attn_backend or None)
    minis = split_mini_batches(len(samples), cfg.run.mini_batches)
    plans = [plan_micro_batches([len(samples[i].prompt.token_ids) + len(samples[i].completion_ids) - 1
                                 for i in mb], d.dp_size, cfg.parallel.micro_batch_tokens)[d.dp_rank]
             for mb in minis]
    batches = [[pack(samples, [mb[j] for j in micro], pad_id, d, backend) for micro in plan]
               for mb, plan in zip(minis, plans)]
    n_micro = sum(len(p) for p in batches)

    # Log-probs before any update: needed when later mini-batches are off-policy, or for TIS/KL.
    need_old = len(minis) > 1 or lcfg.tis_cap is not None
    timer.start("logprobs")
    old, ref = {}, {}
    if need_old or ref_model is not None:
        bar = tqdm(total=n_micro, desc="logprobs", leave=False, disable=not progress)
        with torch.no_grad():
            for m, mbs in enumerate(batches):
                for j, mb in enumerate(mbs):
                    if need_old:
                        old[m, j] = micro_logprobs(model, mb, rc)[0]
                    if ref_model is not None:
                        ref[m, j] = micro_logprobs(ref_model, mb, rc)[0]
                    bar.update()
        bar.close()
    timer.stop("logprobs")

    timer.start("train")
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(total=n_micro, desc="train", leave=False, disable=not progress, unit="mb")
    # Completion tokens of every sample [N]; with the mini-batch's totals these are the global
    # normalisers of the loss weights, identical on every rank.
    comp_lens = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32, device=d.device)
    for m, (mb_idx, mbs) in enumerate(zip(minis, batches)):
        n_tokens = comp_lens[mb_idx].sum().clamp_min(1)
        for j, mb in enumerate(mbs):
            lp, ent = micro_logprobs(model, mb, rc)
            w = token_weights(mb.mask, mb.seq_ids, comp_lens, len(mb_idx), n_tokens, lcfg.agg,
                              float(rc.max_new_tokens))
            loss, metrics = policy_loss(lp, old.get((m, j), lp.detach()), mb.advantages, w, lcfg,
                                        ref_logprobs=ref.get((m, j)), gen_logprobs=mb.gen_logprobs, entropy=ent)
            loss.backward()
            metrics["loss"] = loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v / len(minis)
            bar.update()
        grad_norm = clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach() / len(minis)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    bar.close()
    timer.stop("train")
    # Every rank summed its share: all_reduce SUM gives mini-batch means (grad_norm is replicated).
    keys = sorted(sums)
    vec = torch.stack([sums[k].float().to(d.device) for k in keys])
    dist.all_reduce(vec)
    out = dict(zip(keys, vec))
    out["grad_norm"] = out["grad_norm"] / d.world
    return out


def score_samples(samples: list[Sample], cfg: TrainConfig):
    """GRPO advantages: rewards standardised within each prompt's group of n completions."""
    rewards = torch.tensor([s.reward for s in samples])
    adv = group_advantages(rewards, cfg.rollout.n_samples, std_norm=cfg.algo.std_norm)
    for s, a in zip(samples, adv.tolist()):
        s.advantage = a


def rollout_stats(samples: list[Sample]) -> dict[str, float]:
    r = torch.tensor([s.reward for s in samples])
    lens = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float32)
    return {"reward_mean": r.mean().item(), "reward_std": r.std(correction=0).item(),
            "solved": (r > 0).float().mean().item(), "response_len": lens.mean().item(),
            "truncated": sum(s.finish_reason == "length" for s in samples) / len(samples)}


def sync_weights(generator, model, dtype):
    """Stream the updated policy into the generator one parameter at a time (a collective)."""
    generator.update_weights(iter_full_params(model, dtype))


def save(cfg: TrainConfig, step, model, optimizer, scheduler, data):
    checkpoint.save(os.path.join(cfg.run.out_dir, "checkpoints"), step, model, optimizer, scheduler,
                    data.state_dict())


def evaluate(generator, prompts: list[Prompt], d: Dist, cfg: TrainConfig, reward_fn, tok) -> float:
    """Greedy accuracy (reward > 0) on held-out prompts, each replica a share, summed over replicas."""
    replica, n_replicas, reports = generator_replicas(d, cfg)
    mine = prompts[replica::n_replicas]
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0)
    outs = generator.generate([p.token_ids for p in mine], params) if mine else []
    correct = sum(reward_fn(prompt_text(p), tok.decode(o.token_ids), p.answer) > 0 for p, o in zip(mine, outs))
    counts = torch.tensor([float(correct), float(len(mine))], device=d.device) * reports
    dist.all_reduce(counts)
    return (counts[0] / counts[1]).item()
