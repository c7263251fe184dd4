"""scripts/repro_recompute_hang.py on gloo: every case ends as scripts/README.md says, fast, and the
ledgers (minirl/ledger.py) point at the collective that really diverged.

What a failure looks like in torchrun's output changes with the torch version, so the tests assert
what is stable: the outcome, the time bound and the divergent collectives; a symptom is checked
only to be one of those the supported versions print (repro.SYMPTOMS).

Each case is its own torchrun launch (a mismatched collective leaves the process group unusable), so
they are launched a few at a time: a hanging case mostly waits. With a 15 s collective timeout the
whole module takes 1-4 minutes on 2 busy cores.
"""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_dist import gpus

from minirl.ledger import read_ledgers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("repro_recompute_hang",
                                               os.path.join(REPO, "scripts", "repro_recompute_hang.py"))
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)

TIMEOUT = 15.0  # the collective timeout of every launch
LAYERS = repro.tiny_config(n_layers=2).num_hidden_layers
DETAIL = repro.Case("tail_skew", "naive", (), repro.FAILED)  # once more, with --detail
CASES = {(c.scenario, c.name): c for c in repro.CASES}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("repro")
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(3) as pool:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo, also on a GPU machine
        futures = {key: pool.submit(repro.launch, case, 2, TIMEOUT, str(root / str(i)))
                   for i, (key, case) in enumerate(CASES.items())}
        futures["detail"] = pool.submit(repro.launch, DETAIL, 2, TIMEOUT, str(root / "detail"), detail=True)
        return {key: f.result() for key, f in futures.items()}


def ledgers_of(r) -> list[list[dict]]:
    return read_ledgers(os.path.join(r.out_dir, "ledger"))


def log_of(r) -> str:
    with open(os.path.join(r.out_dir, "torchrun.log")) as f:
        return f.read()[-4000:]


@pytest.mark.parametrize("key", list(CASES), ids=[f"{s}-{n}".replace(" ", "") for s, n in CASES])
def test_case_ends_as_documented(results, key):
    r, case = results[key], CASES[key]
    assert r.code == case.expect, f"{key}: {repro.OUTCOMES[r.code]} ({r.how}), divergence {r.divergence}\n{log_of(r)}"
    # Within 2x the timeout of the ranks being up: by itself, or killed there by the launcher.
    assert r.seconds < 2 * TIMEOUT + repro.TEARDOWN_S, f"{key} took {r.seconds:.0f} s"
    assert r.code == repro.COMPLETED or r.seconds < 2 * TIMEOUT + 10
    if case.expect == repro.COMPLETED:
        assert r.divergence is None and not r.killed, str(r.divergence)


def without_time(entries) -> list[dict]:
    """What must be the same on every rank: the collectives, but for times and call sites."""
    return [{k: v for k, v in e.items() if k not in ("t", "site")} for e in entries if "op" in e]


def position_gathers(ledger: list[dict], phase: str) -> int:
    """The in-layer all_gathers of position_ids: the only int64 collectives."""
    return sum(1 for e in ledger if e.get("phase") == phase and e.get("op") == "_allgather_base_"
               and e["dtype"] == "int64")


@pytest.mark.parametrize("mode", repro.MODES)
def test_count_one_gather_per_layer_in_forward_and_recompute(results, mode):
    ledgers = ledgers_of(results["count", mode])
    assert len(ledgers) == 2 and without_time(ledgers[0]) == without_time(ledgers[1])
    want = LAYERS if mode == "naive" else 0
    for ledger in ledgers:
        assert [position_gathers(ledger, p) for p in repro.PHASES] == [want, want, 0]
        recompute = [e for e in ledger if e.get("phase") == "recompute"]
        assert {e["op"] for e in recompute} == ({"all_to_all_single", "_allgather_base_"} if want else {"all_to_all_single"})


def test_count_naive_and_pregather_compute_the_same_loss(results):
    """The in-layer gather only finds the same document boundaries again: each rank's loss is the same."""
    def losses(mode):
        return [e["note"] for ledger in ledgers_of(results["count", mode]) for e in ledger if "note" in e]
    assert losses("naive") == losses("pregather") and len(losses("naive")) == 2


def test_tail_skew_rank0_recomputes_a_gather_that_rank1_skips(results):
    r = results["tail_skew", "naive"]
    rank0, rank1 = r.divergence.entries[0], r.divergence.entries[1]
    assert (rank0["phase"], rank0["op"], rank0["dtype"]) == ("recompute", "_allgather_base_", "int64")
    assert (rank1["phase"], rank1["op"]) == ("backward", "all_to_all_single")  # Ulysses: the functional all-to-all
    # gloo pairs the two by order and both wait for the other's bytes: a hang (see repro.HANG_SYMPTOMS)
    assert r.how in repro.HANG_SYMPTOMS, log_of(r)
    # Recompute of the last layer: attention's gather on both ranks, the tail's on rank 0 only.
    assert [position_gathers(ledger, "recompute") for ledger in ledgers_of(r)] == [2, 1]


def test_tail_skew_fixes_recompute_the_same_collectives(results):
    for name in ("pregather", "naive --no-early-stop"):
        ledgers = ledgers_of(results["tail_skew", name])
        recompute = [without_time(e for e in ledger if e.get("phase") == "recompute") for ledger in ledgers]
        assert recompute[0] == recompute[1] and recompute[0], name


@pytest.mark.parametrize("mode", repro.MODES)
def test_fsdp_moe_reduce_scatters_differ_in_size(results, mode):
    r = results["fsdp_moe", mode]
    rank0, rank1 = r.divergence.entries[0], r.divergence.entries[1]
    assert rank0["op"] == rank1["op"] == "_reduce_scatter_base_" and rank0["phase"] == "backward"
    assert rank0["shapes"][0][0] > rank1["shapes"][0][0]  # rank 1 leaves out its idle expert
    assert r.how in repro.SIZE_SYMPTOMS, log_of(r)
    # "tokens per expert, per layer: [[...], [...]]": the last expert is busy on rank 0, idle on rank 1.
    load = [json.loads(e["note"].split(": ", 1)[1]) for ledger in ledgers_of(r)
            for e in ledger if "note" in e]
    assert [[layer[-1] > 0 for layer in rank] for rank in load] == [[True] * LAYERS, [False] * LAYERS], load


def test_detail_reports_the_mismatch_without_waiting(results):
    r = results["detail"]
    assert r.code == repro.FAILED and r.how == "DETAIL: mismatch reported", log_of(r)
    assert r.seconds < TIMEOUT


@gpus(2)
def test_nccl_count_completes_and_tail_skew_is_reported_in_time(tmp_path):
    """Under NCCL (bf16): `count` completes with identical ledgers; `tail_skew` naive hangs until the
    watchdog, is killed or aborted within the launcher's bound, and its ledgers name the divergence."""
    ok = repro.launch(CASES["count", "naive"], 2, TIMEOUT, str(tmp_path / "count"))
    assert ok.code == repro.COMPLETED and ok.divergence is None, log_of(ok)
    r = repro.launch(CASES["tail_skew", "naive"], 2, TIMEOUT, str(tmp_path / "tail"))
    assert r.code == repro.FAILED and r.seconds < 2 * TIMEOUT + 10, log_of(r)
    assert r.divergence.entries[0]["op"] == "_allgather_base_" and r.divergence.entries[0]["phase"] == "recompute"
