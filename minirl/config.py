"""The training configuration: one tree of small dataclasses, overridable by a JSON file and CLI flags.

Every field is a flag of the same name (`--lr 1e-6`, `--no-numa`) in its section of `--help`, its help,
range and whether --resume may change it next to it (`opt`); train.py takes all, rollout.py its own.
Precedence: dataclass default < the built-in task's train_config.json (no --model) < `--config FILE` <
flags. Values are type-checked, a bad file is one error naming it. `validate` checks the settings, `derive`
works out once the forms the step uses them in (`Derived`). Nothing changes the config after parsing.
"""

import argparse
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from minirl.advantages import AdvantageConfig, check_advantage
from minirl.algorithms import KL_ESTIMATORS, KL_PLACEMENTS, LossConfig, auto_settings
from minirl.attention import BACKENDS
from minirl.backend import MIN_TEMPERATURE, SamplingParams
from minirl.env import load_env, stop_token_id
from minirl.episodes import EpisodeConfig
from minirl.hf import read_json
from minirl.lora import TARGETS, AdapterSpec
from minirl.model import CHECKPOINTING
from minirl.rewards import load_reward

# The built-in tasks: a small model, its data and its settings ship in the repo.
DEFAULT_TASK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_task")
TASKS = {"default": DEFAULT_TASK,  # 2-digit addition (scripts/make_default_model.py)
         "tools": os.path.join(os.path.dirname(DEFAULT_TASK), "tools_task")}  # a calculator tool, multi-turn


def opt(default, help: str, range: str = "", resume: bool = False):
    return field(default=default, metadata={"help": help, "range": range, "resume": resume})


def in_range(value, spec: str) -> bool:
    """Whether `value` lies in `spec`: "[0, inf)", "(0, 1]", "0 or (1, inf)"... NaN and inf lie in none."""
    zero, left, low, high, right = re.fullmatch(r"(0 or )?([\[(])(\S+), (\S+)([\])])", spec).groups()
    above = float(low) < value if left == "(" else float(low) <= value
    return bool(zero) and value == 0 or above and (value < float(high) if right == ")" else value <= float(high))


@dataclass
class DataConfig:
    task: str = opt("default", "built-in task used without --model: default (addition) or tools (a calculator "
                    "tool over several turns); its train_config.json comes before --config")
    model: str = opt("", "HF model dir (config.json, safetensors, tokenizer.json); empty = the built-in --task")
    data: str = opt("", "prompt dataset, .jsonl (or .parquet with pyarrow); empty = the default task's")
    test_data: str = opt("", "held-out prompts for accuracy evaluation (optional)", resume=True)
    prompt_field: str = opt("prompt", "field holding the prompt (a string or a list of chat messages)")
    answer_field: str = opt("answer", "field holding the reference answer handed to the reward")
    chat_template: bool = opt(True, "render prompts with the tokenizer's chat template (--no-chat-template: raw text)")
    max_prompt_len: int = opt(1024, "prompts of more tokens are dropped (the count is reported)", "[1, inf)")
    reward: str = opt("math", "reward: a built-in name (math, exact) or module:function")


@dataclass
class RolloutConfig:
    backend: str = opt("naive", "generator: naive (pure PyTorch) or vllm (colocated; pip install vllm)", resume=True)
    n_samples: int = opt(8, "completions per prompt (the GRPO group size)", "[1, inf)")
    temperature: float = opt(1.0, "sampling temperature (0 = greedy)", f"0 or [{MIN_TEMPERATURE}, inf)")
    top_p: float = opt(1.0, "nucleus sampling mass (1 = off)", "(0, 1]")
    top_k: int = opt(0, "top-k sampling (0 = off)", "[0, inf)")
    max_new_tokens: int = opt(512, "completion length limit", "[1, inf)")
    gen_batch_size: int = opt(0, "rows the naive generator decodes at once, refilled as rows finish (0 = as many as "
                              "90%% of the free GPU memory holds, 64 on CPUs)", "[0, inf)", resume=True)
    tp: int = opt(1, "vLLM tensor-parallel size (one engine replica per group of tp ranks)", "[1, inf)", resume=True)
    vllm_memory: float = opt(0.5, "vLLM's share of GPU memory (weights and KV cache)", "(0, 1]", resume=True)
    keep_generator: bool = opt(False, "keep the generator's weight copy resident during training", resume=True)
    env: str = opt("", "multi-turn episodes with an environment, module:Name or file.py:Name (minirl/env.py); "
                   "it gives the rewards (--reward is unused)")
    max_turns: int = opt(4, "with --env: policy turns per episode at most (finish_reason max_turns)", "[1, inf)")
    episode_tokens: int = opt(0, "with --env: tokens after the prompt per episode, turns and observations "
                              "(finish_reason length; 0 = max_turns x max_new_tokens)", "[0, inf)")


