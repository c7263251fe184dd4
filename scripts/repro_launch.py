"""Launching the reproducer's cases (scripts/repro_recompute_hang.py): torchrun per case, a deadline, and
the ledgers (minirl/ledger.py) deciding the outcome, whether the ranks failed by themselves or were killed.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from minirl.ledger import Divergence, first_divergence, read_ledgers

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "repro_recompute_hang.py")
COMPLETED, FAILED, UNEXPLAINED = 0, 1, 3  # exit codes; argparse exits 2 on bad usage
OUTCOMES = {COMPLETED: "completed", FAILED: "failed fast", UNEXPLAINED: "failed, no divergence"}


@dataclass
class Case:
    scenario: str
    mode: str
    flags: tuple[str, ...]
    expect: int | None = None  # COMPLETED or FAILED: what --all and the tests check

    @property
    def name(self) -> str:
        return " ".join((self.mode, *self.flags))


SYMPTOMS = (  # how a failure shows in torchrun's output, most specific first (torch 2.11 to 2.14)
    ("Detected mismatch between collectives", "DETAIL: mismatch reported"),
    ("doesn't match expected size", "gloo: size mismatch, abort"),
    ("Watchdog caught collective operation timeout", "NCCL: watchdog timeout"),
    ("detected by watchdog", "NCCL: watchdog timeout"),
    ("Timed out waiting", "gloo: timeout"),
)
KILLED = "killed at the deadline"
STARTUP_S = 600  # the launcher's limit for torchrun, `import torch` and init (minutes on a starved machine)
TEARDOWN_S = 60  # and for the ranks to exit once their ledgers have ended
# A hang: the process group's timeout ended it, or (torch 2.14's gloo waits past it) the launcher did.
HANG_SYMPTOMS = ("gloo: timeout", "NCCL: watchdog timeout", KILLED)
SIZE_SYMPTOMS = ("gloo: size mismatch, abort",)


@dataclass
class Result:
    case: Case
    code: int
    seconds: float  # from the ranks being up (their ledgers exist) to the first failure, or the end
    killed: bool  # still running at the launcher's deadline
    divergence: Divergence | None
    how: str  # the failure's symptom (SYMPTOMS), "" when it completed
    out_dir: str  # ledgers, torchrun.log, NCCL dumps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int):
    """SIGKILL a process and all its descendants. (torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks running.) Linux: reads /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):  # not a process, or it just ended
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(case: Case, nproc: int, timeout: float, out_dir: str, detail: bool = False,
           extra: tuple[str, ...] = ()) -> Result:
    """Run one case with torchrun (output to OUT/torchrun.log); kill it 2x the collective timeout after
    its ledgers last grew (once its ranks are up: their ledgers exist), or STARTUP_S after the launch
    if they never get there. Ranks whose ledgers all ended by then get TEARDOWN_S more to exit.
    `extra`: more arguments for the script.

    Result.seconds counts from the ranks being up, so start-up on a busy machine does not count. The
    outcome comes from the ledgers, not from torchrun's exit code, so it is the same whether the
    ranks failed by themselves or were killed (NCCL's watchdog aborts the process).
    """
    ledger_dir = os.path.join(out_dir, "ledger")
    shutil.rmtree(ledger_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", SCRIPT, "--scenario", case.scenario, "--mode", case.mode, *case.flags,
           *extra, "--timeout", str(timeout), "--out-dir", out_dir] + ["--detail"] * detail
    log_path = os.path.join(out_dir, "torchrun.log")
    deadline, up, tearing_down, size = time.monotonic() + STARTUP_S, None, False, -1
    paths = [os.path.join(ledger_dir, f"rank{r}.jsonl") for r in range(nproc)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if up is None and all(os.path.exists(p) for p in paths):
                up = time.monotonic()
            if up is not None and not tearing_down and sum(map(_size, paths)) != size:  # progress (a batch)
                size, deadline = sum(map(_size, paths)), time.monotonic() + 2 * timeout
            if time.monotonic() >= deadline:
                ledgers = read_ledgers(ledger_dir)
                if tearing_down or up is None or not all(ledger and "end" in ledger[-1] for ledger in ledgers):
                    break
                deadline, tearing_down = deadline + TEARDOWN_S, True
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        killed = proc.poll() is None
        if killed:
            kill_tree(proc.pid)
            proc.wait()
    ledgers = read_ledgers(ledger_dir)
    failed_at = [ledger[-1]["t"] for ledger in ledgers if ledger and ledger[-1].get("end") == "failed"]
    # To the first rank's failure (its ledger's clock starts when it is up), else to the end or the kill.
    seconds = min(failed_at) if failed_at else time.monotonic() - (up or deadline - STARTUP_S)
    ends = [ledger[-1]["end"] for ledger in ledgers if ledger and "end" in ledger[-1]]
    completed = proc.returncode == 0 and ends == ["completed"] * nproc
    divergence = first_divergence(ledgers)
    with open(log_path) as f:
        text = f.read()
    # A symptom in the log wins over the kill: a rank may abort (gloo) while torchrun is slow to stop the rest.
    how = "" if completed else next((label for pattern, label in SYMPTOMS if pattern in text),
                                    KILLED if killed else "other error (see torchrun.log)")
    code = COMPLETED if completed else FAILED if divergence else UNEXPLAINED
    return Result(case, code, seconds, killed, divergence, how, out_dir)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # not there (yet)
        return 0


def print_table(results: list[Result]):
    rows = [("scenario", "mode", "expected", "outcome", "how", "seconds", "first divergence (rank 0; rank 1; ...)")]
    for r in results:
        rows.append((r.case.scenario, r.case.name, OUTCOMES[r.case.expect],
                     OUTCOMES[r.code] + ("" if r.code == r.case.expect else " (!)"), r.how or "-",
                     f"{r.seconds:.1f}", r.divergence.short() if r.divergence else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


@dataclass(frozen=True)
class Scenario:
    """What the entry script needs to run one scenario on a rank."""

    run: object  # run(args, d, ledger, state): its forward and backward on this rank, every collective recorded
    modes: tuple[str, ...]  # the naive mode first
    sp_all: bool = True  # every rank one SP group (else data parallel only)
    prepare: object = None  # prepare(args, d) -> state: start-up work (compiling) before the ledger begins
