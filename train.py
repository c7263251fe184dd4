"""Train a policy with GRPO/PPO on verifiable rewards. Read top to bottom: it is the data flow.

    torchrun --nproc-per-node 2 train.py                                  # the built-in default task
    torchrun --nproc-per-node 8 train.py --model DIR --data FILE --sp 2   # a real model
    python train.py --help                                                # every flag

Works on GPUs (NCCL) and on CPUs (gloo); multi-node is plain torchrun (--nnodes, --rdzv-endpoint).
"""

import contextlib
import faulthandler
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from minirl import checkpoint, outdir, report
from minirl.attention import pick_backend
from minirl.config import Derived, TrainConfig, derive, parse_config, validate
from minirl.data import PromptDataset
from minirl.dist import Dist, agree, check_parallel_or_exit, distributed
from minirl.fsdp import build_sharded
from minirl.hf import check_weights, load_state_dict_from_dir, read_config
from minirl.model import ModelConfig
from minirl.numa import bind_to_gpu_node
from minirl.rollouts import evaluate, make_generator
from minirl.tokenizer import Tokenizer
from minirl.trainer import Policy, rl_step, sync_weights


# Steps in a row that skipped an update for a NaN/inf gradient before the run stops: the model is not
# learning, and a run that cannot recover should not go on burning compute.
MAX_SKIPPED_STEPS = 3
# How long a rank other than 0 that found bad inputs leaves rank 0 to report them (see `main`).
QUIET_RANK_WAIT_S = 10