@dataclass
class AlgoConfig:
    """The algorithm (README's table names each value's paper). A setting left on auto (empty, 0 or None)
    takes the published default of the algorithm chosen: algorithms.auto_settings decides, --help says."""

    advantage: str = opt("grpo", "grpo (group mean off, over the group std) | rloo (mean of the other n-1 off) | "
                         "reinforce++ (normalised over the batch, KL in the reward) | reinforce++-baseline "
                         "(group mean off, then normalised over the batch)")
    std_norm: bool | None = opt(None, "divide advantages by the std, the group's (grpo, rloo) or the batch's "
                                "(reinforce++); --no-std-norm: Dr.GRPO. auto: on, off for rloo")
    skip_zero_var: bool = opt(False, "leave groups whose rewards are all equal out of the loss and its normalisers")
    dynamic_sampling: int = opt(0, "DAPO dynamic sampling: redraw the groups whose rewards are all equal, at most "
                                "this many more draws a step, so the step holds --prompts-per-step groups that "
                                "carry signal (0 = off)", "[0, inf)")
    overlong_filter: bool = opt(False, "DAPO: completions cut off by the length limit out of the loss and its "
                                "normalisers")
    overlong_buffer: int = opt(0, "DAPO soft overlong punishment: the reward falls linearly, by up to --overlong-"
                               "penalty, over the last this many tokens before the length limit (0 = off)", "[0, inf)")
    overlong_penalty: float = opt(1.0, "the most the soft overlong punishment takes off a reward", "[0, inf)")
    policy_loss: str = opt("ppo", "ppo (clipped surrogate: PPO, GRPO, DAPO, GSPO) | cispo (REINFORCE weighted by "
                           "a clipped, stop-gradient IS ratio)")
    clip_eps_low: float = opt(0.0, "clip range below 1 (0 = auto: 0.2; GSPO 3e-4; cispo 1: no lower bound)", "[0, 1]")
    clip_eps_high: float = opt(0.0, "clip range above 1 (0 = auto: 0.2; GSPO 4e-4; cispo 3: weights <= 4)", "[0, inf)")
    dual_clip_c: float = opt(0.0, "dual-clip constant c > 1 for negative advantages (0 = off)", "0 or (1, inf)")
    kl_coef: float = opt(0.0, "weight of the KL to the frozen initial policy (0: none, no reference model)", "[0, inf)")
    kl_estimator: str = opt("", "k1 | k2 | k3 (empty = auto: k1 in the reward; in the loss k3, k2 for "
                            "reinforce++-baseline)")
    kl_placement: str = opt("", "loss (a loss term) | reward (a per-token penalty in the reward) (empty = auto: "
                            "reward for reinforce++, else loss)")
    entropy_coef: float = opt(0.0, "entropy bonus coefficient", "[0, inf)")
    loss_agg: str = opt("", "token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (empty = auto: "
                        "token-mean; GSPO seq-mean-token-mean)")
    ratio_level: str = opt("token", "PPO ratio: token | sequence (GSPO) | sequence-token (GSPO-token)")
    tis_cap: float = opt(0.0, "importance sampling against the generator's log-probs: weight cap (0 = off)", "[0, inf)")
    tis_level: str = opt("token", "importance ratio per token, or per sequence (product of its token ratios)")
    tis_mode: str = opt("truncate", "truncate: weight min(ratio, cap); mask: drop tokens/sequences outside [low, cap]")
    tis_low: float = opt(0.0, "lower bound of the importance ratio under --tis-mode mask", "[0, inf)")
    mini_batches: int = opt(1, "optimizer steps per RL step (the rollout split into as many mini-batches)", "[1, inf)")
    ppo_epochs: int = opt(1, "passes over the mini-batches of one rollout (old log-probs computed once)", "[1, inf)")


