"""The out-dir check before start-up (minirl/outdir.py): which runs may write where, the lock that keeps
a second run out, and what a resume may change. The cases that need real checkpoints are in
test_checkpoint.py (copies of the ones its workers write); a resumed run end to end is in
test_train_errors.py."""

import os
import socket
import subprocess
import sys
from dataclasses import asdict

import pytest

from minirl.config import parse_config
from minirl.outdir import OutDir, changes, check_out_dir


def test_a_run_with_no_finished_step_starts_again(tmp_path):
    """Stopped or failed during step 1: the evaluation before training (step 0) and maybe a line cut short
    are all there is. A rerun, with or without --resume, starts the run again (MetricsLog replaces them)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "test_accuracy": 0.1}\n{"step": 1, "lo')
    (tmp_path / "checkpoints" / "step_1.tmp").mkdir(parents=True)  # a save cut short
    for resume in (False, True):
        out = check_out_dir(str(tmp_path), resume=resume, world_size=2)
        assert out.step == 0 and ("holds no finished step" in out.note or "nothing to resume" in out.note), out


def test_resume_with_no_checkpoint_starts_fresh(tmp_path):
    """Finished steps in metrics.jsonl but no checkpoint (a run that failed with --save-every 0):
    --resume starts it afresh and says its metrics are replaced."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    out = check_out_dir(str(tmp_path), resume=True, world_size=2)
    assert out.step == 0 and "nothing to resume" in out.note and "metrics.jsonl is replaced" in out.note
    (tmp_path / "final").mkdir()  # an exported model is never overwritten by starting again
    with pytest.raises(ValueError, match=r"holds a run \(metrics.jsonl, final/\) but no complete checkpoint"):
        check_out_dir(str(tmp_path), resume=True, world_size=2)


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    out = check_out_dir(str(tmp_path / "typo"), resume=True, world_size=2)
    assert out.step == 0 and "nothing to resume" in out.note and "typo" in out.note


HOLDER = """import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d on the other host" % os.getpid())
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_locked_out_dir_is_refused_until_its_holder_is_killed(tmp_path):
    """Another process (a run's rank 0) holds the out-dir's lock: the check refuses it, naming the holder.
    SIGKILL gives no process a chance to clean up; the kernel still releases the lock."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on the other"):
            check_out_dir(str(tmp_path), resume=False, world_size=1, lock=True)
        check_out_dir(str(tmp_path), resume=False, world_size=1)  # the other ranks of a run do not lock
    finally:
        holder.kill()
        holder.wait()
    assert check_out_dir(str(tmp_path), resume=False, world_size=1, lock=True) == OutDir(0)
    assert check_out_dir(str(tmp_path), resume=False, world_size=1, lock=True) == OutDir(0)  # held: same process
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_unusable_out_dirs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_out_dir(str(tmp_path / "file"), resume=False, world_size=1)
    with pytest.raises(ValueError, match="is not writable"):
        check_out_dir(str(tmp_path / "file" / "run"), resume=False, world_size=1)


def test_a_resume_applies_some_changes_and_refuses_the_others():
    saved = asdict(parse_config(["--model", "/m", "--data", "d.jsonl", "--lr", "1e-6", "--steps", "10"]))
    now = parse_config(["--model", "/m", "--data", "moved/d.jsonl", "--lr", "2e-6", "--steps", "20", "--sp", "2",
                        "--out-dir", "elsewhere", "--resume"])
    assert changes(saved, now) == (["--lr 1e-06 -> 2e-06", "--sp 1 -> 2", "--steps 10 -> 20"], [])
    now = parse_config(["--model", "/other", "--data", "d.jsonl", "--kl-coef", "0.1", "--lr", "2e-6"])
    assert changes(saved, now) == (["--lr 1e-06 -> 2e-06", "--steps 10 -> 100"],
                                   ["--model '/m' -> '/other'", "--kl-coef 0.0 -> 0.1"])
    del saved["algo"]["kl_coef"]  # a run.json of an older minirl, which had no such setting
    assert changes(saved, now)[1] == ["--model '/m' -> '/other'"]
