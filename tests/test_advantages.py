"""Advantages and reward shaping (minirl/advantages.py) against values worked out by hand and against
independent float64 implementations of the papers' formulas."""

import math
import re

import pytest
import torch

from minirl.advantages import (
    AdvantageConfig,
    advantages,
    batch_normalise,
    check_advantage,
    group_advantages,
    kl_returns,
    overlong_penalty,
    reinforce_pp_advantages,
    select_groups,
    zero_variance_groups,
)

F64 = torch.float64


# ---- group advantages (GRPO, RLOO) ----


def test_group_advantages_std_norm():
    # group 1: [1, 0, 0, 1] mean 0.5, biased std 0.5 -> [1, -1, -1, 1]
    # group 2: [3, 0, 0, 0] mean 0.75, biased std sqrt(0.75^2*3/4 + 2.25^2/4) = sqrt(27/16)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0], dtype=F64)
    adv = group_advantages(rewards, group_size=4, eps=0.0)
    s = math.sqrt(27 / 16)
    expected = [1, -1, -1, 1, 2.25 / s, -0.75 / s, -0.75 / s, -0.75 / s]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64))


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


def test_rloo_advantages():
    # leave-one-out: r_i - mean of the other three.
    # group 1 [1, 0, 0, 1]: 1 - 1/3, 0 - 2/3;  group 2 [3, 0, 0, 0]: 3 - 0, 0 - 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.0], dtype=F64)
    adv = group_advantages(rewards, group_size=4, std_norm=False, estimator="rloo")
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 3, -1, -1, -1], dtype=F64)
    torch.testing.assert_close(adv, expected)
    # with std_norm: divided by the biased group std (0.5 and sqrt(27/16))
    adv = group_advantages(rewards, group_size=4, estimator="rloo", eps=0.0)
    std = torch.tensor([0.5] * 4 + [math.sqrt(27 / 16)] * 4, dtype=F64)
    torch.testing.assert_close(adv, expected / std)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, group_size=1, estimator="rloo")
    with pytest.raises(ValueError, match="advantage must be one of"):
        group_advantages(rewards, group_size=4, estimator="ppo")
    with pytest.raises(ValueError, match="reinforce_pp_advantages"):
        group_advantages(rewards, group_size=4, estimator="reinforce++")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_equal_rewards_give_exact_zeros(estimator):
    # seven 0.3s average to 0.3 - 3e-8 in float32; divided by std + 1e-6 that would be -0.03
    rewards = torch.tensor([0.3] * 7 + [0.0] * 6 + [1.0])
    adv = group_advantages(rewards, group_size=7, estimator=estimator)
    assert torch.equal(adv[:7], torch.zeros(7))
    assert zero_variance_groups(rewards, 7).tolist() == [True, False]
    assert adv[7:].abs().min() > 0


def test_check_advantage():
    check_advantage("reinforce++", 1)  # plain REINFORCE++ needs no group
    for estimator in ("rloo", "reinforce++-baseline"):
        with pytest.raises(ValueError, match=re.escape(f"{estimator} advantages need a group of at least 2")):
            check_advantage(estimator, 1)


# ---- REINFORCE++ and the KL in the reward ----


def _padded(rows, fill=0.0):
    """Variable-length rows -> [N, L] float64 (padding `fill`)."""
    L = max(len(r) for r in rows)
    return torch.tensor([list(r) + [fill] * (L - len(r)) for r in rows], dtype=F64)


def test_kl_returns_by_hand():
    # sample 0: 3 counted tokens; sample 1: a counted token, an observation (masked), a counted token, padding
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 0]], dtype=F64)
    kl = torch.tensor([[0.1, 0.2, 0.3, math.inf], [0.5, 99.0, -0.1, math.nan]], dtype=F64)
    G = kl_returns(rewards, mask, kl, kl_coef=0.5)
    # G_t = r - 0.5 * (KL of the counted tokens from t on)
    want = [[1 - 0.5 * 0.6, 1 - 0.5 * 0.5, 1 - 0.5 * 0.3, 1.0], [-0.5 * 0.4, 0.05, 0.05, 0.0]]
    torch.testing.assert_close(G, torch.tensor(want, dtype=F64))
    torch.testing.assert_close(kl_returns(rewards, mask, kl, 0.0), rewards[:, None].expand(2, 4))


