"""The README's default job, run as the README says.

`torchrun --nproc-per-node 2 train.py` with no arguments must finish well inside 10 minutes on a
2-core CPU and raise held-out accuracy by at least 20 points; its outputs (metrics, TensorBoard
scalars, reward curve, HF export) must be there. (A SIGTERM mid-run, what a cluster scheduler sends:
tests/test_shutdown.py.)
"""

import json
import os


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_default_job_learns(background):
    """The run is conftest.py's BACKGROUND["default_job"], started in the background as the session starts."""
    future, tmp_path = background["default_job"]
    proc, seconds = future.result()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert seconds < 600
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

