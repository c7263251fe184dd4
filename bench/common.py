"""What every benchmark needs: the model shapes, the two ceilings of the device, timing, output.

A benchmark number means little without the device's own ceilings next to it, so the scripts measure
them at the start of a run instead of trusting a datasheet:
- `matmul_tflops`: a large bf16 matrix product (the rate the tensor cores reach through cuBLAS);
- `copy_bandwidth`: a large device-to-device copy, counting bytes read plus bytes written.
Times come from CUDA events around the region after warm-up runs, and the median of several
repetitions is reported (on CPU, `time.perf_counter`).

Output: each script prints a short table last and writes JSON to `--out`, by default
`$OUT/<name>.json` when $OUT is set, else `bench/results/<name>.json`. Every JSON file carries a
"summary" list of headline rows ({"what", "value", "unit"}) that `bench/summary.py` collects.
"""

import itertools
import json
import math
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from minirl.model import ModelConfig, Transformer, init_weights

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))

# Dense bf16 tensor-core rate from the vendor datasheets (no sparsity), in FLOP/s; first match of the
# device name wins, so the PCIe and NVL variants come before the SXM part's plain "H100".
DATASHEET_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12))

# HF-style config.json fields of the shapes the benchmarks use (random weights; only shapes matter).
_COMMON = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
               max_position_embeddings=40960)
SHAPES = {
    "qwen3-0.6b": dict(_COMMON, model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-1.7b": dict(_COMMON, model_type="qwen3", hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "qwen3-4b": dict(_COMMON, model_type="qwen3", hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "qwen2.5-1.5b": dict(_COMMON, model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                         max_position_embeddings=32768),
    # For --tiny smoke runs on CPU: every switch of a real shape (GQA, q/k norm, tied), seconds to run.
    "tiny": dict(_COMMON, model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def model_config(shape: str) -> ModelConfig:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {sorted(SHAPES)}")
    return ModelConfig.from_hf(SHAPES[shape])


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts from a model built on the meta device (no memory).

    "embedding" is the input embedding; "non_embedding" is everything else except an untied
    output head, i.e. the decoder blocks and the final norm (the N of the 6*N*T rule).
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding - head}


def random_model(cfg: ModelConfig, device: torch.device, seed: int = 0) -> Transformer:
    """An fp32 model with minirl's `init_weights`, drawn directly on `device`.

    init_weights without a seed draws with torch.randn on the default device, which the device
    context makes `device`: on a GPU that takes a blink, where a seeded CPU generator needs about
    20 s per billion parameters.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
        init_weights(model)
    return model


def causal_attention_flops(doc_lens: list[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention over packed documents, one layer: 4 * sum(L^2 / 2) * H * D.

    Two matrix products (QK^T and PV) of 2 FLOPs per multiply-add, over the half of each L x L
    score matrix that causality keeps. Backward is 2.5x this (five products instead of two).
    """
    return 4.0 * sum(L * L / 2 for L in doc_lens) * heads * head_dim


# ---------------------------------------------------------------------------------------------------
# Device, timing, ceilings


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, cuda=torch.version.cuda, sms=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1))
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def datasheet_bf16(device: torch.device) -> float | None:
    """The datasheet dense bf16 rate of this GPU, when it is one we know; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((rate for key, rate in DATASHEET_BF16 if key in name), None)


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Run `fn` `warmup` times untimed, then `reps` times, each timed alone; milliseconds per run.

    On CUDA each run sits between two events recorded on the current stream, and the host reads
    them only after all runs (no sync inside the loop). On CPU it is the host clock.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    sync(device)
    return [start.elapsed_time(end) for start, end in events]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul rate, TFLOP/s: n x n x n products on random data, rotating 3 input pairs.

    bf16 on CUDA (the tensor-core ceiling the model's matmuls chase); fp32 on CPU, where bf16 has
    no fast path and the figure only serves to make --tiny runs print something.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
             for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    rotation = itertools.cycle(pairs)

    def run():
        a, b = next(rotation)
        torch.matmul(a, b, out=out)

    ms = median(time_ms(run, device, warmup=3, reps=reps))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, reps: int = 20) -> float:
    """Measured device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, reps=reps))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def profile_table(fn, device: torch.device, title: str, path: str | None, rows: int = 20) -> str:
    """Run `fn` once under torch.profiler; write to `path` (None: no file, e.g. ranks other than 0) and
    return its top operators by self and by total GPU time (CPU time on a CPU): where the time goes."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    averages = prof.key_averages()
    keys = ("self_device_time_total", "device_time_total") if device.type == "cuda" else \
        ("self_cpu_time_total", "cpu_time_total")
    table = "".join(f"{title}: top {rows} operators by {key}\n{averages.table(sort_by=key, row_limit=rows)}\n\n"
                    for key in keys)
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            f.write(table)
        print(f"wrote {path}", flush=True)
    return table


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------------
# Output


def out_path(name: str, given: str | None) -> str:
    """Where a benchmark writes its JSON: --out, else $OUT/<name>.json, else bench/results/<name>.json."""
    if given:
        return given
    folder = os.environ.get("OUT") or os.path.join(BENCH_DIR, "results")
    return os.path.join(folder, f"{name}.json")


def write_json(path: str, payload: dict):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1)
    print(f"wrote {path}", flush=True)


def fmt(x) -> str:
    """A table cell: floats with 3-4 significant figures, None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if x == 0 or 1e-2 <= abs(x) < 1e5:
            return f"{x:.4g}"
        return f"{x:.2e}"
    return str(x)


def print_table(title: str, columns: list[str], rows: list[list]):
    """A plain fixed-width table; the last thing each benchmark prints."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in cells)) if cells else len(col) for i, col in enumerate(columns)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(col.rjust(w) for col, w in zip(columns, widths)))
    print(line)
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(flush=True)


def csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def csv_strs(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


# ---------------------------------------------------------------------------------------------------
# Workloads


def lognormal_lengths(n: int, median: float, sigma: float, cap: int, seed: int) -> list[int]:
    """n completion lengths exp(N(log median, sigma^2)), rounded, in [1, cap]: long-tailed, as RL
    completions are (most end after a few hundred tokens, a few run to the limit); seeded."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.float64).log_normal_(math.log(median), sigma, generator=g)
    return x.round().clamp(1, cap).long().tolist()


def length_stats(lengths: list[int], cap: int) -> dict:
    """Mean, p50, p90, p99, the fraction at the cap and the total of a list of lengths."""
    x = torch.tensor(lengths, dtype=torch.float64)
    p50, p90, p99 = torch.quantile(x, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"mean": x.mean().item(), "p50": p50, "p90": p90, "p99": p99,
            "capped_frac": (x >= cap).double().mean().item(), "total": int(x.sum().item())}
