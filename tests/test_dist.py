"""Tests for minirl/dist.py: layout validation (a one-line error, exit 2, before anything loads) and the grid."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_dist import REPO, failures, gpus, run_worker, torchrun

from minirl.dist import main, validate_devices, validate_parallel
from minirl.model import ModelConfig


def config(heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, qk_norm=True)


@pytest.mark.parametrize("world, sp, heads, kv_heads", [
    (1, 1, 4, 2), (4, 2, 4, 2), (8, 4, 8, 8), (4, 4, 4, 2), (8, 8, 16, 2), (6, 3, 12, 6),
])
def test_valid_layouts(world, sp, heads, kv_heads):
    validate_parallel(world, sp, config(heads, kv_heads))


@pytest.mark.parametrize("world, sp, heads, kv_heads, message", [
    (4, 3, 12, 12, "sp=3 does not divide the world size 4"),
    (8, 4, 6, 6, "sp=4 does not divide the 6 attention heads"),
    (2, 2, 6, 3, "sp=2 and the 3 kv heads must divide one another"),
    (8, 4, 12, 6, "sp=4 and the 6 kv heads must divide one another"),
    (4, 0, 4, 2, "sp=0 and world size 4 must be >= 1"),
])
def test_invalid_layouts(world, sp, heads, kv_heads, message):
    with pytest.raises(ValueError) as e:
        validate_parallel(world, sp, config(heads, kv_heads))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config(4, 2).to_hf()))
    return str(tmp_path)


SINGLE_PROCESS = ("from minirl.dist import distributed\n"
                  "with distributed() as d:\n"
                  "    print(d.world, d.rank, d.sp_group, d.is_main)")


def single_process() -> subprocess.CompletedProcess:
    """`distributed()` in a plain `python` process, without torchrun's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    return subprocess.run([sys.executable, "-c", SINGLE_PROCESS], cwd=REPO, env={**env, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict:
    """The module's launches (parallel_worker.py on 2 and 4 ranks, which test_fsdp and test_ulysses reuse
    through run_worker's cache; the bad-layout torchrun; the single process), started together when first
    asked for, 3 at a time: name -> Future. Start-up is mostly serial (torchrun, then `import torch`)."""
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text(json.dumps(config(4, 2).to_hf()))
    with ThreadPoolExecutor(3) as pool:
        yield {4: pool.submit(run_worker, "parallel_worker.py", 4), 2: pool.submit(run_worker, "parallel_worker.py", 2),
               "bad_layout": pool.submit(torchrun, 2, ["-m", "minirl.dist", "--model", str(model), "--sp", "3"],
                                         timeout=120),  # a hang guard only: it shares the cores now
               "single": pool.submit(single_process)}


def test_check_command(model_dir, capsys):
    main(["--model", model_dir, "--sp", "2", "--world", "4"])
    assert capsys.readouterr().out == "ok: world 4 = dp 2 x sp 2\n"
    with pytest.raises(SystemExit) as e:
        main(["--model", model_dir, "--sp", "4", "--world", "6"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: bad parallel layout: sp=4 does not divide the world size 6\n"


def test_bad_layout_under_torchrun_fails_with_one_line(started):
    """A real launch: the ranks exit 2 before joining any process group, and the reason is printed once."""
    proc = started["bad_layout"].result()
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: bad parallel layout: sp=3 does not divide the world size 2"], proc.stderr[-2000:]
    assert "exitcode  : 2" in proc.stderr


@pytest.mark.parametrize("local_world, n_gpus, ok", [(2, 2, True), (1, 8, True), (4, 0, True), (3, 2, False)])
def test_one_rank_per_gpu(local_world, n_gpus, ok):
    """More ranks than GPUs on a node is an error; any number of ranks is fine on CPUs (n_gpus = 0)."""
    if ok:
        validate_devices(local_world, n_gpus)
    else:
        with pytest.raises(ValueError, match="3 ranks on this node but 2 GPUs visible"):
            validate_devices(local_world, n_gpus)


@gpus(1)
def test_more_ranks_than_gpus_fails_with_one_line(model_dir):
    """On a GPU machine, one rank too many: every rank exits 2 before any process group, one line printed."""
    import torch
    n = torch.cuda.device_count()
    proc = torchrun(n + 1, ["-m", "minirl.dist", "--model", model_dir, "--sp", "1", "--world", str(n + 1)],
                    timeout=120, cuda=True)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {n + 1} ranks on this node but {n} GPUs visible: start one process per GPU "
                     f"(torchrun --nproc-per-node {n})"], proc.stderr[-2000:]
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr and "[rank" not in proc.stderr  # no rank traceback


def test_single_process_without_torchrun(started):
    """Started with plain `python`, `distributed` forms a one-rank gloo job and tears it down."""
    proc = started["single"].result()
    assert (proc.returncode, proc.stdout) == (0, "1 0 None True\n"), proc.stderr[-2000:]


@pytest.mark.parametrize("nproc, layout", [(2, "dp2-sp1"), (2, "dp1-sp2"), (4, "dp2-sp2"), (4, "dp1-sp4")])
def test_grid(started, nproc, layout):
    """Ranks of one sp group are adjacent: rank = dp_rank * sp + sp_rank; only rank 0 is main."""
    assert failures(started[nproc].result(), f"equiv/{layout}-ckpt_none/grid") == []
