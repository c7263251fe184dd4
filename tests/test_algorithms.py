"""Losses and advantages against values worked out by hand."""

import math

import pytest
import torch

from minirl.algorithms import (
    LossConfig,
    group_advantages,
    k3_kl,
    policy_loss,
    rollout_is_weights,
    token_weights,
    zero_variance_groups,
)

LN2 = math.log(2.0)


def _lp(ratios):
    """Logprobs that give these ratios against old_logprobs = 0, as a grad leaf."""
    return torch.tensor([math.log(r) for r in ratios], dtype=torch.float64, requires_grad=True)


def _zeros(n):
    return torch.zeros(n, dtype=torch.float64)


def _mean_weights(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


# ---- group advantages ----


def test_group_advantages_std_norm():
    # group 1: [1, 0, 0, 1] mean 0.5, biased std 0.5 -> [1, -1, -1, 1]
    # group 2: [3, 0, 0, 0] mean 0.75, biased std sqrt(0.75^2*3/4 + 2.25^2/4) = sqrt(27/16)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    s = math.sqrt(27 / 16)
    expected = [1, -1, -1, 1, 2.25 / s, -0.75 / s, -0.75 / s, -0.75 / s]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


def test_group_advantages_no_std_norm():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, group_size=4, std_norm=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 2.25, -0.75, -0.75, -0.75]))


def test_group_advantages_identical_rewards_give_zeros():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, group_size=3)
    assert not adv.isnan().any()
    # group 2: [0, 1, 0] mean 1/3, biased std sqrt(2)/3
    s = math.sqrt(2) / 3
    torch.testing.assert_close(adv, torch.tensor([0, 0, 0, -1 / 3 / s, 2 / 3 / s, -1 / 3 / s]))
    assert torch.equal(group_advantages(torch.ones(2), group_size=1), torch.zeros(2))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), group_size=2)


# ---- PPO surrogate ----


