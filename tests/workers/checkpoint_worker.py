"""Multi-rank checks of minirl/checkpoint.py: resume reproduces training bit for bit; it falls back
past broken checkpoints; a failed save stops every rank with one message; HF export.

All phases share `--shared DIR` (DIR/ckpt, DIR/export, DIR/cases).
`--phase train`: 5 steps of AdamW with warm-up and clipping on 2 ranks (dp2), checkpointing after
steps 2 and 3, then exporting an HF directory and scoring a fixed sequence with the sharded model.
`--phase resume` (fresh processes, a different init seed): load the checkpoint and run steps 4 and 5.
Each step's data comes from the data position (a dict the checkpoint stores for the caller) and
from python's and torch's global RNGs, so a resume that forgot any of them shows in the losses.
`--phase train` and `--phase resume` then do the same with LoRA adapters on a frozen base (DIR/lora_ckpt,
DIR/lora_export with DIR/lora_adapter, its PEFT-format adapters for the base DIR/lora_base).
`--phase faults`: copies of DIR/ckpt broken in one way each (BROKEN); each is resumed and trained to
step 5, reporting where it resumed, its losses and rank 0's warnings. Then saves that must fail on
every rank because rank 1 alone has a NaN parameter or a full disk, and pruning with `keep`.
"""

import contextlib
import hashlib
import io
import os
import random
import resource
import shutil
import signal

import torch
import torch.distributed as dist
from common import Report, full_meta, make_model, parse_args, packed, tiny_config

from minirl import checkpoint, hf, lora
from minirl import dist as mdist
from minirl.fsdp import clip_grad_norm_, iter_full_params, shard_model

STEPS, SAVES = 5, (2, 3)
SCORE_LENGTHS = [6, 9]  # the sequence the export is scored on


def next_batch(data_state: dict):
    """One packed micro-batch: lengths from python's RNG, tokens from torch's, seed from the position."""
    data_state["batches"] += 1
    lengths = [random.randint(1, 12) for _ in range(3)]
    ids, pos, tgt, mask = packed(lengths, seed=1000 * data_state["batches"] + dist.get_rank())
    ids = (ids + torch.randint(0, 97, ids.shape)) % 97  # torch's global RNG
    tgt = torch.cat([ids[1:], ids.new_zeros(1)]) * (mask > 0)  # targets follow the new ids
    return ids, pos, tgt, mask


def train_step(model, optimizer, scheduler, data_state, device="cpu") -> float:
    ids, pos, tgt, mask = (x.to(device) for x in next_batch(data_state))
    count = mask.sum()
    dist.all_reduce(count)
    lp, _ = model(ids, pos, full_meta(pos), targets=tgt)
    loss = (mask / count * -lp).sum()
    loss.backward()
    clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss.item()


def params_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in iter_full_params(model, torch.float32):
        h.update(name.encode())
        h.update(t.cpu().numpy().tobytes())
    return h.hexdigest()


def truncate(path: str):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def garble(path: str):
    with open(path, "wb") as f:
        f.write(b"not a torch file" * 64)


def set_latest(ckpt_dir: str, name: str):
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(name)


# Each case: how to break a copy of DIR/ckpt (step_2, step_3, `latest` -> step_3).
BROKEN = {
    "truncated_shard": lambda c: truncate(os.path.join(c, "step_3", "__1_0.distcp")),
    "dangling_latest": lambda c: shutil.rmtree(os.path.join(c, "step_3")),  # `latest` still names it
    "bad_rank1_file": lambda c: garble(os.path.join(c, "step_3", "rank1.pt")),  # fails on rank 1 only
    "newer_than_latest": lambda c: set_latest(c, "step_2"),  # step_3 is not committed: ignored
    "none_loads": lambda c: [truncate(os.path.join(c, s, "__0_0.distcp")) for s in ("step_2", "step_3")],
}


def copy_checkpoints(shared: str, name: str) -> str:
    """DIR/cases/name: a copy of DIR/ckpt made by rank 0, seen by every rank on return."""
    case_dir = os.path.join(shared, "cases", name)
    if dist.get_rank() == 0:
        shutil.copytree(os.path.join(shared, "ckpt"), case_dir)
    dist.barrier()
    return case_dir


def resume_and_train(model, optimizer, scheduler, ckpt_dir: str) -> dict:
    """Resume from ckpt_dir and train to STEPS: where it resumed, the losses, rank 0's warnings."""
    warnings = io.StringIO()
    with contextlib.redirect_stderr(warnings):
        try:
            resumed = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
        except ValueError as e:
            return {"error": str(e), "warnings": warnings.getvalue()}
    losses = {step: train_step(model, optimizer, scheduler, resumed.data_state)
              for step in range(resumed.step + 1, STEPS + 1)}
    return {"step": resumed.step, "losses": losses, "warnings": warnings.getvalue()}


