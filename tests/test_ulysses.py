"""Tests for minirl/ulysses.py.

Single-process: padding, slicing and metadata of `shard_micro_batch`. Multi-rank (gloo, in
tests/workers/parallel_worker.py): `attention` on slices equals attention on the whole sequence
(values and q/k/v gradients, kv heads split or repeated), and a ledger of every collective each
rank issues in one checkpointed forward+backward.
"""

import pytest
import torch
from helpers_dist import failures, run_worker

from minirl.ulysses import local_slice, shard_micro_batch

SP_GROUP = object()  # shard_micro_batch only stores the group in the metadata; no collective runs


def test_shard_micro_batch_pads_with_its_own_document():
    ids = torch.arange(100, 111)  # T = 11: documents of 4, 1 and 6 tokens
    pos = torch.cat([torch.arange(4), torch.arange(1), torch.arange(6)])
    slices = [shard_micro_batch(ids, pos, r, 4, "sdpa", SP_GROUP) for r in range(4)]
    assert all(pad == 1 for *_, pad in slices)
    assert torch.equal(torch.cat([s[0] for s in slices]), torch.cat([ids, torch.zeros(1, dtype=ids.dtype)]))
    assert torch.equal(torch.cat([s[1] for s in slices]), torch.cat([pos, torch.arange(1)]))
    for _, _, meta, _ in slices:  # every rank describes the FULL padded batch, padding as a document
        assert meta.cu_seqlens.tolist() == [0, 4, 5, 11, 12] and meta.max_seqlen == 6
        assert meta.sp_group is SP_GROUP


def test_shard_micro_batch_without_sp_is_the_whole_batch():
    pos = torch.cat([torch.arange(3), torch.arange(2)])
    ids, lpos, meta, pad = shard_micro_batch(pos + 7, pos, 0, 1, "sdpa")
    assert pad == 0 and torch.equal(ids, pos + 7) and torch.equal(lpos, pos)
    assert meta.sp_group is None and meta.cu_seqlens.tolist() == [0, 3, 5] and meta.max_seqlen == 3


def test_local_slice_pads_other_per_token_tensors():
    w = torch.ones(5, 2)
    parts = [local_slice(w, r, 2, fill=0.0) for r in range(2)]
    assert [p.shape for p in parts] == [(3, 2), (3, 2)]
    assert parts[1][-1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("pos, sp, group, message", [
    (torch.tensor([1, 2, 0]), 1, None, "start a document"),
    (torch.tensor([], dtype=torch.long), 1, None, "non-empty"),
    (torch.arange(4), 2, None, "needs the sp process group"),
])
def test_shard_micro_batch_rejects(pos, sp, group, message):
    with pytest.raises(ValueError, match=message):
        shard_micro_batch(pos, pos, 0, sp, "sdpa", group)


@pytest.mark.parametrize("nproc, sp", [(2, 2), (4, 4)])
def test_attention_matches_whole_sequence(nproc, sp):
    assert failures(run_worker("parallel_worker.py", nproc), f"attention/sp{sp}/") == []


def test_attention_in_head_chunks_matches_whole_sequence():
    """Each rank's heads in 2 chunks, every chunk's all-to-all started at once: the same values and
    q/k/v gradients as the whole sequence."""
    assert failures(run_worker("parallel_worker.py", 2), "attention/sp2-2chunks/") == []


@pytest.mark.parametrize("nproc, sp", [(2, 2), (4, 4)])
def test_gather_tokens(nproc, sp):
    assert failures(run_worker("parallel_worker.py", nproc), f"attention/sp{sp}-gather_tokens") == []


def test_collective_ledger():
    """dp2 x sp2, checkpointing on, one forward+backward per rank, recorded by minirl.ledger.

    The sp group sees 2 all-to-alls per layer in forward (q, k, v together; o) and 2 reversed in backward,
    none in recompute (their outputs are kept) and nothing else: the document boundaries were computed
    before the model call. Every
    rank issues the same sequence of collectives. (The peers' in-layer gather, and what it adds,
    is in scripts/repro_recompute_hang.py and its test.)
    """
    reports = run_worker("parallel_worker.py", 4)
    assert failures(reports, "ledger") == []
    ledgers = [rep["data"]["ledger"] for rep in reports]
    assert all(ledger == ledgers[0] for ledger in ledgers[1:])
    assert {op for op, group, phase in ledgers[0] if group == "sp"} == {"all_to_all_single"}  # the functional all-to-all
