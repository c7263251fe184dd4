"""scripts/repro_recompute_hang.py on gloo: every case ends as scripts/README.md says, fast, and the
ledgers (minirl/ledger.py) point at the collective that really diverged.

What a failure looks like in torchrun's output changes with the torch version, so the tests assert
what is stable: the outcome, the time bound and the divergent collectives; a symptom is checked
only to be one of those the supported versions print (repro.SYMPTOMS).

Each failing case is its own torchrun launch (a mismatched collective leaves the process group
unusable); the cases of the newer scenarios that complete share one launch. The launches run a few
at a time: a hanging case mostly waits. compile_reorder compiles with the aot_eager backend here:
dynamo and AOTAutograd, which make the graphs, their forward/backward split and the recompute
decisions, without inductor's C++ build (minutes on 2 busy cores; scripts/gpu_hangs.sh runs inductor).
With a 15 s collective timeout the whole module takes 2-4 minutes on 2 busy cores.
"""

import importlib.util
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_dist import gpus

from minirl.divergence import kind
from minirl.ledger import read_ledgers, signature

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("repro_recompute_hang",
                                               os.path.join(REPO, "scripts", "repro_recompute_hang.py"))
repro = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(repro)

TIMEOUT = 15.0  # the collective timeout of every launch
COMPILE = ("--compile-backend", "aot_eager")
LAYERS = repro.tiny_config(n_layers=2).num_hidden_layers
DETAIL = repro.Case("tail_skew", "naive", (), repro.FAILED)  # once more, with --detail
# The cases that complete and take no flag run in one launch, one after the other; every other alone.
BATCHED = [c for c in repro.CASES if c.expect == repro.COMPLETED and not c.flags]
BATCH = repro.Case(",".join(c.scenario for c in BATCHED), ",".join(c.mode for c in BATCHED), (), repro.COMPLETED)
CASES = {(c.scenario, c.name): c for c in repro.CASES if c not in BATCHED} | {("batch", BATCH.name): BATCH}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("repro")
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(3) as pool:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo, also on a GPU machine
        futures = {key: pool.submit(repro.launch, CASES[key], 2, TIMEOUT, str(root / str(i)), extra=COMPILE)
                   for i, key in enumerate(sorted(CASES, key=launch_order))}
        futures["detail"] = pool.submit(repro.launch, DETAIL, 2, TIMEOUT, str(root / "detail"), detail=True)
        return {key: f.result() for key, f in futures.items()}


def launch_order(key) -> int:
    """The compiling launches first, then those that wait for the collective timeout (idle, they
    overlap the others' start-up on the busy cores), then the rest."""
    case = CASES[key]
    return 0 if "compile_reorder" in case.scenario else 1 if case.expect == repro.FAILED and key[0] in (
        "tail_skew", "rank_metrics") else 2


def ledgers_of(r) -> list[list[dict]]:
    return read_ledgers(os.path.join(r.out_dir, "ledger"))


def sections(ledger: list[dict]) -> dict[str, list[dict]]:
    """A batch ledger's lines per case ("scenario mode"), from the note that starts each."""
    out, current = {}, None
    for e in ledger:
        if e.get("note", "").startswith("scenario "):
            current = e["note"].removeprefix("scenario ")
            out[current] = []
        elif current is not None:
            out[current].append(e)
    return out


def case_ledgers(results, scenario: str, mode: str) -> list[list[dict]]:
    """Each rank's lines of one case: its own launch's ledgers, or its section of the batch's."""
    if (scenario, mode) in CASES:
        return ledgers_of(results[scenario, mode])
    return [sections(ledger)[f"{scenario} {mode}"] for ledger in ledgers_of(results["batch", BATCH.name])]


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
    ledgers = case_ledgers(results, "count", mode)
    assert len(ledgers) == 2 and without_time(ledgers[0]) == without_time(ledgers[1])
    want = LAYERS if mode == "naive" else 0
    for ledger in ledgers:
        assert [position_gathers(ledger, p) for p in repro.PHASES] == [want, want, 0]
        recompute = [e for e in ledger if e.get("phase") == "recompute"]
        # The Ulysses all-to-alls' outputs are kept (model.keep_collectives): recompute issues none of them.
        assert {e["op"] for e in recompute} == ({"_allgather_base_"} if want else set())


def test_count_naive_and_pregather_compute_the_same_loss(results):
    """The in-layer gather only finds the same document boundaries again: each rank's loss is the same."""
    def losses(mode):
        return [e["note"] for ledger in case_ledgers(results, "count", mode) for e in ledger if "note" in e]
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
        ledgers = case_ledgers(results, "tail_skew", name)
        recompute = [without_time(e for e in ledger if e.get("phase") == "recompute") for ledger in ledgers]
        assert recompute[0] == recompute[1], name
        # pregather leaves no collective in the checkpointed region (the all-to-alls' outputs are kept);
        # the naive gather still runs again in every recompute, now on every rank alike.
        assert bool(recompute[0]) == (name != "pregather"), name


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


# ---------------------------------------------------------------------------------------------------
# The newer scenarios: compile_reorder, recompute_order, rank_metrics


def notes_of(ledger: list[dict]) -> list[str]:
    return [e["note"] for e in ledger if "note" in e]


