"""Policy losses on packed token streams: PPO's clipped surrogate (GRPO, DAPO, GSPO), CISPO, the KL
estimators, and the published defaults of each algorithm's settings (`auto_settings`). Advantages and
reward shaping (GRPO, RLOO, REINFORCE++, DAPO's) are in minirl/advantages.py.

Everything here works on 1-D per-token tensors of one micro-batch: the tokens of several sequences
concatenated, length T. `seq_ids[t]` says which sequence of the mini-batch token t belongs to and `mask[t]`
whether it counts (completion tokens count; prompt, observation and padding tokens do not).

A mini-batch is cut into micro-batches (and spread over data- and sequence-parallel ranks) and their
gradients are summed. For that sum to be the gradient of the mini-batch loss, every loss is written as
`loss = sum_t weights[t] * loss_t`, where `weights` come from counts over the *whole* mini-batch
(`token_weights`): a micro-batch's loss is then exactly its share, however the tokens were split.

Sequence-level quantities (GSPO's ratio, sequence-level importance weights) need all of a sequence's
tokens, which Ulysses splits over the sp ranks of its group: `sequence_sums` scatters each rank's tokens
into a per-sequence vector and all-reduces it over the sp group (`Sequences.group`), so every rank sees
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
POLICY_LOSSES = ("ppo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_PLACEMENTS = ("loss", "reward")
GSPO_CLIP = (3e-4, 4e-4)  # the GSPO paper's range below and above 1 (Zheng et al. 2025, arXiv 2507.18071)
CISPO_CLIP = (1.0, 3.0)  # no lower bound (a weight is >= 0 anyway), weights capped at 4 (ScaleRL, arXiv 2510.13786)


@dataclass
class LossConfig:
    """Algorithm knobs of the policy loss. The defaults are plain PPO/GRPO clipping."""

    policy_loss: str = "ppo"  # ppo (clipped surrogate) | cispo (clipped IS weight), see policy_loss
    clip_eps_low: float = 0.2  # ppo: the ratio is clipped to [1 - low, 1 + high]; cispo: the IS weight is
    clip_eps_high: float = 0.2  # > low gives "clip-higher" (DAPO)
    dual_clip_c: float | None = None  # dual-clip PPO: cap the loss of A < 0 tokens at c * |A|
    kl_coef: float = 0.0  # weight of the KL to the reference policy in the loss
    kl_estimator: str = "k3"  # one of KL_ESTIMATORS, see kl_estimate
    entropy_coef: float = 0.0  # entropy bonus: loss -= coef * entropy
    agg: str = "token-mean"  # one of AGG_MODES, see token_weights
    ratio_level: str = "token"  # token (PPO) | sequence (GSPO) | sequence-token (GSPO-token), see policy_log_ratio
    # Importance sampling against the generator, see rollout_is_weights:
    tis_cap: float | None = None  # upper bound of the weight; None = no correction
    tis_level: str = "token"  # one of TIS_LEVELS: a ratio per token, or one per sequence
    tis_mode: str = "truncate"  # one of TIS_MODES: cap the weight, or drop tokens/sequences outside the bounds
    tis_low: float = 0.0  # lower bound of the mask (mask mode only)

    def __post_init__(self):
        for name, value, choices in (("policy_loss", self.policy_loss, POLICY_LOSSES), ("agg", self.agg, AGG_MODES),
                                     ("ratio_level", self.ratio_level, RATIO_LEVELS),
                                     ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
                                     ("tis_level", self.tis_level, TIS_LEVELS), ("tis_mode", self.tis_mode, TIS_MODES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if not min(self.clip_eps_low, self.clip_eps_high) > 0:
            raise ValueError(f"clip_eps_low and clip_eps_high must be > 0, got {self.clip_eps_low}, "
                             f"{self.clip_eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1, got {self.dual_clip_c}")
        if self.policy_loss == "cispo" and (self.ratio_level != "token" or self.dual_clip_c is not None):
            raise ValueError("policy_loss cispo weights each token by its own clipped ratio: it takes neither "
                             "ratio_level sequence/sequence-token (GSPO's) nor dual_clip_c (PPO's)")
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


def auto_settings(advantage: str, policy_loss: str, ratio_level: str, kl_placement: str = "") -> dict:
    """The value each setting left on auto takes: the published default of the algorithm chosen.

      clip_eps_low/high  0.2 / 0.2 (PPO, GRPO); GSPO 3e-4 / 4e-4 (its paper: a sequence's mean log-ratio
                         moves far less than a token's, so +-0.2 would never clip); CISPO no lower bound
                         and a weight cap of 4 (ScaleRL's; verl's example caps at 1.2, SkyRL's at 6)
      loss_agg           token-mean (DAPO's, verl's default); GSPO seq-mean-token-mean (its objective: each
                         sequence counts once, whatever its length; verl fixes it, TRL warns)
      std_norm           grpo and the REINFORCE++ pair yes; rloo no (the RLOO paper, verl and TRL)
      kl_placement       reinforce++ the reward (its paper's per-token penalty); the others the loss
      kl_estimator       in the reward k1 (REINFORCE++; verl's and OpenRLHF's default there); in the loss
                         k3 (GRPO), k2 for reinforce++-baseline (OpenRLHF's recipe)
    `kl_placement` is the user's, or "" for auto.
    """
    gspo = ratio_level != "token"
    low, high = GSPO_CLIP if gspo else CISPO_CLIP if policy_loss == "cispo" else (0.2, 0.2)
    placement = kl_placement or ("reward" if advantage == "reinforce++" else "loss")
    estimator = "k1" if placement == "reward" else "k2" if advantage == "reinforce++-baseline" else "k3"
    return dict(clip_eps_low=low, clip_eps_high=high, loss_agg="seq-mean-token-mean" if gspo else "token-mean",
                std_norm=advantage != "rloo", kl_placement=placement, kl_estimator=estimator)


@dataclass
class Sequences:
    """Which sequence each token belongs to, for the sequence-level ratios. Per micro-batch, per rank."""

    ids: Tensor  # [T] index of the token's sequence into lens (its sample index in the step)
    mask: Tensor  # [T] 1 for counted (completion) tokens
    lens: Tensor  # [S] counted tokens of each whole sequence, over all its slices
    group: dist.ProcessGroup | None = None  # the sp group holding the other slices; None: sequences are whole


class SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) over a process group as an autograd op. Every rank's loss uses the summed vector and
    the loss minimised is the sum of the ranks' losses, so the gradient w.r.t. one rank's addend is the sum
    over ranks of their gradients w.r.t. the sum: the backward is the same all-reduce."""

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

    Each rank adds its own tokens into a vector over all sequences (zeros for those it does not hold), and
    the sp group all-reduces it: every sp rank calls this as often (they run the same micro-batches).
    """
    v = torch.where(seqs.mask.bool(), values, 0.0)  # [T]; where, not *, so a -inf outside the mask stays out
    sums = v.new_zeros(seqs.lens.shape[0]).index_add(0, seqs.ids, v)  # [S]
    if seqs.group is not None:
        sums = SumOverGroup.apply(sums, seqs.group)
    return sums


def token_weights(mask: Tensor, seq_ids: Tensor, seq_lens: Tensor, n_seqs: int | Tensor, n_tokens: int | Tensor,
                  agg: str, norm_len: float) -> Tensor:
    """Per-token weights that turn a sum over tokens into the chosen mean.

    All counts are global to the mini-batch (every micro-batch, every rank), so the weights of a token do
    not depend on which micro-batch it landed in:
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
    The first two sum to 1 over the mini-batch. (FSDP sums the ranks' gradients here: fsdp.py.)
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


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate [T] of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
    divergence", 2020; verl's kl_penalty, OpenRLHF's compute_approx_kl). With log r = ref - logprobs:
      k1  -log r           unbiased; negative where ref is likelier; as a loss its gradient averages to 0
      k2  (log r)^2 / 2    biased, never negative; as a loss its gradient is the KL's (on-policy)
      k3  r - log r - 1    unbiased, never negative, low variance (GRPO's)
    Not clamped (verl and OpenRLHF clamp at +-10): a large value shows in the metrics, as for the ratios.
    """
    log_r = ref_logprobs - logprobs  # [T]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def policy_log_ratio(logprobs: Tensor, old_logprobs: Tensor, level: str, seqs: Sequences | None) -> Tensor:
    """log(pi / pi_old) per token [T], at the chosen level; the PPO clip then acts on its exp.

      token           each token's own ratio (PPO, GRPO)
      sequence        GSPO: the mean log-ratio over the completion's tokens (the log of the geometric mean
                      of its token ratios), shared by all its tokens. Clipping then keeps or drops whole
                      sequences, and a token's gradient is the sequence's, spread over its tokens by 1/len.
      sequence-token  GSPO-token: the same value, but each token's gradient flows through its own log-prob
                      only (the sequence mean is detached). With per-sequence advantages the two give
                      identical gradients; under sp this one needs no differentiable all-reduce.
    GSPO's clip range is tiny (GSPO_CLIP). The log-ratio is not clamped before exp (verl clamps it): a
    ratio that large means the policy has left the rollout's, which should show in the metrics.
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

    The generator (a separate engine, or lower precision) samples from a slightly different distribution
    than the trainer computes; reweighting by the ratio corrects that.
      tis_level token     each token's own ratio
      tis_level sequence  the product of the completion's token ratios (its likelihood ratio),
                          shared by all its tokens; unbiased for the sequence but of high variance
      tis_mode truncate   weight = min(ratio, tis_cap): bounds the variance, keeps every token
      tis_mode mask       weight = ratio inside [tis_low, tis_cap], 0 outside: tokens (or whole
                          sequences) the generator sampled too differently are dropped from the loss
    Dropped tokens still count in the loss normalisers, so the weights of the others do not depend on how
    many were dropped (and a micro-batch's share does not depend on the others').
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


def clipped_surrogate(ratio: Tensor, advantages: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor | None]:
    """PPO's per-token loss -min(r A, clip(r, 1 - low, 1 + high) A) [T] (also GRPO's, DAPO's with a higher
    upper bound, GSPO's with sequence ratios), where the clip zeroed the gradient [T], and where the dual
    clip capped the loss [T] (None when off)."""
    surr = ratio * advantages  # [T]
    surr_clipped = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high) * advantages
    pg = -torch.minimum(surr, surr_clipped)  # [T]
    clipped = surr_clipped < surr  # [T]: there the clipped term is the smaller one, constant in logprobs
    if cfg.dual_clip_c is None:
        return pg, clipped, None
    # For A < 0 the min above is unbounded as the ratio grows; cap it at c * |A| (Ye et al. 2020).
    cap = -cfg.dual_clip_c * advantages  # [T]
    dual = (advantages < 0) & (pg > cap)  # [T]
    return torch.where(dual, cap, pg), clipped, dual


def cispo_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    cfg: LossConfig) -> tuple[Tensor, Tensor]:
    """CISPO's per-token loss -sg(clip(r, 1 - low, 1 + high)) A log pi [T] (MiniMax-M1, arXiv 2506.13585),
    and where the weight was clipped [T]. REINFORCE with a truncated, stop-gradient importance weight:
    every token keeps its gradient -w A d log pi, where PPO's clip zeroes the gradient of tokens outside
    the range (often the rare tokens that matter). The loss's value is no objective's; its gradient is.
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [T]
    w = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high).detach()  # [T]
    return -w * advantages * logprobs, ratio != w


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, weights: Tensor, cfg: LossConfig,
                ref_logprobs: Tensor | None = None, gen_logprobs: Tensor | None = None, entropy: Tensor | None = None,
                seqs: Sequences | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy-gradient loss (PPO's clipped surrogate or CISPO's) plus optional KL and entropy terms.

    All inputs are [T]; only `logprobs` (and `entropy`, if given) carry gradient. `weights` come from
    `token_weights`, so the returned loss is this micro-batch's exact share of the mini-batch loss. `seqs`
    is needed for the sequence-level modes (ratio_level other than token, tis_level sequence); under sp
    each issues one all-reduce on `seqs.group` (GSPO's a second one in backward).

    A token of zero weight (prompt, observation, padding) is out of every term: torch.where gives it
    neutral inputs (log-probs and advantage 0), so a non-finite value there (a k3 or a ratio that
    overflows, a NaN) reaches neither the loss, nor its gradient, nor the metrics, as 0 x inf would.

    The metrics are weighted sums with the same weights, so they too add up over micro-batches to
    mini-batch means (scaled by mean_len / norm_len under seq-mean-token-sum-norm, whose weights do not
    sum to 1):
      pg_loss         the (IS-weighted) policy-gradient term
      clip_frac       ppo: tokens where clipping zeroed the gradient; cispo: tokens whose weight was clipped
      approx_kl       k3 estimate of KL(pi_old || pi), how far this update moved
      dual_clip_frac  tokens capped by the dual clip (if enabled)
      kl_ref          KL to the reference, by cfg.kl_estimator (if ref_logprobs given)
      entropy         mean entropy (if given)
      tis_weight      mean importance weight against the generator (if enabled)
      tis_masked      tokens dropped by tis_mode mask (if enabled)
    No host syncs: everything stays a tensor.
    """
    keep = weights != 0  # [T]
    logprobs, old_logprobs, advantages, ref_logprobs, gen_logprobs, entropy = (
        None if x is None else torch.where(keep, x, 0.0)
        for x in (logprobs, old_logprobs, advantages, ref_logprobs, gen_logprobs, entropy))
    metrics = {}
    if cfg.policy_loss == "cispo":
        pg, clipped = cispo_surrogate(logprobs, old_logprobs, advantages, cfg)
    else:
        ratio = torch.exp(policy_log_ratio(logprobs, old_logprobs, cfg.ratio_level, seqs))  # [T]
        pg, clipped, dual = clipped_surrogate(ratio, advantages, cfg)
        if dual is not None:
            metrics["dual_clip_frac"] = dual
    if cfg.tis_cap is not None:
        if gen_logprobs is None:
            raise ValueError("tis_cap is set but gen_logprobs was not given")
        tis, kept = rollout_is_weights(old_logprobs, gen_logprobs, cfg, seqs)  # [T], [T]
        pg = torch.where(kept, pg * tis, 0.0)  # a dropped token's pg may be inf (a ratio far out, A < 0)
        metrics["tis_weight"] = tis
        if cfg.tis_mode == "mask":
            metrics["tis_masked"] = ~kept

    loss_tok = pg  # [T]
    if cfg.kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef is set but ref_logprobs was not given")
        loss_tok = loss_tok + cfg.kl_coef * kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
    if cfg.entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef is set but entropy was not given")
        loss_tok = loss_tok - cfg.entropy_coef * entropy
    loss = (loss_tok * weights).sum()

    with torch.no_grad():
        metrics["pg_loss"] = pg
        metrics["clip_frac"] = clipped
        metrics["approx_kl"] = kl_estimate(old_logprobs, logprobs)
        if ref_logprobs is not None:
            metrics["kl_ref"] = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
        if entropy is not None:
            metrics["entropy"] = entropy
        w = weights.detach()
        metrics = {k: (v.to(w.dtype) * w).sum() for k, v in metrics.items()}
    return loss, metrics
