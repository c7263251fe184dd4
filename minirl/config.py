"""The training configuration: one tree of small dataclasses, overridable by a JSON file and CLI flags.

Every field becomes a flag of the same name (`--lr 1e-6`, `--sp 2`, `--no-numa`), grouped by section in
`--help`, with the help text kept next to the field. Precedence: dataclass default < `--config FILE`
< flags given on the command line.
"""

import argparse
import json
from dataclasses import asdict, dataclass, field, fields


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    model: str = opt("", "HF model dir (config.json, safetensors, tokenizer.json); empty = the built-in default task")
    data: str = opt("", "prompt dataset, .jsonl (or .parquet with pyarrow); empty = the default task's")
    test_data: str = opt("", "held-out prompts for accuracy evaluation (optional)")
    prompt_field: str = opt("prompt", "field holding the prompt (a string or a list of chat messages)")
    answer_field: str = opt("answer", "field holding the reference answer handed to the reward")
    chat_template: bool = opt(True, "render prompts with the tokenizer's chat template (--no-chat-template: raw text)")
    max_prompt_len: int = opt(1024, "prompts longer than this many tokens are dropped (the count is reported)")
    reward: str = opt("math", "reward: a built-in name (math, exact) or module:function")


@dataclass
class RolloutConfig:
    backend: str = opt("naive", "generator: naive (pure PyTorch) or vllm (colocated, needs vllm installed)")
    n_samples: int = opt(8, "completions per prompt (the GRPO group size)")
    temperature: float = opt(1.0, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    max_new_tokens: int = opt(512, "completion length limit")
    gen_batch_size: int = opt(64, "rows per generation batch (more prompts are processed in chunks)")
    tp: int = opt(1, "vLLM tensor-parallel size (one engine replica per group of tp ranks)")
    vllm_memory: float = opt(0.5, "vLLM's share of GPU memory (weights + KV cache); leave room for training")
    keep_generator: bool = opt(False, "keep the generator's weight copy resident during training")


@dataclass
class AlgoConfig:
    std_norm: bool = opt(True, "divide group advantages by the group std (--no-std-norm: Dr.GRPO)")
    clip_eps_low: float = opt(0.2, "PPO clip range below 1")
    clip_eps_high: float = opt(0.2, "PPO clip range above 1")
    dual_clip_c: float = opt(0.0, "dual-clip constant c > 1 for negative advantages (0 = off)")
    kl_coef: float = opt(0.0, "k3 KL penalty to the frozen initial policy (0 = no reference model)")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient")
    loss_agg: str = opt("token-mean", "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm")
    tis_cap: float = opt(0.0, "truncated importance sampling cap against generator log-probs (0 = off)")


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear warm-up steps")
    schedule: str = opt("constant", "after warm-up: constant or cosine (to 10%% of lr)")
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)")


@dataclass
class ParallelConfig:
    sp: int = opt(1, "Ulysses sequence-parallel size (divides world size and attention heads)")
    micro_batch_tokens: int = opt(16384, "token budget of one packed micro-batch per data-parallel rank")
    checkpointing: bool = opt(True, "activation checkpointing inside each decoder block")
    compile: bool = opt(False, "torch.compile each decoder block (GPU; 1.3x faster training steps on an H100)")
    cpu_offload: bool = opt(False, "FSDP2 CPU offload of parameters, gradients and optimizer state")
    attn_backend: str = opt("", "force flash | varlen | sdpa (default: best available; env MINIRL_ATTN)")
    timeout_s: int = opt(600, "collective timeout in seconds (a hang fails after this)")
    numa: bool = opt(True, "bind each rank to its GPU's NUMA node (--no-numa to disable)")
    trace_collectives: bool = opt(False, "record every collective in out_dir/ledger, check each step that the ranks "
                                  "issued the same ones, report where they parted on a hang (minirl/ledger.py)")


@dataclass
class RunConfig:
    steps: int = opt(100, "RL steps (one rollout + one or more optimizer steps each)")
    prompts_per_step: int = opt(64, "prompts per step, over all ranks")
    mini_batches: int = opt(1, "optimizer steps per RL step (the rollout split into this many mini-batches)")
    seed: int = opt(0, "seed for data order, sampling and init: a run is reproducible")
    out_dir: str = opt("runs/default", "metrics.jsonl, checkpoints, exported model, reward curve")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end and on SIGTERM)")
    resume: bool = opt(False, "resume from the latest checkpoint in out_dir")
    eval_every: int = opt(0, "held-out greedy accuracy every N steps (0 = before and after only)")
    export: bool = opt(True, "write an HF model dir to out_dir/final at the end")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _sections(cfg: TrainConfig):
    for sec in fields(cfg):
        yield sec.name, getattr(cfg, sec.name)


def apply_overrides(cfg: TrainConfig, values: dict, source: str):
    """Set fields from a flat {"lr": ...} or nested {"optim": {"lr": ...}} dict; unknown keys are errors."""
    flat = {}
    for k, v in values.items():
        flat.update(v if isinstance(v, dict) and k in dict(_sections(cfg)) else {k: v})
    known = {f.name: section for _, section in _sections(cfg) for f in fields(section)}
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}")
    for k, v in flat.items():
        setattr(known[k], k, v)


def build_parser(cfg: TrainConfig, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="", help="JSON file of settings (flat or by section); flags override it")
    for name, section in _sections(cfg):
        group = p.add_argument_group(name)
        for f in fields(section):
            default = getattr(section, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(default, bool):
                group.add_argument(flag, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                                   help=f.metadata["help"] + f" (default: {default})")
            else:
                group.add_argument(flag, default=argparse.SUPPRESS, type=type(default), dest=f.name,
                                   help=f.metadata["help"] + f" (default: {default!r})")
    return p


def parse_config(argv=None, description: str = "", default_job: str | None = None) -> TrainConfig:
    """Defaults, then --config FILE, then flags. With neither --config nor --model, the JSON file
    `default_job` stands in for --config: that is how a bare `train.py` runs the built-in task."""
    cfg = TrainConfig()
    args = vars(build_parser(cfg, description).parse_args(argv))
    config_file = args.pop("config") or ("" if "model" in args else default_job)
    if config_file:
        with open(config_file) as fh:
            apply_overrides(cfg, json.load(fh), config_file)
    apply_overrides(cfg, args, "command line")
    return cfg

