"""minirl.ledger's flight_recorder source with a compiled collective (tests/test_ledger.py), on 2 gloo ranks.

Each rank runs a torch.compile'd function whose all-to-all is traced into the graph (the dispatch
ledger cannot see it: torch.compile does not compile while a dispatch mode is on), with the ledger
reading torch's flight recorder. Step 1 is the same on both ranks; in step 2 rank 1 sends a [2, 4]
tensor where rank 0 sends a [4, 2] one: the same bytes, so gloo completes it without noticing, and
only the ledger's step check can. Every rank writes DIR/rank{r}.json: what the check said, the
graphs compiled, and the graph breaks.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

from minirl import dist as mdist
from minirl.ledger import Ledger, flight_recorder_env


def a2a_sin(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x * 2, group=group)
    return out.sin()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="inductor")
    args = p.parse_args()
    ledger_dir = os.path.join(args.out, "ledger")
    flight_recorder_env(ledger_dir)  # before the process group
    mdist.init_process_group(timeout_s=120)
    rank = dist.get_rank()
    sp = dist.new_group(list(range(dist.get_world_size())), group_desc="sp")
    compiled = torch.compile(a2a_sin, backend=args.backend, dynamic=True)  # one graph for both shapes
    said = []
    with Ledger(ledger_dir, rank, labels={"sp": sp}, source="flight_recorder") as ledger:
        for step, shape in ((1, (4, 2)), (2, (4, 2) if rank == 0 else (2, 4))):
            compiled(torch.ones(shape), sp)
            try:
                ledger.check_step(step)
                said.append("ok")
            except RuntimeError as e:
                said.append(str(e))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"checks": said, "graphs": counters["stats"]["unique_graphs"],
                   "graph_breaks": sum(counters["graph_break"].values())}, f)
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
