"""metrics.jsonl (minirl/report.py MetricsLog): always valid JSON; a resume keeps the rows up to its step."""

import json
import math
import os
import resource
import signal

from minirl.report import MetricsLog, summary_line


def strict_rows(path) -> list[dict]:
    """Rows as a strict JSON parser reads them: a bare NaN or Infinity is an error."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def test_non_finite_values_are_written_as_null(tmp_path):
    log = MetricsLog(str(tmp_path), start_step=0)
    row = {"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "reward_mean": -float("inf"), "lr": 1e-6}
    log.write(row)
    assert strict_rows(log.path) == [{"step": 1, "loss": None, "grad_norm": None, "reward_mean": None, "lr": 1e-6}]
    assert math.isnan(row["loss"]) and "loss=+nan" in summary_line(row)  # the caller's row is unchanged


def write_steps(log: MetricsLog, steps):
    for s in steps:
        log.write({"step": s, "reward_mean": s / 10})


def test_a_fresh_run_replaces_the_file(tmp_path):
    write_steps(MetricsLog(str(tmp_path), start_step=0), range(4))
    log = MetricsLog(str(tmp_path), start_step=0)
    write_steps(log, [1])
    assert [r["step"] for r in strict_rows(log.path)] == [1]


def test_a_resume_drops_the_rows_after_its_step(tmp_path):
    log = MetricsLog(str(tmp_path), start_step=0)
    write_steps(log, range(6))
    with open(log.path, "a") as fh:
        fh.write('{"step": 6, "reward_me')  # killed mid-write
    log = MetricsLog(str(tmp_path), start_step=3)
    assert [r["step"] for r in strict_rows(log.path)] == [0, 1, 2, 3]
    write_steps(log, [4, 5])  # the resumed run repeats steps 4 and 5 once
    assert [r["step"] for r in strict_rows(log.path)] == [0, 1, 2, 3, 4, 5]


def test_a_resume_without_a_metrics_file_starts_one(tmp_path):
    log = MetricsLog(str(tmp_path / "run"), start_step=3)
    write_steps(log, [4])
    assert [r["step"] for r in strict_rows(log.path)] == [4]


def test_a_full_disk_leaves_whole_lines_and_names_the_file(tmp_path):
    """The disk fills during a row's write (in a child process whose files may grow by 10 more bytes, so
    the row is cut short, as on a full disk): the error names the file, and the part of the row that
    reached it is cut off again, so metrics.jsonl still ends with step 1's whole line."""
    log = MetricsLog(str(tmp_path), start_step=0)
    write_steps(log, [1])
    size = os.path.getsize(log.path)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain file writes happen here, then it leaves without cleaning up
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            log.write({"step": 2, "reward_mean": 0.2, "note": "x" * 100})
            got = "no error"
        except BaseException as e:
            got = f"{type(e).__name__}: {e}"
        os.write(write, got.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        got = fh.read()
    os.waitpid(pid, 0)
    assert got.startswith("OSError") and log.path in got, got
    assert [r["step"] for r in strict_rows(log.path)] == [1]
