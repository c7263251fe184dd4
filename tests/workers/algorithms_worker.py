"""Sequence-level losses on 2 ranks: sequences cut across sp ranks, or whole on dp ranks, add up.

`torchrun --nproc-per-node 2 algorithms_worker.py --out DIR`. For every sequence-level mode
(GSPO, GSPO-token, sequence-level truncated and masked IS; CISPO and the KL estimators beside them),
a mini-batch of random per-token tensors packed into two micro-batches of uneven size is scored
- whole, in one process, without any collective (the reference, computed on every rank);
- sp2: each micro-batch's tokens split between the two ranks as Ulysses splits them (contiguous
  slices, padded), the per-sequence sums all-reduced over the sp group;
- dp2: each rank scoring one micro-batch of whole sequences.
The ranks' summed losses, metrics and gradients must equal the reference's.

Then the step's advantages with the KL in the reward (`trainer.set_advantages`): each rank holds the
log-probs of its own tokens only, and every rank must see every sample's (one all-reduce), and each
micro-batch must get its tokens' advantages, under sp2 and dp2 alike.
"""

import os

import torch
import torch.distributed as dist
from common import Report, parse_args, rel_err

from minirl import dist as mdist
from minirl.advantages import AdvantageConfig, advantages
from minirl.algorithms import LossConfig, Sequences, policy_loss, token_weights
from minirl.data import Prompt
from minirl.packing import pack_mini_batch
from minirl.rollouts import Sample
from minirl.trainer import completion_logprobs, set_advantages
from minirl.ulysses import local_slice

TOL = 1e-10  # float64 throughout
MODES = {
    "gspo": dict(ratio_level="sequence", clip_eps_low=0.02, clip_eps_high=0.03),
    "gspo-token": dict(ratio_level="sequence-token", clip_eps_low=0.02, clip_eps_high=0.03),
    "seq-tis": dict(tis_cap=1.5, tis_level="sequence"),
    "seq-mask": dict(tis_cap=1.5, tis_level="sequence", tis_mode="mask", tis_low=0.7),
    "gspo+seq-mask": dict(ratio_level="sequence", clip_eps_low=0.02, clip_eps_high=0.03, tis_cap=3.0,
                          tis_level="sequence", tis_mode="mask", tis_low=0.8),
    "gspo+k1": dict(ratio_level="sequence", clip_eps_low=0.02, clip_eps_high=0.03, kl_estimator="k1"),
    # CISPO is per token, the sequence-level IS weight all-reduced; a k2 KL in the loss
    "cispo+seq-tis+k2": dict(policy_loss="cispo", dual_clip_c=None, clip_eps_low=1.0, clip_eps_high=0.1,
                             kl_estimator="k2", tis_cap=1.5, tis_level="sequence"),
}
LENGTHS = [[9, 5, 10], [7]]  # tokens per sequence in each micro-batch: T = 24 and 7 (odd: sp pads); under
# sp2 the second sequence of each straddles the two ranks


def mini_batch(seed=0):
    """Per-token tensors of each micro-batch ([T_m] each), and the per-sequence lengths [S]."""
    g = torch.Generator().manual_seed(seed)
    micro, first = [], 0
    for lens in LENGTHS:
        seq = torch.cat([torch.full((n,), first + i) for i, n in enumerate(lens)])  # [T]
        first += len(lens)
        T = len(seq)
        mask = (torch.rand(T, generator=g) > 0.25).double()  # [T]
        theta, old, ref, gen = (torch.randn(T, generator=g, dtype=torch.float64) * s for s in (0.3, 0.3, 0.3, 0.2))
        adv = torch.randn(len(lens), generator=g, dtype=torch.float64)[seq - seq[0]]  # [T]
        micro.append(dict(seq=seq, mask=mask, theta=theta, old=old, ref=ref, gen=gen, adv=adv))
    seq_lens = torch.zeros(first, dtype=torch.float64)
    for mb in micro:
        seq_lens.index_add_(0, mb["seq"], mb["mask"])
    return micro, seq_lens


def score(mb, seq_lens, n_tokens, cfg, agg, group):
    """Loss, metrics and the gradient w.r.t. this part's log-probs."""
    theta = mb["theta"].clone().requires_grad_()
    w = token_weights(mb["mask"], mb["seq"], seq_lens, len(seq_lens), n_tokens, agg, norm_len=16.0)
    loss, metrics = policy_loss(theta, mb["old"], mb["adv"], w, cfg, ref_logprobs=mb["ref"], gen_logprobs=mb["gen"],
                                seqs=Sequences(mb["seq"], mb["mask"], seq_lens, group))
    loss.backward()
    return loss.detach(), metrics, theta.grad


