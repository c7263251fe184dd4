"""A stop signal on ONE rank during `trainer.update`: every rank raises Interrupted at the same micro-batch,
before the step's first optimizer step, and the model, optimizer and lr schedule are as they were. Every
rank's Interrupted holds SIGTERM, the signal one rank got: all exit with 143.

`torchrun --nproc-per-node 2 stop_worker.py --out DIR` (dp2, FSDP2 over both ranks). A real SIGTERM
(`signal.raise_signal`) reaches report.Interrupt's handler on rank 1 only; the ranks can only agree
through `Interrupt.check`, the all_reduce that `update` runs before each micro-batch of the first
mini-batch. Two cases, each after one full update (so the optimizer holds state to compare):
- before: rank 1 is signalled before `update` is called: both ranks stop before micro-batch 0, having
  run no forward and no backward, so every gradient is still None (zero_grad(set_to_none) of the update before);
- during: rank 0 is signalled in micro-batch 0's forward: both ranks stop before micro-batch 1.
Each rank writes how many forwards it ran in the interrupted update (`data`), and named checks.
"""

import os
import signal

import torch
import torch.distributed as dist
from common import Report, make_model, parse_args, tiny_config
from torch.distributed.tensor import DTensor

from minirl import dist as mdist
from minirl.config import TrainConfig, derive
from minirl.data import Prompt
from minirl.fsdp import shard_model
from minirl.advantages import AdvantageConfig
from minirl.packing import pack_mini_batch, split_mini_batches
from minirl.report import Interrupt, Interrupted
from minirl.rollouts import Sample
from minirl.trainer import Policy, set_advantages, update

N_SAMPLES, TOKEN_BUDGET = 8, 24  # 8 samples of 9-13 tokens: 2 micro-batches of 1-2 samples on each dp rank


def samples_of(vocab: int) -> list[Sample]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(N_SAMPLES):
        prompt = torch.randint(1, vocab, (4,), generator=g).tolist()
        completion = torch.randint(1, vocab, (5 + i % 5,), generator=g).tolist()
        out.append(Sample(Prompt(i, f"p{i}", prompt, ""), completion, [-1.0] * len(completion), "length",
                          reward=float(i % 4)))  # advantages i % 4 - 1.5 in groups of 4 (no std)
    return out


def settings():
    """The default loss (token-mean, no KL) and a 16-token sample budget."""
    cfg = TrainConfig()
    cfg.rollout.max_new_tokens = 16
    return derive(cfg, None)


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(policy: Policy) -> dict:
    """This rank's shards of the parameters and optimizer state, and the lr schedule's state."""
    opt = policy.optimizer
    return {"params": [local(p) for p in policy.model.parameters()],
            "optim": [{k: local(v) for k, v in opt.state[p].items()} for p in policy.model.parameters()],
            "groups": [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups],
            "sched": policy.scheduler.state_dict()}


def same(a: dict, b: dict) -> bool:
    return (all(torch.equal(x, y) for x, y in zip(a["params"], b["params"], strict=True))
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(a["optim"], b["optim"], strict=True))
            and a["groups"] == b["groups"] and a["sched"] == b["sched"])


def run_case(report: Report, d, policy: Policy, batches, minis, samples, name: str, signal_rank: int,
             at_forward: int | None):
    """One interrupted update: SIGTERM to `signal_rank` before the update (at_forward None) or inside
    its forward number `at_forward` (1-based, through a forward pre-hook)."""
    interrupt = Interrupt(d.device)  # installs the SIGTERM handler, as train.py does
    forwards = [0]

    def count(module, inputs):
        forwards[0] += 1
        if d.rank == signal_rank and forwards[0] == at_forward:
            signal.raise_signal(signal.SIGTERM)

    before = snapshot(policy)
    report.check(f"stop/{name}/state_to_compare", len(before["optim"][0]) > 0 and before["sched"]["last_epoch"] == 1,
                 "the optimizer holds no state yet: the comparison would mean little")
    hook = policy.model.register_forward_pre_hook(count)
    if d.rank == signal_rank and at_forward is None:
        signal.raise_signal(signal.SIGTERM)
    report.check(f"stop/{name}/flag_only_on_signalled_rank",
                 interrupt.requested() == (d.rank == signal_rank and at_forward is None),
                 f"requested={interrupt.requested()} before the update")
    interrupted = 0
    try:
        update(policy, samples, minis, batches, d, settings(), 1.0, 1, False, interrupt)
    except Interrupted as e:
        interrupted = e.signum
    hook.remove()
    report.data[f"stop/{name}/forwards"] = forwards[0]
    report.check(f"stop/{name}/interrupted", interrupted, "update returned without Interrupted")
    report.check(f"stop/{name}/signal", interrupted in (0, signal.SIGTERM),  # also on the rank not signalled:
                 f"Interrupted with signal {interrupted}, not SIGTERM's {int(signal.SIGTERM)}")  # its exit code
    want = 0 if at_forward is None else at_forward
    report.check(f"stop/{name}/micro_batch", forwards[0] == want,
                 f"stopped after {forwards[0]} forwards, expected {want}")
    report.check(f"stop/{name}/unchanged", same(snapshot(policy), before),
                 "parameters, optimizer state or lr schedule changed")
    if at_forward is None:
        report.check(f"stop/{name}/no_grads", all(p.grad is None or not local(p.grad).any()
                                                  for p in policy.model.parameters()), "gradients were accumulated")
    policy.optimizer.zero_grad(set_to_none=True)  # as train.py does after Interrupted
    flag = torch.ones(1)
    dist.all_reduce(flag)  # the ranks are still in lockstep: no one is left inside a collective of the update
    report.check(f"stop/{name}/lockstep", flag.item() == d.world, f"all_reduce gave {flag.item()}")


def check_stop(report: Report, d):
    cfg = tiny_config()
    model = shard_model(make_model(cfg, 0), d.fsdp_mesh, False, False, "none")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = Policy(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)))
    samples = samples_of(cfg.vocab_size)
    minis = split_mini_batches(len(samples), 1)
    batches = [pack_mini_batch(samples, mb, d, TOKEN_BUDGET, 0, "sdpa") for mb in minis]
    set_advantages(samples, batches, AdvantageConfig(group_size=4, std_norm=False))
    count = torch.tensor([float(len(batches[0]))])
    dist.all_reduce(count, op=dist.ReduceOp.MIN)
    report.check("stop/two_micro_batches", count.item() >= 2, f"{count.item()} micro-batches on some rank")
    update(policy, samples, minis, batches, d, settings(), 1.0, 1, False)  # one full update, no signal: the
    # optimizer now has state and the schedule moved
    run_case(report, d, policy, batches, minis, samples, "before", signal_rank=1, at_forward=None)
    run_case(report, d, policy, batches, minis, samples, "during", signal_rank=0, at_forward=1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main():
    args = parse_args()
    with mdist.distributed(sp=1, timeout_s=60) as d:
        report = Report(args.out, d.rank)
        check_stop(report, d)
        report.write()
    os._exit(0)


if __name__ == "__main__":
    main()
