"""Checkpoint I/O: round trips, interoperability with transformers, and errors that name the culprit."""

import json
import os

import pytest
import torch
from helpers_models import hf_model, minirl_model, packed_batch, save_hf_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from minirl.hf import load_model, load_state_dict_from_dir, read_config, save_model


def shard_files(model_dir) -> list[str]:
    return sorted(f for f in os.listdir(model_dir) if f.startswith("model-") and f.endswith(".safetensors"))


def test_sharded_round_trip_is_exact(tmp_path):
    hf = hf_model("llama", seed=0)
    model = minirl_model(hf)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "notes.txt"):
        (tok_dir / name).write_text(f"contents of {name}")

    # A one-pass generator of non-contiguous views, as a streaming (FSDP) caller might hand over.
    stream = ((name, p.detach().t().contiguous().t() if p.ndim == 2 else p) for name, p in model.named_parameters())
    out = tmp_path / "ckpt"
    save_model(str(out), model.cfg, stream, tokenizer_dir=str(tok_dir), max_shard_bytes=40_000)

    files = shard_files(out)
    assert len(files) >= 2 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert set(index["weight_map"]) == set(hf.state_dict())  # transformers' own names
    loaded = load_state_dict_from_dir(str(out))
    assert loaded.keys() == dict(model.named_parameters()).keys()
    for name, p in model.named_parameters():
        assert torch.equal(loaded[name], p), name
    assert read_config(str(out)) == model.cfg

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_text() == f"contents of {name}"
    assert not (out / "notes.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "tok"]  # no temporary directory left behind


def test_save_keeps_the_given_dtype_and_replaces_an_old_checkpoint(tmp_path):
    model = minirl_model(hf_model("qwen3", seed=1))
    out = str(tmp_path / "ckpt")
    save_model(out, model.cfg, model.named_parameters(), max_shard_bytes=20_000)  # sharded, fp32
    bf16 = {name: p.detach().to(torch.bfloat16) for name, p in model.named_parameters()}
    save_model(out, model.cfg, bf16.items())  # one file: the old shards and index must go

    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    loaded = load_state_dict_from_dir(out)
    assert all(torch.equal(loaded[name], t) for name, t in bf16.items())
    reloaded = load_model(out, dtype=torch.float32)
    assert all(torch.equal(p, bf16[name].float()) for name, p in reloaded.named_parameters())


def test_save_rejects_wrong_names_and_leaves_nothing(tmp_path):
    model = minirl_model(hf_model("qwen2", seed=2))
    params = dict(model.named_parameters())
    params["layers.0.mlp.extra.weight"] = params.pop("layers.1.mlp.up_proj.weight")
    out = tmp_path / "ckpt"
    culprits = r"missing 1: layers\.1\.mlp\.up_proj\.weight; unexpected 1: layers\.0\.mlp\.extra\.weight"
    with pytest.raises(ValueError, match=culprits):
        save_model(str(out), model.cfg, params.items())
    assert os.listdir(tmp_path) == []

    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "log.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="runs"):
        save_model(str(tmp_path / "runs"), model.cfg, model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied, tied
def test_transformers_loads_our_checkpoint(tmp_path, family):
    hf = save_hf_model(str(tmp_path / "hf"), family, seed=3)
    ours = load_model(str(tmp_path / "hf"))
    save_model(str(tmp_path / "ours"), ours.cfg, ours.named_parameters(), max_shard_bytes=30_000)

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
    assert reloaded.dtype == torch.float32  # config.json names the dtype the files hold
    if family == "qwen2":
        assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = packed_batch([11], seed=4)[0][None]  # [1, 11]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, rtol=0, atol=1e-6)


def test_load_sharded_transformers_checkpoint(tmp_path):
    hf = save_hf_model(str(tmp_path), "qwen3", seed=5, max_shard_size="20KB")
    assert len(shard_files(tmp_path)) >= 2 and (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(str(tmp_path), dtype=torch.float64)
    theirs = {name.removeprefix("model."): t for name, t in hf.state_dict().items()}
    for name, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.equal(p, theirs[name].double()), name


def test_extra_hf_tensors_are_ignored(tmp_path):
    """A tied model may still store lm_head.weight; old exporters store RoPE's inv_freq buffer."""
    hf = save_hf_model(str(tmp_path), "qwen2", seed=6)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, path, metadata={"format": "pt"})
    model = load_model(str(tmp_path))
    assert torch.equal(model.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_load_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in .*nowhere"):
        load_model(str(tmp_path / "nowhere"))

    sharded = tmp_path / "sharded"
    save_hf_model(str(sharded), "llama", max_shard_size="20KB")
    first, second = shard_files(sharded)[:2]
    os.remove(sharded / first)
    with pytest.raises(FileNotFoundError, match=f"absent: {first}"):
        load_model(str(sharded))
    (sharded / second).write_bytes((sharded / second).read_bytes()[:1000])  # truncated
    save_file({}, sharded / first)  # put back a (wrong but readable) file, so the truncated one is reached
    with pytest.raises(ValueError, match=f"{second}.*corrupt or truncated"):
        load_model(str(sharded))


def edited_checkpoint(tmp_path, edit):
    """A single-file Qwen2 checkpoint whose tensors dict went through `edit`."""
    save_hf_model(str(tmp_path), "qwen2", seed=7)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    def widen_norm(t):
        t["model.layers.1.input_layernorm.weight"] = torch.ones(65)
    culprit = r"wrong shape 1: layers\.1\.input_layernorm\.weight \[65\] \(expected \[64\]\)"
    with pytest.raises(ValueError, match=culprit):
        load_model(edited_checkpoint(tmp_path, widen_norm))


def test_missing_and_unexpected_names_are_listed(tmp_path):
    def drop_layer_1(t):
        for name in [n for n in t if n.startswith("model.layers.1.")]:  # 12 tensors
            t[name.replace("layers.1.", "layers.7.")] = t.pop(name)
    with pytest.raises(ValueError) as err:
        load_state_dict_from_dir(edited_checkpoint(tmp_path, drop_layer_1))
    message = str(err.value)
    assert "missing 12: layers.1.input_layernorm.weight" in message and "(+4 more)" in message
    assert "unexpected 12: layers.7.input_layernorm.weight" in message
    assert "\n" not in message


@pytest.mark.parametrize("edit, message", [
    (lambda text: text[:-2], r"config\.json:\d+:\d+: malformed JSON"),  # cut short
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "hidden_size"}),
     r"config\.json: no 'hidden_size', which minirl needs"),
    (lambda text: json.dumps({**json.loads(text), "model_type": "gpt2"}), r"config\.json: unsupported model_type 'gpt2'"),
    (lambda text: "[1, 2]", r"config\.json: expected a JSON object, got list"),
])
def test_a_bad_config_json_is_one_error_naming_it(tmp_path, edit, message):
    cfg = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(edit(json.dumps(cfg)))
    with pytest.raises(ValueError, match=message) as info:
        read_config(str(tmp_path))
    assert str(tmp_path / "config.json") in str(info.value)