def failed_save(model, optimizer, scheduler, ckpt_dir: str, step: int) -> dict:
    """Save that is expected to fail: the exception, and what the checkpoint directory holds after it."""
    try:
        checkpoint.save(ckpt_dir, step, model, optimizer, scheduler, {"batches": step})
        error = None
    except (ValueError, OSError) as e:
        error = f"{type(e).__name__}: {e}"
    with open(os.path.join(ckpt_dir, "latest")) as f:
        return {"error": error, "files": sorted(os.listdir(ckpt_dir)), "latest": f.read()}


def run_faults(report: Report, d: mdist.Dist, model, optimizer, scheduler, shared: str):
    for name, breaks in BROKEN.items():
        case_dir = copy_checkpoints(shared, name)
        if d.rank == 0:
            breaks(case_dir)
        dist.barrier()
        report.data[name] = resume_and_train(model, optimizer, scheduler, case_dir)

    ckpt_dir = copy_checkpoints(shared, "save_faults")
    checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)  # a model whose weights are known
    if d.rank == 1:  # one NaN in rank 1's shard only
        with torch.no_grad():
            next(p for p in model.parameters() if p.to_local().numel()).to_local().view(-1)[0] = float("nan")
    report.data["nan_param"] = failed_save(model, optimizer, scheduler, ckpt_dir, 4)
    checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)  # finite again
    if d.rank == 1:  # rank 1's disk is full: its writes beyond 4 KiB fail (EFBIG instead of ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    report.data["disk_full"] = failed_save(model, optimizer, scheduler, ckpt_dir, 4)
    if d.rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report.data["after_disk_full"] = resume_and_train(model, optimizer, scheduler, ckpt_dir)

    checkpoint.save(ckpt_dir, 6, model, optimizer, scheduler, {"batches": 6}, keep=2)
    report.data["keep_2"] = sorted(os.listdir(ckpt_dir))
    checkpoint.save(ckpt_dir, 7, model, optimizer, scheduler, {"batches": 7}, keep=1)
    report.data["keep_1"] = sorted(os.listdir(ckpt_dir))


def run(report: Report, d: mdist.Dist, shared: str, phase: str, adapters: bool = False):
    """One phase; with `adapters`, the same on a frozen base (seed 0, as a model dir would give it) with
    LoRA adapters, whose results go to report.data["lora"] and checkpoints to DIR/lora_ckpt."""
    cfg = tiny_config()
    seed = 0 if phase == "train" else 123
    model = make_model(cfg, seed=0 if adapters else seed)
    if adapters:
        lora.add_adapters(model, lora.AdapterSpec(rank=4, alpha=8.0, seed=seed))
        lora.freeze_base(model)
    model = shard_model(model, d.fsdp_mesh, False, False, "full")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    ckpt_dir = os.path.join(shared, "lora_ckpt" if adapters else "ckpt")
    out, prefix = (report.data.setdefault("lora", {}), "lora/") if adapters else (report.data, "")
    random.seed(10 + d.rank if phase == "train" else 99)
    torch.manual_seed(20 + d.rank if phase == "train" else 99)
    if phase == "faults":
        return run_faults(report, d, model, optimizer, scheduler, shared)
    data_state = {"batches": 0}
    first = 1
    if phase == "resume":
        resumed = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
        report.check(prefix + "resume/step", resumed is not None and resumed.step == SAVES[-1],
                     f"resumed at {resumed}")
        data_state, first = resumed.data_state, resumed.step + 1
    else:
        report.check(prefix + "resume/empty_dir", checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler) is None)
    losses = {}
    for step in range(first, STEPS + 1):
        losses[step] = train_step(model, optimizer, scheduler, data_state)
        if phase == "train" and step in SAVES:
            checkpoint.save(ckpt_dir, step, model, optimizer, scheduler, data_state)
    out["losses"] = losses
    out["digest"] = params_digest(model)
    out["data_state"] = data_state
    if phase == "train":
        export = os.path.join(shared, "lora_export" if adapters else "export")
        if adapters:  # the base model directory the PEFT adapter refers to
            if d.rank == 0:
                hf.save_model(os.path.join(shared, "lora_base"), cfg, make_model(cfg, seed=0).named_parameters())
            checkpoint.export_hf(model, cfg, export, dtype=torch.float32,
                                 adapter_dir=os.path.join(shared, "lora_adapter"),
                                 base_model=os.path.join(shared, "lora_base"))
        else:
            checkpoint.export_hf(model, cfg, export, dtype=torch.float32)
        ids, pos, tgt, _ = packed(SCORE_LENGTHS, seed=5)
        with torch.no_grad():
            lp, _ = model(ids, pos, full_meta(pos), targets=tgt)
        out["score"] = {"lengths": SCORE_LENGTHS, "ids": ids.tolist(), "logprobs": lp.tolist()}


def main():
    args = parse_args()
    with mdist.distributed(sp=1, timeout_s=60) as d:
        report = Report(args.out, d.rank)
        run(report, d, args.shared, args.phase)
        if args.phase != "faults":
            run(report, d, args.shared, args.phase, adapters=True)
        report.write()
    os._exit(0)


if __name__ == "__main__":
    main()
