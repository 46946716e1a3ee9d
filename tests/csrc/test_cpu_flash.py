"""The compiled plain attention on CPU (csrc/cpu_flash.cpp), forward and backward, called directly.

Its out and lse, and its dq, dk, dv, are held by the tolerance rule of ``fastattn_icl.testing`` to the oracle's
(``fastattn_icl.reference.attention``, gradients by autograd) in float32 and float64, on shapes that cross its blocks
(more than 64 query rows, more than 512 keys), grouped heads, a chunk of queries over a cache (bottom-right causal), no
causal mask, one decode row, a head dim off the vector width, strided inputs and float64; through the BLAS the wheel
carries and through ``at::addmm_`` (``FASTATTN_ICL_CPU_GEMM=aten``); with the AVX2 body and, in a subprocess, the
baseline one. The backend takes it for every flash pass without a key mask (tests/ops/test_cpu_paths.py runs that end
to end).
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
from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close

pytestmark = pytest.mark.skipif(not _cpu_kernels.available(), reason="fastattn_icl._C lacks the CPU kernels")
OP = torch.ops.fastattn_icl.flash_attention_bwd
FWD = torch.ops.fastattn_icl.flash_attention_fwd
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CASES = [
    # B, H, Hkv, Tq, Tk, D, causal
    (1, 2, 2, 150, 150, 32, True),  # three query blocks, the last one partial
    (2, 4, 2, 70, 70, 16, True),  # GQA: each query head adds into its own dk/dv
    (1, 2, 1, 40, 600, 16, True),  # a chunk over a cache: two key blocks, bottom-right causal
    (2, 2, 2, 33, 530, 20, False),  # not causal, a head dim off the vector width, a partial key block
    (1, 3, 3, 1, 77, 24, True),  # one decode row
    (2, 4, 2, 24, 90, 16, True),  # GQA over a cache, two batch rows
    (1, 2, 1, 100, 600, 16, True),  # two query blocks over two key blocks: rows that see none of a later block
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


def _check_forward(case, dtype=torch.float32, layout=None, q_mult=1.0, weighted=False):
    """The forward against the oracle's out and lse (in ``dtype`` and in float64); ``layout`` rearranges q, k, v;
    ``q_mult`` scales q (and so the logits); ``weighted``: with key weights ``w [B, H, Tk]`` (around 1, some keys far
    from it), whose oracle is ``(P ⊙ w) v`` with the unweighted ``P`` and ``lse``."""
    B, H, Hkv, Tq, Tk, D, causal = case
    (_, q, k, v, _, _), leaves = _problem(case, dtype)
    q, leaves = q * q_mult, (leaves[0] * q_mult, *leaves[1:])
    w = torch.randn(B, H, Tk, generator=torch.Generator().manual_seed(Tk), dtype=torch.float64).mul(1.5).exp() \
        if weighted else None
    if layout is not None:
        q, k, v = layout([q, k, v])
    out, lse = FWD(q, k, v, causal, D ** -0.5, None if w is None else w.to(dtype))
    assert out.dtype == lse.dtype == dtype and lse.shape == (B, H, Tq)
    if q.is_contiguous():
        assert out.is_contiguous()
    else:  # as [B, Tq, H, D] memory (fastattn_icl.ops._validate.output_like)
        assert out.transpose(1, 2).is_contiguous()
    wants = []
    for dt in (dtype, torch.float64):
        q_, k_, v_ = (x.to(dt) for x in leaves[:3])
        s = torch.matmul(q_, k_.repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * D ** -0.5
        if causal:
            s = s.masked_fill(torch.ones(Tq, Tk, dtype=torch.bool).triu(Tk - Tq + 1), float("-inf"))
        if w is None:
            wants.append((attention_ref(q_, k_, v_, causal=causal), s.logsumexp(-1)))
        else:
            p_hat = torch.softmax(s, -1) * w.to(dt)[:, :, None, :]
            wants.append((torch.matmul(p_hat, v_.repeat_interleave(H // Hkv, 1)), s.logsumexp(-1)))
    check_close("out", out, wants[0][0], wants[1][0], factor=FWD_FACTOR)
    check_close("lse", lse, wants[0][1], wants[1][1], factor=FWD_FACTOR)


@pytest.fixture(params=["blas", "aten"])
def gemm(request, monkeypatch):
    """The GEMMs through the BLAS libtorch_cpu carries, or through ``at::addmm_``."""
    if request.param == "aten":
        monkeypatch.setenv("FASTATTN_ICL_CPU_GEMM", "aten")
    return request.param


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_the_oracle(gemm, case, direction):
    (_check_forward if direction == "fwd" else _check)(case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_key_weights_scale_the_values_product_only(gemm, case):
    """``out = (P ⊙ w) v`` with ``P`` and ``lse`` unweighted (the folded anchor re-weighting), float32 and float64;
    and on a q whose logits spread wide (the running max moves; the accumulator is rescaled with the weights in it)."""
    _check_forward(case, weighted=True)
    _check_forward(case, torch.float64, weighted=True)
    _check_forward(case, q_mult=30.0, weighted=True)


def test_unit_key_weights_are_bit_for_bit_no_weights():
    (_, q, k, v, _, _), _ = _problem(CASES[2], torch.float32)
    plain = FWD(q, k, v, True, 0.25)
    ones = FWD(q, k, v, True, 0.25, torch.ones(1, 2, 600))
    # bit-exact on purpose: the same kernel and code path, the product by 1.0 is exact
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))


def test_forward_float64_and_strides():
    """float64; q, k, v in ``[B, T, H, D]`` memory (a transformers projection's) with a padded row stride for k, v;
    a single query row whose stride is 1 (BLAS could not take it)."""
    _check_forward(CASES[2], torch.float64)

    def bthd(xs):
        q, k, v = xs
        wide = [torch.cat([x, torch.zeros_like(x[..., :3])], -1)[..., : x.shape[-1]] for x in (k, v)]
        return [q.transpose(1, 2).contiguous().transpose(1, 2), *wide]

    _check_forward(CASES[1], layout=bthd)

    def one_row(xs):
        q, k, v = xs
        B, H, _, D = q.shape
        return [torch.empty_strided(q.shape, (H * D, D, 1, 1), dtype=q.dtype).copy_(q), k, v]

    _check_forward(CASES[4], layout=one_row)


def test_forward_wide_logits():
    """Logits spread over hundreds (q scaled by 30): the running max moves between key blocks, and most terms fall
    under the exp floor."""
    _check_forward(CASES[2], q_mult=30.0)
    _check_forward(CASES[-1], q_mult=30.0)


def test_forward_nan_stays_nan():
    """A NaN key makes out and lse NaN on every row that sees it (PyTorch's kernel does the same), in the first key
    block of two, in the last column of a block, and on a short row."""
    for Tk, at in ((600, 511), (600, 3), (8, 7)):
        q, k, v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, Tk, 16), torch.randn(1, 1, Tk, 16)
        k[0, 0, at, 0] = float("nan")
        out, lse = FWD(q, k, v, False, 0.25)
        assert out.isnan().all() and lse.isnan().all(), (Tk, at)


def test_forward_without_keys():
    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 0, 8)
    out, lse = FWD(q, k, k, False, 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_forward_bad_input():
    (_, q, k, v, _, _), _ = _problem(CASES[1], torch.float32)
    cases = {
        "dtype": ((q, k.double()), "share one dtype"),
        "half": ((q.half(), k.half(), v.half()), "float32 or float64"),
        "heads": ((q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1)), "not a multiple"),
        "causal": ((q, k[:, :, :10], v[:, :, :10]), "causal needs Tq <= Tk"),
        "scale": ((q, k, v, True, -1.0), "scale must be positive"),
        "weights shape": ((q, k, v, True, 0.25, torch.ones(2, 4, 69)), "key_weights must be a CPU tensor"),
        "weights dtype": ((q, k, v, True, 0.25, torch.ones(2, 4, 70, dtype=torch.float64)), "of q's dtype"),
    }
    for head, match in cases.values():
        with pytest.raises(RuntimeError, match=match):
            FWD(*head, *(q, k, v, True, 0.25)[len(head):])


def test_forward_opcheck():
    (_, q, k, v, _, _), _ = _problem((1, 2, 1, 9, 12, 8, True), torch.float32)
    torch.library.opcheck(FWD.default, (q, k, v, True, 0.3))
    torch.library.opcheck(FWD.default, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, False, 0.3))
    torch.library.opcheck(FWD.default, (q, k, v, True, 0.3, torch.rand(1, 2, 12) + 0.5))


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


def test_float64(gemm):
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


def test_any_stride_along_d():
    """Inputs whose stride along D is not 1 (``[B, H, D, T]`` memory) are copied for BLAS, both directions."""

    def d_major(xs):
        return [x.transpose(2, 3).contiguous().transpose(2, 3) if x.dim() == 4 else x for x in xs]

    _check(CASES[1], layout=d_major)
    _check_forward(CASES[1], layout=d_major)


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
        "causal": ((do, q, k[:, :, :10], v[:, :, :10]), "causal needs Tq <= Tk"),
    }
    for head, match in cases.values():
        with pytest.raises(RuntimeError, match=match):
            OP(*head, *args[len(head):], True, 0.25)


def test_opcheck():
    args, _ = _problem((1, 2, 1, 9, 12, 8, True), torch.float32)
    torch.library.opcheck(OP.default, (*args, True, 0.3))


def test_baseline_body():
    """With ``ATEN_CPU_CAPABILITY=default`` the kernels run their baseline bodies (std::exp, no AVX2), still within
    the rule."""
    script = textwrap.dedent("""
        import torch
        from tests.csrc import test_cpu_flash as t
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for case in t.CASES[:3]:
            t._check(case)
            t._check_forward(case)
            t._check_forward(case, weighted=True)
        print("ok")
    """)
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


def test_a_build_without_key_weights_counts_as_missing(monkeypatch):
    """A build from older sources has ``flash_attention_fwd`` without ``key_weights``: the kernels then count as
    missing (the backend runs its eager code, with the warning naming the argument), so no call passes it."""
    assert _cpu_kernels._missing() is None
    monkeypatch.setattr(_cpu_kernels, "ARGS", (("flash_attention_fwd", "no_such_argument"),))
    assert _cpu_kernels._missing() == "the argument no_such_argument of fastattn_icl::flash_attention_fwd"
    assert not _cpu_kernels.available.__wrapped__()