def main(argv=None):
    """Parse and check everything, then train inside the process group. Exit codes (each rank's; torchrun
    exits 0 when all ranks did, else 1): 0 the run finished (or, resumed, had finished already);
    1 it failed mid-run (an error agreed by every rank, one `error:` line); 2 bad input, found before
    any process group started (one `error:` line); 130 / 143 (128 + SIGINT / SIGTERM) a signal stopped
    it, after saving the last finished step."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:  # everything that can be wrong with the inputs fails here, before any process group or weights
        cfg = parse_config(argv, description=__doc__.splitlines()[0])
        inputs = load_inputs(cfg)
    except (ValueError, FileNotFoundError) as e:
        if not rank0:
            # Rank 0 reads the same inputs and speaks for all; when it fails, torchrun ends this rank. Leaving
            # first would let torchrun end rank 0 before it printed. Still here: only this rank's inputs
            # are bad (per-node paths), so it speaks for itself.
            time.sleep(QUIET_RANK_WAIT_S)
        print(f"error: {e}" if rank0 else f"error (rank {os.environ['RANK']}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if inputs is None:  # resumed a finished run: nothing to do (load_inputs said so)
        return
    ledger_dir = os.path.join(cfg.run.out_dir, "ledger")
    if cfg.parallel.trace_collectives:
        from minirl import ledger  # a debugging tool: imported only when asked for
        ledger.flight_recorder_env(ledger_dir)  # read when the process group is created
    with (distributed(cfg.parallel.sp, cfg.parallel.timeout_s, cpu_collectives=cfg.parallel.cpu_offload) as d,
          trace_collectives(cfg, d, ledger_dir) as traced):
        try:
            stopped = run(cfg, d, *inputs, traced)
        except (ValueError, OSError) as e:
            # Raised on every rank together (a reward error, non-finite steps, a failed checkpoint save or
            # load: each agreed through a collective), so rank 0 speaks for all.
            if d.is_main:
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
    if stopped:  # leave now: the interpreter's teardown of torch can take seconds of torchrun's grace
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + stopped)  # a shell's code for a process ended by that signal: not finished, not failed


def load_inputs(cfg: TrainConfig) -> tuple[ModelConfig, Tokenizer, PromptDataset, PromptDataset | None, Derived] | None:
    """Check and read everything a run needs before it starts: the settings, the layout against the model,
    the weights' files, the out dir (and a resumed run's settings), the tokenizer, the prompts, the reward
    and environment (`config.derive`); rank 0 prints the notes. A problem is a ValueError or
    FileNotFoundError naming it. None: --resume found the run finished, with nothing left to do."""
    validate(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_cfg = read_config(cfg.data.model)
    check_parallel_or_exit(world, cfg.parallel.sp, model_cfg)
    check_weights(cfg.data.model)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    out = outdir.check_out_dir(cfg.run.out_dir, cfg.run.resume, world, lock=rank0)  # rank 0 holds its lock
    if out.step > cfg.run.steps:
        raise ValueError(f"--steps {cfg.run.steps} is below step {out.step}, the checkpoint --resume goes on from in "
                         f"{cfg.run.out_dir}; pass --steps {out.step} or more")
    if out.step == cfg.run.steps:
        if rank0:
            print(f"note: the run in {cfg.run.out_dir} finished its {out.step} steps: nothing to resume "
                  f"(pass a larger --steps to train on)", flush=True)
        return None
    tok = Tokenizer.from_dir(cfg.data.model)
    ds = derive(cfg, tok)
    dc, notes = cfg.data, [out.note] if out.note else []
    if dc.chat_template and not tok.has_chat_template:
        notes.append(f"note: {dc.model} has no chat template; prompts are used as raw text")
    data, test = (PromptDataset(path, tok, dc.prompt_field, dc.answer_field, dc.chat_template and tok.has_chat_template,
                                dc.max_prompt_len, cfg.run.seed) if path else None for path in (dc.data, dc.test_data))
    longest = max(len(p.token_ids) for p in data.prompts) + ds.sample_budget - 1
    if longest > cfg.parallel.micro_batch_tokens:
        raise ValueError(f"--micro-batch-tokens {cfg.parallel.micro_batch_tokens} cannot hold the longest prompt "
                         f"with its completion ({longest} tokens); raise it or lower --max-new-tokens/--max-prompt-len")
    if data.missing_answers:
        notes.append(f"warning: {data.missing_answers} of {dc.data}'s rows have no {dc.answer_field!r} "
                     f"field; their rewards compare against an empty answer")
    if cfg.rollout.n_samples == 1 and cfg.algo.advantage == "grpo":
        notes.append("warning: --n-samples 1: every GRPO advantage is 0 (a group of one), so nothing is learned")
    if cfg.algo.ratio_level != "token" and ds.loss.agg == "token-mean":
        notes.append("warning: --loss-agg token-mean under GSPO (--ratio-level sequence*) counts each sequence once "
                     "per token, so long ones weigh more; GSPO's objective is seq-mean-token-mean (its auto default)")
    if out.step:  # a resume: the same run, or an error
        notes.append(outdir.check_resume(cfg, data, out.step))
    if rank0:
        outdir.save_run(cfg, data)
        for line in notes:
            print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)
    return model_cfg, tok, data, test, ds


def trace_collectives(cfg: TrainConfig, d: Dist, ledger_dir: str):
    """--trace-collectives: every collective of every rank in ledger_dir; stacks before the timeout."""
    if not cfg.parallel.trace_collectives:
        return contextlib.nullcontext()
    from minirl import ledger
    return ledger.Ledger(ledger_dir, d.rank, labels={"sp": d.sp_group, "fsdp": d.fsdp_mesh.get_group()},
                         stall_s=0.75 * cfg.parallel.timeout_s)


def run(cfg: TrainConfig, d: Dist, model_cfg, tok, data, test, ds: Derived, traced=None) -> int:
    """Train; returns 0, or the signal that ended the run early (after saving a checkpoint)."""
    if cfg.parallel.numa and d.device.type == "cuda":
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        bind_to_gpu_node(d.rank, local_rank, local_world, d.device)
    torch.manual_seed(cfg.run.seed)
    log = print if d.is_main else (lambda *a, **k: None)
    if data.dropped:
        log(f"data: dropped {data.dropped} prompts longer than {cfg.data.max_prompt_len} tokens")
    log(f"world {d.world} = dp {d.dp_size} x sp {d.sp_size} on {d.device}; model {cfg.data.model}")

    policy = build_policy(model_cfg, cfg, ds, d)
    ckpt_dir = os.path.join(cfg.run.out_dir, "checkpoints")
    # A vLLM engine must shut down before the process group does (its shutdown tears groups down).
    with contextlib.closing(make_generator(cfg, model_cfg, tok, d.device)) as generator:
        start = 0
        if cfg.run.resume:
            state = checkpoint.load_latest(ckpt_dir, policy.model, policy.optimizer, policy.scheduler)
            if state is not None:
                start = state.step
                data.load_state_dict(state.data_state)
                set_peak_lr(policy, cfg.optim.lr)
                log(f"resumed from step {start}")
        sync_weights(policy, generator)

        metrics = report.MetricsLog(cfg.run.out_dir, start_step=start) if d.is_main else None
        if test is not None and start == 0:
            acc0 = evaluate(generator, test.prompts, d, cfg.rollout, ds, tok)
            log(f"held-out accuracy before training: {acc0:.1%}")
            write_row(metrics, {"step": 0, "test_accuracy": acc0}, d)

        interrupt, acc = report.Interrupt(d.device), None
        saved = start  # the newest checkpoint on disk (0: none needed, nothing has changed yet)
        step_bar = tqdm(range(start, cfg.run.steps), desc="steps", disable=not d.is_main,
                        initial=start, total=cfg.run.steps)
        skipped = 0  # steps in a row that skipped an update
        for step in step_bar:
            drawn = data.state_dict()  # the data order before this step's prompts: --resume redoes the step
            try:
                row = rl_step(policy, generator, data, step, d, cfg, ds, tok, progress=d.is_main, interrupt=interrupt)
            except report.Interrupted as e:  # on every rank together, before the step changed the model
                policy.optimizer.zero_grad(set_to_none=True)  # the micro-batches' gradients so far
                if step > saved:
                    checkpoint.save(ckpt_dir, step, policy.model, policy.optimizer, policy.scheduler, drawn,
                                    keep=cfg.run.keep_checkpoints)
                log(f"stopped by signal during step {step + 1}; " + (
                    f"saved step {step}, the last finished one: --resume runs step {step + 1} again"
                    if step else "no step had finished: nothing to save"))
                return e.signum
            if traced is not None:  # every rank issued the same collectives this step, or fail here
                traced.check_step(step + 1)
            acc = None
            if test is not None and cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0:
                acc = row["test_accuracy"] = evaluate(generator, test.prompts, d, cfg.rollout, ds, tok)
            write_row(metrics, row, d)
            if d.is_main:
                step_bar.write(report.summary_line(row))

            skipped = skipped + 1 if row["skipped_updates"] else 0
            if skipped == MAX_SKIPPED_STEPS:  # the same value on every rank: all stop together
                raise ValueError(f"steps {step + 2 - skipped}-{step + 1} each skipped an update for a NaN or inf "
                                 f"loss/gradient norm ({MAX_SKIPPED_STEPS} steps in a row); check the rewards, "
                                 f"lower --lr, or resume from the last checkpoint")
            last = step + 1 == cfg.run.steps
            stopping = interrupt.any_rank()  # a signal that came after the step could no longer be abandoned
            if stopping or last or (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0):
                checkpoint.save(ckpt_dir, step + 1, policy.model, policy.optimizer, policy.scheduler,
                                data.state_dict(), keep=cfg.run.keep_checkpoints)
                saved = step + 1
            if stopping:
                log(f"stopped by signal after step {step + 1}; checkpoint saved, resume with --resume")
                return stopping

        if test is not None:
            if acc is None:  # not already evaluated at the last step
                acc = evaluate(generator, test.prompts, d, cfg.rollout, ds, tok)
                write_row(metrics, {"step": cfg.run.steps, "test_accuracy": acc}, d)
            log(f"held-out accuracy after training: {acc:.1%}")
        if cfg.run.export:
            final, adapter_dir = (os.path.join(cfg.run.out_dir, name) for name in ("final", "adapter"))
            checkpoint.export_hf(policy.model, model_cfg, final, cfg.data.model, adapter_dir=adapter_dir,
                                 base_model=os.path.abspath(cfg.data.model))  # the adapters too, with LoRA
            log(f"exported {final}" + (f" and {adapter_dir}" if ds.adapters else ""))
        if d.is_main:
            report.plot_rewards(metrics.path, os.path.join(cfg.run.out_dir, "reward_curve.png"))
    return 0


def write_row(metrics: report.MetricsLog | None, row: dict, d: Dist) -> None:
    """Rank 0 appends `row` to metrics.jsonl; a write that fails there (a full disk) is raised on every
    rank together (a collective), so that no rank is left waiting for rank 0."""
    error = ""
    if d.is_main:
        try:
            metrics.write(row)
        except OSError as e:
            error = str(e)
    if error := agree(error):
        raise OSError(error)


def build_policy(model_cfg: ModelConfig, cfg: TrainConfig, ds: Derived, d: Dist) -> Policy:
    """The FSDP2-sharded policy, the frozen reference (only with a KL penalty; with LoRA the policy with its
    adapters off), AdamW of the trainable parameters and its lr schedule: linear warm-up, then constant or
    cosine decay to 10% of the peak lr."""
    weights = load_state_dict_from_dir(cfg.data.model)
    model = build_sharded(model_cfg, weights, d, cfg.parallel, train=True, adapters=ds.adapters)
    ref_model = None
    if cfg.algo.kl_coef:
        ref_model = model if ds.adapters else build_sharded(model_cfg, weights, d, cfg.parallel, train=False)
    del weights
    oc, updates = cfg.optim, cfg.run.steps * cfg.algo.mini_batches * cfg.algo.ppo_epochs
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=oc.lr,
                                  weight_decay=oc.weight_decay)

    def lr_multiplier(update: int) -> float:
        if update < oc.warmup_steps:
            return (update + 1) / oc.warmup_steps
        if oc.schedule == "constant":
            return 1.0
        progress = (update - oc.warmup_steps) / max(1, updates - oc.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return Policy(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier), ref_model,
                  pick_backend(d.device, cfg.parallel.attn_backend or None))


def set_peak_lr(policy: Policy, lr: float) -> None:
    """This run's peak `lr`, at the point of the schedule a resumed checkpoint holds: the checkpoint restores
    the saved run's lr, and --resume may change it (and the schedule, which `build_policy`'s multiplier reads)."""
    scheduler = policy.scheduler
    scheduler.base_lrs = [lr] * len(policy.optimizer.param_groups)
    for group, multiplier in zip(policy.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * multiplier(scheduler.last_epoch)


if __name__ == "__main__":
    faulthandler.enable()  # a rank killed by a signal (SIGSEGV, gloo's SIGABRT) prints every thread's stack
    main()
