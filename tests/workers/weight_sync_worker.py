"""Weight sync from an FSDP2 policy into the generator (2 ranks, dp2, gloo).

After one AdamW step on the sharded model, the generator is refreshed with `iter_full_params`. Its
log-probs must equal those of an unsharded model that took the same step on the whole batch (both
ranks' data) in one process, and must differ from the log-probs before the step.
"""

import os

import torch
import torch.distributed as dist
from common import MICRO_BATCHES, Report, full_meta, make_model, packed, parse_args, rel_err, tiny_config

from minirl import dist as mdist
from minirl.fsdp import iter_full_params, shard_model
from minirl.generate import Generator, SamplingParams

PROMPTS = [[3, 14, 15, 92], [65, 35], [89, 79, 32, 38, 46]]


def step(model, batches, lr=1e-2):
    """One AdamW step on packed batches; the loss weights use the count over ALL given batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    count = sum(m.sum() for _, _, _, m in batches)
    if dist.is_initialized() and isinstance(next(model.parameters()), torch.distributed.tensor.DTensor):
        dist.all_reduce(count)
    for ids, pos, tgt, mask in batches:
        lp, _ = model(ids, pos, full_meta(pos), targets=tgt)
        (mask / count * -lp).sum().backward()
    opt.step()


def scored(gen: Generator):
    """Greedy completions and their log-probs: a function of the generator's weights."""
    outs = gen.generate(PROMPTS, SamplingParams(max_new_tokens=5, temperature=0.0))
    return torch.tensor([lp for o in outs for lp in o.logprobs]), [o.token_ids for o in outs]


def main():
    args = parse_args()
    cfg = tiny_config()
    with mdist.distributed(sp=1) as d:
        report = Report(args.out, d.rank)
        batches = [packed(MICRO_BATCHES[r], seed=r) for r in range(d.world)]  # rank r trains on batches[r]

        ref = make_model(cfg, seed=0)
        step(ref, batches)
        ref_gen = Generator(cfg, eos_ids=[], pad_id=0, dtype=torch.float32)
        ref_gen.update_weights(ref.named_parameters())
        want_lp, want_ids = scored(ref_gen)

        model = shard_model(make_model(cfg, seed=0), d.fsdp_mesh, mixed_precision=False, cpu_offload=False,
                            checkpointing="full")
        gen = Generator(cfg, eos_ids=[], pad_id=0, dtype=torch.float32)
        gen.update_weights(iter_full_params(model, torch.float32))
        before_lp, _ = scored(gen)
        gen.release()
        step(model, [batches[d.rank]])
        gen.update_weights(iter_full_params(model, torch.float32))  # rebuilt after release
        got_lp, got_ids = scored(gen)

        report.check("tokens_match_reference", got_ids == want_ids, f"{got_ids} != {want_ids}")
        report.close(rel_err(got_lp, want_lp), 1e-5, "logprobs_match_reference")
        report.check("sync_changed_outputs", rel_err(before_lp, want_lp) > 1e-3, "the step changed nothing")
        report.write()
        del model, gen, ref_gen
    os._exit(0)


if __name__ == "__main__":
    main()
