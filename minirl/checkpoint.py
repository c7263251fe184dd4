"""Training checkpoints (save, resume) and export of the trained model as an HF model directory.

A checkpoint directory `step_N/` holds
- the model and optimizer state, sharded, in torch.distributed.checkpoint (DCP) format: every rank
  writes its own shards in parallel, and DCP can load them into a different number of ranks;
- `rank{r}.pt` per rank: step, LR scheduler state, the data position the caller hands in (an opaque
  dict of plain Python values) and the random number generator states (python, torch CPU, CUDA),
  which differ per rank. Resuming restores all of these, so a resumed run repeats the exact losses
  of an uninterrupted one (tests/test_checkpoint.py checks that bit for bit); the RNG files tie a
  resume to the same number of ranks.

Writing is atomic: everything goes to `step_N.tmp/`, rank 0 renames it to `step_N/` once every rank
has finished, and only then rewrites the `latest` file (itself via a rename). A crash mid-save leaves
`latest` pointing at the previous complete checkpoint. All ranks must see the same directory.
"""

import os
import random
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minirl import hf
from minirl.fsdp import iter_full_params
from minirl.model import ModelConfig

LATEST = "latest"


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


def save(ckpt_dir: str, step: int, model, optimizer, scheduler, data_state: dict) -> str:
    """Write checkpoint `ckpt_dir/step_{step}` from every rank (a collective); returns its path."""
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
        os.makedirs(tmp)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "data": data_state, "rng": _rng_state()},
               os.path.join(tmp, f"rank{rank}.pt"))
    dist.barrier()  # every rank's files are complete
    if rank == 0:
        # A step_N may exist from a run that crashed after renaming it but before updating `latest`.
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(ckpt_dir, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(ckpt_dir, LATEST + ".tmp"), os.path.join(ckpt_dir, LATEST))
    dist.barrier()  # nobody reads `latest` before it is written
    return final


def load_latest(ckpt_dir: str, model, optimizer, scheduler) -> Resume | None:
    """Restore the newest complete checkpoint into model, optimizer, scheduler and the RNGs (a collective).

    Returns None when `ckpt_dir` holds no checkpoint yet (a fresh start).
    """
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(ckpt_dir, f.read().strip())
    n_files = len([f for f in os.listdir(path) if f.startswith("rank") and f.endswith(".pt")])
    if n_files != dist.get_world_size():
        raise ValueError(f"checkpoint {path} was written by {n_files} ranks; this run has "
                         f"{dist.get_world_size()} (the per-rank RNG states need the same number)")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)  # fills the sharded tensors in place
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_state = torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=True)
    scheduler.load_state_dict(rank_state["scheduler"])
    _set_rng_state(rank_state["rng"])
    return Resume(step=rank_state["step"], data_state=rank_state["data"])


def export_hf(model, cfg: ModelConfig, out_dir: str, tokenizer_dir: str | None = None,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the (sharded) model as an HF model directory that transformers and vLLM load (a collective).

    All ranks gather the parameters one at a time; rank 0 alone writes them.
    """
    tensors = iter_full_params(model, dtype)
    if dist.get_rank() == 0:
        hf.save_model(out_dir, cfg, tensors, tokenizer_dir)
    for _ in tensors:  # the other ranks must join every gather (rank 0 has nothing left)
        pass
    dist.barrier()  # the directory is complete before anyone reads it
