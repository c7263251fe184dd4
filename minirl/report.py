"""What a run reports: phase times, metrics (jsonl, TensorBoard), the per-step line, the reward
curve, and the SIGTERM/Ctrl-C flag (`Interrupt`) that turns a kill into a checkpoint.

Times and metrics are read once per step; inside the micro-batch loop runs only `Interrupt.check`.
"""

import errno
import json
import math
import os
import signal
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

METRICS_FILE = "metrics.jsonl"


class PhaseTimer:
    """Wall time per phase. On CUDA it records events and reads them once, in `summary()`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: dict[str, list] = {}

    @contextmanager
    def phase(self, name: str):
        """`with timer.phase("train"): ...` times the block."""
        self.marks[name] = [self._now()]
        yield
        self.marks[name].append(self._now())

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def summary(self) -> dict[str, float]:
        """{"time/<phase>": seconds} (a sync on CUDA: call it once per step)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {f"time/{k}": a.elapsed_time(b) / 1000 for k, (a, b) in self.marks.items()}
        return {f"time/{k}": b - a for k, (a, b) in self.marks.items()}


class Interrupted(Exception):
    """A stop signal ended the step early: raised on every rank together, before the step changed the model,
    optimizer, scheduler or data order (train.py saves the last finished step, exits with 128 + `signum`)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Interrupt:
    """SIGTERM/SIGINT set this rank's flag (`requested()`). The ranks must agree on where they stop (or one
    would enter a collective the others never join): `check` is that agreement, a one-float all_reduce(MAX)
    per micro-batch, on GPUs through a gloo group so that it waits for no queued GPU work."""

    def __init__(self, device: torch.device):
        self._signum = 0  # the signal this rank got, 0: none
        self.group = dist.new_group(backend="gloo") if device.type == "cuda" else None  # a collective
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._signum = signum

    def requested(self) -> bool:
        """Whether this rank got a signal (no collective): what a generator asks between batches."""
        return bool(self._signum)

    def any_rank(self) -> int:
        """The signal some rank got (SIGTERM over SIGINT), 0 when none did: a collective, on every rank
        together, so that all exit with the same code."""
        flag = torch.tensor([float(self._signum)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def check(self):
        """Raise Interrupted on every rank if any rank got a signal (call it on every rank together)."""
        if signum := self.any_rank():
            raise Interrupted(signum)


class MetricsLog:
    """One JSON line per row in out_dir/metrics.jsonl, and TensorBoard scalars when it is installed.
    `start_step` is the step the run continues after: 0 (fresh) removes an old file (outdir.check_out_dir
    allowed it); N (resume) keeps the rows up to step N, as the later steps run again."""

    def __init__(self, out_dir: str, start_step: int):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, METRICS_FILE)
        if start_step == 0 and os.path.exists(self.path):
            os.remove(self.path)
        elif start_step > 0 and os.path.exists(self.path):
            truncate_metrics(self.path, start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        except ImportError:  # the tensorboard package is optional
            self.tb = None

    def write(self, row: dict):
        """Append `row` as one line, in one write (NaN and inf as null: valid JSON). A write that fails (a full
        disk) is an OSError naming the file, and what it wrote is cut off again: the last line stays whole."""
        safe = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        line = (json.dumps(safe, allow_nan=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, line) < len(line):  # a full disk may take part of it
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            os.ftruncate(fd, end)
            raise OSError(f"could not write step {row.get('step')}'s row to {self.path} ({e.strerror or e}); "
                          f"it ends with the row before") from None
        finally:
            os.close(fd)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep the rows of `path` up to `last_step` (and drop a line cut off by a crash); atomic rewrite."""
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            if isinstance(row, dict) and row.get("step", 0) <= last_step:  # a row, not stray JSON
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as fh:
        fh.writelines(kept)
    os.replace(path + ".tmp", path)


def summary_line(row: dict) -> str:
    """The step's console line: its main metrics, then the phase times."""
    keys = [("step", "{}"), ("reward_mean", "{:.3f}"), ("solved", "{:.2f}"), ("loss", "{:+.4f}"),
            ("entropy", "{:.3f}"), ("clip_frac", "{:.3f}"), ("approx_kl", "{:.2e}"), ("grad_norm", "{:.3f}"),
            ("response_len", "{:.1f}"), ("tokens_per_s", "{:.0f}")]
    parts = [f"{k}=" + fmt.format(row[k]) for k, fmt in keys if k in row]
    times = " ".join(f"{k[5:]}={v:.2f}s" for k, v in row.items() if k.startswith("time/"))
    return " ".join(parts) + " | " + times


def plot_rewards(metrics_path: str, png_path: str):
    """reward_mean and held-out accuracy per step as a PNG, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [r for r in rows if r.get("reward_mean") is not None]
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="train reward (mean)")
    test = [r for r in rows if r.get("test_accuracy") is not None]
    if test:
        ax.plot([r["step"] for r in test], [r["test_accuracy"] for r in test], "o-", label="held-out accuracy")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
