"""Reproduce the hang blamed on "a collective inside gradient-checkpoint recompute", and show what really hangs.

The report: FSDP2 + Ulysses SP + non-reentrant activation checkpointing hung in backward, stuck right
after an all_gather of position_ids that every attention call issues (so it re-runs in recompute).
A collective in recompute is harmless by itself: every rank re-issues it, in the same order. Ranks
hang when they issue DIFFERENT collectives, and recompute is one way to get there. Each scenario
runs one forward + backward of minirl's own model (model.py, ulysses.py, fsdp.py; all ranks form one
SP group, FSDP shards over all of them) and records every collective each rank issues:

- count      minirl as is (pregather: document boundaries computed once, before the model call), or with
             naive attention (`GatheringAttention`, swapped in at build time: each call all_gathers the
             position_ids, as the peers do), which adds one all_gather per layer to forward and one to
             recompute, identical on every rank: both complete, with the same loss.
- tail_skew  mechanism A, early stop. Non-reentrant checkpoint stops recomputing once the last tensor
             saved in forward is rebuilt, so a collective after a rank's last saved tensor is skipped
             on that rank only. Here each layer ends with a tail that looks up document lengths (in
             naive mode: another position gather) and then saves a tensor only if this rank holds
             tokens of a long document. naive fails; pregather and --no-early-stop complete.
- fsdp_moe   mechanism B, MoE + FSDP2. The MLP is a mixture of experts that skips experts with no
             tokens (as HF's MoE layers do); one SP rank never routes a token to the last expert, so
             its FSDP2 post-backward reduce-scatter leaves out that expert's gradients and is smaller
             than the other ranks'. Both modes fail; --all-experts (idle experts run on zero tokens,
             so their gradients are zeros, not missing) and --reduce-unused (FSDP2's own switch,
             `set_reduce_scatter_unused_params`) complete.

Fail fast: every collective has a timeout (--timeout); each rank records its collectives with
minirl.ledger in OUT/ledger/rank{r}.jsonl, line by line BEFORE issuing them, so after a crash or a
kill the files still show where the ranks parted; a stack dump of every thread comes when no
collective has started for 3/4 of the timeout. The first rank that fails prints the first
collective on which the ledgers differ (`python -m minirl.ledger OUT/ledger` does it afterwards).

    torchrun --nproc-per-node 2 scripts/repro_recompute_hang.py --scenario tail_skew --mode naive
    python scripts/repro_recompute_hang.py --scenario tail_skew --mode naive   # launches torchrun itself
    python scripts/repro_recompute_hang.py --all                # every case, then a table

Exit status: 0 completed, 1 failed and the ledgers show where the ranks diverged, 2 bad usage,
3 failed with identical ledgers (not a collective mismatch). Under torchrun the ranks exit with
these codes; torchrun itself then reports 1 for any failure.
"""

import argparse
import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import set_checkpoint_early_stop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `python scripts/...` from anywhere, without installing minirl

from minirl import dist as mdist  # noqa: E402
from minirl.attention import AttnMeta, cu_seqlens_from_positions, pick_backend  # noqa: E402
from minirl.fsdp import shard_model  # noqa: E402
from minirl.ledger import (Divergence, Ledger, first_divergence, flight_recorder_env, group_labels,  # noqa: E402
                           read_ledgers)
from minirl.model import MLP, Attention, Block, ModelConfig, Transformer, init_weights  # noqa: E402
from minirl.ulysses import local_slice, shard_micro_batch  # noqa: E402

def gather_tokens(x_local: torch.Tensor, group, pad: int = 0) -> torch.Tensor:
    """Per-token values of the whole micro-batch from every rank's slice: [t, ...] -> [T, ...], without
    the last `pad` entries (the padding `shard_micro_batch` added). The peers' way to get document
    boundaries inside attention: an all-gather that activation recompute issues again."""
    sp = dist.get_world_size(group)
    x_local = x_local.detach().contiguous()
    out = x_local.new_empty((sp * x_local.shape[0], *x_local.shape[1:]))  # [T, ...]
    dist.all_gather_into_tensor(out, x_local, group=group)
    return out[:out.shape[0] - pad]


