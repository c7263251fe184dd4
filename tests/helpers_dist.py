"""Launch multi-rank test workers with torchrun and collect what each rank reports.

A launch costs 3-6 s (mostly `import torch` per rank), so each worker script batches many checks
and writes one JSON file per rank; the tests then assert on single entries. Results are cached per
(script, ranks, arguments), so test modules that share a launch pay for it once.
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(REPO, "tests", "workers")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, args: list[str], timeout: float = 300, cuda: bool = False) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc-per-node nproc ARGS`, one CPU thread per rank.

    --standalone: torchrun binds its rendezvous port itself (port 0). A port picked here and handed over
    stays free until torchrun binds it seconds later (importing torch), and launches started together
    could pick the same one. GPUs are hidden unless `cuda`, so the ranks use gloo on the CPU even on a
    GPU machine.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone", *args]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker_in(out_dir: str, script: str, nproc: int, *args: str, cuda: bool = False) -> list[dict]:
    """Run tests/workers/`script` on nproc ranks writing into out_dir; returns each rank's report."""
    proc = torchrun(nproc, [os.path.join(WORKERS, script), "--out", out_dir, *args], cuda=cuda)
    if proc.returncode != 0:
        raise AssertionError(f"{script} on {nproc} ranks exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    reports = []
    for r in range(nproc):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            reports.append(json.load(f))
    return reports


@functools.cache
def run_worker(script: str, nproc: int, *args: str, cuda: bool = False) -> list[dict]:
    """`run_worker_in` a throwaway directory, once per session for the same arguments."""
    out_dir = tempfile.mkdtemp(prefix="minirl-test-")
    try:
        return run_worker_in(out_dir, script, nproc, *args, cuda=cuda)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def failures(reports: list[dict], prefix: str) -> list[str]:
    """Every failed check whose name starts with `prefix`, on any rank; asserts that some ran."""
    names = [name for rep in reports for name in rep["checks"] if name.startswith(prefix)]
    assert names, f"the worker ran no check named {prefix}*"
    return [f"rank {r}: {name}: {msg}" for r, rep in enumerate(reports)
            for name, msg in rep["checks"].items() if name.startswith(prefix) and msg]


def gpus(n: int = 1):
    """Mark a test for the GPU tier (`pytest -m gpu`); it is skipped where fewer than n CUDA devices exist."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = pytest.mark.skipif(have < n, reason=f"needs {n} CUDA GPU(s), found {have}")
    return lambda f: pytest.mark.gpu(skip(f))

