"""Bind each rank's CPU threads and host memory to the NUMA node nearest its GPU.

On multi-socket GPU hosts, a rank whose Python threads and pinned-memory copies run on the far socket
pays a cross-socket hop on every host<->device transfer. `choose_node` decides the node from a sysfs tree
(a pure function, tested without a GPU); `bind_to_gpu_node` gathers its inputs, applies the choice and
logs one line. Only libnuma's integer API is used (`numa_run_on_node`, `numa_set_preferred`): its bitmask
API hands out pointers that ctypes easily truncates to 32 bits (segfaults far from the cause).
"""

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass

import torch

_BDF = re.compile(r"[0-9a-f]{4,8}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


@dataclass(frozen=True)
class NumaChoice:
    """The node a rank runs on (None when skipped) and which rule of `choose_node` picked it."""

    node: int | None
    reason: str  # pci | local_cpulist | fallback | skipped


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel cpulist such as "0-3,8-11" (may be empty) into CPU ids."""
    cpus = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_nodes(sysfs_root: str = "/sys") -> dict[int, list[int]]:
    """Node id -> its CPUs, for nodes that have CPUs (not memory-only nodes: GB200's HBM, CXL memory)."""
    node_dir = os.path.join(sysfs_root, "devices", "system", "node")
    try:
        names = os.listdir(node_dir)
    except OSError:
        return {}
    nodes = {}
    for name in names:
        if not re.fullmatch(r"node\d+", name):
            continue  # also holds files such as "online" and "has_cpu"
        cpus = parse_cpulist(_read(os.path.join(node_dir, name, "cpulist")) or "")
        if cpus:
            nodes[int(name[4:])] = cpus
    return dict(sorted(nodes.items()))


def choose_node(bdf: str | None, local_rank: int, local_world_size: int, max_node: int,
                sysfs_root: str = "/sys") -> NumaChoice:
    """Pick the NUMA node for the rank that drives the GPU at PCI address `bdf`; the first usable answer:
      1. pci:           /sys/bus/pci/devices/<bdf>/numa_node
      2. local_cpulist: the node of the first CPU in .../<bdf>/local_cpulist, when numa_node is -1 (no
         affinity from firmware: single-socket boxes, VMs) or names a CPU-less node (GB200);
      3. fallback:      local_rank * n // local_world_size over the n CPU-bearing nodes (libnuma's
         0..max_node without sysfs), a guess that is wrong whenever GPUs are not spread evenly.
    A node is usable if it has CPUs and is <= max_node (numa_max_node(); sysfs may list more).
    """
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise ValueError(f"need 0 <= local_rank < local_world_size, got {local_rank=} {local_world_size=}")
    if max_node < 0:
        raise ValueError(f"max_node must be >= 0, got {max_node}")
    usable = {n: cpus for n, cpus in cpu_nodes(sysfs_root).items() if n <= max_node}

    if bdf is not None:
        bdf = bdf.lower()
        if not _BDF.fullmatch(bdf):
            raise ValueError(f"bad PCI address {bdf!r}, expected e.g. '0000:1b:00.0'")
        device_dir = os.path.join(sysfs_root, "bus", "pci", "devices", bdf)

        node = int((_read(os.path.join(device_dir, "numa_node")) or "-1").strip())
        if node in usable:
            return NumaChoice(node, "pci")

        local_cpus = parse_cpulist(_read(os.path.join(device_dir, "local_cpulist")) or "")
        if local_cpus:
            first = min(local_cpus)
            for node, cpus in usable.items():
                if first in cpus:
                    return NumaChoice(node, "local_cpulist")

    candidates = sorted(usable) or list(range(max_node + 1))
    return NumaChoice(candidates[local_rank * len(candidates) // local_world_size], "fallback")


def load_libnuma() -> ctypes.CDLL | None:
    """libnuma with the integer-API functions typed (ctypes would guess `int` for all); None if absent."""
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("numa") or "libnuma.so.1", use_errno=True)
    except OSError:
        return None
    for fn, argtypes, restype in ((lib.numa_available, [], ctypes.c_int), (lib.numa_max_node, [], ctypes.c_int),
                                  (lib.numa_run_on_node, [ctypes.c_int], ctypes.c_int),
                                  (lib.numa_set_preferred, [ctypes.c_int], None)):
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def apply_node(lib: ctypes.CDLL, node: int) -> None:
    """Run the calling thread (and the threads it starts later: call it early) on `node`'s CPUs and
    prefer its memory (preferred, not strict: allocations spill over instead of failing)."""
    if lib.numa_run_on_node(node) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"numa_run_on_node({node}) failed: {os.strerror(err)}")
    lib.numa_set_preferred(node)


def format_bdf(domain: int, bus: int, device: int) -> str:
    """sysfs PCI address of a CUDA device (PCI function 0): format_bdf(0, 0x1b, 0) == "0000:1b:00.0"."""
    return f"{domain:04x}:{bus:02x}:{device:02x}.0"


def gpu_pci_bdf(index: int) -> str:
    """PCI address of the physical device behind visible CUDA device `index` (CUDA_VISIBLE_DEVICES')."""
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"CUDA device index {index} out of range: {count} visible device(s)")
    props = torch.cuda.get_device_properties(index)
    return format_bdf(props.pci_domain_id, props.pci_bus_id, props.pci_device_id)


def bind_to_gpu_node(rank: int, local_rank: int, local_world_size: int, device: torch.device,
                     sysfs_root: str = "/sys") -> NumaChoice:
    """Bind this process to the NUMA node of `device`; call once per rank at start-up. Never fails the
    run over NUMA (no CUDA device, no libnuma, a kernel without NUMA: skipped); prints one line."""
    def skip(who: str, why: str) -> NumaChoice:
        print(f"numa: rank {rank} {who} -> skipped ({why})", flush=True)
        return NumaChoice(None, "skipped")

    if device.type != "cuda":
        return skip(f"device {device}", "not a CUDA device")
    if device.index is None:
        raise ValueError(f"device must name its index, e.g. cuda:{local_rank}; got {device}")
    if not torch.cuda.is_available():
        return skip(f"gpu {device.index}", "CUDA not available")
    bdf = gpu_pci_bdf(device.index)
    who = f"gpu {device.index} ({bdf})"
    lib = load_libnuma()
    if lib is None:
        return skip(who, "libnuma not found; install libnuma1")
    if lib.numa_available() < 0:
        return skip(who, "kernel has no NUMA support")
    choice = choose_node(bdf, local_rank, local_world_size, lib.numa_max_node(), sysfs_root)
    try:
        apply_node(lib, choice.node)
    except OSError as e:
        return skip(who, f"{e.strerror} on node {choice.node} ({choice.reason})")
    print(f"numa: rank {rank} {who} -> node {choice.node} ({choice.reason})", flush=True)
    return choice