@dataclass
class OptimConfig:
    lr: float = opt(1e-6, "peak learning rate (AdamW)", "(0, inf)", resume=True)
    weight_decay: float = opt(0.0, "AdamW weight decay", "[0, inf)")
    warmup_steps: int = opt(0, "linear warm-up steps", "[0, inf)", resume=True)
    schedule: str = opt("constant", "after warm-up: constant or cosine (to 10%% of lr)", resume=True)
    grad_clip: float = opt(1.0, "max global gradient norm (0 = off)", "[0, inf)", resume=True)


@dataclass
class ParallelConfig:
    sp: int = opt(1, "Ulysses sequence-parallel size (divides world size and attention heads)", "[1, inf)", resume=True)
    micro_batch_tokens: int = opt(16384, "tokens in one micro-batch of a data-parallel rank", "[1, inf)", resume=True)
    checkpointing: str = opt("selective", "recompute in backward: selective (not matmuls, attention), full or none",
                             resume=True)
    compile: bool = opt(True, "torch.compile each decoder block (GPUs)", resume=True)
    cpu_offload: bool = opt(False, "FSDP2 CPU offload of parameters, gradients and optimizer state", resume=True)
    attn_backend: str = opt("", "force flash | varlen | sdpa (default: best available; env MINIRL_ATTN)", resume=True)
    timeout_s: int = opt(600, "collective timeout in seconds (a hang fails after this)", "[1, inf)", resume=True)
    numa: bool = opt(True, "bind each rank to its GPU's NUMA node (--no-numa to disable)", resume=True)
    trace_collectives: bool = opt(False, "record every collective in ledger/ in out_dir (rollout.py: beside --out), "
                                  "check each step that the ranks issued the same ones, report where they parted "
                                  "on a hang (minirl/ledger.py; compiled blocks stay compiled)", resume=True)


@dataclass
class LoRAConfig:
    lora_rank: int = opt(0, "train LoRA adapters of this rank on a frozen base model (0 = full fine-tuning); "
                         "give it ~10x the full fine-tuning --lr (README: LoRA)", "[0, inf)")
    lora_alpha: float = opt(32.0, "LoRA scale: the adapters' update B A is multiplied by alpha / rank", "(0, inf)")
    lora_targets: str = opt(",".join(TARGETS), "comma-separated projections of every block that get adapters")


@dataclass
class RunConfig:
    steps: int = opt(100, "RL steps (one rollout + one or more optimizer steps each)", "[1, inf)", resume=True)
    prompts_per_step: int = opt(64, "prompts per step, over all ranks", "[1, inf)")
    seed: int = opt(0, "seed for data order, sampling and init: a run is reproducible", "[0, 2147483647]")
    out_dir: str = opt("runs/default", "metrics.jsonl, checkpoints, exported model, reward curve")
    save_every: int = opt(0, "checkpoint every N steps (0 = only at the end and on SIGTERM)", "[0, inf)", resume=True)
    resume: bool = opt(False, "go on from the newest complete checkpoint in out_dir (none: a fresh run); settings "
                       "marked 'may change on --resume' may differ from out_dir/run.json's, others may not")
    keep_checkpoints: int = opt(0, "keep only the N newest checkpoints (0 = keep all)", "[0, inf)", resume=True)
    eval_every: int = opt(0, "held-out greedy accuracy every N steps (0 = before and after)", "[0, inf)", resume=True)
    export: bool = opt(True, "write an HF model dir to out_dir/final at the end", resume=True)


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)


