"""The out-dir a run writes into: the check before start-up, its lock, and the settings a resume is
compared with.

An out-dir belongs to one run. Before any process group starts, `check_out_dir` makes sure a run may
write there: rank 0 takes its lock (`claim`), another run's results are never overwritten, and --resume
says after which step the run goes on. `out_dir/run.json` keeps the settings the run was started (or last
resumed) with; `check_resume` compares a resumed run's with them: a change to a setting that `config`
marks `resume=True` is applied and named, a change to any other makes it another run, and is refused.
"""

import fcntl
import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, fields

from minirl.checkpoint import CHECKPOINTS, candidates, newest_complete
from minirl.config import TrainConfig
from minirl.data import PromptDataset
from minirl.report import METRICS_FILE

LOCK = ".lock"  # out_dir/.lock: the run writing into out_dir holds an flock on it (`claim`)
RUN_FILE = "run.json"  # out_dir/run.json: the run's settings and prompts (`save_run`)
# Compared through the prompts they give (PromptDataset.fingerprint), not by value: a moved file is fine.
SAME_PROMPTS = ("data", "prompt_field", "answer_field", "chat_template", "max_prompt_len")
_held: dict[str, int] = {}  # the out-dirs this process has claimed: real path -> the lock file's fd


@dataclass
class OutDir:
    """What `check_out_dir` found: the step a run goes on after (0: a fresh start) and a note to print."""

    step: int
    note: str = ""


def claim(out_dir: str) -> None:
    """Hold out_dir/.lock until this process exits, or raise ValueError when another process holds it.

    An flock: atomic, so two runs started together cannot both win it, and released by the kernel when its
    holder exits, even by SIGKILL. The file names its holder (pid and host) for the loser's error.
    """
    key = os.path.realpath(out_dir)
    if key in _held:
        return
    fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise ValueError(f"--out-dir {out_dir} is in use by another run ({holder}); wait for it to end, or "
                             f"choose another --out-dir") from None
        raise ValueError(f"--out-dir {out_dir}: cannot lock {LOCK} ({e.strerror or e})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _held[key] = fd


def finished_rows(metrics: str) -> int:
    """Rows of a metrics.jsonl that record a finished step (step 0 is the evaluation before training)."""
    if not os.path.isfile(metrics):
        return 0
    rows = 0
    with open(metrics, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                rows += json.loads(line).get("step", 0) > 0
            except (ValueError, AttributeError):  # a line cut short by a crash; not a row
                pass
    return rows


def check_out_dir(out_dir: str, resume: bool, world_size: int, lock: bool = False) -> OutDir:
    """Before the process group starts: may a run write into `out_dir` (a ValueError if not), and after
    which step does it go on? With `lock` (rank 0 of a run) this process `claim`s it first.

    A finished step is a result: a row of metrics.jsonl after step 0, a checkpoint, an exported model.
    Without `resume`, an out-dir holding results is an error (a rerun never overwrites them); one with
    none (a run that ended during step 1) is started again. `resume` goes on after the newest complete
    checkpoint; with none, broken checkpoints or an exported model are an error (starting again would
    overwrite them), else the run starts fresh, its metrics replaced, and the note says so.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out-dir {out_dir} exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out-dir {out_dir} is not writable ({e.strerror or e})") from None
    if lock:
        claim(out_dir)
    ckpt_dir = os.path.join(out_dir, CHECKPOINTS)
    metrics = os.path.join(out_dir, METRICS_FILE)
    checkpoints = bool(candidates(ckpt_dir)[0])
    results = [name for name, there in ((METRICS_FILE, finished_rows(metrics)), (CHECKPOINTS + "/", checkpoints),
                                        ("final/", os.path.isdir(os.path.join(out_dir, "final")))) if there]
    if not resume:
        if results:
            todo = ("pass --resume to continue it" if checkpoints else
                    "it has no checkpoint: pass --resume to start it again (its metrics are replaced)")
            raise ValueError(f"--out-dir {out_dir} already holds a run ({', '.join(results)}); {todo}, choose "
                             f"another --out-dir, or delete it")
        return OutDir(0, f"note: {out_dir} holds no finished step: starting its run again"
                      if os.path.isfile(metrics) else "")
    if not checkpoints and "final/" not in results:
        return OutDir(0, f"note: nothing to resume in {out_dir} (no checkpoint): starting a fresh run" +
                      ("; its metrics.jsonl is replaced" if results else ""))
    path, warnings = newest_complete(ckpt_dir, world_size)
    if path is None:
        why = "; ".join(warnings) or f"no checkpoint in {ckpt_dir}"
        raise ValueError(f"--resume: {out_dir} holds a run ({', '.join(results)}) but no complete checkpoint "
                         f"({why}); choose another --out-dir, or delete it to start again")
    return OutDir(int(os.path.basename(path).removeprefix("step_")))


def save_run(cfg: TrainConfig, data: PromptDataset) -> None:
    """Write out_dir/run.json, the settings a run starts (or resumes) with and its prompts, atomically."""
    path = os.path.join(cfg.run.out_dir, RUN_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"config": asdict(cfg), "prompts": _prompts(data)}, f, indent=1)
    os.replace(path + ".tmp", path)


def check_resume(cfg: TrainConfig, data: PromptDataset, step: int) -> str:
    """A note saying what a resume after `step` goes on with, in one line; a ValueError when a changed
    setting or other prompts would make it another run than the one saved in out_dir/run.json."""
    path = os.path.join(cfg.run.out_dir, RUN_FILE)
    if not os.path.isfile(path):  # saved by an older minirl
        return f"note: resuming after step {step}; {path} is missing, so the settings are not compared"
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: malformed ({e}); restore it, or delete it to resume without comparing "
                         f"the settings") from None
    applied, refused = changes(saved["config"], cfg)
    if saved["prompts"] != _prompts(data):
        then, now = saved["prompts"]["rows"], len(data.prompts)
        refused.append(f"the prompts ({then} usable rows then, {now} in {cfg.data.data} now"
                       f"{', other ones' if then == now else ''})")
    if refused:
        raise ValueError(f"--resume: {'; '.join(refused)}: that would be another run than the one in {path}; "
                         f"pass the saved values, or start it in another --out-dir (--help marks the settings "
                         f"that may change on --resume)")
    return f"note: resuming after step {step}" + (f", with {', '.join(applied)}" if applied else "")


def changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """(changes a resumed run applies, changes that would make it another run): "--flag old -> new" for
    each setting of `cfg` that differs from `saved` (a run.json's config); one `saved` lacks is unchanged."""
    applied, refused = [], []
    for sec in fields(cfg):
        section = getattr(cfg, sec.name)
        for f in fields(section):
            new = getattr(section, f.name)
            old = saved.get(sec.name, {}).get(f.name, new)
            if old != new and f.name not in (*SAME_PROMPTS, "out_dir", "resume"):
                change = f"--{f.name.replace('_', '-')} {old!r} -> {new!r}"
                (applied if f.metadata["resume"] else refused).append(change)
    return applied, refused


def _prompts(data: PromptDataset) -> dict:
    return {"rows": len(data.prompts), "fingerprint": data.fingerprint()}
