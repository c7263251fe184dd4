"""A ledger of every collective a process issues, to find where ranks parted when a job hangs.

Ranks hang when they issue different collectives (an extra all-gather, a reduce-scatter of another
size): each group matches collectives by order, and the stacks printed at the timeout blame whatever
each rank waited in. So each rank appends every collective (op, group, shapes, dtype, phase, call
site) to `DIR/rank{r}.jsonl`, flushed BEFORE it is issued; comparing the files after a timeout, an
abort or a kill gives the first collective the ranks disagree on (`minirl/divergence.py`).

    with Ledger("out/ledger", rank):            # or: ledger = start("out/ledger") ... ledger.stop()
        train()                                 # any PyTorch program; gloo or NCCL
    python -m minirl.ledger out/ledger          # after the fact: the first divergence per group

Two sources fill the same files. "dispatch" (default) is a TorchDispatchMode: every op passes through
`__torch_dispatch__` (its cost: scripts/README.md), compiled code's too (torch compiles with the mode off
and runs the code with it on), and it knows each collective's phase: "forward" outside autograd's
backward; inside it "recompute" while a module's forward runs (a checkpointed region rebuilt; global
module hooks count the depth per thread) and "backward" otherwise. "flight_recorder" reads torch's flight
recorder (every collective, gloo or NCCL, once TORCH_FR_BUFFER_SIZE is set before the process group:
`flight_recorder_env`) at each `check_step`, stall and exit: no per-op cost, no phase or call site.
"""

import faulthandler
import hashlib
import json
import os
import pickle
import sys
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from minirl.divergence import Divergence, first_divergence, group_labels, read_ledgers, report, signature  # noqa: F401

NAMESPACES = ("c10d", "_c10d_functional")  # process-group ops and the functional collectives
_TORCH_DIR = os.path.dirname(torch.__file__)
_WRAPPERS = ("distributed_c10d.py", "c10d_logger.py", "_python_dispatch.py", "_functional_collectives.py",
             "typing_extensions.py", "contextlib.py", "functools.py", os.path.join("minirl", "ledger.py"))


def flight_recorder_env(ledger_dir: str):
    """NCCL's flight recorder: keep the last 2000 collectives, dump them to DIR/nccl_trace_rank_{r} on a timeout.

    Only read when a process group is created, so call it before `init_process_group`. The names are
    the ones torch 2.11 to 2.14 read; variables already set win. Read the dumps with
    `python -m torch.distributed.flight_recorder.fr_trace DIR -p nccl_trace_rank_`.
    After a timeout the watchdog waits 4x TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC (default 15 s: a minute)
    for the ranks to dump before it ends the process; the dumps took under a second on 2 H200s, so
    2 s keeps a failure within seconds of the timeout.
    """
    for key, value in (("TORCH_FR_BUFFER_SIZE", "2000"), ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1"),
                       ("TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC", "2000"),
                       ("TORCH_FR_DUMP_TEMP_FILE", os.path.join(os.path.abspath(ledger_dir), "nccl_trace_rank_"))):
        os.environ.setdefault(key, value)


SOURCES = ("dispatch", "flight_recorder")


class _Dispatch(TorchDispatchMode):
    """Sees every op of the program and hands the collectives to the ledger. torch.compile compiles
    with the mode off and runs the compiled code with it on (`ignore_compile_internals`): the mode
    then sees what that code dispatches, its collectives included, but not the ops fused into kernels."""

    def __init__(self, ledger: "Ledger"):
        super().__init__()
        self.ledger = ledger

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in NAMESPACES:
            group = self.ledger._group(func, args, kwargs)  # None: no process group, not a collective (a wait)
            if group is not None:
                self.ledger.record(func, args, kwargs, group)
        return func(*args, **kwargs)


