"""The compiled backward of plain attention on CPU (csrc/cpu_flash_bwd.cpp), called directly.

Its dq, dk, dv are held by the tolerance rule of ``fastattn_icl.testing`` to the oracle's gradients (autograd through
``fastattn_icl.reference.attention``) in float32 and float64, on shapes that cross its blocks (more than 64 query rows,
more than 512 keys), grouped heads, a chunk of queries over a cache (bottom-right causal), no causal mask, one decode
row, a head dim off the vector width, strided inputs and float64; through the BLAS the wheel carries and through
``at::addmm_`` (``FASTATTN_ICL_CPU_GEMM=aten``); with the AVX2 body and, in a subprocess, the baseline one. The backend
takes it for every mask-free flash backward (tests/ops/test_cpu_paths.py runs that end to end).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastattn_icl.ops import _cpu_kernels
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import GRAD_FACTOR, check_close

pytestmark = pytest.mark.skipif(not _cpu_kernels.available(), reason="fastattn_icl._C lacks the CPU kernels")
OP = torch.ops.fastattn_icl.flash_attention_bwd
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [
    # B, H, Hkv, Tq, Tk, D, causal
    (1, 2, 2, 150, 150, 32, True),  # three query blocks, the last one partial
    (2, 4, 2, 70, 70, 16, True),  # GQA: each query head adds into its own dk/dv
    (1, 2, 1, 40, 600, 16, True),  # a chunk over a cache: two key blocks, bottom-right causal
    (2, 2, 2, 33, 530, 20, False),  # not causal, a head dim off the vector width, a partial key block
    (1, 3, 3, 1, 77, 24, True),  # one decode row
    (2, 4, 2, 24, 90, 16, True),  # GQA over a cache, two batch rows
]


def _problem(case, dtype, seed=0):
    """``(grad_out, q, k, v, out, lse)`` in ``dtype`` (``out`` and ``lse`` from the float64 oracle) and the leaves in
    float64."""
    B, H, Hkv, Tq, Tk, D, causal = case
    g = torch.Generator().manual_seed(seed + sum(case[:6]))
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    do = torch.randn(B, H, Tq, D, generator=g, dtype=torch.float64)
    scale = D ** -0.5
    s = torch.matmul(q, k.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(Tk - Tq + 1), float("-inf"))
    lse = s.logsumexp(-1)
    o = attention_ref(q, k, v, causal=causal)
    return [t.to(dtype) for t in (do, q, k, v, o, lse)], (q, k, v, do)


def _oracle_grads(leaves, causal, dtype):
    q, k, v, do = (t.to(dtype) for t in leaves)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    return torch.autograd.grad(attention_ref(*xs, causal=causal), xs, do)


def _check(case, dtype=torch.float32, layout=None, expand_grad=False):
    """The op against the oracle; ``layout`` rearranges the op's inputs in memory; ``expand_grad``: the output
    gradient is one row of ``D`` values expanded to every row (stride 0)."""
    args, leaves = _problem(case, dtype)
    if expand_grad:
        args[0] = args[0][:1, :1, :1].expand(args[0].shape)
        leaves = (*leaves[:3], leaves[3][:1, :1, :1].expand(leaves[3].shape))
    if layout is not None:
        args = layout(args)
    got = OP(*args, case[6], case[5] ** -0.5)
    same = _oracle_grads(leaves, case[6], dtype)
    high = _oracle_grads(leaves, case[6], torch.float64)
    for name, x, s, h in zip(("dq", "dk", "dv"), got, same, high):
        assert x.shape == h.shape and x.dtype == dtype and x.is_contiguous()
        check_close(name, x, s, h, factor=GRAD_FACTOR)


@pytest.mark.parametrize("gemm", ["blas", "aten"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_the_oracle(monkeypatch, case, gemm):
    if gemm == "aten":
        monkeypatch.setenv("FASTATTN_ICL_CPU_GEMM", "aten")
    _check(case)


@pytest.mark.parametrize("gemm", ["blas", "aten"])
def test_float64(monkeypatch, gemm):
    if gemm == "aten":
        monkeypatch.setenv("FASTATTN_ICL_CPU_GEMM", "aten")
    _check(CASES[2], torch.float64)


def test_row_strides_blas_cannot_take():
    """A row stride below D (the expanded output gradient of ``(out.sum((0, 1, 2)) * w).sum()``: stride 0) is not a
    BLAS leading dimension, nor is the stride of a single row that PyTorch calls contiguous whatever it is (1 here):
    the op copies the first and ignores the second."""

    _check(CASES[1], expand_grad=True)

    def one_row(args):  # q, out, grad_out of one row, [B, H, D, 1] memory seen as [B, H, 1, D]
        do, q, k, v, o, lse = args
        B, H, _, D = q.shape
        q, do, o = (torch.empty_strided(x.shape, (H * D, D, 1, 1), dtype=x.dtype).copy_(x) for x in (q, do, o))
        assert q.stride(2) == 1 and q.is_contiguous()
        return [do, q, k, v, o, lse]

    _check(CASES[4], layout=one_row)


def test_strided_inputs():
    """Inputs in other layouts: ``[B, T, H, D]`` memory (a transformers projection's), the lse ``[B, Tq, H]`` of
    PyTorch's CPU flash kernel, and a padded row stride."""

    def layout(args):
        do, q, k, v, o, lse = args
        bthd = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (do, q, o)]
        wide = [torch.cat([x, torch.zeros_like(x[..., :3])], -1)[..., : x.shape[-1]] for x in (k, v)]
        return [*bthd[:2], *wide, bthd[2], lse.transpose(1, 2).contiguous().transpose(1, 2)]

    _check(CASES[1], layout=layout)


def test_a_row_that_sees_no_key_gets_no_gradient():
    """lse = −inf: the row's P is 0, so its dq and its share of dk, dv are 0 (not NaN)."""
    args, _ = _problem(CASES[0], torch.float32)
    args[5][:, :, 7] = float("-inf")
    dq, dk, dv = OP(*args, True, 0.2)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dq[:, :, 7] == 0).all() and (dq[:, :, 8] != 0).any()


def test_bad_input():
    args, _ = _problem(CASES[1], torch.float32)
    do, q, k, v, o, lse = args
    cases = {
        "dtype": ((do, q.double()), "every input must be"),
        "half": ((do.half(), q.half(), k.half(), v.half(), o.half(), lse.half()), "float32 or float64"),
        "heads": ((do, q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1)), "not a multiple"),
        "lse": ((do, q, k, v, o, lse[:, :, :5]), "lse must be"),
        "stride": ((do, q.transpose(2, 3).contiguous().transpose(2, 3)), "unit stride along D"),
        "causal": ((do, q, k[:, :, :10], v[:, :, :10]), "causal needs Tq <= Tk"),
    }
    for head, match in cases.values():
        with pytest.raises(RuntimeError, match=match):
            OP(*head, *args[len(head):], True, 0.25)


def test_opcheck():
    args, _ = _problem((1, 2, 1, 9, 12, 8, True), torch.float32)
    torch.library.opcheck(OP.default, (*args, True, 0.3))


def test_baseline_body():
    """With ``ATEN_CPU_CAPABILITY=default`` the kernel runs its baseline body (std::exp, no AVX2), still within the
    rule."""
    script = textwrap.dedent("""
        import torch
        from tests.csrc import test_cpu_flash_bwd as t
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for case in t.CASES[:2]:
            t._check(case)
        print("ok")
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
