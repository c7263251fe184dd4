"""Sequence-level quantities (GSPO's ratio, sequence-level importance weights) against hand-worked
values and per-sequence loops written independently here, and their split invariance."""

import math

import pytest
import torch
from helpers_dist import failures, run_worker

from minirl.algorithms import LossConfig, Sequences, policy_loss, rollout_is_weights, token_weights

LN2 = math.log(2.0)


def _zeros(n):
    return torch.zeros(n, dtype=torch.float64)


# ---- sequence-level ratios (GSPO) and sequence-level importance sampling ----

# Two sequences, one prompt token in front of each: [p, a, a, p, b, b, b]. Prompt tokens have huge
# log-ratios that must not leak into the sequence sums.
_SMASK = torch.tensor([0, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
_SSEQ = torch.tensor([0, 0, 0, 1, 1, 1, 1])
_SEQS = Sequences(_SSEQ, _SMASK, torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_gspo_ratio_and_gradient_by_hand():
    # a: token log-ratios ln2, -ln2 -> mean 0, ratio 1.   b: 0.3, 0.3, 0 -> mean 0.2, ratio e^0.2 = 1.221
    # A_a = 1 (unclipped: pg = -1 per token), A_b = 1 (clipped at 1.2: pg = -1.2, no gradient)
    lp = torch.tensor([9.0, LN2, -LN2, 9.0, 0.3, 0.3, 0.0], dtype=torch.float64, requires_grad=True)
    adv = torch.ones(7, dtype=torch.float64)
    w = _SMASK / 5  # token-mean over the 5 completion tokens
    loss, m = policy_loss(lp, _zeros(7), adv, w, LossConfig(ratio_level="sequence"), seqs=_SEQS)
    assert loss.item() == pytest.approx((-1 - 1 - 1.2 * 3) / 5)
    assert m["clip_frac"].item() == pytest.approx(3 / 5)
    loss.backward()
    # loss_a = -2/5 * exp((lp1 + lp2) / 2): d/d lp_t = -2/5 * 1/2 = -1/5 for both tokens of a
    torch.testing.assert_close(lp.grad, torch.tensor([0, -0.2, -0.2, 0, 0, 0, 0], dtype=torch.float64))


def _gspo_reference(theta, old, adv, w, mask, seq, lens, eps_low, eps_high):
    """GSPO written per sequence in a Python loop (float64): s_i = exp(mean log-ratio), clipped."""
    total = theta.new_zeros(())
    for i in range(len(lens)):
        tok = (seq == i) & (mask > 0)
        if not tok.any():
            continue
        s = torch.exp((theta[tok] - old[tok]).sum() / lens[i])
        a = adv[tok][0]
        pg = -torch.minimum(s * a, s.clamp(1 - eps_low, 1 + eps_high) * a)
        total = total + pg * w[tok].sum()
    return total


def _random_batch(seed, n_seqs=6, T=70):
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.sort(torch.randint(0, n_seqs, (T,), generator=g)).values  # [T]
    mask = (torch.rand(T, generator=g) > 0.3).double()  # [T]
    lens = torch.bincount(seq_ids, weights=mask, minlength=n_seqs).double()  # [S]

    def rand(scale):
        return torch.randn(T, generator=g, dtype=torch.float64) * scale

    theta, old, ref, gen = rand(0.3), rand(0.3), rand(0.3), rand(0.2)
    adv = torch.randn(n_seqs, generator=g, dtype=torch.float64)[seq_ids]  # [T]
    return seq_ids, mask, lens, theta, old, ref, gen, adv


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gspo_against_a_per_sequence_loop(agg):
    seq_ids, mask, lens, theta, old, _, _, adv = _random_batch(1)
    theta.requires_grad_()
    w = token_weights(mask, seq_ids, lens, len(lens), mask.sum(), agg, norm_len=20.0)
    cfg = LossConfig(ratio_level="sequence", clip_eps_low=0.05, clip_eps_high=0.08, agg=agg)
    loss, m = policy_loss(theta, old, adv, w, cfg, seqs=Sequences(seq_ids, mask, lens))
    want = _gspo_reference(theta, old, adv, w, mask, seq_ids, lens, 0.05, 0.08)
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, theta)
    (want_grad,) = torch.autograd.grad(want, theta)
    torch.testing.assert_close(grad, want_grad)
    assert 0 < m["clip_frac"] < 1  # both clipped and unclipped sequences
    # GSPO-token: same value, and the same gradient, since every aggregation weighs the tokens of a
    # sequence equally (GSPO's d mean / d lp_t = 1/len spreads the sequence's weight sum evenly too)
    cfg_tok = LossConfig(ratio_level="sequence-token", clip_eps_low=0.05, clip_eps_high=0.08, agg=agg)
    loss_tok, _ = policy_loss(theta, old, adv, w, cfg_tok, seqs=Sequences(seq_ids, mask, lens))
    torch.testing.assert_close(loss_tok, want)
    (grad_tok,) = torch.autograd.grad(loss_tok, theta)
    torch.testing.assert_close(grad_tok, want_grad)


def test_sequence_is_weights_by_hand():
    # a: old - gen = ln2, ln2 -> product 4.   b: -ln2, ln3, 0 -> product 1.5. Prompt tokens: huge.
    old = torch.tensor([5.0, LN2, LN2, -5.0, -LN2, math.log(3.0), 0.0], dtype=torch.float64)
    gen = _zeros(7)
    cfg = LossConfig(tis_cap=2.0, tis_level="sequence")
    w, kept = rollout_is_weights(old, gen, cfg, _SEQS)
    torch.testing.assert_close(w[_SMASK > 0], torch.tensor([2.0, 2.0, 1.5, 1.5, 1.5], dtype=torch.float64))
    cfg = LossConfig(tis_cap=2.0, tis_level="sequence", tis_mode="mask", tis_low=0.5)
    w, kept = rollout_is_weights(old, gen, cfg, _SEQS)
    torch.testing.assert_close(w[_SMASK > 0], torch.tensor([0.0, 0.0, 1.5, 1.5, 1.5], dtype=torch.float64))
    # in the loss: ratio 1, A = 1 -> pg = -1 * weight; b survives, a is dropped
    lp = _zeros(7).requires_grad_()
    loss, m = policy_loss(lp, _zeros(7), torch.ones(7, dtype=torch.float64), _SMASK / 5, cfg,
                          gen_logprobs=gen - old, seqs=_SEQS)
    assert loss.item() == pytest.approx(-1.5 * 3 / 5)
    assert m["tis_masked"].item() == pytest.approx(2 / 5)
    assert m["tis_weight"].item() == pytest.approx(1.5 * 3 / 5)


@pytest.mark.parametrize("bad, message", [
    (dict(tis_level="sequence"), "need tis_cap"),
    (dict(tis_cap=2.0, tis_low=0.5), "tis_low is the lower bound of tis_mode mask"),
    (dict(tis_cap=2.0, tis_mode="mask", tis_low=2.0), "0 <= tis_low < tis_cap"),
    (dict(ratio_level="seq"), "ratio_level must be one of"),
    (dict(tis_cap=2.0, tis_mode="clip"), "tis_mode must be one of"),
])
def test_invalid_combinations(bad, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**bad)


SEQ_MODES = {
    "gspo": dict(ratio_level="sequence", clip_eps_low=0.02, clip_eps_high=0.03),
    "gspo-token": dict(ratio_level="sequence-token", clip_eps_low=0.02, clip_eps_high=0.03),
    "seq-tis": dict(tis_cap=1.5, tis_level="sequence"),
    "seq-mask": dict(tis_cap=1.5, tis_level="sequence", tis_mode="mask", tis_low=0.7),
    "token-mask": dict(tis_cap=1.2, tis_mode="mask", tis_low=0.8),
}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("mode", sorted(SEQ_MODES))
def test_sequence_modes_split_invariance(mode, agg):
    """Whole sequences spread over micro-batches of uneven sizes (as over dp ranks): the parts add up.
    (Sequences cut across sp ranks are checked in tests/workers/algorithms_worker.py.)"""
    seq_ids, mask, lens, theta, old, ref, gen, adv = _random_batch(4)
    theta.requires_grad_()
    cfg = LossConfig(agg=agg, dual_clip_c=3.0, kl_coef=0.1, **SEQ_MODES[mode])

    def loss_on(idx):
        w = token_weights(mask[idx], seq_ids[idx], lens, len(lens), mask.sum(), agg, norm_len=20.0)
        return policy_loss(theta[idx], old[idx], adv[idx], w, cfg, ref_logprobs=ref[idx], gen_logprobs=gen[idx],
                           seqs=Sequences(seq_ids[idx], mask[idx], lens))

    full_loss, full_metrics = loss_on(torch.arange(len(seq_ids)))
    (full_grad,) = torch.autograd.grad(full_loss, theta)
    parts = [[4, 0], [2], [5, 1, 3]]  # uneven, out of order
    results = [loss_on(torch.isin(seq_ids, torch.tensor(p)).nonzero().squeeze(1)) for p in parts]
    total = sum(r[0] for r in results)
    (grad,) = torch.autograd.grad(total, theta)
    torch.testing.assert_close(total, full_loss)
    torch.testing.assert_close(grad, full_grad)
    for k, v in full_metrics.items():
        torch.testing.assert_close(sum(r[1][k] for r in results), v)
    assert full_metrics.get("tis_masked", 1) > 0 and full_metrics["clip_frac"] > 0  # the modes did something


@pytest.mark.parametrize("layout", ["sp2", "dp2"])
def test_sequence_modes_across_ranks(layout):
    """Sequences cut across 2 sp ranks (per-sequence sums all-reduced, gradient included), or whole
    on 2 dp ranks: the ranks' summed losses, metrics and gradients equal one process's."""
    failed = failures(run_worker("algorithms_worker.py", 2), "seq/")
    assert [f for f in failed if f"/{layout}/" in f or "/nontrivial" in f] == []


@pytest.mark.parametrize("layout", ["sp2", "dp2"])
def test_kl_in_the_reward_across_ranks(layout):
    """With the KL in the reward every rank gathers every sample's old and reference log-probs from the
    ranks holding them, and each micro-batch gets its own tokens' advantages (the same launch)."""
    failed = failures(run_worker("algorithms_worker.py", 2), "adv/")
    assert [f for f in failed if f"/{layout}/" in f or "adv/per_token" in f] == []
