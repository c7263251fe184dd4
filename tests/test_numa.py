"""Tests for minirl/numa.py.

Node selection runs against fake sysfs trees laid out like the real thing
(devices/system/node/nodeN/cpulist, bus/pci/devices/<bdf>/{numa_node,local_cpulist});
expected nodes are written out by hand from each topology. The real libnuma
binding runs in a subprocess so the test process keeps its own affinity.
"""

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest
import torch

from minirl.numa import NumaChoice, bind_to_gpu_node, choose_node, format_bdf, parse_cpulist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# PCI addresses of the 8 GPUs on a 2-socket DGX-style box: 0-3 on socket 0, 4-7 on socket 1.
DGX_BDFS = [
    "0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0",
    "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0",
]


def make_sysfs(root, nodes: dict[int, str], gpus: dict[str, tuple[int | None, str | None]]) -> str:
    """Write a fake sysfs: nodes maps id -> cpulist text ("" = CPU-less node);
    gpus maps bdf -> (numa_node, local_cpulist), None leaving that file out."""
    node_dir = root / "devices" / "system" / "node"
    node_dir.mkdir(parents=True)
    (node_dir / "online").write_text(f"0-{max(nodes)}\n" if nodes else "\n")  # must be ignored
    for node, cpulist in nodes.items():
        (node_dir / f"node{node}").mkdir()
        (node_dir / f"node{node}" / "cpulist").write_text(cpulist + "\n")
    for bdf, (numa_node, local_cpulist) in gpus.items():
        dev = root / "bus" / "pci" / "devices" / bdf
        dev.mkdir(parents=True)
        if numa_node is not None:
            (dev / "numa_node").write_text(f"{numa_node}\n")
        if local_cpulist is not None:
            (dev / "local_cpulist").write_text(local_cpulist + "\n")
    return str(root)


def choices(sysfs, bdfs, max_node):
    return [choose_node(b, i, len(bdfs), max_node, sysfs) for i, b in enumerate(bdfs)]


@pytest.fixture
def dgx(tmp_path):
    """2 sockets x 8 GPUs, hyperthreads listed as a second range."""
    gpus = {b: (0 if i < 4 else 1, "0-55,112-167" if i < 4 else "56-111,168-223")
            for i, b in enumerate(DGX_BDFS)}
    return make_sysfs(tmp_path, {0: "0-55,112-167", 1: "56-111,168-223"}, gpus)


def test_parse_cpulist():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("\n") == []


def test_format_bdf():
    assert format_bdf(0, 0x1B, 0) == "0000:1b:00.0"
    assert format_bdf(0x19, 0x1, 0x2) == "0019:01:02.0"


def test_two_sockets_eight_gpus(dgx):
    assert choices(dgx, DGX_BDFS, max_node=1) == [NumaChoice(0, "pci")] * 4 + [NumaChoice(1, "pci")] * 4


