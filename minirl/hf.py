"""Read and write Hugging Face checkpoint directories (config.json + safetensors), which transformers, vLLM
and minirl load alike. Our parameter names are HF's without the `model.` prefix (`lm_head.weight` keeps its
name, and is absent when the embeddings are tied). Loading checks every name and shape against the config
(on the meta device: free) and fails with one error listing all that is wrong, instead of a half-loaded
model; saving takes (name, tensor) one at a time, so a sharded model never gathers whole.
"""

import json
import os
import shutil
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minirl.model import ModelConfig, Transformer

CONFIG = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Everything besides the weights that a model directory needs for tokenising and generating.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def _names(names, limit: int = 8) -> str:
    """A readable, bounded list of names for an error message."""
    names = sorted(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def ours_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


def read_config(model_dir: str) -> ModelConfig:
    """The ModelConfig of `model_dir`'s config.json; every problem with the file is one error naming it."""
    path = os.path.join(model_dir, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG} in {model_dir!r}: not a Hugging Face model directory")
    hf = read_json(path)
    try:
        return ModelConfig.from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}, which minirl needs") from None
    except (ValueError, TypeError, ZeroDivisionError) as e:  # unsupported options, values of the wrong kind
        raise ValueError(f"{path}: {e}") from None


def read_json(path: str) -> dict:
    """The JSON object in `path`; bad JSON, text that is not UTF-8 or a non-object is one error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter name of the model `cfg` describes, with its shape (no memory allocated)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Transformer(cfg).named_parameters()}


def check_state_dict(shapes: dict[str, torch.Size], expected: dict[str, torch.Size], where: str):
    """Raise one ValueError naming every missing, unexpected and mis-shaped parameter."""
    problems = []
    if missing := expected.keys() - shapes.keys():
        problems.append(f"missing {len(missing)}: {_names(missing)}")
    if unexpected := shapes.keys() - expected.keys():
        problems.append(f"unexpected {len(unexpected)}: {_names(unexpected)}")
    if wrong := [f"{n} {list(shapes[n])} (expected {list(expected[n])})"
                 for n in expected.keys() & shapes.keys() if tuple(shapes[n]) != tuple(expected[n])]:
        problems.append(f"wrong shape {len(wrong)}: {_names(wrong)}")
    if problems:
        raise ValueError(f"{where} does not match the model config: " + "; ".join(problems))


def _shard_files(model_dir: str) -> list[str]:
    """The safetensors files of a checkpoint: the single file (it wins over a stale index, as in
    transformers), else every shard the index names."""
    if os.path.isfile(os.path.join(model_dir, SINGLE_FILE)):
        return [SINGLE_FILE]
    index = os.path.join(model_dir, INDEX_FILE)
    if not os.path.isfile(index):
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir!r}")
    weight_map = read_json(index).get("weight_map")
    if not weight_map:
        raise ValueError(f"{index!r} has no weight_map: not a safetensors index")
    files = sorted(set(weight_map.values()))
    if absent := [name for name in files if not os.path.isfile(os.path.join(model_dir, name))]:
        raise FileNotFoundError(f"{model_dir!r}: {INDEX_FILE} lists shards that are absent: {_names(absent)}")
    return files


def _ours(hf_name: str, cfg: ModelConfig) -> str | None:
    """Our name for a stored tensor, or None for one we do not load: a RoPE buffer some exporters save
    (recomputed), a tied lm_head (a copy of the embedding)."""
    skip = "rotary_emb." in hf_name or hf_name == "lm_head.weight" and cfg.tie_word_embeddings
    return None if skip else hf_name.removeprefix("model.")


def _stored(model_dir: str, tensors: bool) -> dict:
    """Our name -> the stored tensor (`tensors`), or its shape from the file headers alone, for every tensor
    we load from `model_dir`: exactly the config's parameter names and shapes, or one ValueError."""
    cfg = read_config(model_dir)
    out = {}
    for name in _shard_files(model_dir):
        path = os.path.join(model_dir, name)
        try:
            with safe_open(path, "pt") as f:
                for hf_name in f.keys():
                    if (ours := _ours(hf_name, cfg)) is not None:
                        out[ours] = f.get_tensor(hf_name) if tensors else torch.Size(f.get_slice(hf_name).get_shape())
        except SafetensorError as e:
            raise ValueError(f"cannot read {path!r} (corrupt or truncated safetensors file): {e}") from None
    shapes = {n: t.shape for n, t in out.items()} if tensors else out
    check_state_dict(shapes, expected_shapes(cfg), f"checkpoint {model_dir!r}")
    return out


