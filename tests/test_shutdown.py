"""A stop signal in the middle of a step longer than torchrun's grace (train.py, report.Interrupt,
trainer.rl_step): the step is abandoned on every rank, the last finished step is saved, the job exits
before torchrun's grace runs out, and `--resume` repeats a straight run's metrics exactly.

One chain of launches on the built-in default task, 2 gloo ranks, torchrun's grace cut to GRACE s:
A is stopped during step 2's rollout (saves step 1) by a SIGTERM to torchrun and every worker at once, as a
cluster scheduler sends it; B resumes it and is stopped again in step 2 (its rollout or update; step 1
is on disk already) by a SIGTERM to torchrun alone, which passes it on; C resumes B to the end;
`straight` runs both steps at once.
The stop inside the update (trainer.update's check before each micro-batch of the first mini-batch) is
also tested deterministically, on the worker level: tests/workers/stop_worker.py.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from helpers_dist import REPO, failures, free_port, run_worker

GRACE = 6  # s, torchrun --shutdown-timeout: SIGKILL this long after it passes the SIGTERM on
# A step takes ~7-8 s on an idle 2-core machine, longer than GRACE; small micro-batches (10 a rank) and
# generation batches (8 a rank) keep the wait for the next lockstep point short, also on a busy machine.
ARGS = ["--steps", "2", "--prompts-per-step", "128", "--micro-batch-tokens", "512", "--gen-batch-size", "64",
        "--eval-every", "0", "--no-export"]
STOPPED = "stopped by signal during step 2; saved step 1"
TIMING = ("time/", "tokens_per_s", "peak_mem_gb")  # the only fields that may differ between runs


class Launch:
    """torchrun train.py, its output read as it comes so that a test can wait for a line of it."""

    def __init__(self, out_dir, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", f"--shutdown-timeout={GRACE}", "train.py", *ARGS,
               "--out-dir", str(out_dir), *extra]
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.text = {"out": "", "err": ""}
        self.arrivals = {"out": [], "err": []}  # (length of the text so far, time it arrived)
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, "out")),
                        threading.Thread(target=self._read, args=(self.proc.stderr, "err"))]
        for t in self.readers:
            t.start()

    def _read(self, stream, key):
        while chunk := stream.read1(4096):  # tqdm's bars end in \r, not \n: read what is there
            with self.changed:
                self.text[key] += chunk.decode(errors="replace")
                self.arrivals[key].append((len(self.text[key]), time.monotonic()))
                self.changed.notify_all()
        with self.changed:  # the end of the output: a waiter need not wait for its timeout
            self.changed.notify_all()

    def wait_for(self, key: str, text: str, after: int = 0, timeout: float = 240):
        """Until `text` comes in stdout ("out") or stderr ("err"), in what came after the first `after` chars."""
        def seen():
            return text in self.text[key][after:]
        with self.changed:
            found = self.changed.wait_for(lambda: seen() or self.proc.poll() is not None, timeout)
        assert found and seen(), f"no {text!r}:\n{self.text['out'][-2000:]}{self.text['err'][-3000:]}"

    def arrived(self, key: str, text: str) -> float:
        """When `text` had arrived in full (time.monotonic)."""
        end = self.text[key].index(text) + len(text)
        return next(t for n, t in self.arrivals[key] if n >= end)

    def workers(self) -> list[str]:
        """The pids of torchrun's children (the ranks), from /proc."""
        stats = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    stats.append((pid, fh.read().rsplit(")", 1)[1].split()))  # [state, ppid, ...]
            except OSError:  # gone meanwhile
                pass
        return [pid for pid, fields in stats if fields[1] == str(self.proc.pid)]

    def sigterm(self, line: str, every_process: bool = False) -> tuple[float, float]:
        """SIGTERM to torchrun alone (it passes it on to the workers, and SIGKILLs them GRACE s later), or
        with `every_process` to torchrun and each worker at once, as a cluster scheduler signals a job
        (torchrun starts every worker in a session of its own, so a process-group signal would reach
        torchrun alone): seconds until `line` came (rank 0 prints it once the checkpoint is saved) and
        until the last worker had exited."""
        ranks = self.workers()
        assert len(ranks) == 2, ranks
        start = time.monotonic()
        for pid in ranks if every_process else []:
            os.kill(int(pid), signal.SIGTERM)  # before torchrun's: once it passed its own on, one may be gone
        self.proc.send_signal(signal.SIGTERM)
        while any(os.path.exists(f"/proc/{pid}") for pid in ranks) and self.proc.poll() is None:
            time.sleep(0.02)  # polling for the ranks' exit (torchrun reaps them at once), not a fixed wait
        gone = time.monotonic() - start
        self.finish(timeout=GRACE + 60)
        assert line in self.text["out"], self.text["out"][-2000:] + self.text["err"][-3000:]
        return self.arrived("out", line) - start, gone

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        for t in self.readers:
            t.join()
        return code


