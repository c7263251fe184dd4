"""Test-only rewards for train.py that make the ranks issue different collectives (tests/test_ledger.py).

A reward function runs on every rank, on that rank's share of the completions, between generation
and the gather of the results: any user code there can issue a collective. Each function scores like
the built-in `exact` reward and, at its first call on a rank, issues one collective that differs
between the ranks.
"""

import torch
import torch.distributed as dist

from minirl.rewards import exact_reward

_calls = 0


def _device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def _first_call() -> bool:
    global _calls
    _calls += 1
    return _calls == 1


def extra_collective(prompt: str, completion: str, answer: str) -> float:
    """Rank 1 issues one all_reduce of 3 floats that rank 0 never issues: the ranks part there."""
    if _first_call() and dist.get_rank() == 1:
        dist.all_reduce(torch.zeros(3, device=_device()))
    return exact_reward(prompt, completion, answer)


def other_dtype(prompt: str, completion: str, answer: str) -> float:
    """Every rank issues one all_reduce of 16 bytes: float32 on rank 0, int32 on the others. gloo adds
    up the bytes without noticing, so the run goes on; only the ledger's step check catches it."""
    if _first_call():
        dist.all_reduce(torch.zeros(4, dtype=torch.float32 if dist.get_rank() == 0 else torch.int32, device=_device()))
    return exact_reward(prompt, completion, answer)