class Ledger:
    """Records this rank's collectives to `ledger_dir/rank{rank}.jsonl` while entered.

    labels: names for process groups ({"sp": group}) shown in reports; otherwise a group's own
    description (DeviceMesh names them "mesh_<dim>") or "world". stall_s: when no collective has
    started for that long, faulthandler prints every thread's stack (from a thread of its own, which
    needs no GIL: some waits in collectives hold it) and a Python thread prints the ledgers' first
    divergence so far (when it gets the GIL); set it a little below the collective timeout, so both
    come before the process group gives up. source: "dispatch" or "flight_recorder" (module docstring).
    Leaving the `with` block writes an end line; on an exception, the first rank to fail prints the
    first divergence.
    """

    def __init__(self, ledger_dir: str, rank: int | None = None, labels: dict | None = None,
                 stall_s: float | None = None, source: str = "dispatch"):
        if source not in SOURCES:
            raise ValueError(f"unknown ledger source {source!r}; choose one of {SOURCES}")
        if source == "flight_recorder" and not flight_recorder_on():
            raise ValueError("the flight_recorder ledger needs TORCH_FR_BUFFER_SIZE set before the process group "
                             "is created (minirl.ledger.flight_recorder_env)")
        self.dir, self.source = ledger_dir, source
        self.rank = rank if rank is not None else int(os.environ.get("RANK", "0"))
        os.makedirs(ledger_dir, exist_ok=True)
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        if self.rank == 0:  # an earlier run's claims, and files of ranks this run does not have
            for name in os.listdir(ledger_dir):
                r = name.removeprefix("rank").removesuffix(".jsonl")
                if not (name == f"rank{r}.jsonl" and r.isdigit() and int(r) < world):
                    os.remove(os.path.join(ledger_dir, name))
        self.file = open(os.path.join(ledger_dir, f"rank{self.rank}.jsonl"), "w", buffering=1)  # line-buffered
        self.labels = {}  # process group name -> label
        if dist.is_initialized():
            self.labels[dist.group.WORLD.group_name] = "world"  # (when not yet, `_group` names it)
        for label, group in (labels or {}).items():
            if group is not None:
                self.labels[group.group_name] = "+".join(filter(None, (self.labels.get(group.group_name), label)))
        self.ranks: dict[str, list[int]] = {}  # groups described in the file so far -> their global ranks
        self.n, self.start_time, self.last, self.armed = 0, time.monotonic(), time.monotonic(), 0.0
        self.start_ns = time.time_ns()  # the flight recorder stamps entries with the wall clock
        self.seen = -1  # flight_recorder source: the newest record id copied so far
        self.lock = threading.Lock()  # the watcher and the main thread both copy flight recorder entries
        self.entries: list[dict] = []  # this rank's collectives since the last check_step
        self.depth = threading.local()  # .n: module forwards running on this thread
        self._hooks, self._mode = [], None
        self.stall_s, self._stop = stall_s, threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True) if stall_s else None
        self.write(rank=self.rank, pid=os.getpid(), torch=torch.__version__, source=source)

    # -- recording ----------------------------------------------------------------------------------

    def record(self, func, args, kwargs, group: str):
        """dispatch source: one c10d op about to be issued."""
        if torch._C._current_graph_task_id() == -1:
            phase = "forward"
        else:
            phase = "recompute" if getattr(self.depth, "n", 0) > 0 else "backward"
        schema = func._schema.arguments
        named = list(zip((a.name for a in schema), (*args, *[kwargs.get(a.name) for a in schema[len(args):]])))
        tensors = [x for _, a in named for x in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(x, torch.Tensor)]
        # What this rank sends: the argument named input* (c10d: (output, input); functional: (input)),
        # else the first tensor (allreduce_'s tensors): eager and compiled calls compare alike.
        sent = next((x for name, a in named if name.startswith("input") for x in _flat(a)),
                    tensors[0] if tensors else None)
        self.add(dict(n=self.n, t=self.seconds(), phase=phase, op=func._opname, group=group,
                      shapes=[list(x.shape) for x in tensors], sent=list(sent.shape) if sent is not None else [],
                      dtype=str(sent.dtype).removeprefix("torch.") if sent is not None else "-", site=call_site()))

    def sync(self):
        """flight_recorder source: copy the collectives recorded since the last call into the file."""
        with self.lock:
            new = [e for e in flight_recorder_entries() if e["record_id"] > self.seen]
            if new and self.seen >= 0 and new[0]["record_id"] != self.seen + 1:
                self.note(f"the flight recorder dropped {new[0]['record_id'] - self.seen - 1} collectives: "
                          f"raise TORCH_FR_BUFFER_SIZE")
            for e in new:
                self.seen = e["record_id"]
                name, desc = e["process_group"]
                if not name:  # a group torch made for itself (TORCH_DISTRIBUTED_DEBUG=DETAIL's checks)
                    continue
                if name not in self.ranks:
                    self.describe(name, dist.distributed_c10d._resolve_process_group(name), desc)
                self.add(dict(n=self.n, t=round((e["time_created_ns"] - self.start_ns) / 1e9, 3), phase="-",
                              op=e["profiling_name"].split(":")[-1], group=name, shapes=e["input_sizes"],
                              sent=e["input_sizes"][0] if e["input_sizes"] else [],
                              dtype=e["input_dtypes"][0] if e["input_dtypes"] else "-"))

    def add(self, entry: dict):
        self.write(**entry)
        self.entries.append(entry)
        self.n += 1
        self.last = time.monotonic()
        if self.stall_s and self.last - self.armed > min(1.0, self.stall_s / 10):  # re-arming starts a thread:
            faulthandler.dump_traceback_later(self.stall_s)  # at most once a second
            self.armed = self.last

    def _group(self, func, args, kwargs) -> str | None:
        """The process group's name (a ScriptObject argument of c10d ops, a `group_name` string of
        functional ones); described once in the file with its label and global ranks."""
        name = None
        for arg, value in zip(func._schema.arguments, (*args, *[kwargs.get(a.name) for a in
                                                                 func._schema.arguments[len(args):]])):
            if isinstance(value, torch.ScriptObject) and value._type().name() == "ProcessGroup":
                group = dist.ProcessGroup.unbox(value)
                name = group.group_name
                break
            if arg.name == "group_name" and isinstance(value, str):
                name = value
                group = dist.distributed_c10d._resolve_process_group(name)  # how funcol finds it, too
                break
        if name is None:
            return None
        if name not in self.ranks:
            self.describe(name, group, getattr(group, "group_desc", ""))
        return name

    def describe(self, name: str, group, desc: str):
        """One line naming a process group the first time it is used: its label and global ranks."""
        self.ranks[name] = dist.get_process_group_ranks(group)
        world = "world" if name == dist.group.WORLD.group_name else ""
        label = self.labels.get(name) or world or desc or name
        self.labels[name] = label
        self.write(group_name=name, label=label, ranks=self.ranks[name])

    def seconds(self) -> float:
        return round(time.monotonic() - self.start_time, 3)

    def write(self, **line):
        self.file.write(json.dumps(line) + "\n")

    def note(self, text: str):
        """A free-form line (routing, token counts, ...) shown with the divergence."""
        self.write(note=text, t=self.seconds())

    # -- start, stop, failure -----------------------------------------------------------------------

    def _enter_module(self, module, args):
        self.depth.n = getattr(self.depth, "n", 0) + 1

    def _leave_module(self, module, args, output):
        self.depth.n -= 1

    def __enter__(self):
        if self.source == "dispatch":
            self._mode = _Dispatch(self).__enter__()
            self._hooks = [register_module_forward_pre_hook(self._enter_module),
                           register_module_forward_hook(self._leave_module, always_call=True)]  # also when
            # checkpoint's early stop raises out of a forward
        else:  # what the process issued before the ledger began is not this ledger's
            self.seen = max((e["record_id"] for e in flight_recorder_entries()), default=-1)
        if self._watcher is not None:
            self._watcher.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stop.set()
        if self.stall_s:
            faulthandler.cancel_dump_traceback_later()
        for hook in self._hooks:
            hook.remove()
        if self._mode is not None:
            self._mode.__exit__(exc_type, exc, tb)
        if self.source == "flight_recorder":
            self.sync()
        if exc is None:
            self.write(end="completed", t=self.seconds())
        else:
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            self.write(end="failed", t=self.seconds(), error=error)
            print(f"rank {self.rank} failed: {error}", file=sys.stderr, flush=True)  # every rank: its own cause
            if self._claim("reported"):  # the other ranks are killed soon after this one exits
                print(report(self.dir), file=sys.stderr, flush=True)
        self.file.close()

    def stop(self):
        """End a ledger begun with `start`."""
        self.__exit__(None, None, None)

    def _claim(self, name: str) -> bool:
        """True for the first rank (on this file system) to ask: one report, not one per rank."""
        try:
            os.close(os.open(os.path.join(self.dir, name), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False

    def _watch(self):
        """At a stall (no new collective for stall_s), one rank prints the divergence so far. With the
        flight_recorder source it also copies new entries into the file, every stall_s / 4: each copy
        dumps the recorder's whole buffer (~30 us per entry held on a busy CPU), too dear for often."""
        period = self.stall_s / 4 if self.source == "flight_recorder" else min(1.0, self.stall_s / 10)
        while not self._stop.wait(period):
            if self.source == "flight_recorder":
                self.sync()
            if time.monotonic() - self.last > self.stall_s and self._claim("stalled"):
                print(f"rank {self.rank}: no collective started for {self.stall_s:.0f} s\n{report(self.dir)}",
                      file=sys.stderr, flush=True)

    # -- the invariant ------------------------------------------------------------------------------

    def check_step(self, step: int):
        """Assert that, since the last check, the ranks of every group issued the same collectives.

        Every rank sends a digest of its new entries per group to every other (one all_gather_object
        over the world; every rank calls this at the same point, e.g. at the end of each step). If
        the members of a group disagree, their entries are exchanged too and a RuntimeError names
        the first divergent collective. For minirl this covers the trainer's invariants: all ranks
        share the FSDP group, so the same sequence there means the same number of micro-batches
        (each one all-gathers every block's parameters); each sp group checks its own sequence.
        Call it only where all ranks are (it issues collectives); it is recorded like any other.
        """
        if self.source == "flight_recorder":
            self.sync()
        new, self.entries = self.entries, []
        digests = {}
        for e in new:
            digests.setdefault(e["group"], hashlib.sha1()).update(json.dumps(signature(e)).encode())
        mine = {g: (sum(e["group"] == g for e in new), h.hexdigest(), self.ranks[g]) for g, h in digests.items()}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        members = {g: ranks for d in everyone for g, (_, _, ranks) in d.items()}
        bad = sorted(g for g, ranks in members.items() if len({str(everyone[m].get(g, "")[:2]) for m in ranks}) > 1)
        if not bad:
            self.write(check=step, t=self.seconds(), ok=True)
            return
        ledgers = [None] * dist.get_world_size()
        described = [dict(group_name=g, label=self.labels.get(g, g), ranks=self.ranks[g])
                     for g in bad if g in self.ranks]
        dist.all_gather_object(ledgers, described + [e for e in new if e["group"] in bad])
        self.write(check=step, t=self.seconds(), ok=False)
        divergence = first_divergence(ledgers, {g: members[g] for g in bad})
        raise RuntimeError(f"step {step}: ranks issued different collectives (minirl.ledger check): {divergence}")


def _flat(value) -> list[torch.Tensor]:
    """The tensors in an op argument: a tensor, or (nested) lists of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else []


def flight_recorder_on() -> bool:
    """Whether the environment asks torch for a flight recorder (it must, before the process group exists)."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"))


