"""Shared test setup: import `minirl` from this checkout, run torch on one CPU thread, faulthandler in
every process the tests launch, and the tiny train.py task that several end-to-end test modules run.

Test tensors are tiny, so extra threads buy nothing; on a small machine that is busy with other work
they cost a lot (measured here on 2 cores under load: 15 s with two threads, 3 s with one).
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)
# Every process a test launches inherits this environment: a rank that crashes (SIGSEGV, SIGABRT)
# prints its Python stack, every thread's, before it dies.
os.environ["PYTHONFAULTHANDLER"] = "1"

# The task's rewards, loaded by train.py through --reward TASK/rewards.py:NAME.
REWARDS = '''
def length(prompt, completion, answer):
    return float(len(completion))


def vowels(prompt, completion, answer):
    """Dense: a random model's completions differ in reward, so step 1 has a gradient."""
    return float(sum(c in "aeiou" for c in completion))


def nan_on_3(prompt, completion, answer):
    return float("nan") if answer == "3" else float(len(completion))


calls = 0


def huge(prompt, completion, answer):
    """Finite, but unequal in each group (2 samples) and their float32 sum overflows: the group mean is
    inf, and the advantages, loss and gradients are NaN."""
    global calls
    calls += 1
    return 3e38 if calls % 2 else 2e38
'''


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA GPUs only; the GPU tier is `python -m pytest -m gpu tests`")


@pytest.fixture
def gloo_rank():
    """A one-rank gloo process group in this process (collectives that in-process tests call), and its Dist."""
    import torch.distributed as dist
    from minirl.dist import build_dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield build_dist(1)
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """TASK/model (a tiny random Qwen3 with the test tokenizer), TASK/train.jsonl (12 sums) and
    TASK/rewards.py (REWARDS), for train.py end to end; returns TASK."""
    from helpers_models import save_hf_model  # imports transformers: only where a test needs the task
    from helpers_tokenizer import make_test_tokenizer

    root = tmp_path_factory.mktemp("task")
    make_test_tokenizer(str(root / "model"))
    save_hf_model(str(root / "model"), "qwen3", vocab_size=320)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(1, 5) for b in range(1, 4)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return root


# Long train.py runs that no test times and that leave a share of the two cores idle (their ranks wait for
# each other at every collective): started one after the other in the background as the session starts,
# for the selected tests that check them, so that the tests before those use the idle share. The README's
# default job alone: 119 s of wall time for 143 s of CPU.
BACKGROUND = {  # name -> (the test that checks it, torchrun's train.py arguments but --out-dir)
    "default_job": ("test_default_job.py::test_default_job_learns", []),
    "lora_job": ("test_lora.py::test_lora_run_of_the_default_task_learns",
                 ["--lora-rank", "8", "--lr", "1e-3", "--prompts-per-step", "16", "--steps", "5", "--eval-every", "0",
                  "--kl-coef", "1e-3"]),
    "tools_task": ("test_tools_task.py::test_tools_task_learns_to_use_the_tool",
                   ["--task", "tools", "--steps", "10", "--eval-every", "0", "--lr", "1e-4", "--no-export"]),
}


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory) -> dict:
    """BACKGROUND's runs whose test is selected, started as the session starts, one at a time, on 2 ranks:
    name -> (Future of (CompletedProcess, seconds it took), its out dir)."""
    from helpers_dist import torchrun

    def run(args, out):
        start = time.monotonic()
        proc = torchrun(2, ["train.py", *args, "--out-dir", str(out)], timeout=600)
        return proc, time.monotonic() - start

    selected = [name for name, (test, _) in BACKGROUND.items()  # in BACKGROUND's order: the one needed first, first
                if any(item.nodeid.endswith(test) for item in request.session.items)]
    with ThreadPoolExecutor(1) as pool:
        runs = {}
        for name in selected:
            out = tmp_path_factory.mktemp(name)
            runs[name] = (pool.submit(run, BACKGROUND[name][1], out), out)
        yield runs
