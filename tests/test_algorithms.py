"""Policy losses, KL estimators and the published defaults against values worked out by hand and
independent float64 formulas. (Advantages: tests/test_advantages.py; sequence-level modes:
tests/test_algorithms_seq.py.)"""

import math

import pytest
import torch

from minirl.algorithms import (
    CISPO_CLIP,
    GSPO_CLIP,
    LossConfig,
    Sequences,
    auto_settings,
    kl_estimate,
    policy_loss,
    rollout_is_weights,
    token_weights,
)

LN2 = math.log(2.0)


def _lp(ratios):
    """Logprobs that give these ratios against old_logprobs = 0, as a grad leaf."""
    return torch.tensor([math.log(r) for r in ratios], dtype=torch.float64, requires_grad=True)


def _zeros(n):
    return torch.zeros(n, dtype=torch.float64)


def _mean_weights(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


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


def test_kl_estimators_by_hand():
    lp = torch.tensor([0.0, LN2, 0.3])
    ref = torch.tensor([LN2, 0.0, 0.3])
    # log r = ref - lp: r=2, r=1/2, r=1
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([-LN2, LN2, 0.0]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([LN2**2 / 2, LN2**2 / 2, 0.0]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([1 - LN2, LN2 - 0.5, 0.0]))
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_estimate(lp, ref, "k4")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        LossConfig(kl_estimator="low_var_kl")


def test_kl_estimators_against_the_exact_kl():
    """Over the whole support of a categorical pi (float64), E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly
    (Schulman's unbiased estimators), and as a loss k2's gradient E_pi[d k2] is d KL while k1's is 0."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), 0)
    lp = torch.log_softmax(logits, 0)  # [V]
    p = lp.exp().detach()  # the sampling distribution: no gradient through it
    exact = (lp.exp() * (lp - ref)).sum()  # KL(pi || ref)
    for k in ("k1", "k3"):
        torch.testing.assert_close((p * kl_estimate(lp, ref, k)).sum(), exact)
    assert (p * kl_estimate(lp, ref, "k2")).sum() > 0 and kl_estimate(lp, ref, "k3").min() >= 0
    (want,) = torch.autograd.grad(exact, logits, retain_graph=True)
    (k2_grad,) = torch.autograd.grad((p * kl_estimate(lp, ref, "k2")).sum(), logits, retain_graph=True)
    (k1_grad,) = torch.autograd.grad((p * kl_estimate(lp, ref, "k1")).sum(), logits)
    torch.testing.assert_close(k2_grad, want)
    torch.testing.assert_close(k1_grad, torch.zeros(7, dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_in_the_loss(estimator):
    # ratio 1, A = 0: the loss is kl_coef * mean k, its gradient kl_coef * d k / d lp per token
    lp = torch.tensor([0.0, LN2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([LN2, 0.0], dtype=torch.float64)
    loss, m = policy_loss(lp, lp.detach(), _zeros(2), _mean_weights(2), LossConfig(kl_coef=0.5, kl_estimator=estimator),
                          ref_logprobs=ref)
    k = {"k1": [-LN2, LN2], "k2": [LN2**2 / 2] * 2, "k3": [1 - LN2, LN2 - 0.5]}[estimator]
    dk = {"k1": [1.0, 1.0], "k2": [-LN2, LN2], "k3": [1 - 2.0, 1 - 0.5]}[estimator]  # k3: d/d lp = 1 - r
    assert loss.item() == pytest.approx(0.5 * sum(k) / 2)
    assert m["kl_ref"].item() == pytest.approx(sum(k) / 2)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor(dk, dtype=torch.float64) * 0.5 / 2)


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


# ---- CISPO ----


def _cispo_reference(lp, old, adv, w, low, high):
    """The MiniMax-M1 objective written token by token (float64): the loss -sum_t w_t sg(r_hat_t) A_t log pi_t,
    r_hat = clip(pi / pi_old, 1 - low, 1 + high), and its gradient -w_t r_hat_t A_t."""
    loss, grad = 0.0, []
    for t in range(len(lp)):
        r_hat = min(max(math.exp(lp[t] - old[t]), 1 - low), 1 + high)
        loss -= w[t] * r_hat * adv[t] * lp[t]
        grad.append(-w[t] * r_hat * adv[t])
    return loss, grad


def test_cispo_by_hand():
    # ratios 0.5, 1, 1.5, 5 (old = 0); low 0.2, high 0.28 -> weights 0.8, 1, 1.28, 1.28: three clipped
    lp = _lp([0.5, 1.0, 1.5, 5.0])
    adv = torch.tensor([1.0, -1.0, 1.0, 2.0], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    cfg = LossConfig(policy_loss="cispo", clip_eps_low=0.2, clip_eps_high=0.28)
    loss, m = policy_loss(lp, _zeros(4), adv, w, cfg)
    logs = [math.log(r) for r in (0.5, 1.0, 1.5, 5.0)]
    assert loss.item() == pytest.approx(-(0.8 * logs[0] - 0 + 1.28 * logs[2] + 1.28 * 2 * logs[3]))
    assert m["clip_frac"].item() == pytest.approx(3.0)
    loss.backward()
    # every token keeps a gradient, -w A: PPO's clip would have zeroed the last two
    torch.testing.assert_close(lp.grad, torch.tensor([-0.8, 1.0, -1.28, -2.56], dtype=torch.float64))
    ppo_lp = _lp([0.5, 1.0, 1.5, 5.0])
    policy_loss(ppo_lp, _zeros(4), adv, w, LossConfig(clip_eps_low=0.2, clip_eps_high=0.28))[0].backward()
    assert ppo_lp.grad[2:].abs().sum() == 0


def test_cispo_against_the_paper_formula():
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(40, generator=g, dtype=torch.float64) * 0.5 - 1.0).requires_grad_()
    old = lp.detach() + torch.randn(40, generator=g, dtype=torch.float64) * 1.2
    adv, w = torch.randn(40, generator=g, dtype=torch.float64), torch.rand(40, generator=g, dtype=torch.float64)
    low, high = CISPO_CLIP
    cfg = LossConfig(policy_loss="cispo", clip_eps_low=low, clip_eps_high=high)
    loss, m = policy_loss(lp, old, adv, w, cfg)
    want, want_grad = _cispo_reference(lp.tolist(), old.tolist(), adv.tolist(), w.tolist(), low, high)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64))
    assert 0 < m["clip_frac"] < w.sum()  # some weights capped at 4, none below (no lower bound)


@pytest.mark.parametrize("bad", [dict(ratio_level="sequence"), dict(dual_clip_c=3.0)])
def test_cispo_rejects_ppo_only_settings(bad):
    with pytest.raises(ValueError, match="policy_loss cispo weights each token by its own clipped ratio"):
        LossConfig(policy_loss="cispo", **bad)


# ---- tokens out of the loss ----


@pytest.mark.parametrize("mode", ["ppo", "gspo", "cispo"])
def test_masked_tokens_never_poison_the_loss(mode):
    """Non-finite terms at tokens of zero weight (prompt, observation) stay out of the loss, its gradient and
    the metrics, in float32 as the trainer runs: they equal those of the counted tokens alone. (Multiplied by
    a zero weight, the inf of an overflowing k3 or ratio gave 0 x inf = NaN and the step was skipped.)"""
    mask = torch.tensor([0, 1, 1, 0, 1, 1], dtype=torch.bool)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    # prompt tokens: lp - old = 100 (ratio e^100 = inf), ref - lp = 100 (k3 = inf), NaN generator log-probs
    lp = torch.tensor([-100.0, -0.5, -1.0, -100.0, -0.2, -2.0], requires_grad=True)
    old = torch.tensor([-200.0, -0.4, -1.1, -200.0, -0.3, -1.9])
    ref = torch.tensor([0.0, -0.6, -0.9, 0.0, -0.25, -2.1])
    gen = torch.tensor([math.nan, -0.45, -1.0, math.nan, -0.3, -2.0])
    ent = torch.tensor([math.inf, 1.0, 2.0, math.inf, 0.5, 0.7])
    adv = torch.tensor([-5.0, 1.0, 1.0, -5.0, -1.0, -1.0])
    kwargs = {"ppo": dict(dual_clip_c=None), "gspo": dict(ratio_level="sequence"), "cispo": dict(policy_loss="cispo")}
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, tis_mode="mask", tis_low=0.5, **kwargs[mode])
    lens = torch.tensor([2.0, 2.0])
    w = token_weights(mask, seq_ids, lens, 2, 4, "token-mean", 1.0)

    def run(idx):
        x = lp.detach()[idx].double().requires_grad_()
        seqs = Sequences(seq_ids[idx], mask[idx].double(), lens.double())
        loss, metrics = policy_loss(x, old[idx].double(), adv[idx].double(), w[idx].double(), cfg, ref[idx].double(),
                                    gen[idx].double(), ent[idx].double(), seqs)
        loss.backward()
        return loss, metrics, x.grad

    loss, metrics = policy_loss(lp, old, adv, w, cfg, ref, gen, ent, Sequences(seq_ids, mask.float(), lens))
    loss.backward()
    want_loss, want_metrics, want_grad = run(mask.nonzero().squeeze(1))  # the counted tokens alone, float64
    assert loss.isfinite() and all(v.isfinite() for v in metrics.values())
    torch.testing.assert_close(loss.double(), want_loss)
    torch.testing.assert_close(lp.grad[mask].double(), want_grad)
    assert lp.grad[~mask].abs().sum() == 0
    for k, v in want_metrics.items():
        torch.testing.assert_close(metrics[k].double(), v, msg=k)


# ---- each algorithm's published defaults ----


def test_auto_settings_by_algorithm():
    grpo = auto_settings("grpo", "ppo", "token")
    assert grpo == dict(clip_eps_low=0.2, clip_eps_high=0.2, loss_agg="token-mean", std_norm=True,
                        kl_placement="loss", kl_estimator="k3")
    for level in ("sequence", "sequence-token"):  # GSPO: its paper's range and objective
        gspo = auto_settings("grpo", "ppo", level)
        assert (gspo["clip_eps_low"], gspo["clip_eps_high"], gspo["loss_agg"]) == (*GSPO_CLIP, "seq-mean-token-mean")
    assert GSPO_CLIP == (3e-4, 4e-4)
    assert auto_settings("rloo", "ppo", "token")["std_norm"] is False  # RLOO: no std
    cispo = auto_settings("grpo", "cispo", "token")
    assert (cispo["clip_eps_low"], cispo["clip_eps_high"], cispo["loss_agg"]) == (1.0, 3.0, "token-mean")
    rpp = auto_settings("reinforce++", "ppo", "token")
    assert (rpp["kl_placement"], rpp["kl_estimator"], rpp["std_norm"]) == ("reward", "k1", True)
    assert auto_settings("reinforce++-baseline", "ppo", "token")["kl_estimator"] == "k2"
    assert auto_settings("grpo", "ppo", "token", kl_placement="reward")["kl_estimator"] == "k1"
    assert auto_settings("reinforce++", "ppo", "token", kl_placement="loss")["kl_estimator"] == "k3"


def _gspo_paper_loss(theta, old, mask, seq_ids, adv_seq, low, high):
    """-J_GSPO (arXiv 2507.18071, eq. 5) in a loop: the mean over sequences of
    -min(s_i A_i, clip(s_i, 1 - low, 1 + high) A_i), s_i the geometric mean of the token ratios."""
    terms = []
    for i, a in enumerate(adv_seq):
        tok = (seq_ids == i) & mask
        s = math.exp(sum((theta[tok] - old[tok]).tolist()) / int(tok.sum()))
        terms.append(-min(s * a, min(max(s, 1 - low), 1 + high) * a))
    return sum(terms) / len(terms)


def test_gspo_defaults_give_the_papers_objective():
    """With its auto settings GSPO is the paper's sequence-mean objective, clipped at 3e-4 / 4e-4; with PPO's
    (token-mean, +-0.2) a long sequence counted once per token and no sequence was ever clipped."""
    # a short sequence (2 tokens, A = +1) and a long one (6 tokens, A = -1); mean log-ratios +1e-3 and -2e-4
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    old = torch.zeros(10, dtype=torch.float64)
    theta = torch.tensor([9.0, 2e-3, 0.0, 9.0, -1e-3, 1e-3, -6e-4, -2e-4, -2e-4, -2e-4], dtype=torch.float64)
    adv_seq = [1.0, -1.0]
    adv = torch.tensor(adv_seq, dtype=torch.float64)[seq_ids]
    lens = torch.tensor([2.0, 6.0], dtype=torch.float64)
    seqs = Sequences(seq_ids, mask.double(), lens)

    def loss_with(low, high, agg):
        w = token_weights(mask, seq_ids, lens, 2, 8, agg, 1.0)
        cfg = LossConfig(ratio_level="sequence", clip_eps_low=low, clip_eps_high=high, agg=agg)
        return policy_loss(theta, old, adv, w, cfg, seqs=seqs)

    auto = auto_settings("grpo", "ppo", "sequence")
    loss, m = loss_with(auto["clip_eps_low"], auto["clip_eps_high"], auto["loss_agg"])
    want = _gspo_paper_loss(theta, old, mask, seq_ids, adv_seq, *GSPO_CLIP)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # by hand: s_0 = e^1e-3 clipped to 1.0004 (A > 0), s_1 = e^-2e-4 inside [0.9997, 1.0004]
    assert want == pytest.approx((-1.0004 + math.exp(-2e-4)) / 2, rel=1e-12)
    assert m["clip_frac"].item() == pytest.approx(0.5)  # the first sequence: half the weight
    old_loss, old_m = loss_with(0.2, 0.2, "token-mean")  # what --ratio-level sequence gave before
    assert old_m["clip_frac"].item() == 0
    assert old_loss.item() == pytest.approx((-2 * math.exp(1e-3) + 6 * math.exp(-2e-4)) / 8, rel=1e-12)


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


SPLIT_VARIANTS = {
    "ppo-k3": dict(dual_clip_c=3.0),
    "ppo-k2": dict(dual_clip_c=3.0, kl_estimator="k2"),
    "cispo-k1": dict(policy_loss="cispo", kl_estimator="k1"),  # with per-token advantages (REINFORCE++'s)
}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("variant", sorted(SPLIT_VARIANTS))
def test_split_invariance(agg, variant):
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
    if variant == "cispo-k1":
        adv = adv + rand()
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1, entropy_coef=0.01, agg=agg, tis_cap=1.2,
                     **SPLIT_VARIANTS[variant])

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

    assert full_metrics["clip_frac"] > 0 and full_metrics.get("dual_clip_frac", 1) > 0
    if agg != "seq-mean-token-sum-norm":  # these weights sum to 1
        w = token_weights(mask, seq_ids, seq_lens, n_seqs, n_tokens, agg, norm_len=20.0)
        assert w.sum().item() == pytest.approx(1.0)
