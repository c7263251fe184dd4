"""Tests for minirl/ledger.py and minirl/divergence.py: the first divergence per process group, the
phases, compiled collectives (both ledger sources), and train.py --trace-collectives on 2 gloo ranks
with and without a collective that differs between the ranks.

The train.py runs use the default task with 4 prompts, 2 samples, 1 step and 8 held-out prompts,
launched together with the compiled-collective worker (each mostly waits). The injected divergences
come from test-only rewards in helpers_divergence.py: one rank issues one extra all_reduce (the ranks
part: a hang until the collective timeout, or a gloo error), or the ranks issue an all_reduce of the
same byte count in different dtypes (gloo does not notice; the per-step check must).
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist
from helpers_dist import REPO, gpus, torchrun
from torch.utils.checkpoint import checkpoint

from minirl.ledger import Ledger, first_divergence, read_ledgers, signature

TIMEOUT = 20  # --timeout-s of the run that must fail
SLACK = 60  # for the wall-clock bounds: the CPU is shared, start-up times vary
DIVERGENCE = os.path.join(REPO, "tests", "helpers_divergence.py")


def entry(n, op, group="g", shapes=((2,),), dtype="float32", phase="backward"):
    return dict(n=n, phase=phase, op=op, group=group, shapes=[list(s) for s in shapes], dtype=dtype)


def test_first_divergence_compares_each_group_in_order():
    same = [entry(0, "a"), entry(1, "b", group="h")]
    assert first_divergence([same, same]) is None
    # Group h diverges at rank 0's entry 1, group g only at entry 2: h is reported.
    d = first_divergence([[entry(0, "a"), entry(1, "b", group="h"), entry(2, "c")],
                          [entry(0, "a"), entry(1, "x", group="h"), entry(2, "a")]])
    assert (d.group, d.index, d.entries[1]["op"]) == ("h", 0, "x")
    # Same op, other shape or dtype; a ledger that stops early.
    assert first_divergence([[entry(0, "a", shapes=((4,),))], [entry(0, "a")]]).index == 0
    assert first_divergence([[entry(0, "a", dtype="int32")], [entry(0, "a")]]).index == 0
    d = first_divergence([[entry(0, "a"), entry(1, "a")], [entry(0, "a")]])
    assert d.index == 1 and d.entries[1] is None and "nothing" in d.short()


def test_eager_and_compiled_names_of_one_collective_compare_alike():
    """Eager code issues c10d's ops (output, input), compiled code the functional ones (input): the
    same collective on the wire when what each rank sends matches."""
    eager = dict(entry(0, "alltoall_base_", shapes=((2, 4), (2, 4))), sent=[2, 4])
    compiled = dict(entry(0, "all_to_all_single", shapes=((2, 4),)), sent=[2, 4])
    assert signature(eager) == signature(compiled) and first_divergence([[eager], [compiled]]) is None
    gather = dict(entry(0, "_allgather_base_", shapes=((8,), (4,))), sent=[4])
    assert signature(gather) == signature(dict(entry(0, "all_gather_into_tensor"), sent=[4]))
    assert first_divergence([[eager], [dict(compiled, sent=[4, 2])]]).index == 0
    assert first_divergence([[eager], [dict(gather, n=0)]]).index == 0


def test_a_crossed_wait_names_both_sides():
    """Rank 1 stopped in a collective of another group: its last one is shown beside rank 0's."""
    d = first_divergence([[entry(0, "a", group="s"), entry(1, "alltoall_base_", group="s")],
                          [entry(0, "a", group="s"), entry(1, "_reduce_scatter_base_", group="f")]])
    assert d.entries[1] is None and d.elsewhere[1]["op"] == "_reduce_scatter_base_"
    assert "its last collective: #1 backward  _reduce_scatter_base_" in str(d) and "(last: backward" in d.short()


def test_a_launched_process_that_crashes_prints_its_stack():
    """conftest.py sets PYTHONFAULTHANDLER for every process the tests launch: a segfault shows where."""
    crash = "import ctypes\ndef deep():\n    ctypes.string_at(0)\ndeep()\n"
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Fatal Python error: Segmentation fault" in proc.stderr
    assert 'line 3 in deep' in proc.stderr, proc.stderr


def test_first_divergence_compares_only_the_members_of_a_group():
    """Two sp groups, {0, 1} and {2, 3}, under one name each: each is compared within itself only."""
    described = [{"group_name": "s01", "label": "sp", "ranks": [0, 1]},
                 {"group_name": "s23", "label": "sp", "ranks": [2, 3]}]
    a, b = [entry(0, "a", group="s01")], [entry(0, "b", group="s23")]
    assert first_divergence([described + a, a, b, b]) is None
    # Rank 1 is a member of s01 and issued nothing on it.
    d = first_divergence([described + a, [], b, b])
    assert (d.group, d.label, list(d.entries), d.entries[1]) == ("s01", "sp", [0, 1], None)