def test_four_gpus_two_nodes(tmp_path):
    bdfs = ["0000:1b:00.0", "0000:43:00.0", "0000:89:00.0", "0000:c4:00.0"]
    sysfs = make_sysfs(tmp_path, {0: "0-15", 1: "16-31"},
                       {b: (i // 2, None) for i, b in enumerate(bdfs)})
    assert [c.node for c in choices(sysfs, bdfs, 1)] == [0, 0, 1, 1]


def test_all_gpus_on_node_1(tmp_path):
    """A rank-count spread would put half the ranks on node 0; the GPUs say node 1."""
    sysfs = make_sysfs(tmp_path, {0: "0-31", 1: "32-63"}, {b: (1, "32-63") for b in DGX_BDFS})
    assert choices(sysfs, DGX_BDFS, 1) == [NumaChoice(1, "pci")] * 8


def test_gb200_cpu_less_gpu_nodes(tmp_path):
    """GB200: each GPU reports its own HBM node (2, 10, 18, 26: no CPUs);
    the Grace CPUs sit on nodes 0 and 1 and local_cpulist points there."""
    nodes = {n: "" for n in range(34)}
    nodes[0], nodes[1] = "0-71", "72-143"
    bdfs = ["0008:01:00.0", "0009:01:00.0", "0018:01:00.0", "0019:01:00.0"]
    gpus = {bdfs[0]: (2, "0-71"), bdfs[1]: (10, "0-71"),
            bdfs[2]: (18, "72-143"), bdfs[3]: (26, "72-143")}
    sysfs = make_sysfs(tmp_path, nodes, gpus)
    assert choices(sysfs, bdfs, max_node=33) == [
        NumaChoice(0, "local_cpulist"), NumaChoice(0, "local_cpulist"),
        NumaChoice(1, "local_cpulist"), NumaChoice(1, "local_cpulist"),
    ]


def test_gb200_fallback_skips_cpu_less_nodes(tmp_path):
    nodes = {n: "" for n in range(34)}
    nodes[0], nodes[1] = "0-71", "72-143"
    sysfs = make_sysfs(tmp_path, nodes, {})
    assert [c.node for c in choices(sysfs, [None] * 4, 33)] == [0, 0, 1, 1]


def test_single_socket_numa_node_minus_one(tmp_path):
    bdfs = ["0000:01:00.0", "0000:02:00.0"]
    sysfs = make_sysfs(tmp_path, {0: "0-7"}, {b: (-1, "0-7") for b in bdfs})
    assert choices(sysfs, bdfs, 0) == [NumaChoice(0, "local_cpulist")] * 2


def test_local_cpulist_spanning_nodes_takes_first_cpu(tmp_path):
    """Sub-NUMA clustering: one socket split into nodes 0 and 1, the GPU's
    local_cpulist covers the whole socket; its first CPU is on node 0."""
    sysfs = make_sysfs(tmp_path, {0: "0-7", 1: "8-15", 2: "16-23", 3: "24-31"},
                       {"0000:18:00.0": (-1, "0-15"), "0000:9a:00.0": (-1, "16-31")})
    assert choose_node("0000:18:00.0", 0, 2, 3, sysfs) == NumaChoice(0, "local_cpulist")
    assert choose_node("0000:9a:00.0", 1, 2, 3, sysfs) == NumaChoice(2, "local_cpulist")


def test_cuda_visible_devices_subset_follows_physical_gpu(dgx):
    """CUDA_VISIBLE_DEVICES="4,5": local ranks 0 and 1 drive physical GPUs 4 and 5,
    whose bdfs torch reports. Both are on node 1, though local rank 0 of 2
    would be spread to node 0."""
    visible = [DGX_BDFS[4], DGX_BDFS[5]]
    assert choices(dgx, visible, 1) == [NumaChoice(1, "pci")] * 2
    assert choose_node(None, 0, 2, 1, dgx) == NumaChoice(0, "fallback")  # what a guess would do


def test_bdf_is_case_insensitive(dgx):
    assert choose_node("0000:9A:00.0", 0, 1, 1, dgx) == NumaChoice(1, "pci")


def test_no_pci_info_spreads_over_nodes(tmp_path):
    sysfs = make_sysfs(tmp_path, {0: "0-3", 1: "4-7"}, {})
    assert [c.node for c in choices(sysfs, [None] * 8, 1)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # bdf given but the device is not in sysfs: same spread, 3 ranks over 2 nodes.
    assert [c.node for c in choices(sysfs, ["0000:18:00.0"] * 3, 1)] == [0, 0, 1]
    assert {c.reason for c in choices(sysfs, [None] * 8, 1)} == {"fallback"}


def test_no_sysfs_at_all_spreads_over_libnuma_nodes(tmp_path):
    assert choices(str(tmp_path), DGX_BDFS, 1) == [NumaChoice(0, "fallback")] * 4 + [NumaChoice(1, "fallback")] * 4


def test_node_beyond_numa_max_node_is_rejected(tmp_path):
    # sysfs says node 3 (with CPUs) but libnuma only knows nodes 0-1.
    sysfs = make_sysfs(tmp_path, {0: "0-3", 1: "4-7", 3: "8-11"},
                       {"0000:18:00.0": (3, "4-7"), "0000:19:00.0": (3, "8-11")})
    assert choose_node("0000:18:00.0", 0, 2, 1, sysfs) == NumaChoice(1, "local_cpulist")
    assert choose_node("0000:19:00.0", 1, 2, 1, sysfs) == NumaChoice(1, "fallback")
    # the same tree with libnuma knowing node 3 takes it.
    assert choose_node("0000:19:00.0", 1, 2, 3, sysfs) == NumaChoice(3, "pci")


def test_bad_input_raises(dgx):
    with pytest.raises(ValueError, match="local_rank"):
        choose_node(DGX_BDFS[0], 8, 8, 1, dgx)
    with pytest.raises(ValueError, match="local_rank"):
        choose_node(DGX_BDFS[0], 0, 0, 1, dgx)
    with pytest.raises(ValueError, match="PCI address"):
        choose_node("18:00.0", 0, 1, 1, dgx)
    with pytest.raises(ValueError, match="max_node"):
        choose_node(DGX_BDFS[0], 0, 1, -1, dgx)


def test_cpu_device_is_skipped(capsys):
    assert bind_to_gpu_node(0, 0, 1, torch.device("cpu")) == NumaChoice(None, "skipped")
    assert capsys.readouterr().out == "numa: rank 0 device cpu -> skipped (not a CUDA device)\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build")
def test_cuda_device_without_cuda_is_skipped(capsys):
    assert bind_to_gpu_node(2, 2, 4, torch.device("cuda", 2)) == NumaChoice(None, "skipped")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("numa: rank 2 gpu 2 -> skipped")


def _node0_cpus() -> set[int]:
    """Node 0's CPUs from the real sysfs, parsed here independently of minirl."""
    with open("/sys/devices/system/node/node0/cpulist") as f:
        cpus = set()
        for part in f.read().strip().split(","):
            a, _, b = part.partition("-")
            cpus |= set(range(int(a), int(b or a) + 1))
        return cpus


def _libnuma_loadable() -> bool:
    try:
        ctypes.CDLL(ctypes.util.find_library("numa") or "libnuma.so.1")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _libnuma_loadable(), reason="libnuma cannot be loaded (apt install libnuma1)")
def test_real_binding_to_node_0():
    """Narrow the affinity to one CPU, bind to node 0 through libnuma, and check
    the affinity became exactly node 0's CPUs and node 0 is the preferred node."""
    node0 = _node0_cpus()
    code = f"""
import ctypes, os
from minirl.numa import apply_node, load_libnuma
lib = load_libnuma()
assert lib.numa_available() >= 0, "no NUMA in this kernel"
os.sched_setaffinity(0, {{{min(node0)}}})
apply_node(lib, 0)
lib.numa_preferred.restype = ctypes.c_int
lib.numa_preferred.argtypes = []
print(sorted(os.sched_getaffinity(0)), lib.numa_preferred())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{sorted(node0)} 0"
