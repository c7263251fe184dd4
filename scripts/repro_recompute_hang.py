"""Reproduce hangs caused by collectives that differ across ranks, the checkpoint-recompute hang first,
and show what really hangs.

The report: FSDP2 + Ulysses SP + non-reentrant activation checkpointing hung in backward, stuck right
after an all_gather of position_ids that every attention call issues (so it re-runs in recompute).
A collective in recompute is harmless by itself: every rank re-issues it, in the same order. Ranks
hang when they issue DIFFERENT collectives, and recompute is one way to get there. Each scenario
runs minirl's own model or layers and records every collective each rank issues
(scripts/README.md explains each one and names the public reports):

- count            minirl as is, or with the peers' in-layer position gather: both complete.
- tail_skew        mechanism A, early stop: a collective after a rank's last saved tensor is
                   recomputed on some ranks only. naive fails; pregather and --no-early-stop complete.
- fsdp_moe         mechanism B, MoE + FSDP2: an idle expert on one rank shrinks its reduce-scatter.
                   Both modes fail; --all-experts and --reduce-unused complete.
- compile_reorder  compiled blocks + operator-based checkpointing that keeps the all-to-all by its
                   compiled name: a rank whose block runs eagerly recomputes it, the others do not.
                   naive fails; fixed (the all-to-all one custom op) and minirl (its own
                   checkpointing) complete.
- recompute_order  expert-parallel all_to_alls in two checkpoints, recomputed in opposite orders on
                   two ranks (one backward per loss). naive fails; fixed (one backward) completes.
- rank_metrics     a metrics all_reduce over each rank's own keys, which differ. naive fails; fixed
                   (agree on the keys first) completes.

Fail fast: every collective has a timeout (--timeout); each rank records its collectives with
minirl.ledger in OUT/ledger/rank{r}.jsonl, line by line BEFORE issuing them (compiled code's too),
so after a crash or a kill the files still show where the ranks parted; a stack dump of every thread
comes when no collective has started for 3/4 of the timeout. The first rank that fails prints the
first collective on which the ledgers differ (`python -m minirl.ledger OUT/ledger` does it afterwards).

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
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]  # minirl and the scenario modules, uninstalled

from minirl import dist as mdist  # noqa: E402
from minirl.ledger import Ledger, first_divergence, flight_recorder_env, group_labels, read_ledgers  # noqa: E402
from repro_checkpoint import (HAS_REDUCE_UNUSED, SCENARIOS as CHECKPOINT_SCENARIOS, gather_tokens,  # noqa: E402,F401
                              tiny_config)
from repro_launch import (COMPLETED, FAILED, HANG_SYMPTOMS, OUTCOMES, SIZE_SYMPTOMS, TEARDOWN_S,  # noqa: E402,F401
                          UNEXPLAINED, Case, launch, print_table)
from repro_order import CAPACITY as ORDER_CAPACITY, SCENARIOS as ORDER_SCENARIOS  # noqa: E402,F401

SCENARIOS = {**CHECKPOINT_SCENARIOS, **ORDER_SCENARIOS}
MODES = ("naive", "pregather")  # of the checkpoint-recompute scenarios
PHASES = ("forward", "recompute", "backward")

CASES = [
    Case("count", "naive", (), COMPLETED),
    Case("count", "pregather", (), COMPLETED),
    Case("tail_skew", "naive", (), FAILED),
    Case("tail_skew", "pregather", (), COMPLETED),
    Case("tail_skew", "naive", ("--no-early-stop",), COMPLETED),
    Case("fsdp_moe", "naive", (), FAILED),
    Case("fsdp_moe", "pregather", (), FAILED),
    Case("fsdp_moe", "naive", ("--all-experts",), COMPLETED),
] + [Case("fsdp_moe", "naive", ("--reduce-unused",), COMPLETED)] * HAS_REDUCE_UNUSED + [
    Case("compile_reorder", "naive", (), FAILED),
    Case("compile_reorder", "fixed", (), COMPLETED),
    Case("compile_reorder", "minirl", (), COMPLETED),
    Case("recompute_order", "naive", (), FAILED),
    Case("recompute_order", "fixed", (), COMPLETED),
    Case("rank_metrics", "naive", (), FAILED),
    Case("rank_metrics", "fixed", (), COMPLETED),
]


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
# One rank under torchrun. --scenario may name several (a,b,...), each with its mode (--mode x,y,... or
# one for all): they run one after the other in one launch and one ledger, which the tests use for the
# cases that complete.


def batch(args) -> tuple[list[str], list[str]]:
    names, modes = args.scenario.split(","), args.mode.split(",")
    return names, modes * len(names) if len(modes) == 1 else modes


def worker(args) -> int:
    rank = int(os.environ["RANK"])
    names, modes = batch(args)
    scenarios = [SCENARIOS[name] for name in names]
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
    dists = [mdist.build_dist(sp=dist.get_world_size() if s.sp_all else 1) for s in scenarios]
    arguments = [argparse.Namespace(**{**vars(args), "scenario": name, "mode": mode})
                 for name, mode in zip(names, modes)]
    states = [s.prepare(a, d) if s.prepare else None for s, a, d in zip(scenarios, arguments, dists)]
    try:
        with Ledger(ledger_dir, rank, labels={"sp": dists[0].sp_group, "fsdp": dists[0].fsdp_mesh.get_group()},
                    stall_s=0.75 * args.timeout) as ledger:
            for a, scenario, d, state in zip(arguments, scenarios, dists, states):
                if len(names) > 1:
                    ledger.note(f"scenario {a.scenario} {a.mode}")
                scenario.run(a, d, ledger, state)
        code = COMPLETED
    except Exception:  # a timeout, a gloo size mismatch, a DETAIL mismatch report; the ledger printed it
        code = FAILED if first_divergence(read_ledgers(ledger_dir)) else UNEXPLAINED
    if code == COMPLETED:
        dist.barrier()  # all ledgers are complete
        if rank == 0:
            report_completed(ledger_dir)
    del dists, states  # no mesh or FSDP state may outlive the group (see minirl.dist.shutdown)
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
# Every case, then a table


def backend_flag(args) -> tuple[str, ...]:
    return ("--compile-backend", args.compile_backend)


def run_all(args) -> int:
    """Every case as its own torchrun launch, `--jobs` at a time; 0 when each ended as expected."""
    root = args.out_dir or tempfile.mkdtemp(prefix="repro_recompute_hang-")

    def one(i_case):
        i, case = i_case
        return launch(case, args.nproc, args.timeout, os.path.join(root, f"{i}-{case.scenario}-{case.name}".replace(
            " ", "_")), detail=args.detail, extra=backend_flag(args))

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, enumerate(CASES)))
    print_table(results)
    print(f"ledgers and logs: {root}")
    return COMPLETED if all(r.code == r.case.expect for r in results) else FAILED


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", help=f"one of {', '.join(SCENARIOS)} (several, comma-separated, run in one launch)")
    p.add_argument("--mode", default="naive",
                   help="naive (fails) or its fix: pregather (count, tail_skew, fsdp_moe: document boundaries "
                        "computed once, before the model call), fixed (compile_reorder, recompute_order, "
                        "rank_metrics), minirl (compile_reorder: the Block's own checkpointing)")
    p.add_argument("--no-early-stop", action="store_true", help="recompute whole checkpointed regions")
    p.add_argument("--all-experts", action="store_true", help="fsdp_moe: run idle experts on zero tokens")
    p.add_argument("--reduce-unused", action="store_true",
                   help="fsdp_moe: FSDP2 reduce-scatters zero gradients for unused parameters")
    p.add_argument("--compile-backend", default="inductor",
                   help="compile_reorder: torch.compile's backend (aot_eager: the same graphs and partitions, "
                        "no code generation)")
    p.add_argument("--timeout", type=float, default=20.0, help="collective timeout in seconds")
    p.add_argument("--detail", action="store_true",
                   help="TORCH_DISTRIBUTED_DEBUG=DETAIL: check every collective across ranks before it runs")
    p.add_argument("--out-dir", default=None, help="ledgers (and NCCL dumps); default: a new temp dir")
    p.add_argument("--nproc", type=int, default=2, help="ranks, when this script launches torchrun")
    p.add_argument("--all", action="store_true", help="run every case and print a table")
    p.add_argument("--jobs", type=int, default=1, help="with --all: launches at a time")
    args = p.parse_args(argv)
    if not args.all:
        if args.scenario is None:
            p.error("give --scenario (or --all)")
        names, modes = batch(args)
        if len(modes) != len(names):
            p.error(f"--mode names {len(modes)} modes for {len(names)} scenarios")
        for name, mode in zip(names, modes):
            if name not in SCENARIOS:
                p.error(f"unknown scenario {name!r}: one of {', '.join(SCENARIOS)}")
            if mode not in SCENARIOS[name].modes:
                p.error(f"{name} has the modes {', '.join(SCENARIOS[name].modes)}, not {mode!r}")
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
    result = launch(case, args.nproc, args.timeout, out_dir, detail=args.detail, extra=backend_flag(args))
    with open(os.path.join(out_dir, "torchrun.log")) as f:
        print(f.read())
    print(f"{OUTCOMES[result.code]}{' (' + result.how + ')' if result.how else ''} in {result.seconds:.1f} s\n"
          f"{notes(read_ledgers(os.path.join(out_dir, 'ledger')))}"
          f"first divergent collective: {result.divergence or 'none'}\n"
          f"ledgers: {out_dir}")
    return result.code


if __name__ == "__main__":
    sys.exit(main())