def check_mode(report: Report, d_sp, d_dp, name, kwargs, agg):
    cfg = LossConfig(**{"agg": agg, "dual_clip_c": 3.0, "kl_coef": 0.1, **kwargs})
    micro, seq_lens = mini_batch()
    n_tokens = sum(mb["mask"].sum() for mb in micro)
    ref = [score(mb, seq_lens, n_tokens, cfg, agg, None) for mb in micro]
    ref_loss = sum(r[0] for r in ref)
    ref_metrics = {k: sum(r[1][k] for r in ref) for k in ref[0][1]}
    report.check(f"seq/{name}/{agg}/nontrivial", ref_metrics["clip_frac"] > 0 and ref_metrics.get("tis_masked", 1) > 0,
                 f"the mode did nothing: {ref_metrics}")

    for layout, d in (("sp2", d_sp), ("dp2", d_dp)):
        if layout == "sp2":  # every micro-batch, each rank its slice of the tokens
            parts = [{k: local_slice(v, d.sp_rank, 2) for k, v in mb.items()} for mb in micro]
            got = [score(p, seq_lens, n_tokens, cfg, agg, d.sp_group) for p in parts]
            want_grads = [local_slice(r[2], d.sp_rank, 2) for r in ref]
        else:  # micro-batch r on rank r, sequences whole
            got = [score(micro[d.dp_rank], seq_lens, n_tokens, cfg, agg, None)]
            want_grads = [ref[d.dp_rank][2]]
        keys = sorted(ref_metrics)
        vec = torch.stack([sum(g[0] for g in got)] + [sum(g[1][k] for g in got) for k in keys])
        dist.all_reduce(vec)  # the mini-batch loss is the sum of the ranks' shares
        want = torch.stack([ref_loss] + [ref_metrics[k] for k in keys])
        report.close(rel_err(vec, want), TOL, f"seq/{name}/{agg}/{layout}/loss_and_metrics")
        grad_err = max(rel_err(g[2], w) for g, w in zip(got, want_grads))
        report.close(grad_err, TOL, f"seq/{name}/{agg}/{layout}/grad")


def step_samples() -> list[Sample]:
    """Two groups of 3: prompts of 2-6 tokens, completions of 1-9, two of them multi-turn (observations)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(6):
        P, C = 2 + i % 5, 1 + (7 * i) % 9
        mask = None if i % 3 else [float(x) for x in (torch.rand(C, generator=g) > 0.3)]
        if mask is not None:
            mask[0] = 1.0
        out.append(Sample(Prompt(i // 3, "", torch.randint(1, 50, (P,), generator=g).tolist(), ""),
                          torch.randint(1, 50, (C,), generator=g).tolist(), [0.0] * C, "stop",
                          reward=float(torch.randint(0, 3, (), generator=g)), mask=mask))
    return out


def fake_logprobs(mb, k: int):
    """Log-probs as a function of (sample, position), the same whichever rank holds the token."""
    return -0.1 * (mb.seq_ids + 1) - 0.03 * mb.position_ids * (k + 1) + 0.2 * k  # [t]


def check_advantages(report: Report, d_sp, d_dp):
    samples = step_samples()
    N, width = len(samples), max(len(s.completion_ids) for s in samples)
    mask = torch.zeros(N, width, dtype=torch.float64)
    want_lp = torch.zeros(2, N, width, dtype=torch.float64)
    for i, s in enumerate(samples):
        m = torch.tensor(s.mask or [1.0] * len(s.completion_ids), dtype=torch.float64)
        mask[i, :len(m)] = m
        pos = torch.arange(len(m)) + len(s.prompt.token_ids) - 1  # the positions of the completion's targets
        for k in range(2):
            want_lp[k, i, :len(m)] = (-0.1 * (i + 1) - 0.03 * pos * (k + 1) + 0.2 * k) * m
    ac = AdvantageConfig("reinforce++", 3, kl_coef=0.5, kl_estimator="k3")
    lengths = torch.tensor([len(s.completion_ids) for s in samples])
    want_adv, _ = advantages(torch.tensor([s.reward for s in samples], dtype=torch.float64), lengths, mask, ac,
                             want_lp[0], want_lp[1])
    prompt_lens = torch.tensor([len(s.prompt.token_ids) for s in samples])
    for layout, d in (("sp2", d_sp), ("dp2", d_dp)):
        batches = [pack_mini_batch(samples, mini, d, 12, 0, "sdpa") for mini in ([0, 1, 2, 5], [3, 4])]
        for mb in (mb for mbs in batches for mb in mbs):
            mb.mask = mb.mask.double()
            mb.old_logprobs, mb.ref_logprobs = fake_logprobs(mb, 0).double(), fake_logprobs(mb, 1).double()
        got = torch.stack(completion_logprobs(batches, prompt_lens, width))
        report.close(rel_err(got, want_lp), TOL, f"adv/{layout}/completion_logprobs")
        set_advantages(samples, batches, ac, batches)
        err = 0.0
        for mb in (mb for mbs in batches for mb in mbs):
            col = (mb.position_ids - prompt_lens[mb.seq_ids] + 1).clamp(0, width - 1)
            err = max(err, rel_err(mb.advantages, torch.where(mb.mask > 0, want_adv[mb.seq_ids, col], 0.0)))
        report.close(err, TOL, f"adv/{layout}/micro_batch_advantages")
    report.check("adv/per_token", bool((want_adv[0, :3].diff() != 0).any()), "the KL made no per-token advantages")


def main():
    args = parse_args()
    with mdist.distributed(sp=2, timeout_s=60) as d_sp:
        report = Report(args.out, d_sp.rank)
        d_dp = mdist.build_dist(1)
        for name, kwargs in MODES.items():
            for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
                check_mode(report, d_sp, d_dp, name, kwargs, agg)
        check_advantages(report, d_sp, d_dp)
        report.write()
        del d_dp
    os._exit(0)


if __name__ == "__main__":
    main()
