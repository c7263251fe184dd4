"""Tests for minirl/checkpoint.py (2 ranks, gloo; tests/workers/checkpoint_worker.py).

Resume: train 5 steps with a checkpoint after step 3; fresh processes, built from a different
random init, resume from it and must reproduce the losses of steps 4 and 5 and the final weights bit
for bit. Export: the HF directory written from the sharded model loads in transformers and gives
the log-probs the sharded model gave.
"""

import json
import os

import pytest
import torch
from helpers_dist import run_worker_in
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    shared = tmp_path_factory.mktemp("checkpoint")
    out = {}
    for phase in ("train", "resume"):
        os.makedirs(shared / phase)
        out[phase] = run_worker_in(str(shared / phase), "checkpoint_worker.py", 2, "--phase", phase,
                                   "--shared", str(shared))
    return shared, out


def test_resume_is_bit_exact(runs):
    _, out = runs
    for train, resume in zip(out["train"], out["resume"]):
        assert resume["checks"] == {"resume/step": ""}
        assert {s: train["data"]["losses"][s] for s in ("4", "5")} == resume["data"]["losses"]
        assert train["data"]["digest"] == resume["data"]["digest"]
        assert train["data"]["data_state"] == resume["data"]["data_state"] == {"batches": 5}
    assert out["train"][0]["checks"] == {"resume/empty_dir": ""}


def test_checkpoint_layout(runs):
    shared, _ = runs
    ckpt = shared / "ckpt"
    assert (ckpt / "latest").read_text() == "step_3"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_3"]  # no *.tmp left behind
    assert {"rank0.pt", "rank1.pt"} <= set(os.listdir(ckpt / "step_3"))


def test_export_loads_in_transformers(runs):
    shared, out = runs
    score = out["train"][0]["data"]["score"]
    ids = torch.tensor(score["ids"])
    want = torch.tensor(score["logprobs"])
    hf = AutoModelForCausalLM.from_pretrained(shared / "export", dtype=torch.float32).eval()
    got, start = [], 0
    for n in score["lengths"]:  # the worker's packed documents, one by one
        doc = ids[start:start + n]
        with torch.no_grad():
            logp = hf(doc[None]).logits[0].float().log_softmax(-1)  # [n, V]
        targets = torch.cat([doc[1:], doc.new_zeros(1)])
        got.append(logp.gather(-1, targets[:, None]).squeeze(-1))
        start += n
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=1e-5)
    assert json.loads((shared / "export" / "config.json").read_text())["model_type"] == "qwen3"