def test_reinforce_pp_by_hand():
    # rewards [1, 0 | 0, 1], 1, 3, 2 and 2 counted tokens: the token values are three 1s and five 0s,
    # mean 3/8, biased std sqrt(15)/8 -> advantages 5/sqrt(15) and -3/sqrt(15)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64)
    mask = _padded([[1], [1, 1, 1], [1, 1], [1, 1]])
    hi, lo = 5 / math.sqrt(15), -3 / math.sqrt(15)
    want = _padded([[hi], [lo] * 3, [lo] * 2, [hi] * 2])
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 2, baseline=False), want)
    # the baseline variant: the groups centre to [.5, -.5 | -.5, .5], whose batch normalisation is the same
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 2, baseline=True), want)
    # without std: only the batch mean (3/8) comes off
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, 2, baseline=False, std_norm=False),
                               _padded([[5 / 8], [-3 / 8] * 3, [-3 / 8] * 2, [5 / 8] * 2]))


def _openrlhf_reference(rewards, masks, kls, kl_coef, group_size, baseline, std_norm=True):
    """REINFORCE++ as OpenRLHF computes it, in plain Python over variable-length samples: group mean off
    the reward (baseline), the reward placed at the last counted token and -kl_coef * kl at every counted
    token, returns summed backwards (gamma 1), then (x - mean) / sqrt(max(var, 1e-8)) over all counted tokens."""
    if baseline:
        rewards = [r - sum(rewards[g - g % group_size:][:group_size]) / group_size for g, r in enumerate(rewards)]
    returns = []
    for r, m, k in zip(rewards, masks, kls):
        last = max(t for t in range(len(m)) if m[t])
        token_r = [(-kl_coef * k[t] if m[t] else 0.0) + (r if t == last else 0.0) for t in range(len(m))]
        g, row = 0.0, [0.0] * len(m)
        for t in reversed(range(len(m))):
            g += token_r[t]
            row[t] = g
        returns.append(row)
    counted = [x for row, m in zip(returns, masks) for x, c in zip(row, m) if c]
    mean = sum(counted) / len(counted)
    var = sum((x - mean) ** 2 for x in counted) / len(counted)
    scale = 1 / math.sqrt(max(var, 1e-8)) if std_norm else 1.0
    return [[(x - mean) * scale if c else 0.0 for x, c in zip(row, m)] for row, m in zip(returns, masks)]


@pytest.mark.parametrize("baseline", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.3])
def test_reinforce_pp_against_openrlhf(baseline, kl_coef):
    g = torch.Generator().manual_seed(5)
    n_groups, n = 3, 4
    lengths = torch.randint(1, 9, (n_groups * n,), generator=g).tolist()
    masks = [[1] + [int(x) for x in (torch.rand(L - 1, generator=g) > 0.3)] for L in lengths]  # observations
    kls = [torch.randn(L, generator=g, dtype=F64).mul(0.2).tolist() for L in lengths]
    rewards = torch.randint(0, 2, (n_groups * n,), generator=g).double()
    got = reinforce_pp_advantages(rewards, _padded(masks), n, baseline, _padded(kls, fill=math.nan), kl_coef)
    want = _padded(_openrlhf_reference(rewards.tolist(), masks, kls, kl_coef, n, baseline))
    torch.testing.assert_close(got, want)
    if kl_coef:  # per-token advantages: the KL of the tokens still to come differs along a sequence
        assert (got[0, : lengths[0]].unique().numel() > 1) or lengths[0] == 1


def test_batch_normalise_equal_values_give_exact_zeros():
    values = torch.full((3, 4), 0.3)  # the float mean of 0.3s is not 0.3: (x - mean) / 1e-4 would not be 0
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert torch.equal(batch_normalise(values, mask), torch.zeros(3, 4))
    assert torch.equal(batch_normalise(values, torch.zeros(3, 4)), torch.zeros(3, 4))


# ---- the step's composition: shaping, then the estimator ----


