"""From rewards to advantages: GRPO's and RLOO's group baselines, REINFORCE++'s batch normalisation, the
KL penalty in the reward, DAPO's overlong reward shaping and the groups its dynamic sampling keeps.

Everything here works on a whole step's samples at once, and every rank holds all of them (in the same
order), so every rank computes the same values without communication. A group is the n samples of one
prompt, consecutive. Per-token quantities come padded, [N, L], with a mask [N, L] of the tokens the loss
counts (the policy's own: no prompt, observation or padding). The policy losses are in algorithms.py.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from minirl.algorithms import kl_estimate

ADVANTAGES = ("grpo", "rloo", "reinforce++", "reinforce++-baseline")


@dataclass(frozen=True)
class AdvantageConfig:
    """How a step's rewards become advantages, its auto settings resolved (config.derive)."""

    estimator: str = "grpo"  # one of ADVANTAGES
    group_size: int = 8  # samples per prompt
    std_norm: bool = True  # divide by the group's std (grpo, rloo) or the batch's (reinforce++)
    kl_coef: float = 0.0  # weight of the KL penalty in the reward (0: none, or the KL is in the loss)
    kl_estimator: str = "k1"  # of that penalty, see algorithms.kl_estimate
    overlong_buffer: int = 0  # DAPO's soft overlong punishment over this many tokens (0: off)
    overlong_penalty: float = 1.0  # the most it takes off the reward
    max_len: int = 0  # the length limit it counts back from (config.sample_budget)


def check_advantage(estimator: str, group_size: int):
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage must be one of {ADVANTAGES}, got {estimator!r}")
    if estimator in ("rloo", "reinforce++-baseline") and group_size < 2:
        raise ValueError(f"{estimator} advantages need a group of at least 2 samples (--n-samples >= 2)")


