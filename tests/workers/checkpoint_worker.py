"""Multi-rank checks of minirl/checkpoint.py: resume reproduces training bit for bit; HF export.

Both phases share `--shared DIR` (DIR/ckpt, DIR/export).
`--phase train`: 5 steps of AdamW with warm-up and clipping on 2 ranks (dp2), checkpointing after
step 3, then exporting an HF directory and scoring a fixed sequence with the sharded model.
`--phase resume` (fresh processes, a different init seed): load the checkpoint and run steps 4 and 5.
Each step's data comes from the data position (a dict the checkpoint stores for the caller) and
from python's and torch's global RNGs, so a resume that forgot any of them shows in the losses.
"""

import hashlib
import os
import random

import torch
import torch.distributed as dist
from common import Report, full_meta, make_model, parse_args, packed, tiny_config

from minirl import checkpoint
from minirl import dist as mdist
from minirl.fsdp import clip_grad_norm_, iter_full_params, shard_model

STEPS, SAVE_AT = 5, 3
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


def run(report: Report, d: mdist.Dist, shared: str, phase: str):
    cfg = tiny_config()
    model = shard_model(make_model(cfg, seed=0 if phase == "train" else 123), d.fsdp_mesh, False, False, True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    ckpt_dir = os.path.join(shared, "ckpt")
    random.seed(10 + d.rank if phase == "train" else 99)
    torch.manual_seed(20 + d.rank if phase == "train" else 99)
    data_state = {"batches": 0}
    first = 1
    if phase == "resume":
        resumed = checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler)
        report.check("resume/step", resumed is not None and resumed.step == SAVE_AT, f"resumed at {resumed}")
        data_state, first = resumed.data_state, resumed.step + 1
    else:
        report.check("resume/empty_dir", checkpoint.load_latest(ckpt_dir, model, optimizer, scheduler) is None)
    losses = {}
    for step in range(first, STEPS + 1):
        losses[step] = train_step(model, optimizer, scheduler, data_state)
        if phase == "train" and step == SAVE_AT:
            checkpoint.save(ckpt_dir, step, model, optimizer, scheduler, data_state)
    report.data["losses"] = losses
    report.data["digest"] = params_digest(model)
    report.data["data_state"] = data_state
    if phase == "train":
        checkpoint.export_hf(model, cfg, os.path.join(shared, "export"), dtype=torch.float32)
        ids, pos, tgt, _ = packed(SCORE_LENGTHS, seed=5)
        with torch.no_grad():
            lp, _ = model(ids, pos, full_meta(pos), targets=tgt)
        report.data["score"] = {"lengths": SCORE_LENGTHS, "ids": ids.tolist(), "logprobs": lp.tolist()}


def main():
    args = parse_args()
    with mdist.distributed(sp=1, timeout_s=60) as d:
        report = Report(args.out, d.rank)
        run(report, d, args.shared, args.phase)
        report.write()
    os._exit(0)


if __name__ == "__main__":
    main()
