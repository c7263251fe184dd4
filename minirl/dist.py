"""Process groups for one torchrun job: who am I, who shares my sequences, and how to leave cleanly.

The W ranks of a job form a 2-D grid, dp x sp = W, with the sp ranks of a group adjacent (rank =
dp_rank * sp + sp_rank, so on one node they share NVLink): the sp ranks of one group hold slices of
the SAME packed micro-batch (Ulysses, ulysses.py), different dp groups see different micro-batches.
FSDP shards every parameter over all W ranks whatever the grid (fsdp.py): the grid only decides who
shares data. Entry points check the layout against the model's config.json before init
(`check_parallel_or_exit`; alone: `python -m minirl.dist --sp N --model DIR [--world W]`).
"""

import argparse
import gc
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from minirl.model import ModelConfig


@dataclass
class Dist:
    """This rank's place in the job. Built once by `build_dist` and passed explicitly."""

    rank: int
    world: int
    device: torch.device
    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    mesh: DeviceMesh  # 2-D ("dp", "sp")
    fsdp_mesh: DeviceMesh  # 1-D over all ranks: FSDP shards over the whole world
    sp_group: dist.ProcessGroup | None  # None when sp_size == 1 (no Ulysses)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def validate_parallel(world: int, sp: int, cfg: ModelConfig) -> None:
    """Raise a one-line ValueError if the model cannot run with this layout: Ulysses gives each sp
    rank H/sp query heads, and splits the kv heads alike, or repeats them up to sp when fewer (GQA)."""
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if sp < 1 or world < 1:
        raise ValueError(f"bad parallel layout: sp={sp} and world size {world} must be >= 1")
    if world % sp:
        raise ValueError(f"bad parallel layout: sp={sp} does not divide the world size {world}")
    if H % sp:
        raise ValueError(f"bad parallel layout: sp={sp} does not divide the {H} attention heads")
    if Hkv % sp and sp % Hkv:
        raise ValueError(f"bad parallel layout: sp={sp} and the {Hkv} kv heads must divide one another "
                         f"(kv heads are split over sp ranks, or repeated up to sp when fewer)")


def validate_devices(local_world: int, gpus: int) -> None:
    """Raise a one-line ValueError if this node runs more ranks than it has GPUs (gpus = 0: CPU, gloo),
    instead of a traceback per surplus rank from `set_device` while the others wait in the rendezvous."""
    if gpus and local_world > gpus:
        raise ValueError(f"{local_world} ranks on this node but {gpus} GPUs visible: start one process per GPU "
                         f"(torchrun --nproc-per-node {gpus})")


def check_parallel_or_exit(world: int, sp: int, cfg: ModelConfig) -> None:
    """`validate_devices` and `validate_parallel` for entry points: a bad layout is one line on stderr
    (rank 0's: every rank runs the same check) and exit code 2."""
    try:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        validate_devices(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpus)
        validate_parallel(world, sp, cfg)
    except ValueError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def init_process_group(timeout_s: float = 600.0, cpu_collectives: bool = False) -> torch.device:
    """Join the job torchrun started (NCCL on GPUs, gloo on CPU) and return this rank's device; under plain
    `python`, a one-rank job with torchrun's environment (vLLM reads it). `timeout_s` bounds every
    collective: a mismatched one fails, naming itself, instead of hanging. `cpu_collectives` adds gloo
    beside NCCL for CPU tensors (FSDP2's CPU offload: the gradient norm)."""
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        # Entry points check this before start-up (check_parallel_or_exit); here for direct callers.
        validate_devices(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    return device


def build_dist(sp: int) -> Dist:
    """The dp x sp grid on an initialised process group (several grids may coexist, as in tests)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or world % sp:
        raise ValueError(f"bad parallel layout: sp={sp} does not divide the world size {world}")
    device_type = "cuda" if "nccl" in dist.get_backend() else "cpu"
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    mesh = init_device_mesh(device_type, (world // sp, sp), mesh_dim_names=("dp", "sp"))
    fsdp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("fsdp",))
    return Dist(rank=rank, world=world, device=device, dp_rank=mesh.get_local_rank("dp"), dp_size=world // sp,
                sp_rank=mesh.get_local_rank("sp"), sp_size=sp, mesh=mesh, fsdp_mesh=fsdp_mesh,
                sp_group=mesh["sp"].get_group() if sp > 1 else None)


def shutdown() -> None:
    """Leave the job. Garbage is collected first: a DeviceMesh or FSDP state that outlives the group
    makes the process abort at exit now and then ("terminate called without an active exception")."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(sp: int = 1, timeout_s: float = 600.0, cpu_collectives: bool = False) -> Iterator[Dist]:
    """`with distributed(sp) as d: train(d)`: init, grid, and a teardown that runs even on errors (keep
    the model and `d` inside the function called in the block, so they are gone before it)."""
    init_process_group(timeout_s, cpu_collectives)
    try:
        yield build_dist(sp)
    finally:
        shutdown()


def agree(error: str) -> str:
    """The first failing rank's error ("rank r: ..." unless rank 0), or "" when every rank succeeded: a
    collective after work that can fail on one rank alone (a reward, a disk), so that all ranks raise
    or go on together instead of the healthy ones waiting in their next collective until the timeout."""
    errors = [""] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    r, first = next(((r, e) for r, e in enumerate(errors) if e), (0, ""))
    return f"rank {r}: {first}" if r else first


def main(argv: list[str] | None = None) -> None:
    """`python -m minirl.dist --sp N --model DIR`: exit 0 if the layout fits the model, 2 with the reason."""
    from minirl.hf import read_config  # only for this command

    p = argparse.ArgumentParser(description="Check a parallel layout against a model before launching.")
    p.add_argument("--model", required=True, help="model directory with a config.json")
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree")
    p.add_argument("--world", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                   help="number of ranks (default: $WORLD_SIZE, else 1)")
    args = p.parse_args(argv)
    check_parallel_or_exit(args.world, args.sp, read_config(args.model))
    print(f"ok: world {args.world} = dp {args.world // args.sp} x sp {args.sp}")


if __name__ == "__main__":
    main()
