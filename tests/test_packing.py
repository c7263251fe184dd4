"""Micro-batch planning (minirl/packing.py): balanced over dp ranks, the same count on every rank."""

import pytest

from minirl.packing import plan_micro_batches


def test_plan_balances_and_equalises_micro_batch_counts():
    # Deliberately skewed: one long sequence and many short ones.
    lengths = [90, 10, 10, 10, 10, 10, 10, 10, 10, 5]
    plan = plan_micro_batches(lengths, dp_size=2, token_budget=100)
    assert len(plan[0]) == len(plan[1])  # same number of micro-batches on every rank
    used = sorted(i for rank in plan for mb in rank for i in mb)
    assert used == list(range(len(lengths)))  # every sequence exactly once
    for rank in plan:
        for mb in rank:
            assert sum(lengths[i] for i in mb) <= 100
    loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert loads == [90, 85]  # longest-first greedy: 90 | 10*8 + 5
    # By hand: 6 -> r0; 3, 3 -> r1 (6 tokens, one bin); 2 -> r0 on the tie, which needs a second bin,
    # so rank 1 gets an empty micro-batch appended.
    plan = plan_micro_batches([6, 3, 3, 2], dp_size=2, token_budget=6)
    assert plan == [[[0], [3]], [[1, 2], []]]


def test_plan_rejects_sequence_over_budget():
    with pytest.raises(ValueError, match="exceeds micro_batch_tokens=16"):
        plan_micro_batches([17, 3], dp_size=1, token_budget=16)