SCENARIOS = ("count", "tail_skew", "fsdp_moe")
MODES = ("naive", "pregather")
COMPLETED, FAILED, UNEXPLAINED = 0, 1, 3  # exit codes; argparse exits 2 on bad usage
OUTCOMES = {COMPLETED: "completed", FAILED: "failed fast", UNEXPLAINED: "failed, no divergence"}
PHASES = ("forward", "recompute", "backward")

LONG_DOC = 4  # tail_skew: documents at least this long get the extra tail op
N_EXPERTS, TOP_K = 4, 2  # fsdp_moe
MARKER = 1  # fsdp_moe: the token id routed to the last expert; it only occurs in rank 0's slice
HAS_REDUCE_UNUSED = hasattr(FSDPModule, "set_reduce_scatter_unused_params")  # torch 2.13 has it, 2.11 not


# ---------------------------------------------------------------------------------------------------
# What the ledgers show


def phase_counts(ledger: list[dict]) -> dict[tuple[str, str, str, str], int]:
    """How many collectives of each (phase, group, op, dtype) one rank issued."""
    counts = {}
    for e in ledger:
        if "op" in e:
            key = (e["phase"], e["group"], e["op"], e["dtype"])
            counts[key] = counts.get(key, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------
# The scenarios: minirl's model, with a toy tail (tail_skew) or a toy MoE MLP (fsdp_moe).


def tiny_config(n_layers: int) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, qk_norm=True, rope_theta=1000.0)


@dataclass
class InLayerMeta(AttnMeta):
    """AttnMeta plus this rank's own position_ids, for attention that rebuilds the boundaries itself."""

    local_position_ids: torch.Tensor | None = None  # [t]


def in_layer_meta(meta: AttnMeta, local_position_ids: torch.Tensor) -> InLayerMeta:
    return InLayerMeta(**{f.name: getattr(meta, f.name) for f in fields(AttnMeta)},
                       local_position_ids=local_position_ids)


def gathered_meta(meta: InLayerMeta) -> AttnMeta:
    """The peers' way: all_gather the position_ids of the whole micro-batch and find the documents
    again, here, inside the layer (and so inside its checkpoint: it runs again in recompute)."""
    cu_seqlens, max_seqlen = cu_seqlens_from_positions(gather_tokens(meta.local_position_ids, meta.sp_group))
    return AttnMeta(cu_seqlens, max_seqlen, meta.backend, meta.sp_group)


class GatheringAttention(Attention):
    """minirl's attention, but ignoring the precomputed boundaries: the naive mode's attention."""

    def forward(self, x, cos, sin, meta: InLayerMeta):
        return super().forward(x, cos, sin, gathered_meta(meta))


class DocTail(nn.Module):
    """tail_skew's layer tail: an extra op on tokens of long documents, skipped where there are none.

    Skipping work that no token needs is an ordinary shortcut, but it makes the number of tensors
    the checkpointed region saves depend on this rank's tokens. The document lengths come from the
    FULL micro-batch's boundaries: precomputed (pregather) or rebuilt from an all_gather of the
    position_ids right here (naive), i.e. after the rank's last unconditionally saved tensor.
    """

    long_tokens = 0  # of the last call, for the report

    def forward(self, x: torch.Tensor, meta: AttnMeta) -> torch.Tensor:  # [t, D] -> [t, D]
        if isinstance(meta, InLayerMeta):
            meta = gathered_meta(meta)
        lengths = meta.cu_seqlens.diff()  # [B]
        per_token = lengths.repeat_interleave(lengths)  # [T]: each token's document length
        sp_rank, sp = dist.get_rank(meta.sp_group), dist.get_world_size(meta.sp_group)
        long = local_slice(per_token, sp_rank, sp) >= LONG_DOC  # [t]
        self.long_tokens = int(long.sum())  # for the report
        if self.long_tokens:  # data-dependent: saves silu's input and the mask only on some ranks
            x = x + F.silu(x) * long[:, None]
        return x


