"""Training checkpoints (save, resume, pruning) and HF export.

A checkpoint directory `step_N/` holds
- the trainable parameters and the optimizer state, sharded, in torch.distributed.checkpoint (DCP)
  format: every rank writes its own shards in parallel. Frozen parameters are left out: with LoRA
  (minirl/lora.py) a checkpoint holds the adapters alone, the base weights come from the model dir again;
- `rank{r}.pt` per rank: step, LR scheduler state, the caller's data position (plain Python values) and
  the RNG states (python, torch CPU, CUDA), which differ per rank and tie a resume to the same number
  of ranks. A resumed run repeats the exact losses of an uninterrupted one (tests/test_checkpoint.py).

Writing is atomic: everything goes to `step_N.tmp/`, rank 0 renames it to `step_N/` once every rank
has finished, and only then rewrites the `latest` file (itself via a rename), the commit point: a crash
or a full disk mid-save leaves it naming the previous complete checkpoint. Resuming walks back from the
one `latest` names and takes the first that is complete and loads, warning about each one it passes
over; `step_N` directories newer than `latest` (an unfinished save) are ignored, and overwritten later.
All ranks must see the same directory.
"""

import os
import random
import re
import shutil
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from minirl import hf, lora
from minirl.dist import agree
from minirl.fsdp import iter_full_params
from minirl.model import ModelConfig

CHECKPOINTS = "checkpoints"  # out_dir/checkpoints holds step_N/ and `latest`
TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # what a checkpoint holds of the model
LATEST = "latest"
_STEP_DIR = re.compile(r"step_(\d+)")


