"""scripts/repro_recompute_hang.py on gloo: every case ends as scripts/README.md says, fast, and the
ledgers point at the collective that really diverged.

Each case is its own torchrun launch (a mismatched collective leaves the process group unusable), so
they are launched a few at a time: a hanging case mostly waits. With a 10 s collective timeout the
whole module takes about a minute on 2 busy cores.
"""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("repro_recompute_hang",
                                               os.path.join(REPO, "scripts", "repro_recompute_hang.py"))
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)

TIMEOUT = 10.0  # the collective timeout of every launch
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


def log_of(r) -> str:
    with open(os.path.join(r.out_dir, "torchrun.log")) as f:
        return f.read()[-4000:]


@pytest.mark.parametrize("key", list(CASES), ids=[f"{s}-{n}".replace(" ", "") for s, n in CASES])
def test_case_ends_as_documented(results, key):
    r, case = results[key], CASES[key]
    assert r.code == case.expect, f"{key}: {repro.OUTCOMES[r.code]} ({r.how}), divergence {r.divergence}\n{log_of(r)}"
    assert not r.killed and r.seconds < 2 * TIMEOUT + 30, f"{key} took {r.seconds:.0f} s"
    if case.expect == repro.COMPLETED:
        assert r.divergence is None, str(r.divergence)


def without_time(entries) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "t"} for e in entries]


def position_gathers(ledger: list[dict], phase: str) -> int:
    """The in-layer all_gathers of position_ids: the only int64 collectives."""
    return sum(1 for e in ledger if e.get("phase") == phase and e.get("op") == "_allgather_base_"
               and e["dtype"] == "int64")


@pytest.mark.parametrize("mode", repro.MODES)
def test_count_one_gather_per_layer_in_forward_and_recompute(results, mode):
    ledgers = repro.read_ledgers(results["count", mode].out_dir)
    assert len(ledgers) == 2 and without_time(ledgers[0]) == without_time(ledgers[1])
    want = LAYERS if mode == "naive" else 0
    for ledger in ledgers:
        assert [position_gathers(ledger, p) for p in repro.PHASES] == [want, want, 0]
        recompute = [e for e in ledger if e.get("phase") == "recompute"]
        assert {e["op"] for e in recompute} == ({"alltoall_base_", "_allgather_base_"} if want else {"alltoall_base_"})


def test_tail_skew_rank0_recomputes_a_gather_that_rank1_skips(results):
    r = results["tail_skew", "naive"]
    rank0, rank1 = r.divergence.entries
    assert (rank0["phase"], rank0["op"], rank0["dtype"]) == ("recompute", "_allgather_base_", "int64")
    assert (rank1["phase"], rank1["op"]) == ("backward", "alltoall_base_")
    assert r.how == "gloo: timeout"  # gloo pairs the two by order and both wait for the other's bytes
    # Recompute of the last layer: attention's gather on both ranks, the tail's on rank 0 only.
    assert [position_gathers(ledger, "recompute") for ledger in repro.read_ledgers(r.out_dir)] == [2, 1]


def test_tail_skew_fixes_recompute_the_same_collectives(results):
    for name in ("pregather", "naive --no-early-stop"):
        ledgers = repro.read_ledgers(results["tail_skew", name].out_dir)
        recompute = [without_time(e for e in ledger if e.get("phase") == "recompute") for ledger in ledgers]
        assert recompute[0] == recompute[1] and recompute[0], name


@pytest.mark.parametrize("mode", repro.MODES)
def test_fsdp_moe_reduce_scatters_differ_in_size(results, mode):
    r = results["fsdp_moe", mode]
    rank0, rank1 = r.divergence.entries
    assert rank0["op"] == rank1["op"] == "_reduce_scatter_base_" and rank0["phase"] == "backward"
    assert rank0["shapes"][0][0] > rank1["shapes"][0][0]  # rank 1 leaves out its idle expert
    assert r.how == "gloo: size mismatch, abort"
    # "tokens per expert, per layer: [[...], [...]]": the last expert is busy on rank 0, idle on rank 1.
    load = [json.loads(e["note"].split(": ", 1)[1]) for ledger in repro.read_ledgers(r.out_dir)
            for e in ledger if "note" in e]
    assert [[layer[-1] > 0 for layer in rank] for rank in load] == [[True] * LAYERS, [False] * LAYERS], load


def test_detail_reports_the_mismatch_without_waiting(results):
    r = results["detail"]
    assert r.code == repro.FAILED and r.how == "DETAIL: mismatch reported", log_of(r)
    assert r.seconds < TIMEOUT + 30


def test_first_divergence_compares_each_group_in_order():
    def e(n, op, group="g", shapes=((2,),), dtype="float32", phase="backward"):
        return dict(n=n, phase=phase, op=op, group=group, shapes=[list(s) for s in shapes], dtype=dtype)

    same = [e(0, "a"), e(1, "b", group="h")]
    assert repro.first_divergence([same, same]) is None
    # Group h diverges at rank 0's entry 1, group g only at entry 2: h is reported.
    d = repro.first_divergence([[e(0, "a"), e(1, "b", group="h"), e(2, "c")],
                                [e(0, "a"), e(1, "x", group="h"), e(2, "a")]])
    assert (d.group, d.index, d.entries[1]["op"]) == ("h", 0, "x")
    # Same op, other shape; and a ledger that stops early.
    assert repro.first_divergence([[e(0, "a", shapes=((4,),))], [e(0, "a")]]).index == 0
    d = repro.first_divergence([[e(0, "a"), e(1, "a")], [e(0, "a")]])
    assert d.index == 1 and d.entries[1] is None and "nothing" in d.short()
