"""The README's default job, run as the README says, and a run stopped by SIGTERM.

`torchrun --nproc-per-node 2 train.py` with no arguments must finish well inside 10 minutes on a
2-core CPU and raise held-out accuracy by at least 20 points; its outputs (metrics, TensorBoard
scalars, reward curve, HF export) must be there. A SIGTERM mid-run (what a cluster scheduler sends)
must end the run cleanly with a checkpoint of the last finished step.
"""

import json
import os
import signal
import subprocess
import sys
import time

from helpers_dist import REPO, free_port, torchrun


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_default_job_learns(tmp_path):
    start = time.time()
    proc = torchrun(2, ["train.py", "--out-dir", str(tmp_path)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.time() - start < 600
    rows = read_metrics(tmp_path)
    acc = [r["test_accuracy"] for r in rows if "test_accuracy" in r]
    assert rows[0]["step"] == 0 and acc[-1] - acc[0] >= 0.20, acc
    assert "held-out accuracy before training" in proc.stdout and "after training" in proc.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(tmp_path / "tensorboard"))
    tb.Reload()
    train_rows = [r for r in rows if "reward_mean" in r]
    assert [e.value for e in tb.Scalars("reward_mean")] == [r["reward_mean"] for r in train_rows]
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_sigterm_checkpoints_and_exits(tmp_path):
    # Small steps and two held-out prompts: the signal, not the work, is what is tested.
    test_data = tmp_path / "test.jsonl"
    test_data.write_text('{"prompt": "12+34=", "answer": "46"}\n{"prompt": "50+7=", "answer": "57"}\n')
    out_dir = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "train.py", "--out-dir", str(out_dir), "--steps", "500",
           "--eval-every", "0", "--no-export", "--test-data", str(test_data), "--prompts-per-step", "8",
           "--n-samples", "4"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)  # polling for a file the run writes, not waiting for a fixed time
    os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler: every process of the job gets it
    out, err = proc.communicate(timeout=120)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 1 <= steps[-1] < 500  # the step in flight at the signal is abandoned (its checkpoint: the one before)
    latest = (out_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{steps[-1]}", (latest, steps[-1], err[-3000:])
    assert "stopped by signal" in out
