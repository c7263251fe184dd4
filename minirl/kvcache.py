"""The static KV cache of generation and the attention of a cached step (model.Attention.forward_step).

The cache is preallocated once and written in place, so a decode step has fixed shapes and can be
captured as a CUDA graph. A step attends either through SDPA with an additive mask over a prefix of
the cache (prefill, and every step on a CPU), or, for a one-token step on a GPU, through FlexAttention
with a block mask built from each row's own position: each row then reads its own filled slots, not
the batch's longest, which is what a continuous batch of rows of very different lengths needs.
`rows_for_memory` says how many rows of generation fit in the memory free on a GPU.
"""

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KVCache:
    """Static per-layer key/value cache: row b's token at absolute position p lives at [layer][b, :, p]."""

    k: torch.Tensor  # [L, B, Hkv, S_max, D]
    v: torch.Tensor  # [L, B, Hkv, S_max, D]

    @classmethod
    def empty(cls, cfg, batch: int, max_len: int, dtype, device) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, start: int, end: int) -> "KVCache":
        """Rows start..end-1, sharing this cache's memory (each layer's slice stays contiguous)."""
        return KVCache(self.k[:, start:end], self.v[:, start:end])


MEMORY_FRACTION = 0.9  # of the free GPU memory, for the cache and decode buffers of a batch sized by memory


def rows_for_memory(cfg, width: int, max_new_tokens: int, free_bytes: int, dtype_bytes: int = 2) -> int:
    """How many rows of generation (model.ModelConfig `cfg`) fit in MEMORY_FRACTION of `free_bytes`: each
    needs its KV cache (k and v of every layer, `width` slots) and its share of a decode step's buffers:
    over the vocabulary the logits in the model's dtype and three fp32 temporaries (probabilities, their
    cumulative sum, one more); per token its uniform number (float64), token (int64) and log-prob (fp32).
    E.g. Qwen3-0.6B in bf16 is 112 KiB a slot: a 128-token prompt and 2,048 new tokens take 240 MiB a row,
    so 60 GiB free hold 230 rows."""
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * width * dtype_bytes
    step = cfg.vocab_size * (dtype_bytes + 3 * 4) + (max_new_tokens + 1) * (8 + 8 + 4)
    return max(1, int(MEMORY_FRACTION * free_bytes) // (kv + step))


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can take: free on the device, plus what torch's allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def decode_mask(input_pos: torch.Tensor, max_len: int, dtype) -> torch.Tensor:
    """Additive attention mask of a cached step, built once for all layers: [B, 1, S, max_len]. A query at
    position p sees slots 0..p of its own row (its prompt, then generated tokens); stale ones above, not."""
    slots = torch.arange(max_len, device=input_pos.device)
    allowed = slots[None, None, None, :] <= input_pos[:, None, :, None]  # [B, 1, S, max_len]
    return torch.zeros(allowed.shape, dtype=dtype, device=input_pos.device).masked_fill_(~allowed, float("-inf"))


FLEX_BLOCK = 64  # cache slots per block of a FlexAttention block mask; a GPU cache's width is a multiple of it


def decode_blocks(input_pos: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block mask of a one-token step for FlexAttention, as tensors built once for all layers.

    Row b reads the blocks of FLEX_BLOCK slots up to its own position p_b (the last one masked slot by
    slot, see flex_decode): num_blocks [B, 1, 1] = p_b // FLEX_BLOCK + 1, and block_order lists every
    block in order, [B, 1, 1, max_len / FLEX_BLOCK]. A row costs its own length, not the batch's longest.
    """
    if max_len % FLEX_BLOCK:
        raise ValueError(f"FlexAttention reads a cache whose width is a multiple of {FLEX_BLOCK}, not {max_len}")
    B, n = input_pos.shape[0], max_len // FLEX_BLOCK
    num = (input_pos[:, -1] // FLEX_BLOCK + 1).to(torch.int32).view(B, 1, 1)
    order = torch.arange(n, dtype=torch.int32, device=input_pos.device).expand(B, 1, 1, n).contiguous()
    return num, order


def flex_decode(q, k_cache, v_cache, num_blocks, block_order, input_pos) -> torch.Tensor:
    """FlexAttention of one-token queries q [B, H, 1, Hd] over the cache [B, Hkv, S_max, Hd], with the
    block mask of decode_blocks: row b reads its blocks, and in the last one the slots up to its
    position input_pos [B, 1]. Built inside the compiled function, so that one compile serves every
    cache width (see compiled_flex_decode)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def visible(b, h, q_idx, kv_idx):
        return kv_idx <= input_pos[b, q_idx]

    blocks = BlockMask.from_kv_blocks(num_blocks, block_order, BLOCK_SIZE=FLEX_BLOCK, mask_mod=visible,
                                      seq_lengths=(q.shape[2], k_cache.shape[2]), compute_q_blocks=False)
    return flex_attention(q, k_cache, v_cache, block_mask=blocks, enable_gqa=True)


@functools.cache
def compiled_flex_decode():
    """flex_decode compiled into FlexAttention's decoding kernel (Triton): static shapes, which that kernel
    wants, except for the cache width (marked dynamic at each call): one compile per batch size."""
    return torch.compile(flex_decode, dynamic=False)


@functools.cache
def flex_decode_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether FlexAttention's decoding kernel compiles here and agrees with SDPA, checked once on a
    small cache. Where it does not (a GPU or torch its Triton kernels fail on), a one-token step reads
    the whole cache through SDPA instead: slower on rows of very different lengths, never wrong."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for shape in
               [(2, 4, 1, 64), (2, 2, 2 * FLEX_BLOCK, 64), (2, 2, 2 * FLEX_BLOCK, 64)])  # [B, H(kv), S, Hd]
    pos = torch.tensor([[3], [2 * FLEX_BLOCK - 1]], device=device)  # [B, 1]: one row per block count
    try:
        out = compiled_flex_decode()(q, k, v, *decode_blocks(pos, k.shape[2]), pos)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=decode_mask(pos, k.shape[2], dtype), enable_gqa=True)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        return True
    except Exception as e:  # noqa: BLE001 (any failure of the kernel means: do not use it)
        print(f"warning: FlexAttention decoding does not work on {device} ({type(e).__name__}: {str(e)[:200]}); "
              "decode steps read the whole cache through SDPA", file=sys.stderr, flush=True)
        return False