def zero_variance_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[G] True for groups whose completions all got the same reward: they carry no signal."""
    r = rewards.view(-1, group_size)  # [G, n]
    return r.amax(dim=1) == r.amin(dim=1)


def group_advantages(rewards: Tensor, group_size: int, std_norm: bool = True, eps: float = 1e-6,
                     estimator: str = "grpo") -> Tensor:
    """Advantages of each reward relative to the other samples of its prompt.

    rewards [N] holds N / group_size groups back to back (the samples of one prompt are consecutive).
    The baseline is
      grpo  the group mean (the sample's own reward included)
      rloo  the mean of the other n - 1 rewards (leave-one-out): unbiased, since it does not depend on
            the sample it scores. As r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean), it is GRPO's
            centring scaled by n / (n - 1).
    With `std_norm` the result is divided by the group std (the RLOO paper uses none). Dr.GRPO drops the
    std division (std_norm=False): it up-weights prompts that are nearly always right or wrong.

    The std is the biased one (divide by n; verl and TRL divide by n - 1): we standardise the group we
    have, so its advantages have zero mean and unit mean square exactly, and group_size=1 gives 0, not
    NaN. A group of equal rewards gets exactly zero advantages, set explicitly: its float mean need not
    equal its rewards (seven 0.3s average to 0.3 - 3e-8, which the eps division would blow up to -0.03).
    """
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    check_advantage(estimator, group_size)
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"group advantages are grpo's or rloo's, not {estimator!r} (reinforce_pp_advantages)")
    r = rewards.view(-1, group_size)  # [G, n]
    adv = r - r.mean(dim=1, keepdim=True)  # [G, n]
    if estimator == "rloo":
        adv = adv * (group_size / (group_size - 1))
    if std_norm:
        adv = adv / (r.std(dim=1, correction=0, keepdim=True) + eps)
    adv = torch.where(zero_variance_groups(rewards, group_size)[:, None], 0.0, adv)  # [G, n]
    return adv.view(-1)  # [N]


def kl_returns(rewards: Tensor, mask: Tensor, token_kl: Tensor | None, kl_coef: float) -> Tensor:
    """Each token's return [N, L] with the KL penalty in the reward (REINFORCE++ eq. 8, arXiv 2501.03262;
    OpenRLHF's compute_reward + get_cumulative_returns, gamma 1; verl's apply_kl_penalty).

    The outcome reward comes at the end, each counted token t pays kl_coef * kl_t (token_kl [N, L], an
    estimate from `algorithms.kl_estimate` of the rollout policy against the reference), and the return
    at t is what comes from t on: G_t = r - kl_coef * sum_{t' >= t, counted} kl_t'. A masked token holds
    the return of the next counted one. G at the first token is the sample's penalised reward, which GRPO
    and RLOO score when the KL is in the reward (verl sums the token rewards).
    """
    r = rewards[:, None].expand(mask.shape)  # [N, L]
    if token_kl is None or kl_coef == 0.0:
        return r.clone()
    kl = torch.where(mask.bool(), token_kl, 0.0)  # [N, L]; where: padding may hold anything
    return r - kl_coef * kl.flip(1).cumsum(1).flip(1)  # the sum over t' >= t


def batch_normalise(values: Tensor, mask: Tensor, std_norm: bool = True) -> Tensor:
    """(values - mean) / std [N, L] over every counted token of the batch; 0 at masked tokens.

    Each counted token weighs the same, so a long sequence weighs more in the statistics (as in OpenRLHF
    and verl). The std is the biased one, floored at 1e-4. Equal values get exact zeros, as in
    `group_advantages`. Without `std_norm` only the mean is subtracted (OpenRLHF's --no_std_norm).
    """
    m = mask.bool()  # [N, L]
    v = values[m]  # [n] the counted tokens' values
    if v.numel() == 0 or v.amax() == v.amin():
        return torch.zeros_like(values)
    out = values - v.mean()
    if std_norm:
        out = out / v.std(correction=0).clamp_min(1e-4)
    return torch.where(m, out, 0.0)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, group_size: int, baseline: bool,
                            token_kl: Tensor | None = None, kl_coef: float = 0.0, std_norm: bool = True) -> Tensor:
    """REINFORCE++ advantages [N, L] (Hu et al., arXiv 2501.03262; OpenRLHF's `reinforce(_baseline)`):
      1. REINFORCE++-baseline (`baseline`): each reward minus its group's mean reward (no std);
      2. each counted token's return, the KL penalty included when it is in the reward (`kl_returns`);
      3. normalised over the whole batch, not the group (`batch_normalise`).
    Plain REINFORCE++ needs no groups (n = 1 works); its paper puts a k1 KL in the reward.
    """
    if baseline:
        r = rewards.view(-1, group_size)  # [G, n]
        rewards = (r - r.mean(dim=1, keepdim=True)).view(-1)  # [N]
    return batch_normalise(kl_returns(rewards, mask, token_kl, kl_coef), mask, std_norm)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment [N] (Yu et al., arXiv 2503.14476, eq. 13), added to the reward: 0 up
    to max_len - buffer tokens, then falling linearly to -factor at the limit,
        penalty = -factor * clamp(len - (max_len - buffer), 0, buffer) / buffer
    so a completion that runs long is punished the more the nearer it came to being cut off.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"the overlong buffer must be in [1, {max_len}] (the length limit), got {buffer}")
    exceed = (lengths.double() - (max_len - buffer)).clamp(0, buffer)  # [N]
    return -factor * exceed / buffer


def advantages(rewards: Tensor, lengths: Tensor, mask: Tensor, ac: AdvantageConfig,
               logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """A step's advantages per completion token [N, L] (0 at masked tokens), and the reward shaping's
    metrics (the mean overlong and KL penalties per sample, each when on): rewards [N] as scored, the
    completions' lengths [N], mask [N, L], and with the KL in the reward the rollout policy's and the
    reference's log-probs [N, L]. The shaping (overlong, then KL penalty) comes before the baseline.
    """
    stats = {}
    if ac.overlong_buffer:
        penalty = overlong_penalty(lengths, ac.max_len, ac.overlong_buffer, ac.overlong_penalty)  # [N]
        rewards, stats["overlong_penalty"] = rewards + penalty, penalty.mean().item()
    token_kl = None
    if ac.kl_coef:
        token_kl = torch.where(mask.bool(), kl_estimate(logprobs, ref_logprobs, ac.kl_estimator), 0.0)  # [N, L]
        stats["kl_penalty"] = ac.kl_coef * token_kl.sum(1).mean().item()
    if ac.estimator in ("grpo", "rloo"):
        penalised = kl_returns(rewards, mask, token_kl, ac.kl_coef)[:, 0]  # [N]
        adv = group_advantages(penalised, ac.group_size, ac.std_norm, estimator=ac.estimator)  # [N]
        return torch.where(mask.bool(), adv[:, None], 0.0), stats
    return reinforce_pp_advantages(rewards, mask, ac.group_size, ac.estimator == "reinforce++-baseline", token_kl,
                                   ac.kl_coef, ac.std_norm), stats


def select_groups(informative: list[bool], need: int) -> list[int]:
    """DAPO's dynamic sampling (arXiv 2503.14476, section 3.2): the groups, by index in draw order, that
    one step trains on: the first `need` informative ones (`informative[g]`: group g's rewards are not all
    equal). When the draws ran out before that many were found, the groups of equal rewards drawn first
    fill the step up to `need`, so the batch keeps its size (verl's DAPO stops the run there instead).
    """
    keep = [g for g, ok in enumerate(informative) if ok][:need]
    fill = [g for g, ok in enumerate(informative) if not ok][:need - len(keep)]
    return sorted(keep + fill)