def test_ppo_clip_symmetric():
    # eps 0.2 -> ratio clipped to [0.8, 1.2]. pg = -min(r*A, clip(r)*A):
    #   r=1.1 A=+1: -1.1        r=1.5 A=+1: -1.2 (clipped)   r=0.5 A=+1: -0.5
    #   r=1.5 A=-1: +1.5        r=0.5 A=-1: +0.8 (clipped)   r=1.1 A=-1: +1.1
    lp = _lp([1.1, 1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    loss, m = policy_loss(lp, _zeros(6), adv, _mean_weights(6), LossConfig())
    assert loss.item() == pytest.approx((-1.1 - 1.2 - 0.5 + 1.5 + 0.8 + 1.1) / 6)
    assert m["clip_frac"].item() == pytest.approx(2 / 6)
    assert m["pg_loss"].item() == pytest.approx(loss.item())
    loss.backward()
    # d(-r*A)/d lp = -r*A where unclipped, 0 where clipped
    expected = torch.tensor([-1.1, 0.0, -0.5, 1.5, 0.0, 1.1], dtype=torch.float64) / 6
    torch.testing.assert_close(lp.grad, expected)


def test_ppo_clip_asymmetric():
    # low 0.2, high 0.28 -> [0.8, 1.28]
    #   r=1.25 A=+1: -1.25 (inside, would be clipped to 1.2 with symmetric eps)
    #   r=1.5  A=+1: -1.28 (clipped)   r=0.7 A=-1: +0.8 (clipped)   r=0.7 A=+1: -0.7
    lp = _lp([1.25, 1.5, 0.7, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    loss, m = policy_loss(lp, _zeros(4), adv, _mean_weights(4), cfg)
    assert loss.item() == pytest.approx((-1.25 - 1.28 + 0.8 - 0.7) / 4)
    assert m["clip_frac"].item() == pytest.approx(2 / 4)


def test_dual_clip():
    # c = 3: for A < 0 the loss r*|A| is capped at 3*|A|; A > 0 is untouched.
    #   r=5 A=-1: 5 -> 3    r=2 A=-1: 2    r=5 A=-2: 10 -> 6    r=5 A=+1: -1.2 (normal clip)
    lp = _lp([5.0, 2.0, 5.0, 5.0])
    adv = torch.tensor([-1.0, -1.0, -2.0, 1.0], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    loss, m = policy_loss(lp, _zeros(4), adv, w, LossConfig(dual_clip_c=3.0))
    assert loss.item() == pytest.approx(3.0 + 2.0 + 6.0 - 1.2)
    assert m["dual_clip_frac"].item() == pytest.approx(2.0)
    loss.backward()
    # only the r=2 token keeps a gradient: d(-r*A)/d lp = -r*A = 2
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        LossConfig(dual_clip_c=1.0)


# ---- KL, entropy, truncated IS ----


def test_k3_kl_values():
    lp = torch.tensor([0.0, LN2, 0.3])
    ref = torch.tensor([LN2, 0.0, 0.3])
    # log r = ref - lp: r=2 -> 2 - ln2 - 1;  r=1/2 -> 1/2 + ln2 - 1;  r=1 -> 0
    torch.testing.assert_close(k3_kl(lp, ref), torch.tensor([1 - LN2, LN2 - 0.5, 0.0]))


def test_kl_and_entropy_terms():
    # ratio 1, A = 0: the surrogate is 0, leaving kl_coef*k3 - entropy_coef*entropy
    lp = torch.tensor([0.0, LN2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([LN2, 0.0], dtype=torch.float64)
    ent = torch.tensor([1.0, 3.0], dtype=torch.float64)
    cfg = LossConfig(kl_coef=0.5, entropy_coef=0.1)
    w = _mean_weights(2)
    loss, m = policy_loss(lp, lp.detach(), _zeros(2), w, cfg, ref_logprobs=ref, entropy=ent)
    kl = ((1 - LN2) + (LN2 - 0.5)) / 2
    assert loss.item() == pytest.approx(0.5 * kl - 0.1 * 2.0)
    assert m["kl_ref"].item() == pytest.approx(kl)
    assert m["entropy"].item() == pytest.approx(2.0)
    assert m["approx_kl"].item() == pytest.approx(0.0)
    with pytest.raises(ValueError):
        policy_loss(lp, lp.detach(), _zeros(2), w, cfg, entropy=ent)  # kl without ref


def test_token_is_weights_truncate_and_mask():
    old = torch.tensor([math.log(3.0), math.log(0.5), 0.0, math.log(0.1)])
    gen = torch.zeros(4)
    w, kept = rollout_is_weights(old, gen, LossConfig(tis_cap=2.0), None)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.5, 1.0, 0.1]))
    assert kept.all()
    # mask [0.2, 2]: 3 and 0.1 are dropped, the others keep their (uncapped) ratio
    w, kept = rollout_is_weights(old, gen, LossConfig(tis_cap=2.0, tis_mode="mask", tis_low=0.2), None)
    torch.testing.assert_close(w, torch.tensor([0.0, 0.5, 1.0, 0.0]))
    assert kept.tolist() == [False, True, True, False]


def test_tis_scales_policy_loss_and_is_detached():
    # ratio 1, A = 1 -> pg = -1 per token, times the TIS weight [2 (capped from 3), 0.5]
    old = torch.tensor([0.0, 0.0], dtype=torch.float64)
    gen = torch.tensor([-math.log(3.0), LN2], dtype=torch.float64, requires_grad=True)
    lp = _lp([1.0, 1.0])
    adv = torch.ones(2, dtype=torch.float64)
    w = torch.ones(2, dtype=torch.float64)
    loss, m = policy_loss(lp, old, adv, w, LossConfig(tis_cap=2.0), gen_logprobs=gen)
    assert loss.item() == pytest.approx(-2.5)
    assert m["tis_weight"].item() == pytest.approx(2.5)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-2.0, -0.5], dtype=torch.float64))
    assert gen.grad is None


# ---- aggregation ----

# Two sequences packed with a prompt token in front of each: [p, a, a, p, b, b, b, b].
# Ratio 1 everywhere so pg = -A: A_a = 3 -> -3 per token, A_b = -1 -> +1 per token.
# The prompt tokens get a huge advantage that must not leak in.
_MASK = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
_SEQ = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
_ADV = torch.tensor([100.0, 3, 3, 100, -1, -1, -1, -1], dtype=torch.float64)


@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token-mean", (-3 * 2 + 1 * 4) / 6),  # every token 1/6
        ("seq-mean-token-mean", (-3 + 1) / 2),  # mean of per-sequence means
        ("seq-mean-token-sum-norm", (-6 / 8 + 4 / 8) / 2),  # per-sequence sums / norm_len=8
    ],
)
def test_aggregation_by_hand(agg, expected):
    lens = torch.tensor([2, 4])
    w = token_weights(_MASK, _SEQ, lens, n_seqs=2, n_tokens=6, agg=agg, norm_len=8.0)
    assert w[~_MASK].abs().sum() == 0
    lp = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, lp.detach(), _ADV, w, LossConfig(agg=agg))
    assert loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_invariance(agg):
    """Micro-batch losses and gradients add up to the mini-batch's, however tokens are split."""
    g = torch.Generator().manual_seed(0)
    n_seqs, T = 5, 60
    seq_ids = torch.sort(torch.randint(0, n_seqs, (T,), generator=g)).values  # [T]
    mask = torch.rand(T, generator=g) > 0.3  # [T]
    seq_lens = torch.bincount(seq_ids[mask], minlength=n_seqs)  # [S], global counts
    n_tokens = int(mask.sum())

    def rand(scale=0.3):
        return torch.randn(T, generator=g, dtype=torch.float64) * scale

    # Large log-ratios so that clipping, dual clip and TIS caps all trigger.
    theta = rand(1.0).requires_grad_()  # [T] stands in for the model's logprobs
    old, ref, gen = rand(), rand(), rand()
    adv = torch.randn(n_seqs, generator=g, dtype=torch.float64)[seq_ids]  # [T]
    cfg = LossConfig(
        clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.1,
        entropy_coef=0.01, agg=agg, tis_cap=1.2,
    )

    def loss_on(idx):
        w = token_weights(mask[idx], seq_ids[idx], seq_lens, n_seqs, n_tokens, agg, norm_len=20.0)
        return policy_loss(
            theta[idx], old[idx], adv[idx], w, cfg,
            ref_logprobs=ref[idx], gen_logprobs=gen[idx], entropy=theta[idx].exp(),
        )

    full_loss, full_metrics = loss_on(torch.arange(T))
    (full_grad,) = torch.autograd.grad(full_loss, theta)

    for split in (torch.randperm(T, generator=g), torch.arange(T)):  # scattered, then contiguous
        cut = sorted(torch.randint(1, T, (2,), generator=g).tolist())
        parts = [split[: cut[0]], split[cut[0] : cut[1]], split[cut[1] :]]
        losses, metrics = zip(*(loss_on(p) for p in parts))
        total = sum(losses)
        (grad,) = torch.autograd.grad(total, theta)
        torch.testing.assert_close(total, full_loss)
        torch.testing.assert_close(grad, full_grad)
        for k, v in full_metrics.items():
            torch.testing.assert_close(sum(m[k] for m in metrics), v)

    assert full_metrics["clip_frac"] > 0 and full_metrics["dual_clip_frac"] > 0
    if agg != "seq-mean-token-sum-norm":  # these weights sum to 1
        w = token_weights(mask, seq_ids, seq_lens, n_seqs, n_tokens, agg, norm_len=20.0)
        assert w.sum().item() == pytest.approx(1.0)