class Collective(torch.autograd.Function):
    """An all_reduce in forward and in backward, like Ulysses' all-to-alls."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class Layer(torch.nn.Module):
    def forward(self, x):
        return Collective.apply(x).sin()


def test_phases_call_sites_and_end_line(gloo_rank, tmp_path):
    x = torch.ones(3, requires_grad=True)
    with Ledger(str(tmp_path), rank=0) as ledger:
        checkpoint(Layer(), x, use_reentrant=False).sum().backward()
    ops = [e for e in read_ledgers(str(tmp_path))[0] if "op" in e]
    assert [e["phase"] for e in ops] == ["forward", "recompute", "backward"]
    assert {e["op"] for e in ops} == {"allreduce_"} and ops[0]["shapes"] == [[3]] and ops[0]["dtype"] == "float32"
    assert all(e["site"].startswith("test_ledger.py:") for e in ops), ops
    assert ledger.labels[ops[0]["group"]] == "world"
    assert read_ledgers(str(tmp_path))[0][-1]["end"] == "completed"


def test_a_failure_ends_the_ledger_and_prints_the_report(gloo_rank, tmp_path, capsys):
    with pytest.raises(ValueError), Ledger(str(tmp_path), rank=0):
        dist.all_reduce(torch.zeros(2))
        raise ValueError("boom")
    last = read_ledgers(str(tmp_path))[0][-1]
    assert last["end"] == "failed" and "boom" in last["error"]
    err = capsys.readouterr().err
    assert "rank 0 failed: ValueError: boom" in err and "1 collectives, last #0 allreduce_" in err


# ---------------------------------------------------------------------------------------------------
# train.py --trace-collectives, 2 gloo ranks


def train_args(root, name: str, reward: str | None, timeout_s: int) -> list[str]:
    test_data = root / "test.jsonl"
    if not test_data.exists():
        with open(os.path.join(REPO, "minirl", "default_task", "test.jsonl")) as f:
            test_data.write_text("".join(f.readlines()[:8]))
    return ["train.py", "--out-dir", str(root / name), "--steps", "1", "--prompts-per-step", "4", "--n-samples", "2",
            "--no-export", "--test-data", str(test_data), "--trace-collectives", "--timeout-s", str(timeout_s),
            *(["--reward", f"{DIVERGENCE}:{reward}"] if reward else [])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """name -> (CompletedProcess, seconds, ledger dir or out dir), the four launches started together:
    three train.py runs and tests/workers/compiled_worker.py."""
    root = tmp_path_factory.mktemp("trace")
    cases = {"clean": (None, 300), "extra": ("extra_collective", TIMEOUT), "dtype": ("other_dtype", 300)}

    def one(name):
        start = time.monotonic()
        if name == "compiled":
            worker = os.path.join(REPO, "tests", "workers", "compiled_worker.py")
            proc = torchrun(2, [worker, "--out", str(root / name)], timeout=600)
            return proc, time.monotonic() - start, str(root / name)
        reward, timeout_s = cases[name]
        proc = torchrun(2, train_args(root, name, reward, timeout_s), timeout=600)
        return proc, time.monotonic() - start, str(root / name / "ledger")

    names = ["compiled", *cases]  # the compile first: the slowest to start
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(one, names)))


def without_time(ledger: list[dict]) -> list[dict]:
    """What must be the same on every rank: all but times, process ids and call sites (a scatter's
    source rank runs other lines than its receivers)."""
    return [{k: v for k, v in e.items() if k not in ("t", "pid", "rank", "site")} for e in ledger]


def test_clean_run_completes_with_identical_ledgers(runs):
    proc, _, ledger_dir = runs["clean"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    ledgers = read_ledgers(ledger_dir)
    assert len(ledgers) == 2 and without_time(ledgers[0]) == without_time(ledgers[1])
    ops = [e for e in ledgers[0] if "op" in e]
    # The run's collectives: loading, rollout gathers, FSDP all-gathers and reduce-scatters, checks.
    assert {"_allgather_base_", "_reduce_scatter_base_", "allgather_", "allreduce_"} <= {e["op"] for e in ops}
    assert {e["phase"] for e in ops} == {"forward", "backward"}  # checkpointing is off in the default task
    assert [e["ok"] for e in ledgers[0] if "check" in e] == [True]
    assert ledgers[0][-1]["end"] == "completed"


def parse_divergence(text: str) -> dict[int, str]:
    """rank -> its line of the first divergent collective printed in `text`."""
    block = text.split("first divergent collective: ", 1)[1] if "first divergent collective: " in text \
        else text.split("(minirl.ledger check): ", 1)[1]
    return {int(line.split()[1].rstrip(":")): line for line in block.splitlines()[1:3]}


def test_an_extra_collective_fails_within_twice_the_timeout_and_is_named(runs):
    proc, seconds, ledger_dir = runs["extra"]
    assert proc.returncode != 0
    ledgers = read_ledgers(ledger_dir)
    d = first_divergence(ledgers)
    assert d is not None and d.label == "world+fsdp"
    assert (d.entries[1]["op"], d.entries[1]["shapes"], d.entries[1]["phase"]) == ("allreduce_", [[3]], "forward")
    assert d.entries[1]["site"].startswith("helpers_divergence.py:")  # the reward, not where rank 0 waited
    assert d.entries[0]["site"].startswith("dist.py:")  # rank 0 waits in `agree` after the held-out rollout
    # The first rank to fail printed the same divergence: group, op, phase, both ranks' entries.
    printed = parse_divergence(proc.stderr)
    assert "group world+fsdp" in proc.stderr and set(printed) == {0, 1}, proc.stderr[-4000:]
    assert "forward   allreduce_ float32 [[3]]" in printed[1] and "helpers_divergence.py" in printed[1]
    assert f"#{d.entries[0]['n']} {d.entries[0]['phase']}" in printed[0]
    # Within 2x the timeout of rank 1's extra collective, a rank failed by itself; the stall report
    # and faulthandler's stacks ("Timeout (0:00:15)!") came before that.
    ends = [(ledger[-1]["t"], r) for r, ledger in enumerate(ledgers) if "end" in ledger[-1]]
    assert ends and min(t - d.entries[r]["t"] for t, r in ends) < 2 * TIMEOUT, ends
    assert f"no collective started for {0.75 * TIMEOUT:.0f} s" in proc.stderr and "Timeout (0:00:15)!" in proc.stderr
    assert seconds < runs["clean"][1] + 2 * TIMEOUT + SLACK, f"took {seconds:.0f} s"


def test_a_silent_dtype_mismatch_fails_the_step_check(runs):
    proc, seconds, ledger_dir = runs["dtype"]
    assert proc.returncode != 0
    assert "ranks issued different collectives (minirl.ledger check)" in proc.stderr, proc.stderr[-4000:]
    printed = parse_divergence(proc.stderr)
    assert "allreduce_ float32 [[4]]" in printed[0] and "allreduce_ int32 [[4]]" in printed[1]
    assert seconds < 300  # the check, not the collective timeout, ended the run
    ends = [ledger[-1] for ledger in read_ledgers(ledger_dir)]
    assert [e.get("end") for e in ends] == ["failed", "failed"], ends


@pytest.mark.parametrize("source", ["dispatch", "flight_recorder"])
def test_a_divergence_in_compiled_code_is_named(runs, source):
    """An all-to-all traced into an inductor-compiled function: same bytes, other shapes on rank 1 in
    step 2. Both sources see the compiled collective (dispatch: as the functional op it is) and the
    step check names it; nothing fell back to eager."""
    proc, _, out = runs["compiled"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = []
    for r in range(2):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    assert all(rep["graphs"] >= 1 and rep["graph_breaks"] == 0 for rep in reports), reports
    for rep in reports:
        ok, failed = rep[source]["checks"]
        assert ok == "ok" and "ranks issued different collectives" in failed and "group sp" in failed
        lines = failed.splitlines()
        assert "[[4, 2]]" in lines[1] and "[[2, 4]]" in lines[2], failed
        assert rep[source]["ops"][0] == ("all_to_all_single" if source == "dispatch" else "all_to_all")
    if source == "dispatch":
        assert "via compiled code" in reports[0]["dispatch"]["checks"][1]


@gpus(2)
def test_nccl_extra_collective_is_named_before_the_watchdog(tmp_path):
    """The injected extra collective under NCCL: the watchdog aborts the ranks (no Python exception),
    so the stall report (3/4 of the timeout) must name the divergence, and the files must still show it."""
    start = time.monotonic()
    proc = torchrun(2, train_args(tmp_path, "nccl", "extra_collective", TIMEOUT), timeout=2 * TIMEOUT + 240, cuda=True)
    seconds = time.monotonic() - start
    assert proc.returncode != 0 and seconds < 2 * TIMEOUT + 240
    d = first_divergence(read_ledgers(str(tmp_path / "nccl" / "ledger")))
    assert d is not None and d.entries[1]["op"] == "allreduce_" and d.entries[1]["shapes"] == [[3]]
    assert "first divergent collective: group world+fsdp" in proc.stderr, proc.stderr[-4000:]