@dataclass
class Resume:
    """Where a resumed run continues: the last finished step and the caller's data position."""

    step: int
    data_state: dict


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _warn(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def _why(e: BaseException) -> str:
    """One line for an exception; for DCP's CheckpointException, the first failing rank's own error."""
    if isinstance(e, CheckpointException) and e.failures:
        r, (inner, _traceback) = next(iter(e.failures.items()))
        return f"rank {r}: {_why(inner)}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def _read_latest(ckpt_dir: str) -> str | None:
    """The directory name `latest` holds, or None when there is no `latest` file."""
    try:
        with open(os.path.join(ckpt_dir, LATEST)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def candidates(ckpt_dir: str) -> tuple[list[str], list[str]]:
    """(checkpoint paths to try, newest first; warnings): `latest` and older ones, or with no `latest` file
    (a crash between the first rename and writing it) every step_N."""
    steps = sorted((int(m[1]) for name in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                    if (m := _STEP_DIR.fullmatch(name)) and os.path.isdir(os.path.join(ckpt_dir, name))),
                   reverse=True)
    latest, warnings = _read_latest(ckpt_dir), []
    if latest is not None:
        m = _STEP_DIR.fullmatch(latest)
        if m is None:
            warnings.append(f"{os.path.join(ckpt_dir, LATEST)} holds {latest!r}, not a step_N name")
        else:
            if int(m[1]) not in steps:
                warnings.append(f"{os.path.join(ckpt_dir, LATEST)} names {latest}, which does not exist")
            steps = [s for s in steps if s <= int(m[1])]
    return [os.path.join(ckpt_dir, f"step_{s}") for s in steps], warnings


def problem(path: str, world_size: int) -> str | None:
    """Why checkpoint `path` cannot be resumed by `world_size` ranks, or None when it looks complete.

    Cheap, with no process group: DCP's .metadata must read, every shard file be as long as it says (a
    full disk truncates them), and one non-empty rank{r}.pt exist per rank. Wrong bytes show only on load.
    """
    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # missing or unreadable: the save never finished
        return f"{path}: no readable DCP metadata ({_why(e)})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        have = os.path.getsize(file) if os.path.isfile(file) else None
        if have is None or have < size:
            return f"{file} is {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"
    ranks = [f for f in os.listdir(path) if re.fullmatch(r"rank\d+\.pt", f)]
    if len(ranks) != world_size:
        return (f"{path} was written by {len(ranks)} ranks; this run has {world_size} "
                f"(the per-rank RNG states need the same number)")
    for r in range(world_size):
        file = os.path.join(path, f"rank{r}.pt")
        if not os.path.isfile(file) or os.path.getsize(file) == 0:
            return f"{file} is missing or empty"
    return None


def newest_complete(ckpt_dir: str, world_size: int) -> tuple[str | None, list[str]]:
    """The newest candidate checkpoint without a `problem`, and why each newer one was passed over."""
    paths, warnings = candidates(ckpt_dir)
    for path in paths:
        why = problem(path, world_size)
        if why is None:
            return path, warnings
        warnings.append(why)
    return None, warnings


def _non_finite(model) -> list[str]:
    """Names of this rank's parameters holding a NaN or inf (one device sync for all of them)."""
    named = [(n, p.to_local() if isinstance(p, DTensor) else p) for n, p in model.named_parameters()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    return [named[i][0] for i in (~finite).nonzero().flatten().tolist()]


def save(ckpt_dir: str, step: int, model, optimizer, scheduler, data_state: dict, keep: int = 0) -> str:
    """Write checkpoint `ckpt_dir/step_{step}` from every rank (a collective); returns its path.

    Refuses (ValueError) a model with a NaN or inf parameter, the second line of defence after the
    trainer's skipped steps: a poisoned model never becomes `latest`. A write that fails on any rank (a
    full disk) is an OSError on every rank, naming the checkpoint; the half-written directory is removed.
    `keep` > 0 then deletes all but the `keep` newest checkpoints (never the one `latest` names).
    """
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{step}")
    tmp = final + ".tmp"
    previous = _read_latest(ckpt_dir)
    intact = (f"the previous checkpoint {os.path.join(ckpt_dir, previous)} is intact" if previous
              else "there is no earlier checkpoint")
    bad = agree(", ".join(_non_finite(model)[:3]))
    if bad:
        raise ValueError(f"refusing to save {final}: non-finite values in {bad}; {intact}")

    def phase(work, on_all_ranks: bool):
        error = ""
        if on_all_ranks or rank == 0:
            try:
                work()
            except (OSError, CheckpointException) as e:  # DCP wraps a rank's OSError in CheckpointException
                error = _why(e)
        failed = agree(error)
        if failed:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            dist.barrier()  # the half-written directory is gone before any rank reports the failure
            raise OSError(f"could not save checkpoint {final} ({failed}; is the disk full?); {intact}")

    def prepare():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        os.makedirs(tmp)

    def write():
        model_state, optim_state = get_state_dict(model, optimizer, options=TRAINABLE)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_state, "rng": _rng_state()},
                   os.path.join(tmp, f"rank{rank}.pt"))

    def commit():
        # A step_N may exist from a run that crashed after renaming it but before updating `latest`.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(ckpt_dir, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(ckpt_dir, LATEST + ".tmp"), os.path.join(ckpt_dir, LATEST))

    phase(prepare, on_all_ranks=False)
    phase(write, on_all_ranks=True)  # every rank's files are complete after it
    phase(commit, on_all_ranks=False)  # nobody reads `latest` before it is written
    if keep > 0 and rank == 0:
        try:  # all but the `keep` newest, counting from the one `latest` names
            for path in candidates(ckpt_dir)[0][keep:]:
                shutil.rmtree(path)
        except OSError as e:  # the new checkpoint is saved; an old one left behind only costs disk
            _warn(f"could not delete an old checkpoint ({_why(e)})")
    return final


def load_latest(ckpt_dir: str, model, optimizer, scheduler) -> Resume | None:
    """Restore the newest complete checkpoint into model, optimizer, scheduler and the RNGs (a collective).

    One with a `problem`, or whose loading fails on any rank, is passed over with a warning and the next
    older one tried. None when `ckpt_dir` holds no checkpoint; a ValueError when it holds some but none loads.
    """
    paths, passed_over = candidates(ckpt_dir)
    for why in passed_over:
        _warn(why)
    for path in paths:
        why = agree(problem(path, dist.get_world_size()) or "")
        if not why:
            error = ""
            try:
                model_state, optim_state = get_state_dict(model, optimizer, options=TRAINABLE)
                state = {"model": model_state, "optim": optim_state}
                dcp.load(state, checkpoint_id=path)  # fills the sharded tensors in place; a key it lacks is an error
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                               options=StateDictOptions(strict=False))  # the frozen parameters are not in it
                rank_state = torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=True)
            except (Exception, CheckpointException) as e:  # whatever it is, an older checkpoint may load
                error = f"{path} does not load ({_why(e)})"
            why = agree(error)
        if not why:
            scheduler.load_state_dict(rank_state["scheduler"])
            _set_rng_state(rank_state["rng"])
            return Resume(step=rank_state["step"], data_state=rank_state["data"])
        _warn(f"{why}; trying an older checkpoint")
        passed_over.append(why)
    if passed_over:
        raise ValueError(f"no loadable checkpoint in {ckpt_dir}: {'; '.join(passed_over)}")
    return None


def export_hf(model, cfg: ModelConfig, out_dir: str, tokenizer_dir: str | None = None,
              dtype: torch.dtype = torch.bfloat16, adapter_dir: str | None = None, base_model: str = "") -> None:
    """Write the (sharded) model as an HF model directory that transformers and vLLM load (a collective):
    all ranks gather the parameters one at a time, rank 0 writes them. LoRA adapters are merged into their
    weights, and with `adapter_dir` also written there alone, in PEFT's format, for `base_model` (lora.py)."""
    adapters = {}
    tensors = lora.merged(model, iter_full_params(model, dtype), adapters)
    if dist.get_rank() == 0:
        hf.save_model(out_dir, cfg, tensors, tokenizer_dir)
    for _ in tensors:  # the other ranks must join every gather (rank 0 has nothing left)
        pass
    if adapter_dir and adapters and dist.get_rank() == 0:
        lora.save_adapter(adapter_dir, adapters, model, base_model)
    dist.barrier()  # the directories are complete before anyone reads them
