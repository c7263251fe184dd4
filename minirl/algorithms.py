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

Sequence-level quantities (GSPO's ratio, sequence-level importance weights) need all of a
sequence's tokens. Under data parallelism a sequence lives whole on one rank, but Ulysses splits
it over the sp ranks of its group. `sequence_sums` therefore scatters each rank's tokens into a
per-sequence vector and all-reduces it over the sp group (`Sequences.group`), so every rank sees
whole-sequence sums while keeping only its own tokens' terms in its loss.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
RATIO_LEVELS = ("token", "sequence", "sequence-token")
TIS_LEVELS = ("token", "sequence")
TIS_MODES = ("truncate", "mask")
ADVANTAGES = ("grpo", "rloo")


@dataclass
class LossConfig:
    """Algorithm knobs of the policy loss. The defaults are plain PPO/GRPO clipping."""

    clip_eps_low: float = 0.2  # ratio is clipped to [1 - low, 1 + high]
    clip_eps_high: float = 0.2  # > low gives "clip-higher" (DAPO)
    dual_clip_c: float | None = None  # dual-clip PPO: cap the loss of A < 0 tokens at c * |A|
    kl_coef: float = 0.0  # weight of the k3 KL to the reference policy
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy
    agg: str = "token-mean"  # one of AGG_MODES, see token_weights
    ratio_level: str = "token"  # token (PPO) | sequence (GSPO) | sequence-token (GSPO-token), see policy_log_ratio
    # Importance sampling against the generator, see rollout_is_weights:
    tis_cap: float | None = None  # upper bound of the weight; None = no correction
    tis_level: str = "token"  # one of TIS_LEVELS: a ratio per token, or one per sequence
    tis_mode: str = "truncate"  # one of TIS_MODES: cap the weight, or drop tokens/sequences outside the bounds
    tis_low: float = 0.0  # lower bound of the mask (mask mode only)

    def __post_init__(self):
        for name, value, choices in (("agg", self.agg, AGG_MODES), ("ratio_level", self.ratio_level, RATIO_LEVELS),
                                     ("tis_level", self.tis_level, TIS_LEVELS), ("tis_mode", self.tis_mode, TIS_MODES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.tis_cap is None:
            if (self.tis_level, self.tis_mode, self.tis_low) != ("token", "truncate", 0.0):
                raise ValueError("tis_level, tis_mode and tis_low need tis_cap (the upper bound of the weight)")
            return
        if self.tis_cap <= 0.0:
            raise ValueError(f"tis_cap must be > 0, got {self.tis_cap}")
        if self.tis_low != 0.0 and self.tis_mode != "mask":
            raise ValueError("tis_low is the lower bound of tis_mode mask; truncation has no lower bound")
        if not 0.0 <= self.tis_low < self.tis_cap:
            raise ValueError(f"need 0 <= tis_low < tis_cap, got tis_low={self.tis_low}, tis_cap={self.tis_cap}")


@dataclass
class Sequences:
    """Which sequence each token belongs to, for the sequence-level ratios. Per micro-batch, per rank."""

    ids: Tensor  # [T] index of the token's sequence into lens (its sample index in the step)
    mask: Tensor  # [T] 1 for counted (completion) tokens
    lens: Tensor  # [S] counted tokens of each whole sequence, over all its slices
    group: dist.ProcessGroup | None = None  # the sp group holding the other slices; None: sequences are whole


class SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) over a process group as an autograd op.

    Every rank's loss uses the summed vector, and the loss being minimised is the sum of the ranks'
    losses, so the gradient w.r.t. one rank's addend is the sum over ranks of their gradients w.r.t.
    the sum: the backward is the same all-reduce.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sequence_sums(values: Tensor, seqs: Sequences) -> Tensor:
    """Sum of `values` [T] over the counted tokens of each sequence, all slices included: [S].

    Each rank adds its own tokens into a vector over all sequences (zeros for sequences it does not
    hold), and the sp group all-reduces it. Every sp rank must call this the same number of times
    (it does: they run the same micro-batches with the same config). Differentiable: see SumOverGroup.
    """
    v = torch.where(seqs.mask.bool(), values, 0.0)  # [T]; where, not *, so a -inf outside the mask stays out
    sums = v.new_zeros(seqs.lens.shape[0]).index_add(0, seqs.ids, v)  # [S]
    if seqs.group is not None:
        sums = SumOverGroup.apply(sums, seqs.group)
    return sums


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


def policy_log_ratio(logprobs: Tensor, old_logprobs: Tensor, level: str, seqs: Sequences | None) -> Tensor:
    """log(pi / pi_old) per token [T], at the chosen level; the PPO clip then acts on its exp.

      token           each token's own ratio (PPO, GRPO)
      sequence        GSPO: the mean log-ratio over the completion's tokens, i.e. the log of the
                      geometric mean of its token ratios, shared by all its tokens. Clipping then
                      keeps or drops whole sequences, and a token's gradient is the sequence's,
                      spread over its tokens by 1/len.
      sequence-token  GSPO-token: the same value, but each token's gradient flows through its own
                      log-prob only (the sequence mean is detached). With per-sequence advantages and
                      token_weights (equal within a sequence) the two give identical gradients; the
                      token form would let per-token advantages in, and under sp it needs no
                      differentiable all-reduce.
    GSPO uses tiny clip ranges (its paper: 3e-4 below, 4e-4 above), since a sequence's mean
    log-ratio moves far less than a single token's. The log-ratio is not clamped before exp (verl
    clamps it, at +-20 for tokens and 10 for GSPO's): a ratio that large means the policy has left
    the rollout's, which should show in the metrics rather than be bounded away.
    """
    if level == "token":
        return logprobs - old_logprobs
    if seqs is None:
        raise ValueError(f"ratio_level {level!r} needs the token-to-sequence map (seqs)")
    if level == "sequence":
        return (sequence_sums(logprobs - old_logprobs, seqs) / seqs.lens.clamp_min(1))[seqs.ids]  # [T]
    lp = logprobs.detach()
    seq_mean = (sequence_sums(lp - old_logprobs, seqs) / seqs.lens.clamp_min(1))[seqs.ids]  # [T], no gradient
    return seq_mean + logprobs - lp  # value: the sequence's; gradient: d logprobs


@torch.no_grad()
def rollout_is_weights(old_logprobs: Tensor, gen_logprobs: Tensor, cfg: LossConfig,
                       seqs: Sequences | None) -> tuple[Tensor, Tensor]:
    """Importance weights pi_old / pi_gen against the generator, and which tokens they keep: [T], [T].

    The generator (a separate inference engine, or lower precision) samples from a slightly
    different distribution than the trainer computes; reweighting by the ratio corrects that.
      tis_level token     each token's own ratio
      tis_level sequence  the product of the completion's token ratios (its likelihood ratio),
                          shared by all its tokens; unbiased for the sequence but of high variance
      tis_mode truncate   weight = min(ratio, tis_cap): bounds the variance, keeps every token
      tis_mode mask       weight = ratio inside [tis_low, tis_cap], 0 outside: tokens (or whole
                          sequences) the generator sampled too differently are dropped from the loss
    Dropped tokens still count in the loss normalisers, so the weights of the others do not depend
    on how many were dropped (and a micro-batch's share does not depend on the others'). Peers
    offer the weight and the rejection as two separate knobs that can be combined; mask mode is
    that combination (weight kept inside the bounds, 0 outside), and truncate the weight alone.
    """
    log_w = old_logprobs - gen_logprobs  # [T]
    if cfg.tis_level == "sequence":
        if seqs is None:
            raise ValueError("tis_level 'sequence' needs the token-to-sequence map (seqs)")
        log_w = sequence_sums(log_w, seqs)[seqs.ids]  # [T]
    w = torch.exp(log_w)  # [T]; may overflow to inf for a sequence, which either mode bounds
    if cfg.tis_mode == "truncate":
        return w.clamp(max=cfg.tis_cap), torch.ones_like(w, dtype=torch.bool)
    keep = (w >= cfg.tis_low) & (w <= cfg.tis_cap)  # [T]
    return torch.where(keep, w, 0.0), keep


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    weights: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None = None,
    gen_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    seqs: Sequences | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (also GRPO's and GSPO's) plus optional KL and entropy terms.

    All inputs are [T]; only `logprobs` (and `entropy`, if given) carry gradient.
    `weights` come from `token_weights`, so the returned loss is this micro-batch's
    exact share of the mini-batch loss. `seqs` is needed for the sequence-level modes
    (ratio_level other than token, tis_level sequence); under sp each issues one all-reduce
    on `seqs.group` (GSPO's a second one in backward).

    The metrics are weighted sums with the same weights, so they too add up over
    micro-batches to mini-batch means (under seq-mean-token-sum-norm the weights do
    not sum to 1, so the metrics come out scaled by mean_len / norm_len):
      pg_loss         the (IS-weighted) clipped surrogate term
      clip_frac       tokens where clipping zeroed the gradient
      approx_kl       k3 estimate of KL(pi_old || pi), how far this update moved
      dual_clip_frac  tokens capped by the dual clip (if enabled)
      kl_ref          k3 KL to the reference (if ref_logprobs given)
      entropy         mean entropy (if given)
      tis_weight      mean importance weight against the generator (if enabled)
      tis_masked      tokens dropped by tis_mode mask (if enabled)
    No host syncs: everything stays a tensor.
    """
    ratio = torch.exp(policy_log_ratio(logprobs, old_logprobs, cfg.ratio_level, seqs))  # [T]
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
        tis, kept = rollout_is_weights(old_logprobs, gen_logprobs, cfg, seqs)  # [T], [T]
        pg = pg * tis
        metrics["tis_weight"] = tis
        if cfg.tis_mode == "mask":
            metrics["tis_masked"] = ~kept

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


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[G] True for groups whose completions all got the same reward: they carry no signal."""
    r = rewards.view(-1, group_size)  # [G, n]
    return r.amax(dim=1) == r.amin(dim=1)


def check_advantage(estimator: str, group_size: int):
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {estimator!r}")
    if estimator == "rloo" and group_size < 2:
        raise ValueError("rloo advantages need a group of at least 2 samples (--n-samples >= 2)")


def group_advantages(
    rewards: Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6, estimator: str = "grpo"
) -> Tensor:
    """Advantages of each reward relative to the other samples of its prompt.

    rewards [N] holds N / group_size groups back to back (the samples of one prompt
    are consecutive). The baseline is
      grpo  the group mean (the sample's own reward included)
      rloo  the mean of the other n - 1 rewards (leave-one-out, RLOO): an unbiased
            baseline, since it does not depend on the sample it scores. As
            r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean), it is GRPO's centring
            scaled by n / (n - 1).
    With `std_norm` the result is divided by the group std (GRPO; with rloo that is
    GRPO scaled by n / (n - 1), the RLOO paper uses no std). Dr.GRPO drops the std
    division (std_norm=False): it up-weights prompts that are nearly always right or wrong.

    The std is the biased one (divide by n): we standardise the group we have
    rather than estimate a population's spread, so a group's advantages have zero
    mean and unit mean square exactly, and group_size=1 gives 0 rather than NaN.
    verl and TRL use Bessel's correction (divide by n - 1) and add 1e-6 / 1e-4.
    A group of equal rewards gets exactly zero advantages (it carries no signal):
    set explicitly, since its float mean need not equal its rewards (seven 0.3s
    average to 0.3 - 3e-8, which the eps division would blow up to -0.03).
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    check_advantage(estimator, group_size)
    r = rewards.view(-1, group_size)  # [G, n]
    adv = r - r.mean(dim=1, keepdim=True)  # [G, n]
    if estimator == "rloo":
        adv = adv * (group_size / (group_size - 1))
    if std_norm:
        adv = adv / (r.std(dim=1, correction=0, keepdim=True) + eps)
    adv = torch.where(zero_variance_groups(rewards, group_size)[:, None], 0.0, adv)  # [G, n]
    return adv.view(-1)  # [N]