def flight_recorder_entries() -> list[dict]:
    """This process's collectives as torch's flight recorder holds them (oldest first; its last
    TORCH_FR_BUFFER_SIZE). The pickled dump without stacks: ~2 ms for 200 entries, the JSON one ~50."""
    dump = pickle.loads(torch._C._distributed_c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=False,
                                                                  onlyActive=False))
    return dump.get("entries", [])


def start(ledger_dir: str, labels: dict | None = None, stall_s: float | None = None) -> Ledger:
    """Begin recording in one call (any PyTorch program); `.stop()` ends it. Before the process group
    exists it also switches on NCCL's flight recorder, dumping beside the ledgers."""
    if not dist.is_initialized():
        flight_recorder_env(ledger_dir)
    return Ledger(ledger_dir, labels=labels, stall_s=stall_s).__enter__()


def call_site() -> str:
    """`file.py:line function` of the innermost caller outside torch, plus the innermost frame of
    torch.distributed below it when there is one (FSDP's hooks during `loss.backward()`), c10d's
    own wrappers skipped. A collective of compiled code names the user code that ran it, "via
    compiled code" (torch.compile's generated files and FX graphs are not where a reader looks)."""
    frame, inner = sys._getframe(2), None
    while frame is not None:
        path = frame.f_code.co_filename
        here = f"{frame.f_lineno} {frame.f_code.co_name}"
        if inner is None and ("torchinductor" in path or path.startswith("<eval_with_key>")):
            inner = "compiled code"
        elif not path.endswith(_WRAPPERS):
            if not path.startswith(_TORCH_DIR):
                return f"{os.path.basename(path)}:{here}" + (f" via {inner}" if inner else "")
            if inner is None and path.startswith(os.path.join(_TORCH_DIR, "distributed")):  # e.g. FSDP's hooks
                inner = f"{os.path.relpath(path, _TORCH_DIR)}:{here}"
        frame = frame.f_back
    return inner or "?"


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="Print the first divergent collective of DIR/rank*.jsonl "
                                            "(exit 1 if the ranks diverged, 0 if they agree).")
    p.add_argument("dir", help="the ledger directory (train.py: OUT_DIR/ledger)")
    args = p.parse_args(argv)
    print(report(args.dir))
    return 1 if first_divergence(read_ledgers(args.dir)) else 0


if __name__ == "__main__":
    sys.exit(main())