def _step_batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 6, 2, 8, 5, 7]
    masks = [[1.0] * L for L in lengths]
    masks[3][2] = masks[3][5] = 0.0  # a multi-turn sample: two observation tokens
    lp = [(torch.randn(L, generator=g, dtype=F64) * 0.3 - 1).tolist() for L in lengths]
    ref = [(torch.tensor(x, dtype=F64) + torch.randn(len(x), generator=g, dtype=F64) * 0.2).tolist() for x in lp]
    rewards = [1.0, 0.0, 1.0, 0.5, 0.0, 0.0]
    return rewards, lengths, masks, lp, ref


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_with_overlong_and_kl_in_the_reward(estimator):
    """DAPO's penalty (limit 8, buffer 4) and a k3 KL (coefficient 0.2) come off each reward, then the group
    baseline: checked against the formulas written out per sample."""
    rewards, lengths, masks, lp, ref = _step_batch()
    ac = AdvantageConfig(estimator, group_size=3, std_norm=True, kl_coef=0.2, kl_estimator="k3", overlong_buffer=4,
                         max_len=8)
    got, stats = advantages(torch.tensor(rewards, dtype=F64), torch.tensor(lengths), _padded(masks), ac,
                            _padded(lp), _padded(ref))
    shaped, kl_sums = [], []
    for r, L, m, a, b in zip(rewards, lengths, masks, lp, ref):
        kl = sum(math.exp(y - x) - (y - x) - 1 for x, y, c in zip(a, b, m) if c)  # k3 of pi vs ref, counted tokens
        kl_sums.append(kl)
        shaped.append(r + _dapo_length_reward(L, 8, 4) - 0.2 * kl)
    want = []
    for g in range(2):
        grp = shaped[3 * g:3 * g + 3]
        mean = sum(grp) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 3)
        for x in grp:
            base = mean if estimator == "grpo" else (sum(grp) - x) / 2
            want.append((x - base) / (std + 1e-6))
    torch.testing.assert_close(got, _padded([[w * c for c in m] for w, m in zip(want, masks)]))
    assert stats["overlong_penalty"] == pytest.approx(sum(_dapo_length_reward(L, 8, 4) for L in lengths) / 6)
    assert stats["kl_penalty"] == pytest.approx(0.2 * sum(kl_sums) / 6)


def test_reinforce_pp_with_overlong_and_kl_in_the_reward():
    rewards, lengths, masks, lp, ref = _step_batch(8)
    ac = AdvantageConfig("reinforce++-baseline", group_size=3, kl_coef=0.3, kl_estimator="k1", overlong_buffer=3,
                         max_len=8)
    got, _ = advantages(torch.tensor(rewards, dtype=F64), torch.tensor(lengths), _padded(masks), ac, _padded(lp),
                        _padded(ref))
    shaped = [r + _dapo_length_reward(L, 8, 3) for r, L in zip(rewards, lengths)]
    k1 = [[x - y for x, y in zip(a, b)] for a, b in zip(lp, ref)]
    want = _openrlhf_reference(shaped, [[int(c) for c in m] for m in masks], k1, 0.3, 3, baseline=True)
    torch.testing.assert_close(got, _padded(want))


# ---- DAPO: overlong shaping, dynamic sampling ----


def _dapo_length_reward(length, max_len, cache):
    """DAPO's eq. 13 as written: 0, then ((max_len - cache) - |y|) / cache, then -1 beyond the limit."""
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return ((max_len - cache) - length) / cache
    return -1.0


def test_overlong_penalty():
    lengths = torch.tensor([3, 10, 15, 16, 18, 20])
    # limit 20, buffer 5: no penalty up to 15, then -1/5 per token
    torch.testing.assert_close(overlong_penalty(lengths, 20, 5), torch.tensor([0, 0, 0, -0.2, -0.6, -1.0], dtype=F64))
    torch.testing.assert_close(overlong_penalty(lengths, 20, 5, factor=0.5),
                               torch.tensor([0, 0, 0, -0.1, -0.3, -0.5], dtype=F64))
    for max_len, cache in ((20, 5), (20, 20), (7, 1)):
        want = [_dapo_length_reward(x, max_len, cache) for x in range(max_len + 1)]
        torch.testing.assert_close(overlong_penalty(torch.arange(max_len + 1), max_len, cache),
                                   torch.tensor(want, dtype=F64))
    for bad in (0, 21):
        with pytest.raises(ValueError, match="the overlong buffer must be in"):
            overlong_penalty(lengths, 20, bad)


def test_select_groups():
    informative = [False, True, False, True, True]
    assert select_groups(informative, 2) == [1, 3]  # the first informative ones
    assert select_groups(informative, 3) == [1, 3, 4]
    assert select_groups(informative, 4) == [0, 1, 3, 4]  # one short: the first equal-reward group fills in
    assert select_groups(informative, 9) == [0, 1, 2, 3, 4]
    assert select_groups([False, False], 1) == [0]
