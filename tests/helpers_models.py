"""Tiny random Hugging Face models of each supported family, the reference for parity tests.

Each family exercises its own switch: Llama with Llama 3 RoPE rescaling (with a short original
context, so positions of a test already fall in the rescaled band), Qwen2 with q/k/v bias and tied
embeddings, Qwen3 with per-head q/k norm, 4:1 grouped-query attention and a head_dim that is not
hidden_size / heads. Weights are re-drawn so that logits are O(1) and attention is far from uniform,
and norm weights and biases are random rather than 1 and 0: a swapped, dropped or mis-scaled norm or
bias then changes the output visibly instead of by nothing.
"""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from minirl.model import ModelConfig, Transformer

FAMILIES = ("llama", "qwen2", "qwen3")
VOCAB = 97  # deliberately not a power of two


def hf_config(family: str, **overrides):
    """A tiny transformers config of `family`; keyword arguments override any field."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        kwargs = dict(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope, tie_word_embeddings=False)
        return LlamaConfig(**{**common, **kwargs, **overrides})
    if family == "qwen2":
        kwargs = dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
        return Qwen2Config(**{**common, **kwargs, **overrides})
    if family == "qwen3":
        kwargs = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
        return Qwen3Config(**{**common, **kwargs, **overrides})
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def hf_model(family: str, seed: int = 0, **overrides):
    """A random fp32 transformers model of `family` in eval mode, using plain SDPA attention."""
    cfg = hf_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:  # [out, in] and the [V, D] embedding (tied: it is also the output layer)
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def save_hf_model(out_dir: str, family: str, seed: int = 0, max_shard_size=None, **overrides):
    """Write a random model with transformers' own `save_pretrained`; returns the model.

    With `max_shard_size` (e.g. "20KB") the weights are split into shards plus an index json.
    """
    model = hf_model(family, seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kwargs)
    return model


def minirl_model(hf) -> Transformer:
    """Our model holding the same weights as a transformers model, without going through files.

    Independent of minirl.hf on purpose: the model tests do not depend on checkpoint I/O.
    """
    model = Transformer(ModelConfig.from_hf(hf.config.to_dict()))
    state = {name.removeprefix("model."): t for name, t in hf.state_dict().items()}
    if model.lm_head is None:
        state.pop("lm_head.weight", None)  # tied: the same tensor as the embedding
    model.load_state_dict(state)
    return model


def packed_batch(lengths, vocab: int = VOCAB, seed: int = 0):
    """Random documents of the given lengths packed into one sequence.

    Returns (input_ids [T], position_ids [T], docs): position ids restart at 0 for every document,
    and docs is the list of the separate [L_i] token tensors.
    """
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])
    return torch.cat(docs), positions, docs