def apply_overrides(cfg: TrainConfig, values: dict, source: str):
    """Set fields from a flat {"lr": ...} or nested {"optim": {"lr": ...}} dict, naming `source` in errors.
    Unknown keys and values of the wrong type are errors (a JSON `"export": "false"` would read as True)."""
    sections = vars(cfg)
    known = {f.name: (section, f.type) for section in sections.values() for f in fields(section)}
    flat = {}
    for k, v in values.items():
        is_section = k in sections and (isinstance(v, dict) or k not in known)  # "data" is a section and a field
        if is_section and not isinstance(v, dict):
            raise ValueError(f"{source}: section {k!r} must be an object of settings, got {type(v).__name__}")
        flat.update(v if is_section else {k: v})
    unknown = sorted(set(flat) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}")
    for k, v in flat.items():
        section, expected = known[k]
        setattr(section, k, _typed(v, expected, f"{source}: {k!r}"))


def _typed(value, expected: type, what: str):
    """`value` if it is an `expected` (an int is accepted as a float), else a ValueError naming `what`.
    True is not an int here (Python's bool is one), nor 1 a yes/no answer."""
    if expected == bool | None:  # a yes/no left to the algorithm when None (auto)
        if value is None:
            return None
        expected = bool
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{what} must be {expected.__name__}, got {value!r} ({type(value).__name__})")


def build_parser(cfg: TrainConfig, description: str, only: dict[str, tuple[str, ...]] | None = None,
                 ) -> argparse.ArgumentParser:
    """A flag per field of `cfg` (of the sections and fields in `only`, when given), with its range and the
    default a bare run uses (the built-in task's train_config.json's, where it sets one) in `--help`."""
    bare = read_config_file(os.path.join(DEFAULT_TASK, "train_config.json"))
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", default="", help="JSON file of settings (flat or by section); flags override it")
    for name, section in vars(cfg).items():
        group = p.add_argument_group(name)
        for f in fields(section):
            if only is not None and f.name not in only.get(name, ()):
                continue
            default = getattr(section, f.name)
            shown = ("auto" if default is None else f"{default!r}") if f.name not in bare else (
                f"{bare[f.name]!r} from the built-in task's train_config.json, {default!r} with --model")
            notes = [f"range {f.metadata['range']}"] if f.metadata["range"] else []
            notes += ["may change on --resume"] if f.metadata["resume"] else []
            yes_no = f.type in (bool, bool | None)
            kind = dict(action=argparse.BooleanOptionalAction) if yes_no else dict(type=type(default))
            group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, dest=f.name,
                               help=f.metadata["help"] + f" ({'; '.join([*notes, f'default: {shown}'])})", **kind)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_const", const="none",
                   help=argparse.SUPPRESS)
    return p


def parse_config(argv=None, description: str = "") -> TrainConfig:
    """train.py's command line: every field a flag (`config_from_args`)."""
    return config_from_args(vars(build_parser(TrainConfig(), description).parse_args(argv)))


def config_from_args(args: dict, cfg: TrainConfig | None = None) -> TrainConfig:
    """`cfg` (default: the dataclass defaults), then --config FILE, then the flags given in `args`. Without
    --model (in the flags or the file), the --task's train_config.json comes first, and its model and data
    fill in what is left empty: how a bare `train.py` runs the default task, `--task tools` the other."""
    cfg = cfg or TrainConfig()
    values = read_config_file(config_file) if (config_file := args.pop("config", "")) else {}
    flat = {**values, **{k: v for part in values.values() if isinstance(part, dict) for k, v in part.items()}}
    if (task := TASKS.get(name := args.get("task", flat.get("task", "default")))) is None:
        raise ValueError(f"unknown --task {name!r}: one of {', '.join(TASKS)}")
    if "model" not in args and "model" not in flat:
        apply_overrides(cfg, read_config_file(os.path.join(task, "train_config.json")), f"--task {name}")
    apply_overrides(cfg, values, config_file)
    apply_overrides(cfg, args, "command line")
    if not cfg.data.model:
        cfg.data.model = task
        cfg.data.data = cfg.data.data or os.path.join(task, "train.jsonl")
        cfg.data.test_data = cfg.data.test_data or os.path.join(task, "test.jsonl")
    return cfg


