"""Tests for minirl/fsdp.py: sharded training equals single-process training.

Each layout takes one step on the same global batch of two packed micro-batches (uneven document
lengths, a one-token document, a length not divisible by sp) and must match the unsharded model
on the whole batch: the global loss, every gradient, the gradient norm and clipped gradients, and the
SGD-updated parameters, to 1e-5 relative in fp32 (tests/workers/parallel_worker.py).
"""

import pytest
import torch
from helpers_dist import failures, gpus, run_worker

LAYOUTS = [
    (2, "dp2-sp1"),  # plain data parallel: different sequences per rank
    (2, "dp1-sp2"),  # both micro-batches split over 2 sp ranks (gradient accumulation over two)
    (4, "dp2-sp2"),
    (4, "dp1-sp4"),  # 2 kv heads repeated to 4
]


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
@pytest.mark.parametrize("nproc, layout", LAYOUTS)
@pytest.mark.parametrize("quantity", ["loss", "grads", "grad_norm", "clipped", "updated"])
def test_matches_single_process(nproc, layout, checkpointing, quantity):
    name = f"equiv/{layout}-ckpt_{checkpointing}/{quantity}"
    assert failures(run_worker("parallel_worker.py", nproc), name) == []


def test_cpu_offload_matches():
    assert failures(run_worker("parallel_worker.py", 2), "equiv/dp1-sp2-ckpt_full-offload/") == []


def test_bf16_mixed_precision_close():
    """bf16 compute with fp32 gradient reduction, selective checkpointing: within bf16 rounding (5e-2) of
    the fp32 reference."""
    assert failures(run_worker("parallel_worker.py", 2), "equiv/dp1-sp2-ckpt_selective-bf16/") == []


@pytest.mark.parametrize("what", ["names", "fp32", "bf16"])
def test_iter_full_params_equals_unsharded_state_dict(what):
    assert failures(run_worker("parallel_worker.py", 2), f"iter_full_params/{what}") == []


@gpus(1)
def test_cuda_nccl():
    """On GPUs: NCCL, torch's varlen kernel, bf16 for dp and sp (and CPU offload) against the fp32 one-GPU
    reference, a checkpoint round trip (cuda_worker.py). Prints the measured bf16 errors."""
    nproc = 2 if torch.cuda.device_count() >= 2 else 1
    reports = run_worker("cuda_worker.py", nproc, cuda=True)
    for name, rel in sorted(reports[0]["data"].items()):
        print(f"{name}: relative error {rel:.2e}")
    assert failures(reports, "") == []


@pytest.mark.parametrize("layout", ["dp2-sp1", "dp1-sp2"])
@pytest.mark.parametrize("quantity", ["loss", "grads", "frozen", "grad_norm", "clipped", "updated"])
def test_lora_matches_single_process(layout, quantity):
    """With LoRA adapters (minirl/lora.py) the frozen base gets no gradient, and the adapters' loss,
    gradients and update equal the single-process ones: FSDP2 shards frozen and trainable parameters
    of one unit together."""
    assert failures(run_worker("parallel_worker.py", 2), f"equiv/lora-{layout}-ckpt_full/{quantity}") == []
