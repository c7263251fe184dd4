"""A stand-in for flash-attn-4's two kernels, for testing the `minirl::flash_varlen_attn` op on CPU,
and the fixture that installs it.

`forward` and `backward` take the arguments minirl passes to flash-attn-4's `_flash_attn_fwd` and
`_flash_attn_bwd` and compute what those kernels compute, by the textbook formulas in the inputs'
dtype (float64 in the tests): the output and the log-sum-exp [H, T] of each query's scaled scores;
then dq, dk, dv from the saved output and log-sum-exp, as a flash backward does (P rebuilt as
exp(S - lse)). A wiring mistake in the op (arguments swapped, lse in the wrong layout, the wrong
tensors saved for backward) gives wrong numbers here, as it would with the real kernels.
"""

import importlib
import sys

import pytest
import torch

# flash_attn/cute/interface.py of a stand-in flash-attn-4 whose kernels are this module's
REFERENCE_KERNELS = "from helpers_flash import forward as _flash_attn_fwd, backward as _flash_attn_bwd\n"


def _forget_flash_attn():
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]


@pytest.fixture
def fake_flash_attn(tmp_path, monkeypatch):
    """A throwaway `flash_attn` on sys.path, laid out as flash-attn-4 installs it: a namespace
    package (no __init__.py) holding the `cute` subpackage. Returns a function that writes
    `cute/interface.py` (REFERENCE_KERNELS: this module's kernels); imported modules are forgotten
    before each write and at the end (a real flash-attn already imported comes back then)."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    def write_interface(source: str):
        _forget_flash_attn()
        (tmp_path / "flash_attn" / "cute" / "interface.py").write_text(source)
        importlib.invalidate_caches()

    yield write_interface
    _forget_flash_attn()


def _documents(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _scores(q, k, scale):
    """q [L, H, D], k [L, Hkv, D] -> causal scaled scores [H, L, L] (kv heads repeated for GQA)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf"))


def forward(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, return_lse):
    assert causal and return_lse and cu_seqlens_q is cu_seqlens_k and cu_seqlens_q.dtype == torch.int32
    scale, group = q.shape[-1] ** -0.5, q.shape[1] // k.shape[1]
    out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for d in _documents(cu_seqlens_q):
        assert d.stop - d.start <= max_seqlen_q
        s = _scores(q[d], k[d], scale)  # [H, L, L]
        lse[:, d] = s.logsumexp(-1).float()
        out[d] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[d].repeat_interleave(group, dim=1))
    return out, lse, None, None, None  # flash-attn-4 returns three more, unused here


def backward(q, k, v, out, dout, lse, *, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    assert causal and cu_seqlens_q is cu_seqlens_k and lse.shape == (q.shape[1], q.shape[0])
    scale, group = q.shape[-1] ** -0.5, q.shape[1] // k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for d in _documents(cu_seqlens_q):
        kd, vd = (x[d].repeat_interleave(group, dim=1) for x in (k, v))  # [L, H, D]
        p = (_scores(q[d], k[d], scale) - lse[:, d, None].to(q.dtype)).exp()  # [H, L, L]
        dp = torch.einsum("qhd,khd->hqk", dout[d], vd)
        ds = p * (dp - (dout[d] * out[d]).sum(-1).transpose(0, 1)[:, :, None]) * scale
        dq[d] = torch.einsum("hqk,khd->qhd", ds, kd)
        dk_full = torch.einsum("hqk,qhd->khd", ds, q[d])  # [L, H, D]: summed over each kv head's group
        dv_full = torch.einsum("hqk,qhd->khd", p, dout[d])
        dk[d] = dk_full.unflatten(1, (k.shape[1], group)).sum(2)
        dv[d] = dv_full.unflatten(1, (k.shape[1], group)).sum(2)
    return dq, dk, dv