def test_compile_reorder_the_compiled_rank_keeps_the_all_to_all_the_eager_rank_recomputes_it(results):
    """Step 2: rank 1 holds the padding and its blocks run eagerly (a graph break); rank 0's compiled
    block kept the all-to-all's output and goes on to backward's all-to-all, rank 1 recomputes."""
    r = results["compile_reorder", "naive"]
    rank0, rank1 = r.divergence.entries[0], r.divergence.entries[1]
    assert (rank0["phase"], rank0["op"]) == ("backward", "all_to_all_single"), r.divergence  # compiled code's op
    assert rank0["site"].endswith("via compiled code")
    assert (rank1["phase"], rank1["op"]) == ("recompute", "alltoall_base_")  # the peers' c10d all-to-all, eager
    assert rank1["site"].startswith("repro_order.py") and "via compiled code" not in rank1["site"]
    assert rank0["sent"] != rank1["sent"]  # the output's gradient [sp, t, H/sp, D] vs q, k, v together
    assert r.how in repro.SIZE_SYMPTOMS + repro.HANG_SYMPTOMS, log_of(r)
    assert [[n for n in notes_of(ledger) if n.startswith("step 2")] for ledger in ledgers_of(r)] == [
        ["step 2: padding rows here 0"], ["step 2: padding rows here 1"]]  # the failure came before the rest
    # Up to there the ranks matched collective for collective: compiled (functional) and eager (c10d)
    # all-to-alls alike (minirl/divergence.kind).
    before = [[e for e in ledger if "op" in e][:rank0["n"]] for ledger in ledgers_of(r)]
    assert [signature(e) for e in before[0]] == [signature(e) for e in before[1]]
    assert {"all_to_all_single", "alltoall_base_"} == {e["op"] for ledger in before for e in ledger} - {
        "_allgather_base_", "_reduce_scatter_base_"}


def test_compile_reorder_fixes_issue_the_same_collectives_compiled_or_not(results):
    for mode in ("fixed", "minirl"):
        ledgers = case_ledgers(results, "compile_reorder", mode)
        ops = [[e for e in ledger if "op" in e] for ledger in ledgers]
        assert [signature(e) for e in ops[0]] == [signature(e) for e in ops[1]] and ops[0], mode
        notes = [notes_of(ledger) for ledger in ledgers]
        assert notes[0][-1] == "step 2: graph breaks so far 0" and notes[1][-1] != notes[0][-1], notes
        # minirl's all-to-all is the functional op whether the block ran compiled (rank 0) or eagerly
        # (rank 1): one op, so one checkpoint decision, on every rank.
        names = [{e["op"] for e in rank if kind(e["op"]) == "alltoall"} for rank in ops]
        assert names == [{"all_to_all_single"}] * 2, (mode, names)


def test_recompute_order_ranks_recompute_the_two_layers_in_opposite_orders(results):
    r = results["recompute_order", "naive"]
    rank0, rank1 = r.divergence.entries[0], r.divergence.entries[1]
    assert rank0["phase"] == rank1["phase"] == "recompute" and rank0["op"] == rank1["op"] == "alltoall_base_"
    capacity = {m: c * 2 for m, c in repro.ORDER_CAPACITY.items()}  # 2 ranks
    assert (rank0["sent"][0], rank1["sent"][0]) == (capacity["text"], capacity["image"])
    assert r.how in repro.SIZE_SYMPTOMS + repro.HANG_SYMPTOMS, log_of(r)
    # Forward matched: every rank ran text, then image.
    assert r.divergence.index == 2 * len(capacity)


def test_recompute_order_one_backward_recomputes_in_the_same_order(results):
    per_rank = case_ledgers(results, "recompute_order", "fixed")
    assert without_time(per_rank[0]) == without_time(per_rank[1])
    assert [e["phase"] for e in per_rank[0] if "op" in e].count("recompute") == 2 * len(repro.ORDER_CAPACITY)


def reduced(note: str) -> dict[str, float]:
    return json.loads(note.split("reduced: ", 1)[1].replace("'", '"'))


def test_rank_metrics_a_missing_key_shortens_one_ranks_reduction(results):
    r = results["rank_metrics", "naive"]
    rank0, rank1 = r.divergence.entries[0], r.divergence.entries[1]
    assert rank0["op"] == rank1["op"] == "allreduce_" and (rank0["sent"], rank1["sent"]) == ([3], [2])
    assert rank0["site"].startswith("repro_order.py") and "reduce_own_keys" in rank0["site"]
    assert r.how in repro.SIZE_SYMPTOMS + repro.HANG_SYMPTOMS, log_of(r)
    keys = [[n for n in notes_of(ledger) if n.startswith("step 2 metric keys")] for ledger in ledgers_of(r)]
    assert "reward/code" in keys[0][0] and "reward/code" not in keys[1][0]


def test_rank_metrics_agreed_keys_give_every_rank_the_same_means(results):
    per_rank = [notes_of(ledger) for ledger in case_ledgers(results, "rank_metrics", "fixed")]
    step2 = [reduced(next(n for n in notes if n.startswith("step 2 reduced"))) for notes in per_rank]
    assert step2[0] == step2[1]
    # By hand: code only on rank 0 (reward 1), math 1 and 0 on both ranks.
    assert (step2[0]["reward/code"], step2[0]["reward/math"]) == (1.0, 0.5)


@gpus(2)
def test_nccl_count_completes_and_tail_skew_is_reported_in_time(tmp_path):
    """Under NCCL (bf16): `count` completes with identical ledgers; `tail_skew` naive hangs until the
    watchdog, is killed or aborted within the launcher's bound, and its ledgers name the divergence."""
    ok = repro.launch(CASES["count", "naive"], 2, TIMEOUT, str(tmp_path / "count"))
    assert ok.code == repro.COMPLETED and ok.divergence is None, log_of(ok)
    r = repro.launch(CASES["tail_skew", "naive"], 2, TIMEOUT, str(tmp_path / "tail"))
    assert r.code == repro.FAILED and r.seconds < 2 * TIMEOUT + 10, log_of(r)
    assert r.divergence.entries[0]["op"] == "_allgather_base_" and r.divergence.entries[0]["phase"] == "recompute"