def read_config_file(path: str) -> dict:
    """The JSON object in `path`; a missing file, bad JSON or a non-object is one error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    return read_json(path)


# ---------------------------------------------------------------------------------------------------
# Checked and derived settings


def validate(cfg: TrainConfig):
    """Every number in its range (NaN and inf in none), and batch sizes and choices that would otherwise fail
    or do harm mid-run: one clear ValueError at start-up. (`dist.check_parallel_or_exit`: the layout.)"""
    for section in vars(cfg).values():
        for f in fields(section):
            if (spec := f.metadata["range"]) and not in_range(value := getattr(section, f.name), spec):
                raise ValueError(f"--{f.name.replace('_', '-')} must be {'' if spec[0] == '0' else 'in '}{spec}, "
                                 f"got {value!r}")  # "must be in [0, inf)", "must be 0 or (1, inf)"
    rc, algo, n = cfg.rollout, cfg.algo, cfg.run.prompts_per_step * cfg.rollout.n_samples
    budget = sample_budget(rc)
    for bad, message in [
        (not cfg.data.data, "--data is required with --model"),
        (n % algo.mini_batches,
         f"prompts_per_step x n_samples = {n} samples do not split into --mini-batches {algo.mini_batches}"),
        (rc.backend not in ("naive", "vllm"), f"unknown --backend {rc.backend!r}: naive or vllm"),
        (rc.backend == "vllm" and importlib.util.find_spec("vllm") is None,
         "--backend vllm needs vLLM, which is not installed: pip install vllm"),
        (cfg.optim.schedule not in ("constant", "cosine"),
         f"unknown --schedule {cfg.optim.schedule!r}: constant or cosine"),
        (cfg.parallel.checkpointing not in CHECKPOINTING, f"--checkpointing: one of {', '.join(CHECKPOINTING)}"),
        (cfg.parallel.attn_backend not in ("", *BACKENDS),
         f"unknown --attn-backend {cfg.parallel.attn_backend!r}: one of {', '.join(BACKENDS)}"),
        # The algorithm's combinations that would do nothing, or not what they say:
        (algo.kl_placement not in ("", *KL_PLACEMENTS) or algo.kl_estimator not in ("", *KL_ESTIMATORS),
         f"--kl-placement is one of {KL_PLACEMENTS} and --kl-estimator one of {KL_ESTIMATORS}, "
         f"got {algo.kl_placement!r} and {algo.kl_estimator!r}"),
        ((algo.kl_placement or algo.kl_estimator) and not algo.kl_coef,
         "--kl-placement and --kl-estimator need --kl-coef > 0, the weight of the KL"),
        (algo.dynamic_sampling and rc.n_samples < 2,
         "--dynamic-sampling K redraws groups of equal rewards: a group of one always has them"),
        (algo.overlong_buffer and not (algo.overlong_buffer <= budget and algo.overlong_penalty > 0),
         f"--overlong-buffer must be in [1, {budget}] (the length limit) and --overlong-penalty > 0, got "
         f"{algo.overlong_buffer} and {algo.overlong_penalty}")]:
        if bad:
            raise ValueError(message)
    if rc.env:
        load_env(rc.env)  # importable, and makes a well-formed env
    adapter_spec(cfg)  # checks the --lora-* flags
    check_advantage(algo.advantage, rc.n_samples)
    loss_config(algo)  # checks loss_agg, the clip, dual_clip_c, ratio_level, policy_loss and the tis_* settings


def loss_config(algo: AlgoConfig) -> LossConfig:
    """The policy loss's settings, auto ones resolved (`algorithms.auto_settings`); a flag's 0 ("off") is the
    loss's None. With the KL in the reward the loss has no KL term (its estimator still names `kl_ref`'s)."""
    auto = auto_settings(algo.advantage, algo.policy_loss, algo.ratio_level, algo.kl_placement)
    return LossConfig(policy_loss=algo.policy_loss, clip_eps_low=algo.clip_eps_low or auto["clip_eps_low"],
                      clip_eps_high=algo.clip_eps_high or auto["clip_eps_high"], dual_clip_c=algo.dual_clip_c or None,
                      kl_coef=algo.kl_coef if auto["kl_placement"] == "loss" else 0.0,
                      kl_estimator=algo.kl_estimator or auto["kl_estimator"], entropy_coef=algo.entropy_coef,
                      agg=algo.loss_agg or auto["loss_agg"], ratio_level=algo.ratio_level, tis_cap=algo.tis_cap or None,
                      tis_level=algo.tis_level, tis_mode=algo.tis_mode, tis_low=algo.tis_low)


def advantage_config(cfg: TrainConfig) -> AdvantageConfig:
    """How rewards become advantages, auto settings resolved (`algorithms.auto_settings`)."""
    algo = cfg.algo
    auto = auto_settings(algo.advantage, algo.policy_loss, algo.ratio_level, algo.kl_placement)
    in_reward = auto["kl_placement"] == "reward"
    return AdvantageConfig(algo.advantage, cfg.rollout.n_samples,
                           auto["std_norm"] if algo.std_norm is None else algo.std_norm,
                           algo.kl_coef if in_reward else 0.0, algo.kl_estimator or auto["kl_estimator"],
                           algo.overlong_buffer, algo.overlong_penalty, sample_budget(cfg.rollout))


def adapter_spec(cfg: TrainConfig) -> AdapterSpec | None:
    """The LoRA adapters the policy trains (minirl/lora.py), checked; None for full fine-tuning."""
    return AdapterSpec.from_flags(cfg.lora.lora_rank, cfg.lora.lora_alpha, cfg.lora.lora_targets, cfg.run.seed)


def sampling_params(rollout: RolloutConfig, greedy: bool = False) -> SamplingParams:
    """How rollouts sample; `greedy` for held-out evaluation (argmax, same length limit)."""
    if greedy:
        return SamplingParams(rollout.max_new_tokens, temperature=0.0)
    return SamplingParams(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k)


def compiled_blocks(pc: ParallelConfig, device_type: str) -> bool:
    """Whether the decoder blocks are torch.compile'd: on GPUs unless --no-compile. (--trace-collectives'
    ledger sees the collectives of compiled code too: minirl/ledger.py.)"""
    return pc.compile and device_type == "cuda"


def sample_budget(rc: RolloutConfig) -> int:
    """Tokens after the prompt a sample may hold: a completion's max_new_tokens, or with --env, an
    episode's budget (its turns and observations). Also the constant length of seq-mean-token-sum-norm."""
    return (rc.episode_tokens or rc.max_turns * rc.max_new_tokens) if rc.env else rc.max_new_tokens


