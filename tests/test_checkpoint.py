"""Tests for minirl/checkpoint.py (2 ranks, gloo; tests/workers/checkpoint_worker.py).

Resume: train 5 steps with checkpoints after steps 2 and 3; fresh processes, built from a different
random init, resume from it and must reproduce the losses of steps 4 and 5 and the final weights bit
for bit. Fallback: copies with a broken newest checkpoint resume from step 2 and reproduce steps
3 to 5. Failed saves (a NaN parameter or a full disk on one rank) fail on every rank and leave the
previous checkpoint as `latest`. Export: the HF directory written from the sharded model loads in
transformers and gives the log-probs the sharded model gave. The same with LoRA adapters on a frozen
base: the checkpoints hold the adapters alone and resume bit for bit, and the PEFT-format adapters
load onto the base in transformers + peft. The out-dir check before start-up runs in this process,
on copies of the checkpoints the workers wrote.
"""

import errno
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers_dist import run_worker_in
from transformers import AutoModelForCausalLM

from minirl.checkpoint import newest_complete
from minirl.outdir import OutDir, check_out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train, then resume and faults side by side: both only read DIR/ckpt (faults breaks copies of it)."""
    shared = tmp_path_factory.mktemp("checkpoint")

    def launch(phase):
        os.makedirs(shared / phase)
        return run_worker_in(str(shared / phase), "checkpoint_worker.py", 2, "--phase", phase, "--shared", str(shared))

    out = {"train": launch("train")}
    with ThreadPoolExecutor(2) as pool:
        out.update(zip(("resume", "faults"), pool.map(launch, ("resume", "faults"))))
    return shared, out


def test_resume_is_bit_exact(runs):
    _, out = runs
    for train, resume in zip(out["train"], out["resume"]):
        assert resume["checks"] == {"resume/step": "", "lora/resume/step": ""}
        assert {s: train["data"]["losses"][s] for s in ("4", "5")} == resume["data"]["losses"]
        assert train["data"]["digest"] == resume["data"]["digest"]
        assert train["data"]["data_state"] == resume["data"]["data_state"] == {"batches": 5}
    assert out["train"][0]["checks"] == {"resume/empty_dir": "", "lora/resume/empty_dir": ""}


def test_checkpoint_layout(runs):
    shared, _ = runs
    ckpt = shared / "ckpt"
    assert (ckpt / "latest").read_text() == "step_3"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_2", "step_3"]  # no *.tmp left behind
    assert {"rank0.pt", "rank1.pt"} <= set(os.listdir(ckpt / "step_3"))


def assert_export_scores(export_dir, score):
    """The HF model in export_dir, loaded by transformers, gives the log-probs the worker's sharded model
    gave (`score`), document by document; returns the model."""
    ids = torch.tensor(score["ids"])
    want = torch.tensor(score["logprobs"])
    hf = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    got, start = [], 0
    for n in score["lengths"]:  # the worker's packed documents, one by one
        doc = ids[start:start + n]
        with torch.no_grad():
            logp = hf(doc[None]).logits[0].float().log_softmax(-1)  # [n, V]
        targets = torch.cat([doc[1:], doc.new_zeros(1)])
        got.append(logp.gather(-1, targets[:, None]).squeeze(-1))
        start += n
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=1e-5)
    return hf


def test_export_loads_in_transformers(runs):
    shared, out = runs
    assert_export_scores(shared / "export", out["train"][0]["data"]["score"])
    assert json.loads((shared / "export" / "config.json").read_text())["model_type"] == "qwen3"


def test_lora_resume_is_bit_exact(runs):
    _, out = runs
    for train, resume in zip(out["train"], out["resume"]):
        train, resume = train["data"]["lora"], resume["data"]["lora"]  # (its checks: test_resume_is_bit_exact)
        assert {s: train["losses"][s] for s in ("4", "5")} == resume["losses"]
        assert train["digest"] == resume["digest"]
        assert train["losses"]["5"] != out["train"][0]["data"]["losses"]["5"]  # not the full fine-tuning run


def test_lora_checkpoint_holds_the_adapters_alone(runs):
    shared, _ = runs
    keys = dcp.FileSystemReader(str(shared / "lora_ckpt" / "step_3")).read_metadata().state_dict_metadata
    model = {k for k in keys if k.startswith("model.")}
    assert model and all(k.endswith((".lora_A", ".lora_B")) for k in model)
    assert len(model) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    optim = {k for k in keys if k.startswith("optim.state.")}  # optim.state.<param>.<exp_avg|exp_avg_sq|step>
    assert optim and all(".lora_" in k for k in optim)
    full = dcp.FileSystemReader(str(shared / "ckpt" / "step_3")).read_metadata().state_dict_metadata
    assert "model.layers.0.mlp.up_proj.weight" in full  # while full fine-tuning saves every weight


def test_lora_export_loads_in_transformers_and_peft(runs):
    """The merged export gives the sharded LoRA model's log-probs; the adapter dir on the base, loaded
    by peft, gives the merged export's logits."""
    from peft import PeftModel

    shared, out = runs
    merged = assert_export_scores(shared / "lora_export", out["train"][0]["data"]["lora"]["score"])
    ids = torch.tensor(out["train"][0]["data"]["lora"]["score"]["ids"])[None]
    base = AutoModelForCausalLM.from_pretrained(shared / "lora_base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, shared / "lora_adapter").eval()
    with torch.no_grad():
        want = merged(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=0, atol=1e-5)
        with peft_model.disable_adapter():
            assert (peft_model(ids).logits - want).abs().max() > 1e-3


@pytest.mark.parametrize("case, warning", [
    ("truncated_shard", r"step_3/__1_0.distcp is truncated \(\d+ of \d+ bytes\)"),
    ("dangling_latest", r"latest names step_3, which does not exist"),
    ("bad_rank1_file", r"rank 1: .*step_3 does not load"),
    ("newer_than_latest", r"^$"),  # step_3 was never committed: ignored without a word
])
def test_resume_falls_back_to_the_newest_checkpoint_that_loads(runs, case, warning):
    _, out = runs
    for train, faults in zip(out["train"], out["faults"]):
        got = faults["data"][case]
        assert got["step"] == 2
        assert got["losses"] == {s: train["data"]["losses"][s] for s in ("3", "4", "5")}  # as if never broken
    assert re.search(warning, out["faults"][0]["data"][case]["warnings"])  # rank 0 prints them


def test_resume_with_no_loadable_checkpoint_is_an_error(runs):
    _, out = runs
    for rank in out["faults"]:
        error = rank["data"]["none_loads"]["error"]
        assert "no loadable checkpoint" in error and "step_3/__0_0.distcp" in error and "step_2/__0_0.distcp" in error


def test_a_nan_parameter_is_never_saved(runs):
    _, out = runs
    for rank in out["faults"]:  # the NaN is on rank 1 alone; both refuse
        got = rank["data"]["nan_param"]
        assert got["error"].startswith("ValueError: refusing to save")
        assert "non-finite values in rank 1:" in got["error"]
        assert got["files"] == ["latest", "step_2", "step_3"] and got["latest"] == "step_3"


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank(runs):
    _, out = runs
    for rank in out["faults"]:
        got = rank["data"]["disk_full"]
        assert got["error"].startswith("OSError: could not save checkpoint") and "step_4" in got["error"]
        assert f"rank 1: OSError: [Errno {errno.EFBIG}]" in got["error"] and "step_3 is intact" in got["error"]
        assert got["files"] == ["latest", "step_2", "step_3"] and got["latest"] == "step_3"  # step_4.tmp removed
        assert rank["data"]["after_disk_full"]["step"] == 3  # and the previous checkpoint still resumes


def test_keep_prunes_all_but_the_newest(runs):
    _, out = runs
    assert out["faults"][0]["data"]["keep_2"] == ["latest", "step_3", "step_6"]
    assert out["faults"][0]["data"]["keep_1"] == ["latest", "step_7"]


@pytest.fixture
def run_dir(runs, tmp_path):
    """An out-dir holding metrics and a copy of the workers' checkpoints (step_2, step_3)."""
    shared, _ = runs
    shutil.copytree(shared / "ckpt", tmp_path / "run" / "checkpoints")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return tmp_path / "run"


def test_out_dir_with_results_needs_resume(run_dir, tmp_path):
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl, checkpoints/\); pass --resume"):
        check_out_dir(str(run_dir), resume=False, world_size=2)
    assert check_out_dir(str(run_dir), resume=True, world_size=2) == OutDir(3)  # after the newest checkpoint
    assert check_out_dir(str(tmp_path / "new" / "run"), resume=False, world_size=2) == OutDir(0)
    assert os.path.isdir(tmp_path / "new" / "run")
    (tmp_path / "only_metrics").mkdir()
    (tmp_path / "only_metrics" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "loss": 0.5}\n')
    with pytest.raises(ValueError, match="already holds a run .*it has no checkpoint: pass --resume to start it "
                                         "again"):  # the metrics of finished steps are worth keeping too
        check_out_dir(str(tmp_path / "only_metrics"), resume=False, world_size=2)


def test_resume_without_a_complete_checkpoint_is_an_error(run_dir):
    with pytest.raises(ValueError, match="no complete checkpoint .*written by 2 ranks; this run has 4"):
        check_out_dir(str(run_dir), resume=True, world_size=4)
    for step in ("step_2", "step_3"):
        os.truncate(run_dir / "checkpoints" / step / "__0_0.distcp", 10)
    with pytest.raises(ValueError, match=r"no complete checkpoint .*step_3/__0_0.distcp is truncated"):
        check_out_dir(str(run_dir), resume=True, world_size=2)


def test_newest_complete_passes_over_broken_checkpoints(run_dir):
    ckpt = run_dir / "checkpoints"
    assert newest_complete(str(ckpt), world_size=2) == (str(ckpt / "step_3"), [])
    os.truncate(ckpt / "step_3" / "__1_0.distcp", 10)
    path, warnings = newest_complete(str(ckpt), world_size=2)
    assert path == str(ckpt / "step_2") and "step_3/__1_0.distcp is truncated" in warnings[0]
    os.remove(ckpt / "step_2" / ".metadata")
    path, warnings = newest_complete(str(ckpt), world_size=2)
    assert path is None and "step_2: no readable DCP metadata" in warnings[1]
