"""What minirl.ledger costs when on: training steps of minirl's model (FSDP2, Ulysses, checkpointing),
timed with and without the ledger, in alternating rounds so that drift hits both alike.

    torchrun --nproc-per-node 2 scripts/ledger_overhead.py            # CPU (gloo) or GPUs (NCCL, bf16)
    torchrun --nproc-per-node 2 scripts/ledger_overhead.py --sp 2 --layers 8 --tokens 16384
    torchrun --nproc-per-node 2 scripts/ledger_overhead.py --source flight_recorder --compile

Prints the median step time off and on, the difference, and the collectives per step. The dispatch
ledger passes every op the step dispatches through Python (a TorchDispatchMode), so its cost grows
with the number of ops, not with the size of the tensors: small models show the worst case, and
compiled blocks (--compile: each block torch.compile'd, as train.py does on GPUs) dispatch fewer.
The flight_recorder source costs one dump of torch's record and one comparison per step ("on" ends
each step with the ledger's check_step, as train.py does; "off" runs the same steps without it).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minirl import dist as mdist  # noqa: E402
from minirl.attention import pick_backend  # noqa: E402
from minirl.fsdp import shard_model  # noqa: E402
from minirl.ledger import SOURCES, Ledger, flight_recorder_env  # noqa: E402
from minirl.model import ModelConfig, Transformer, init_weights  # noqa: E402
from minirl.ulysses import shard_micro_batch  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=0, help="default: 1024 on GPUs, 256 on CPU")
    p.add_argument("--tokens", type=int, default=0, help="per micro-batch; default: 8192 on GPUs, 1024 on CPU")
    p.add_argument("--rounds", type=int, default=5, help="rounds of (steps off, steps on)")
    p.add_argument("--steps", type=int, default=3, help="steps per round and setting")
    p.add_argument("--source", choices=SOURCES, default="dispatch", help="the ledger's source")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (train.py's GPU default)")
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    flight_recorder_env(os.path.join(tmp, "fr"))  # torch's record on in both settings: the ledger reads it
    with mdist.distributed(args.sp, timeout_s=300) as d:
        gpu = d.device.type == "cuda"
        hidden, tokens = args.hidden or (1024 if gpu else 256), args.tokens or (8192 if gpu else 1024)
        cfg = ModelConfig(model_type="qwen3", vocab_size=32000, hidden_size=hidden, intermediate_size=3 * hidden,
                          num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8,
                          head_dim=hidden // 16, qk_norm=True, rope_theta=1e6)
        model = Transformer(cfg)
        init_weights(model, seed=0)
        if args.compile:
            for block in model.layers:
                block.compile()
        shard_model(model, d.fsdp_mesh, mixed_precision=gpu, cpu_offload=False, checkpointing="full")
        g = torch.Generator().manual_seed(d.dp_rank)
        ids = torch.randint(0, cfg.vocab_size, (tokens,), generator=g)
        pos = torch.cat([torch.arange(n) for n in (tokens // 2, tokens // 4, tokens - tokens // 2 - tokens // 4)])
        lids, lpos, meta, _ = shard_micro_batch(ids, pos, d.sp_rank, d.sp_size, pick_backend(d.device), d.sp_group)
        lids, lpos, meta.cu_seqlens = lids.to(d.device), lpos.to(d.device), meta.cu_seqlens.to(d.device)
        targets = torch.roll(lids, -1)

        def step():
            logprobs, _ = model(lids, lpos, meta, targets=targets)
            (-logprobs.mean()).backward()
            model.zero_grad(set_to_none=True)

        def timed() -> float:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if gpu:
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        def checked(ledger, i) -> float:
            t = timed()
            t0 = time.perf_counter()
            ledger.check_step(i)
            return t + time.perf_counter() - t0

        step()  # warm-up (and compile)
        times = {"off": [], "on": []}
        ledger_dir = os.path.join(tmp, "ledger")
        collectives = 0
        for _ in range(args.rounds):
            times["off"] += [timed() for _ in range(args.steps)]
            with Ledger(ledger_dir, d.rank, stall_s=250, source=args.source) as ledger:
                ledger.check_step(0)  # the ledger's first check is not a step's
                times["on"] += [checked(ledger, i + 1) for i in range(args.steps)]
            collectives = (ledger.n - 2 * (args.steps + 1)) // args.steps  # less the checks' 2 each
        off, on = (statistics.median(times[k]) * 1e3 for k in ("off", "on"))
        if d.is_main:
            print(f"{args.source} ledger{', compiled blocks' if args.compile else ''}: "
                  f"{d.device} world {d.world} sp {d.sp_size}, {cfg.num_hidden_layers} layers x {hidden}, "
                  f"{tokens} tokens/micro-batch, torch {torch.__version__}: step {off:.1f} ms off, {on:.1f} ms on "
                  f"(+{on - off:.1f} ms, +{(on / off - 1) * 100:.1f}%), {collectives} collectives per step")
        del model
    os._exit(0)


if __name__ == "__main__":
    main()
