"""Policy-gradient losses for GRPO and PPO on packed token streams.

Everything here works on 1-D per-token tensors of one micro-batch: the tokens of
several sequences concatenated, length T. `seq_ids[t]` says which sequence of the
mini-batch token t belongs to and `mask[t]` whether it counts (completion tokens
count; prompt and padding tokens do not).

A mini-batch is cut into micro-batches (and spread over data- and sequence-parallel
ranks) and their gradients are summed. For that sum to be the gradient of the
mini-batch loss, every loss is written as

    loss = sum_t weights[t] * loss_t

where `weights` come from counts over the *whole* mini-batch (see `token_weights`).
A micro-batch's loss is then exactly its share, however the tokens were split.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class LossConfig:
    """Algorithm knobs of the policy loss. The defaults are plain PPO/GRPO clipping."""

    clip_eps_low: float = 0.2  # ratio is clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2  # > low gives "clip-higher" (DAPO)
    dual_clip_c: float | None = None  # dual-clip PPO: cap the loss of A < 0 tokens at c * |A|
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy
    agg: str = "token-mean"  # one of AGG_MODES, see token_weights
    tis_cap: float | None = None  # truncated importance sampling against the generator

    def __post_init__(self):
        if self.agg not in AGG_MODES:
            raise ValueError(f"agg must be one of {AGG_MODES}, got {self.agg!r}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.tis_cap is not None and self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")


def token_weights(
    mask: Tensor,
    seq_ids: Tensor,
    seq_lens: Tensor,
    n_seqs: int | Tensor,
    n_tokens: int | Tensor,
    agg: str,
    norm_len: float,
) -> Tensor:
    """Per-token weights that turn a sum over tokens into the chosen mean.

    All counts are global to the mini-batch (every micro-batch, every rank), so
    the weights of a token do not depend on which micro-batch it landed in:
      mask      [T]  1 for counted tokens
      seq_ids   [T]  index into seq_lens
      seq_lens  [S]  counted tokens of each sequence, e.g. bincount(seq_ids[mask])
      n_seqs         sequences in the mini-batch
      n_tokens       counted tokens in the mini-batch
      norm_len       constant length, e.g. the max response length (Dr.GRPO)

    Modes:
      token-mean               every counted token weighs the same: 1 / n_tokens
      seq-mean-token-mean      mean over each sequence, then over sequences (GRPO paper)
      seq-mean-token-sum-norm  sum over each sequence / norm_len, mean over sequences;
                               no length bias since norm_len is the same for all (Dr.GRPO)

    The first two sum to 1 over the mini-batch. If the data-parallel gradient
    reduction averages over ranks instead of summing, scale the loss by world size.
    """
    m = mask if mask.is_floating_point() else mask.float()  # [T]
    if agg == "token-mean":
        return m / n_tokens
    if agg == "seq-mean-token-mean":
        lens = seq_lens[seq_ids].clamp_min(1)  # [T]; clamp only matters where m == 0
        return m / (lens * n_seqs)
    if agg == "seq-mean-token-sum-norm":
        return m / (norm_len * n_seqs)
    raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref) from tokens sampled from pi.

    With log r = ref - logprobs: k3 = r - log r - 1. It is unbiased, and unlike
    the plain -log r it is never negative, so every token pulls towards ref.
    """
    log_r = ref_logprobs - logprobs  # [T]
    return torch.exp(log_r) - log_r - 1.0


def truncated_is_weights(old_logprobs: Tensor, gen_logprobs: Tensor, cap: float) -> Tensor:
    """min(pi_old / pi_gen, cap) per token, without gradient.

    The generator (a separate inference engine, or lower precision) samples from a
    slightly different distribution than the trainer computes. Reweighting by the
    ratio corrects that; truncating at `cap` bounds the variance.
    """
    return torch.exp(old_logprobs - gen_logprobs).clamp(max=cap).detach()  # [T]


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    gen_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (also GRPO's) plus optional KL and entropy terms.

    All inputs are [T]; only `logprobs` (and `entropy`, if given) carry gradient.
    `weights` come from `token_weights`, so the returned loss is this micro-batch's
    exact share of the mini-batch loss.

    The metrics are weighted sums with the same weights, so they too add up over
    micro-batches to mini-batch means (under seq-mean-token-sum-norm the weights do
    not sum to 1, so the metrics come out scaled by mean_len / norm_len):
      pg_loss         the (TIS-weighted) clipped surrogate term
      clip_frac       tokens where clipping zeroed the gradient
      approx_kl       k3 estimate of KL(pi_old || pi), how far this update moved
      dual_clip_frac  tokens capped by the dual clip (if enabled)
      kl_ref          k3 KL to the reference (if ref_logprobs given)
      entropy         mean entropy (if given)
      tis_weight      mean truncated IS weight (if enabled)
    No host syncs: everything stays a tensor.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [T]
    surr = ratio * advantages  # [T]
    surr_clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high) * advantages
    pg = -torch.minimum(surr, surr_clipped)  # [T]
    # Where the clipped term is the smaller one, it is constant in logprobs: no gradient.
    clipped = surr_clipped < surr  # [T]

    metrics = {}
    if cfg.dual_clip_c is not None:
        # For A < 0 the min above is unbounded as ratio grows; cap it at c * |A|.
        cap = -cfg.dual_clip_c * advantages  # [T]
        dual = (advantages < 0) & (pg > cap)  # [T]
        pg = torch.where(dual, cap, pg)
        metrics["dual_clip_frac"] = dual
    if cfg.tis_cap is not None:
        if gen_logprobs is None:
            raise ValueError("tis_cap is set but gen_logprobs was not given")
        tis = truncated_is_weights(old_logprobs, gen_logprobs, cfg.tis_cap)  # [T]
        pg = pg * tis
        metrics["tis_weight"] = tis

    loss_tok = pg  # [T]
    if cfg.kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef is set but ref_logprobs was not given")
        loss_tok = loss_tok + cfg.kl_coef * k3_kl(logprobs, ref_logprobs)
    if cfg.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef is set but entropy was not given")
        loss_tok = loss_tok - cfg.entropy_coef * entropy
    loss = (loss_tok * weights).sum()

    with torch.no_grad():
        metrics["pg_loss"] = pg
        metrics["clip_frac"] = clipped
        metrics["approx_kl"] = k3_kl(old_logprobs, logprobs)
        if ref_logprobs is not None:
            metrics["kl_ref"] = k3_kl(logprobs, ref_logprobs)
        if entropy is not None:
            metrics["entropy"] = entropy
        w = weights.detach()
        metrics = {k: (v.to(w.dtype) * w).sum() for k, v in metrics.items()}
    return loss, metrics


def group_advantages(
    rewards: Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantages: each reward relative to the other samples of its prompt.

    rewards [N] holds N / group_size groups back to back (the samples of one prompt
    are consecutive). Each is centred on its group mean and, if `std_norm`, divided
    by the group std. Dr.GRPO drops the std division (std_norm=False): it up-weights
    prompts that are nearly always right or wrong.

    The std is the biased one (divide by n): we standardise the group we have
    rather than estimate a population's spread, so a group's advantages have zero
    mean and unit mean square exactly, and group_size=1 gives 0 rather than NaN.
    A group of equal rewards gets all-zero advantages (it carries no signal).
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)  # [G, n]
    adv = r - r.mean(dim=1, keepdim=True)  # [G, n]
    if std_norm:
        adv = adv / (r.std(dim=1, correction=0, keepdim=True) + eps)
    return adv.view(-1)  # [N]