class TailSkewBlock(Block):
    """minirl's decoder layer followed by DocTail, all inside the block's checkpoint."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.tail = DocTail()

    def _forward(self, x, cos, sin, meta):
        return self.tail(super()._forward(x, cos, sin, meta), meta)


class MoE(nn.Module):
    """Top-k mixture of minirl MLPs that, like HF's MoE layers, runs only experts that got tokens.

    An expert that runs on no token of this rank has no gradient here; with `run_idle` it runs on
    an empty batch instead, so its gradient exists (all zeros) on every rank.
    """

    def __init__(self, cfg: ModelConfig, run_idle: bool):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, N_EXPERTS, bias=False)
        self.experts = nn.ModuleList(MLP(cfg) for _ in range(N_EXPERTS))
        self.run_idle = run_idle
        self.tokens_per_expert: list[int] = []  # of the last call, for the report

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [t, D] -> [t, D]
        weight, chosen = self.gate(x).float().softmax(-1).topk(TOP_K, dim=-1)  # [t, k], [t, k]
        out = torch.zeros_like(x)
        self.tokens_per_expert = []
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # [n_e] each
            self.tokens_per_expert.append(token.numel())
            if token.numel() == 0 and not self.run_idle:
                continue
            y = expert(x[token]) * weight[token, slot, None].to(x.dtype)  # [n_e, D]
            out = out.index_add(0, token, y)
        return out


def route_marker_to_last_expert(model: Transformer):
    """Make fsdp_moe's routing certain: the last expert takes the MARKER tokens and nothing else.

    Channel 0 of every token embedding is -1, +1 for MARKER, and dominates the RMS-normalised hidden
    state; the last expert's gate row reads channel 0 only, so its score is large for MARKER tokens
    and very negative for all others. (In a real run an expert goes idle on one rank by chance.)
    """
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] = -1.0
        model.embed_tokens.weight[MARKER, 0] = 1.0
        for layer in model.layers:
            row = layer.mlp.gate.weight[-1]
            row.zero_()
            row[0] = 2.0


def build_model(scenario: str, run_idle: bool, gather_in_layer: bool) -> Transformer:
    cfg = tiny_config(n_layers=2)
    model = Transformer(cfg)
    if scenario == "tail_skew":
        model.layers = nn.ModuleList(TailSkewBlock(cfg) for _ in range(cfg.num_hidden_layers))
    if gather_in_layer:
        for layer in model.layers:
            layer.self_attn = GatheringAttention(cfg)
    if scenario == "fsdp_moe":
        for layer in model.layers:
            layer.mlp = MoE(cfg, run_idle)
    init_weights(model, std=0.1, seed=0)
    if scenario == "fsdp_moe":
        route_marker_to_last_expert(model)
    return model


def micro_batch(scenario: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [T], position_ids [T]) of one packed micro-batch, the same on every rank.

    tail_skew: a long document fills the first half, short ones the second, so the ranks of the
    second half hold no long document. fsdp_moe: MARKER tokens at positions 1 and 3 only, which
    are in rank 0's slice for any sp up to 4.
    """
    lengths = {"count": [7, 1, 11], "tail_skew": [8, 2, 2, 2, 2], "fsdp_moe": [9, 7]}[scenario]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(MARKER + 1, 97, (sum(lengths),), generator=g)
    if scenario == "fsdp_moe":
        ids[[1, 3]] = MARKER
    pos = torch.cat([torch.arange(n) for n in lengths])
    return ids, pos


def run_scenario(args, d: mdist.Dist, ledger: Ledger):
    """One forward + backward of the scenario's model on this rank's slice, every collective recorded."""
    naive = args.mode == "naive"
    model = build_model(args.scenario, run_idle=args.all_experts, gather_in_layer=naive)
    # As training runs: bf16 compute on GPUs (torch's varlen kernel takes 16-bit inputs only), fp32 on CPU.
    shard_model(model, d.fsdp_mesh, mixed_precision=d.device.type == "cuda", cpu_offload=False, checkpointing=True)
    if args.reduce_unused:
        model.set_reduce_scatter_unused_params(True)
    ids, pos = (x.to(d.device) for x in micro_batch(args.scenario))
    lids, lpos, meta, _ = shard_micro_batch(ids, pos, d.sp_rank, d.sp_size, pick_backend(d.device), d.sp_group)
    if naive:
        meta = in_layer_meta(meta, lpos)
    targets = torch.roll(lids, -1)  # [t]: any tokens do, only the collectives of backward matter
    with set_checkpoint_early_stop(not args.no_early_stop):
        logprobs, _ = model(lids, lpos, meta, targets=targets)
        if args.scenario == "count":
            ledger.note(f"loss share: {-logprobs.sum().item():.6f}")
        if args.scenario == "tail_skew":
            ledger.note(f"tokens of documents >= {LONG_DOC} long: {model.layers[0].tail.long_tokens}")
        if args.scenario == "fsdp_moe":
            load = [block.mlp.tokens_per_expert for block in model.layers]
            ledger.note(f"tokens per expert, per layer: {load}")
        (-logprobs.sum()).backward()


