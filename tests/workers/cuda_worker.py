"""What the CPU suite cannot run, on GPUs with NCCL: `torchrun --nproc-per-node N cuda_worker.py --out DIR`.

The equivalence checks of parallel_worker.py against the one-GPU fp32 reference (SDPA, TF32 off):
sp=N in fp32; then as training runs on GPUs -- torch's varlen attention kernel, bf16 compute with fp32
gradient reduction -- for dp=N and for sp=N, and sp=N with CPU offload, all within BF16_TOL; and a
checkpoint round trip: a model loaded from a checkpoint takes the same next step as the model that
wrote it. Run by tests/test_fsdp.py on a machine with CUDA devices (N = 2 when there are two).
"""

import os
import random

import torch
from checkpoint_worker import params_digest, train_step
from common import Report, make_model, parse_args, tiny_config
from parallel_worker import check_layout, reference_step

from minirl import checkpoint
from minirl import dist as mdist
from minirl.fsdp import shard_model


# bf16 compute (8 mantissa bits: a relative rounding of up to 2**-8 = 3.9e-3 per operation) over two
# layers, against the fp32 reference; the measured errors are in tests/GPU_TIER.md.
BF16_TOL = 3e-2


def check_checkpoint_round_trip(report: Report, cfg, d: mdist.Dist, ckpt_dir: str):
    def build(seed):
        model = shard_model(make_model(cfg, seed), d.fsdp_mesh, True, False, "full")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    random.seed(d.rank)
    torch.manual_seed(d.rank)
    model, optimizer, scheduler = build(0)
    data_state = {"batches": 0}
    train_step(model, optimizer, scheduler, data_state, d.device)
    checkpoint.save(ckpt_dir, 1, model, optimizer, scheduler, data_state)
    digest = params_digest(model)
    loss = train_step(model, optimizer, scheduler, data_state, d.device)
    model, optimizer, scheduler = build(1)
    resumed = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
    report.check("cuda/checkpoint/weights", params_digest(model) == digest)
    loss_resumed = train_step(model, optimizer, scheduler, resumed.data_state, d.device)
    report.check("cuda/checkpoint/next_loss", loss_resumed == loss, f"{loss_resumed!r} != {loss!r}")


def main():
    args = parse_args()
    with mdist.distributed(sp=1, timeout_s=120, cpu_collectives=True) as d:  # CPU offload reduces CPU gradients
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        report = Report(args.out, d.rank)
        cfg = tiny_config(head_dim=64)  # a head size every flash kernel supports
        ref = reference_step(cfg, d.device)
        check_layout(report, ref, cfg, d.world, checkpointing="full", tol=1e-4)
        for sp, offload in dict.fromkeys(((1, False), (d.world, False), (d.world, True))):  # dpN, spN, + offload
            check_layout(report, ref, cfg, sp, checkpointing="selective", mixed_precision=True, cpu_offload=offload,
                         tol=BF16_TOL, backend="varlen")
        check_checkpoint_round_trip(report, cfg, d, os.path.join(args.out, "ckpt"))
        report.write()
    os._exit(0)


if __name__ == "__main__":
    main()
