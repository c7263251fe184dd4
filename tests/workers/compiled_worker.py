"""minirl.ledger with compiled collectives (tests/test_ledger.py), on 2 gloo ranks.

Each rank runs a torch.compile'd function whose all-to-all is traced into the graph, first under the
"dispatch" ledger (it sees what the compiled code dispatches: the functional collective, recorded
before it is issued), then under the "flight_recorder" one (torch's own record). With each: step 1
is the same on both ranks; in step 2 rank 1 sends a [2, 4] tensor where rank 0 sends a [4, 2] one,
the same bytes, so gloo completes it without noticing and only the ledger's step check can. Every
rank writes DIR/rank{r}.json: per source, what each step's check said; the graphs compiled and the
graph breaks.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from minirl import dist as mdist
from minirl.ledger import SOURCES, Ledger, flight_recorder_env, read_ledgers


def a2a_sin(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x * 2, group=group)
    return out.sin()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="inductor")
    args = p.parse_args()
    flight_recorder_env(os.path.join(args.out, "fr"))  # before the process group
    mdist.init_process_group(timeout_s=120)
    rank = dist.get_rank()
    sp = dist.new_group(list(range(dist.get_world_size())), group_desc="sp")
    compiled = torch.compile(a2a_sin, backend=args.backend, dynamic=True)  # one graph for both shapes
    report = {"graphs": 0}
    for source in SOURCES:
        ledger_dir = os.path.join(args.out, source)
        said = []
        with Ledger(ledger_dir, rank, labels={"sp": sp}, source=source) as ledger:
            for step, shape in ((1, (4, 2)), (2, (4, 2) if rank == 0 else (2, 4))):
                compiled(torch.ones(shape), sp)
                try:
                    ledger.check_step(step)
                    said.append("ok")
                except RuntimeError as e:
                    said.append(str(e))
        dist.barrier()
        report[source] = {"checks": said, "ops": [e["op"] for e in read_ledgers(ledger_dir)[rank] if "op" in e]}
    report.update(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