# ---------------------------------------------------------------------------------------------------
# One rank under torchrun.


def worker(args) -> int:
    rank = int(os.environ["RANK"])
    ledger_dir = os.path.join(args.out_dir, "ledger")
    if rank == 0 and os.path.isdir(ledger_dir):  # a reused --out-dir: no rank gets past init before it is clear
        for name in os.listdir(ledger_dir):
            os.remove(os.path.join(ledger_dir, name))
    if args.detail:  # read when the process group is created, so it must be set before init
        os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
        dist.set_debug_level_from_env()
    if torch.cuda.is_available():
        flight_recorder_env(ledger_dir)
    mdist.init_process_group(args.timeout)
    d = mdist.build_dist(sp=dist.get_world_size())
    try:
        with Ledger(ledger_dir, rank, labels={"sp": d.sp_group, "fsdp": d.fsdp_mesh.get_group()},
                    stall_s=0.75 * args.timeout) as ledger:
            run_scenario(args, d, ledger)
        code = COMPLETED
    except Exception:  # a timeout, a gloo size mismatch, a DETAIL mismatch report; the ledger printed it
        code = FAILED if first_divergence(read_ledgers(ledger_dir)) else UNEXPLAINED
    if code == COMPLETED:
        dist.barrier()  # all ledgers are complete
        if rank == 0:
            report_completed(ledger_dir)
    del d  # no mesh or FSDP state may outlive the group (see minirl.dist.shutdown)
    gc.collect()
    dist.destroy_process_group()
    return code


def notes(ledgers: list[list[dict]]) -> str:
    return "".join(f"  rank {r}: {e['note']}\n" for r, ledger in enumerate(ledgers) for e in ledger if "note" in e)


def report_completed(ledger_dir: str):
    ledgers = read_ledgers(ledger_dir)
    labels = group_labels(ledgers)
    same = first_divergence(ledgers) is None
    print(f"completed; ledgers {'identical on all ranks' if same else 'DIFFER'} ({ledger_dir})\n{notes(ledgers)}"
          f"  {'phase':10s} {'group':8s} {'op':22s} {'dtype':8s} count (rank 0)")
    for (phase, group, op, dtype), n in sorted(phase_counts(ledgers[0]).items(),
                                              key=lambda kv: PHASES.index(kv[0][0])):
        print(f"  {phase:10s} {labels.get(group, group):8s} {op:22s} {dtype:8s} {n}")


# ---------------------------------------------------------------------------------------------------
# Launcher: torchrun per case, then the ledgers decide.


@dataclass
class Case:
    scenario: str
    mode: str
    flags: tuple[str, ...]
    expect: int | None = None  # COMPLETED or FAILED: what --all and the tests check

    @property
    def name(self) -> str:
        return " ".join((self.mode, *self.flags))


CASES = [
    Case("count", "naive", (), COMPLETED),
    Case("count", "pregather", (), COMPLETED),
    Case("tail_skew", "naive", (), FAILED),
    Case("tail_skew", "pregather", (), COMPLETED),
    Case("tail_skew", "naive", ("--no-early-stop",), COMPLETED),
    Case("fsdp_moe", "naive", (), FAILED),
    Case("fsdp_moe", "pregather", (), FAILED),
    Case("fsdp_moe", "naive", ("--all-experts",), COMPLETED),
] + [Case("fsdp_moe", "naive", ("--reduce-unused",), COMPLETED)] * HAS_REDUCE_UNUSED