@dataclass(frozen=True)
class Derived:
    """The settings in the forms the step uses, worked out once before the first step (`derive`) and
    handed down, so that nothing in the step calls back into config.py or env.py. A value that follows
    from several flags, the tokenizer or the hardware (an "auto" default) is added here."""

    loss: LossConfig
    advantage: AdvantageConfig
    sampling: SamplingParams  # the rollouts'
    greedy: SamplingParams  # held-out evaluation: argmax, the same length limit
    sample_budget: int
    reward: Callable[[int, str, str, str], float] | None  # checked (rewards.load_reward); None: no --reward
    episodes: EpisodeConfig | None  # with --env: the environment, its stop token id and the limits
    adapters: AdapterSpec | None  # with --lora-rank: the LoRA adapters the policy trains


def derive(cfg: TrainConfig, tok) -> Derived:
    """`Derived` for a validated config; `tok` turns an environment's stop text into its token id."""
    rc, episodes = cfg.rollout, None
    if rc.env:
        episodes = EpisodeConfig(rc.env, load_env(rc.env), stop_token_id(rc.env, tok), rc.max_turns, sample_budget(rc))
    return Derived(loss_config(cfg.algo), advantage_config(cfg), sampling_params(rc), sampling_params(rc, greedy=True),
                   sample_budget(rc), load_reward(cfg.data.reward) if cfg.data.reward else None, episodes,
                   adapter_spec(cfg))
