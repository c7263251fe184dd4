"""Shared by the multi-rank test workers: a tiny model, packed micro-batches, the loss, a report.

The loss is the one the trainer's losses reduce to: a token-weighted sum of -log p(target) whose
weights are normalised by the GLOBAL number of target tokens, so each rank's loss is an exact
share of the global loss (see minirl/fsdp.py).

Workers run inside `minirl.dist.distributed(...)` and end with `os._exit(0)` right after it: a
process that reaches interpreter teardown still holding a DeviceMesh or an FSDP model aborts now
and then, even after the process group is destroyed.
"""

import argparse
import json
import os

import torch

from minirl.attention import AttnMeta, cu_seqlens_from_positions
from minirl.model import ModelConfig, Transformer, init_weights

# Two packed micro-batches of documents: T = 19 (a multiple of neither 2 nor 4, so SP pads) with a
# one-token document, and T = 18.
MICRO_BATCHES = [[7, 1, 11], [5, 9, 4]]


def tiny_config(**overrides) -> ModelConfig:
    """Qwen3-style: per-head q/k norm, 4 query heads sharing 2 kv heads (sp=4 must repeat them)."""
    kwargs = dict(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  qk_norm=True, rope_theta=1000.0)
    return ModelConfig(**{**kwargs, **overrides})


def make_model(cfg: ModelConfig, seed: int) -> Transformer:
    model = Transformer(cfg)
    init_weights(model, std=0.1, seed=seed)  # large enough that attention is far from uniform
    return model


def packed(lengths: list[int], seed: int, vocab: int = 97):
    """Documents packed into one sequence -> (input_ids [T], position_ids [T], targets [T], mask [T]).

    targets[i] is the next token of the same document; mask is 1.0 where there is one, so the last
    token of every document (and all of a one-token document) carries no loss.
    """
    g = torch.Generator().manual_seed(seed)
    ids, pos, tgt, mask = [], [], [], []
    for n in lengths:
        doc = torch.randint(0, vocab, (n,), generator=g)
        ids.append(doc)
        pos.append(torch.arange(n))
        tgt.append(torch.cat([doc[1:], doc.new_zeros(1)]))
        mask.append(torch.cat([torch.ones(n - 1), torch.zeros(1)]))
    return torch.cat(ids), torch.cat(pos), torch.cat(tgt), torch.cat(mask)


def full_meta(position_ids: torch.Tensor) -> AttnMeta:
    """Attention metadata for an unsharded packed sequence (the single-process reference)."""
    return AttnMeta(*cu_seqlens_from_positions(position_ids), backend="sdpa")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (the absolute error when b is zero)."""
    diff = (a.double() - b.double()).norm().item()
    ref = b.double().norm().item()
    return diff / ref if ref > 0 else diff


class Report:
    """Named checks of one rank: an empty message is a pass. Written as JSON at the end."""

    def __init__(self, out_dir: str, rank: int):
        self.path = os.path.join(out_dir, f"rank{rank}.json")
        self.checks: dict[str, str] = {}
        self.data: dict = {}

    def check(self, name: str, ok: bool, msg: str = "failed"):
        assert name not in self.checks, f"duplicate check {name}"
        self.checks[name] = "" if ok else msg

    def close(self, rel: float, tol: float, name: str, what: str = ""):
        self.check(name, rel <= tol, f"{what + ': ' if what else ''}relative error {rel:.3g} > {tol:g}")
        self.data[name] = rel  # the measured error, for tests that report it

    def write(self):
        with open(self.path, "w") as f:
            json.dump({"checks": self.checks, "data": self.data}, f)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="where this launch writes rank{r}.json")
    p.add_argument("--phase", default="", help="for workers launched more than once")
    p.add_argument("--shared", default="", help="a directory that outlives the launch")
    return p.parse_args()