def rows(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(TIMING)} for line in fh]


def latest(out_dir) -> str:
    with open(os.path.join(out_dir, "checkpoints", "latest")) as fh:
        return fh.read().strip()


@pytest.fixture(scope="module")
def stop_worker():
    """tests/workers/stop_worker.py on 2 ranks, started when first asked for: a Future of its reports.
    `runs` asks first, so that it runs beside the straight run, whose timing nothing asserts."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_worker, "stop_worker.py", 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stop_worker):
    tmp = tmp_path_factory.mktemp("shutdown")
    straight = Launch(tmp / "straight")
    assert straight.finish() == 0, straight.text["err"][-3000:]
    wait([stop_worker])  # over before A, whose signal is timed (its failure is its tests' to report)

    a = Launch(tmp / "run")
    a.wait_for("out", "step=1 ")  # step 1 is done; then rank 0's progress bar of step 2's rollout, the
    a.wait_for("err", "rollout:", after=a.text["err"].rindex("train:"))  # first after step 1's update bar
    a_seconds = a.sigterm(STOPPED, every_process=True)
    a_rows = rows(tmp / "run")
    a_latest = latest(tmp / "run")

    # B: the signal as step 2's rollout starts (no evaluation on a resume). It lands in that rollout or,
    # on a busy machine where it arrives late, in the update that follows (2.7 s of one in CI, where a
    # signal sent at the update's first bar arrived after its end); either way step 2 is abandoned.
    b = Launch(tmp / "run", "--resume")
    b.wait_for("err", "rollout:")
    b_seconds = b.sigterm(STOPPED)

    c = Launch(tmp / "run", "--resume")
    assert c.finish() == 0, c.text["err"][-3000:]
    return {"straight": straight, "a": a, "b": b, "c": c, "a_seconds": a_seconds, "b_seconds": b_seconds,
            "a_rows": a_rows, "a_latest": a_latest, "dir": tmp}


def within_grace(seconds: tuple[float, float], launch: Launch):
    """Saved, and every rank gone, before torchrun's SIGKILL."""
    saved, exited = seconds
    assert saved < GRACE and exited < GRACE, (seconds, launch.text["err"][-3000:])


def test_stop_during_the_rollout_saves_the_last_finished_step_within_the_grace(runs):
    within_grace(runs["a_seconds"], runs["a"])
    assert [r["step"] for r in runs["a_rows"]] == [0, 1]  # no row for the abandoned step
    assert runs["a_latest"] == "step_1"


def test_stop_in_a_resumed_step_abandons_it_within_the_grace(runs):
    b = runs["b"]
    assert b.text["out"].count("resumed from step 1") == 1, b.text["out"][-2000:]
    within_grace(runs["b_seconds"], b)


def test_resume_after_both_stops_repeats_the_straight_run(runs):
    assert "resumed from step 1" in runs["c"].text["out"]
    assert latest(runs["dir"] / "run") == "step_2"
    straight = rows(runs["dir"] / "straight")
    assert [r["step"] for r in straight] == [0, 1, 2, 2]  # accuracy before, two steps, accuracy after
    assert rows(runs["dir"] / "run") == straight


def test_stop_on_one_rank_before_the_update_stops_every_rank_before_micro_batch_0(stop_worker):
    """SIGTERM on rank 1 only, before `update`: both ranks raise Interrupted before micro-batch 0 (no
    forward ran), and the parameters, AdamW state and lr schedule equal the copies taken before, with
    no gradient accumulated."""
    reports = stop_worker.result()
    assert failures(reports, "stop/two_micro_batches") == []
    assert failures(reports, "stop/before/") == []
    assert [r["data"]["stop/before/forwards"] for r in reports] == [0, 0]


def test_stop_on_one_rank_during_micro_batch_0_stops_every_rank_before_micro_batch_1(stop_worker):
    """SIGTERM on rank 0 inside micro-batch 0's forward: both ranks raise Interrupted before micro-batch 1,
    before the optimizer step (parameters, AdamW state and lr schedule unchanged)."""
    reports = stop_worker.result()
    assert failures(reports, "stop/during/") == []
    assert [r["data"]["stop/during/forwards"] for r in reports] == [1, 1]