@torch.compiler.disable
def cached_attention(q, k, v, input_pos, k_cache, v_cache, mask) -> torch.Tensor:
    """Write a step's keys/values into the cache, then attend: q [B, S, H, Hd] -> [B, S, H * Hd].

    `mask` is decode_mask's additive mask, whose width is the number of slots SDPA reads, or, for a
    one-token step on a GPU, decode_blocks' block mask (FlexAttention reads each row's own slots).
    Eager even in a compiled block: compiled, the in-place writes and the attention made a batch-256
    decode step four times slower.
    """
    B, S, Hkv, Hd = k.shape
    idx = input_pos[:, None, :, None].expand(B, Hkv, S, Hd)  # [B, Hkv, S, Hd]
    k_cache.scatter_(2, idx, k.transpose(1, 2))
    v_cache.scatter_(2, idx, v.transpose(1, 2))
    if isinstance(mask, tuple):
        num_blocks, block_order = mask
        for x, dim in ((k_cache, 2), (v_cache, 2), (block_order, 3)):
            torch._dynamo.maybe_mark_dynamic(x, dim)
        with torch._dynamo.config.patch(recompile_limit=64):  # a compile per batch size: more than dynamo's 8
            o = compiled_flex_decode()(q.transpose(1, 2), k_cache, v_cache, num_blocks, block_order, input_pos)
    else:
        n = mask.shape[-1]  # slots read
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask,
                                           enable_gqa=True)  # [B, H, S, Hd]
    return o.transpose(1, 2).flatten(2)  # o: [B, H, S, Hd]