def check_weights(model_dir: str) -> None:
    """`load_state_dict_from_dir`'s checks without reading a tensor: every file readable and not cut
    short, names and shapes matching the config. Cheap, so entry points run it before any process group."""
    _stored(model_dir, tensors=False)


def load_state_dict_from_dir(model_dir: str) -> dict[str, torch.Tensor]:
    """All parameters of an HF checkpoint directory, under our names, as stored (CPU, file dtype)."""
    return _stored(model_dir, tensors=True)


def load_model(model_dir: str, device="cpu", dtype=torch.float32) -> Transformer:
    """The model of an HF directory with its weights, cast to `dtype`, allocated once, on `device`."""
    cfg = read_config(model_dir)
    state = load_state_dict_from_dir(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    model.load_state_dict(state)  # copies (and casts) into the allocated parameters
    return model


def save_model(out_dir: str, cfg: ModelConfig, named_tensors: Iterable[tuple[str, torch.Tensor]],
               tokenizer_dir: str | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write an HF model directory: config.json, safetensors shards (+ index), and the tokenizer files of
    `tokenizer_dir`. `named_tensors` (our name, tensor in the dtype to store) is consumed once, holding at
    most one shard; a temporary sibling replaces `out_dir` at the end: never a half-written checkpoint."""
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, CONFIG)):
        raise FileExistsError(f"{out_dir!r} exists and is not a model directory; refusing to replace it")
    tmp_dir = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        _write_checkpoint(tmp_dir, cfg, named_tensors, max_shard_bytes)
        if tokenizer_dir is not None:
            _copy_tokenizer_files(tokenizer_dir, tmp_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        # Two renames and a delete: a crash in between leaves the old checkpoint in `.old`, intact.
        old_dir = f"{out_dir}.old{os.getpid()}"
        os.rename(out_dir, old_dir)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old_dir)
    else:
        os.rename(tmp_dir, out_dir)


def _shards(named_tensors, max_shard_bytes: int):
    """Group a stream of (name, tensor) into dicts of at most max_shard_bytes (a bigger tensor alone)."""
    shard, size = {}, 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().to("cpu").contiguous()
        if shard and size + tensor.nbytes > max_shard_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    if shard:
        yield shard


def _write_checkpoint(out_dir: str, cfg: ModelConfig, named_tensors, max_shard_bytes: int):
    """The shards under HF's file names (+ the index when several), then config.json."""
    tensor_shapes, shard_of, total_bytes, dtype = {}, {}, 0, None  # our name -> shape; HF name -> shard number
    for i, shard in enumerate(_shards(named_tensors, max_shard_bytes)):
        # Numbered provisionally: HF's names need the shard count, known only at the end.
        save_file({ours_to_hf(n): t for n, t in shard.items()}, os.path.join(out_dir, f"shard-{i}.safetensors"),
                  metadata={"format": "pt"})
        for name, tensor in shard.items():
            tensor_shapes[name] = tensor.shape
            shard_of[ours_to_hf(name)] = i
            total_bytes += tensor.nbytes
            dtype = tensor.dtype if dtype is None else dtype
    check_state_dict(tensor_shapes, expected_shapes(cfg), "tensors given to save_model")

    # HF's file names: one `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index.
    n = len(set(shard_of.values()))
    files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, file in enumerate(files):
        os.rename(os.path.join(out_dir, f"shard-{i}.safetensors"), os.path.join(out_dir, file))
    if n > 1:
        weight_map = {name: files[i] for name, i in sorted(shard_of.items())}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)

    hf_config = cfg.to_hf()
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")  # what the files actually hold
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)


def _copy_tokenizer_files(tokenizer_dir: str, out_dir: str):
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, f))]
    if not present:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...) in {tokenizer_dir!r}")
    for name in present:
        shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