SYMPTOMS = (  # how a failure shows in torchrun's output, most specific first (torch 2.11 to 2.14)
    ("Detected mismatch between collectives", "DETAIL: mismatch reported"),
    ("doesn't match expected size", "gloo: size mismatch, abort"),
    ("Watchdog caught collective operation timeout", "NCCL: watchdog timeout"),
    ("detected by watchdog", "NCCL: watchdog timeout"),
    ("Timed out waiting", "gloo: timeout"),
)
KILLED = "killed at the deadline"
STARTUP_S = 600  # the launcher's limit for torchrun, `import torch` and init (minutes on a starved machine)
TEARDOWN_S = 60  # and for the ranks to exit once their ledgers have ended
# A hang: the process group's timeout ended it, or (torch 2.14's gloo waits past it) the launcher did.
HANG_SYMPTOMS = ("gloo: timeout", "NCCL: watchdog timeout", KILLED)
SIZE_SYMPTOMS = ("gloo: size mismatch, abort",)


@dataclass
class Result:
    case: Case
    code: int
    seconds: float  # from the ranks being up (their ledgers exist) to the first failure, or the end
    killed: bool  # still running at the launcher's deadline
    divergence: Divergence | None
    how: str  # the failure's symptom (SYMPTOMS), "" when it completed
    out_dir: str  # ledgers, torchrun.log, NCCL dumps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int):
    """SIGKILL a process and all its descendants. (torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks running.) Linux: reads /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the field after the state
        except (OSError, ValueError, IndexError):  # not a process, or it just ended
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(case: Case, nproc: int, timeout: float, out_dir: str, detail: bool = False) -> Result:
    """Run one case with torchrun (output to OUT/torchrun.log); kill it 2x the collective timeout after
    its ranks are up (their ledgers exist), or STARTUP_S after the launch if they never get there.
    Ranks whose ledgers all ended by then get TEARDOWN_S more to exit.

    Result.seconds counts from the ranks being up, so start-up on a busy machine does not count. The
    outcome comes from the ledgers, not from torchrun's exit code, so it is the same whether the
    ranks failed by themselves or were killed (NCCL's watchdog aborts the process).
    """
    ledger_dir = os.path.join(out_dir, "ledger")
    shutil.rmtree(ledger_dir, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", os.path.abspath(__file__), "--scenario", case.scenario,
           "--mode", case.mode, *case.flags, "--timeout", str(timeout), "--out-dir", out_dir] + ["--detail"] * detail
    log_path = os.path.join(out_dir, "torchrun.log")
    deadline, up, tearing_down = time.monotonic() + STARTUP_S, None, False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if up is None and all(os.path.exists(os.path.join(ledger_dir, f"rank{r}.jsonl")) for r in range(nproc)):
                up = time.monotonic()
                deadline = up + 2 * timeout
            if time.monotonic() >= deadline:
                ledgers = read_ledgers(ledger_dir)
                if tearing_down or up is None or not all(ledger and "end" in ledger[-1] for ledger in ledgers):
                    break
                deadline, tearing_down = deadline + TEARDOWN_S, True
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        killed = proc.poll() is None
        if killed:
            kill_tree(proc.pid)
            proc.wait()
    ledgers = read_ledgers(ledger_dir)
    failed_at = [ledger[-1]["t"] for ledger in ledgers if ledger and ledger[-1].get("end") == "failed"]
    # To the first rank's failure (its ledger's clock starts when it is up), else to the end or the kill.
    seconds = min(failed_at) if failed_at else time.monotonic() - (up or deadline - STARTUP_S)
    ends = [ledger[-1]["end"] for ledger in ledgers if ledger and "end" in ledger[-1]]
    completed = proc.returncode == 0 and ends == ["completed"] * nproc
    divergence = first_divergence(ledgers)
    with open(log_path) as f:
        text = f.read()
    # A symptom in the log wins over the kill: a rank may abort (gloo) while torchrun is slow to stop the rest.
    how = "" if completed else next((label for pattern, label in SYMPTOMS if pattern in text),
                                    KILLED if killed else "other error (see torchrun.log)")
    code = COMPLETED if completed else FAILED if divergence else UNEXPLAINED
    return Result(case, code, seconds, killed, divergence, how, out_dir)


def print_table(results: list[Result]):
    rows = [("scenario", "mode", "expected", "outcome", "how", "seconds", "first divergence (rank 0; rank 1; ...)")]
    for r in results:
        rows.append((r.case.scenario, r.case.name, OUTCOMES[r.case.expect],
                     OUTCOMES[r.code] + ("" if r.code == r.case.expect else " (!)"), r.how or "-",
                     f"{r.seconds:.1f}", r.divergence.short() if r.divergence else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(lines))


def run_all(args) -> int:
    """Every case as its own torchrun launch, `--jobs` at a time; 0 when each ended as expected."""
    root = args.out_dir or tempfile.mkdtemp(prefix="repro_recompute_hang-")

    def one(i_case):
        i, case = i_case
        return launch(case, args.nproc, args.timeout, os.path.join(root, f"{i}-{case.scenario}-{case.name}".replace(
            " ", "_")), detail=args.detail)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, enumerate(CASES)))
    print_table(results)
    print(f"ledgers and logs: {root}")
    return COMPLETED if all(r.code == r.case.expect for r in results) else FAILED


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=SCENARIOS)
    p.add_argument("--mode", choices=MODES, default="naive",
                   help="naive: all_gather position_ids in every attention call (re-run in recompute); "
                        "pregather: document boundaries computed once before the model call")
    p.add_argument("--no-early-stop", action="store_true", help="recompute whole checkpointed regions")
    p.add_argument("--all-experts", action="store_true", help="fsdp_moe: run idle experts on zero tokens")
    p.add_argument("--reduce-unused", action="store_true",
                   help="fsdp_moe: FSDP2 reduce-scatters zero gradients for unused parameters")
    p.add_argument("--timeout", type=float, default=20.0, help="collective timeout in seconds")
    p.add_argument("--detail", action="store_true",
                   help="TORCH_DISTRIBUTED_DEBUG=DETAIL: check every collective across ranks before it runs")
    p.add_argument("--out-dir", default=None, help="ledgers (and NCCL dumps); default: a new temp dir")
    p.add_argument("--nproc", type=int, default=2, help="ranks, when this script launches torchrun")
    p.add_argument("--all", action="store_true", help="run every case and print a table")
    p.add_argument("--jobs", type=int, default=1, help="with --all: launches at a time")
    args = p.parse_args(argv)
    if not args.all and args.scenario is None:
        p.error("give --scenario (or --all)")
    if args.reduce_unused and not HAS_REDUCE_UNUSED:
        p.error(f"--reduce-unused needs FSDPModule.set_reduce_scatter_unused_params, "
                f"which torch {torch.__version__} lacks")
    if int(os.environ.get("WORLD_SIZE", args.nproc)) not in (2, 4):
        p.error("run on 2 or 4 ranks: all ranks form one SP group over the model's 4 attention heads")
    return args


def main() -> int:
    args = parse_args()
    if args.all:
        return run_all(args)
    if "RANK" in os.environ:  # one rank under torchrun
        if args.out_dir is None:  # every rank must pick the same directory
            args.out_dir = os.path.join(tempfile.gettempdir(), f"repro_recompute_hang-{os.environ['MASTER_PORT']}")
        os._exit(worker(args))
    case = Case(args.scenario, args.mode, tuple(f for f, on in (("--no-early-stop", args.no_early_stop),
                                                                ("--all-experts", args.all_experts),
                                                                ("--reduce-unused", args.reduce_unused)) if on))
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="repro_recompute_hang-")
    print(f"torchrun on {args.nproc} ranks, output in {out_dir}/torchrun.log ...", flush=True)
    result = launch(case, args.nproc, args.timeout, out_dir, detail=args.detail)
    with open(os.path.join(out_dir, "torchrun.log")) as f:
        print(f.read())
    print(f"{OUTCOMES[result.code]}{' (' + result.how + ')' if result.how else ''} in {result.seconds:.1f} s\n"
          f"{notes(read_ledgers(os.path.join(out_dir, 'ledger')))}first divergent collective: {result.divergence or 'none'}\n"
          f"ledgers: {out_dir}")
    return result.code


if __name__ == "__main__":
    sys.exit(main())
