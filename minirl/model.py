"""One decoder-only transformer for the Llama, Qwen2 and Qwen3 families, as their HF config.json defines them.

The three families differ only in small switches: Qwen2 adds a bias to q/k/v, Qwen3 RMS-normalises
each head of q and k, Llama 3 rescales RoPE frequencies. Module and parameter names follow the HF
layout (`model.layers.0.self_attn.q_proj.weight` is `layers.0.self_attn.q_proj.weight` here), so
loading a checkpoint is a prefix strip (see hf.py).

Two ways to run it:
- `forward(input_ids, position_ids, meta)` on a PACKED batch, 1-D [T] tokens of several sequences,
  for training and scoring. Returns hidden states [T, D], or per-token log-probs when given targets.
- `forward_step(tokens, input_pos, cache)` on a [B, S] batch with a static KV cache, for generation
  (`fill_cache` for prefill: the same without the logits).
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from minirl.attention import AttnMeta, kernel_ops, varlen_attention
from minirl.kvcache import KVCache, cached_attention, decode_blocks, decode_mask, flex_decode_works
from minirl.logprobs import token_logprobs

FAMILIES = ("llama", "qwen2", "qwen3")
CHECKPOINTING = ("selective", "full", "none")  # what a decoder block keeps for backward (Block)


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only {"rope_type": "llama3", ...} is supported
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama's attention_bias)
    qk_norm: bool = False  # Qwen3
    max_position_embeddings: int = 4096

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read an HF config.json dict; anything this model does not implement is a clear error."""
        mt = hf.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"unsupported model_type {mt!r}; minirl supports {FAMILIES}")
        problems = []
        if hf.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act={hf['hidden_act']!r} (only 'silu')")
        if hf.get("mlp_bias"):
            problems.append("mlp_bias=true")
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=true")
        # transformers >= 5 writes rope_parameters; older files have rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            problems.append(f"rope_type={rope_type!r} (only 'default' and 'llama3')")
        if problems:
            raise ValueError(f"{mt} config has options minirl does not support: " + "; ".join(problems))
        heads = hf["num_attention_heads"]
        return cls(
            model_type=mt, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=rope if rope_type == "llama3" else None,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)), qk_norm=mt == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 4096))

    def to_hf(self) -> dict:
        """The config.json that transformers and vLLM read back as this same model."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        hf = {
            "architectures": [arch[self.model_type]], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings, "max_position_embeddings": self.max_position_embeddings,
        }
        if self.rope_scaling:
            hf["rope_scaling"] = rope
        if self.model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
        return hf


# ---------------------------------------------------------------------------------------------------
# RoPE


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with Llama 3's long-context rescaling when configured. Computed
    on the fly, not a buffer: `model.to(torch.bfloat16)` would round it, shifting positions past a few k."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    if not cfg.rope_scaling:
        return inv
    s = cfg.rope_scaling
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    smooth = ((old_len / wavelen) - lo) / (hi - lo)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_len / lo, inv / factor, inv)
    is_mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(is_mid, mid, out)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions (any shape P) -> two [*P, D] tensors in `dtype`."""
    freqs = positions.float()[..., None] * rope_inv_freq(cfg, positions.device)  # [*P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [*P, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x [..., H, D] by position; cos/sin are [..., D] (broadcast over H)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # torch's own kernel: one launch instead of eight (a decode step runs four norms per layer), with
        # the statistics in fp32 as HF computes them. HF rounds to x's dtype before scaling by the
        # weight, this rounds once after: the two differ by at most one rounding in bf16.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, Hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_heads * Hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, self.n_kv * Hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, self.n_kv * Hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * Hd, D, bias=False)
        self.q_norm = RMSNorm(Hd, cfg.rms_norm_eps) if cfg.qk_norm else None  # Qwen3
        self.k_norm = RMSNorm(Hd, cfg.rms_norm_eps) if cfg.qk_norm else None

    def project(self, x):
        """x [..., D] -> q [..., H * Hd], k, v [..., Hkv * Hd] (generate.FusedAttention does it in one matmul)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def qkv(self, x, cos, sin):
        """Project, (Qwen3) normalise per head, rotate. x: [..., D] -> q [..., H, Hd], k/v [..., Hkv, Hd]."""
        q, k, v = self.project(x)
        q = q.unflatten(-1, (self.n_heads, self.head_dim))
        k = k.unflatten(-1, (self.n_kv, self.head_dim))
        v = v.unflatten(-1, (self.n_kv, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, meta: AttnMeta):
        """Packed: x [t, D] (this rank's slice of the sequence under SP) -> [t, D]."""
        q, k, v = self.qkv(x, cos, sin)  # [t, H, Hd], [t, Hkv, Hd]
        if meta.sp_group is None:
            o = varlen_attention(q, k, v, meta.cu_seqlens, meta.max_seqlen, meta.backend)
        else:
            from minirl import ulysses
            o = ulysses.attention(q, k, v, meta)
        return self.o_proj(o.flatten(-2))

    def forward_step(self, x, cos, sin, input_pos, k_cache, v_cache, mask):
        """Cached: x [B, S, D] at positions input_pos [B, S]; caches [B, Hkv, S_max, Hd]; mask from
        decode_mask, whose width is the number of cache slots read."""
        q, k, v = self.qkv(x, cos, sin)  # [B, S, H, Hd], [B, S, Hkv, Hd]
        return self.o_proj(cached_attention(q, k, v, input_pos, k_cache, v_cache, mask))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@functools.cache
def _collectives() -> list:
    """Ulysses' all-to-all (ulysses.py), the functional op that eager and compiled code both call."""
    return [torch.ops._c10d_functional.all_to_all_single.default]


@functools.cache
def _kept_ops() -> list:
    return [torch.ops.aten.mm.default, torch.ops.aten.addmm.default, *kernel_ops(), *_collectives()]


def keep_matmuls_and_attention():
    """Selective checkpointing's contexts: the outputs of matmuls (nn.Linear is mm, or addmm with a bias),
    of the attention kernels and of the all-to-alls are saved; every other op is recomputed in backward."""
    return create_selective_checkpoint_contexts(_kept_ops())


def keep_collectives():
    """Full checkpointing's contexts: everything is recomputed but the all-to-alls, whose outputs are saved.

    From torch 2.14 a compiled block never recomputes a collective (the partitioner keeps them), so an eager
    one must not either: a rank whose block runs eagerly (a graph break, dynamo's recompile limit) would
    issue an all-to-all in backward that the compiled ranks do not, and the job would hang (scripts/README.md,
    compile_reorder). Named in the policy, it is kept by eager and compiled blocks on every torch. The price,
    with sp > 1 only: the all-to-alls' outputs stay in memory."""
    return create_selective_checkpoint_contexts(_collectives())


class Block(nn.Module):
    """One decoder layer, with activation checkpointing by `self.checkpointing` (one of CHECKPOINTING):

    - "none":      backward reads every activation forward saved (the most memory);
    - "full":      forward keeps only the block's input (and the all-to-alls' outputs, see keep_collectives)
                   and backward runs the block again (the least memory, a second forward of every matmul
                   and of attention);
    - "selective": forward keeps the outputs of the matmuls and of attention, backward recomputes only
                   what lies between them (norms, RoPE, SwiGLU, residual adds): memory-bound work that
                   costs a few % of the step, so the step runs near "none"'s speed in less memory.

    The checkpoint lives inside the block's own forward, so under FSDP2 recompute runs with parameters
    already unsharded and cast. A compiled block partitions its graph by the policy; an eager one (CPU,
    --no-compile) applies it op by op from Python, which costs more than it saves on tiny documents.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = "none"

    def _forward(self, x, cos, sin, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, meta: AttnMeta):
        if self.checkpointing == "none" or not torch.is_grad_enabled():
            return self._forward(x, cos, sin, meta)
        keep = keep_matmuls_and_attention if self.checkpointing == "selective" else keep_collectives
        return checkpoint(self._forward, x, cos, sin, meta, use_reentrant=False, context_fn=keep)

    def forward_step(self, x, cos, sin, input_pos, k_cache, v_cache, mask):
        x = x + self.self_attn.forward_step(self.input_layernorm(x), cos, sin, input_pos, k_cache, v_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        """The [V, D] unembedding matrix (the input embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, position_ids, meta: AttnMeta, targets=None, temperature=1.0,
                top_k=0, top_p=1.0, chunk_size=4096):
        """Packed forward. input_ids/position_ids: [t] (this rank's slice under SP).

        Without targets: hidden states [t, D] after the final norm. With targets [t]: (log-probs [t],
        entropy [t]) of the targets under the processed distribution, in chunks (no [t, V] fp32 logits),
        inside forward so that FSDP2 has the output weight unsharded.
        """
        h = self.embed_tokens(input_ids)  # [t, D]
        cos, sin = rope_cos_sin(self.cfg, position_ids, h.dtype)  # [t, Hd]
        for layer in self.layers:
            h = layer(h, cos, sin, meta)
        h = self.norm(h)
        if targets is None:
            return h
        return token_logprobs(h, self.output_weight(), targets, temperature, top_k, top_p, chunk_size)

    def forward_step(self, tokens, input_pos, cache: KVCache, kv_len: int | None = None,
                     block_step=Block.forward_step) -> torch.Tensor:
        """Incremental forward for generation: tokens/input_pos [B, S] -> logits [B, S, V], in the model's
        dtype (the sampler upcasts them inside its fused kernels: no pass over [B, S, V] fp32)."""
        h = self.fill_cache(tokens, input_pos, cache, kv_len, block_step)  # [B, S, D]
        return self.norm(h) @ self.output_weight().t()

    def fill_cache(self, tokens, input_pos, cache: KVCache, kv_len: int | None = None,
                   block_step=Block.forward_step) -> torch.Tensor:
        """Run the layers on tokens at input_pos [B, S], writing their keys/values into the cache; returns
        the last layer's hidden states [B, S, D] (prefill needs no logits: GBs for long prompts).

        Attention reads the first `kv_len` cache slots (default: all), which must cover input_pos; without
        kv_len, a one-token step on a GPU reads each row's own slots up to its position (FlexAttention).
        `block_step` runs one layer (`Block.forward_step`, or the generator's compiled version of it).
        """
        h = self.embed_tokens(tokens)  # [B, S, D]
        cos, sin = rope_cos_sin(self.cfg, input_pos, h.dtype)  # [B, S, Hd]
        one_token_on_gpu = tokens.is_cuda and tokens.shape[1] == 1
        if kv_len is None and one_token_on_gpu and flex_decode_works(tokens.device, h.dtype):
            mask = decode_blocks(input_pos, cache.k.shape[3])  # ([B, 1, 1], [B, 1, 1, blocks])
        else:
            mask = decode_mask(input_pos, kv_len or cache.k.shape[3], h.dtype)  # [B, 1, S, kv_len]
        for i, layer in enumerate(self.layers):
            h = block_step(layer, h, cos, sin, input_pos, cache.k[i], cache.v[i], mask)
        return h

    def set_checkpointing(self, policy: str):
        """Activation checkpointing of every decoder block: "selective", "full" or "none" (see Block)."""
        if policy not in CHECKPOINTING:
            raise ValueError(f"unknown checkpointing {policy!r}: one of {', '.join(CHECKPOINTING)}")
        for layer in self.layers:
            layer.checkpointing = policy


def init_weights(model: Transformer, std: float = 0.02, seed: int | None = None):
    """Random init for models built from scratch (benchmarks, the embedded default task)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