# ---- RLOO, zero-variance groups ----


def test_rloo_advantages():
    # leave-one-out: r_i - mean of the other three.
    # group 1 [1, 0, 0, 1]: 1 - 1/3, 0 - 2/3;  group 2 [3, 0, 0, 0]: 3 - 0, 0 - 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, group_size=4, std_norm=False, estimator="rloo")
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 3, -1, -1, -1], dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    # with std_norm: divided by the biased group std (0.5 and sqrt(27/16))
    adv = group_advantages(rewards, group_size=4, estimator="rloo", eps=0.0)
    std = torch.tensor([0.5] * 4 + [math.sqrt(27 / 16)] * 4, dtype=torch.float64)
    torch.testing.assert_close(adv, expected / std)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, group_size=1, estimator="rloo")
    with pytest.raises(ValueError, match="advantage must be one of"):
        group_advantages(rewards, group_size=4, estimator="ppo")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_equal_rewards_give_exact_zeros(estimator):
    # seven 0.3s average to 0.3 - 3e-8 in float32; divided by std + 1e-6 that would be -0.03
    rewards = torch.tensor([0.3] * 7 + [0.0] * 6 + [1.0])
    adv = group_advantages(rewards, group_size=7, estimator=estimator)
    assert torch.equal(adv[:7], torch.zeros(7))
    assert zero_variance_groups(rewards, 7).tolist() == [True, False]
    assert adv[7:].abs().min() > 0
