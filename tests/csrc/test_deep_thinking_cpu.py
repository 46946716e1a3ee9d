"""fastattn_icl::fused_deep_thinking_update_ (csrc/deep_thinking.cpp), the CPU Deep-Thinking update, in one pass.

The kernel does the oracle's float32 operations in the oracle's order with one rounding each (no fused multiply-add),
so it is compared bit for bit with the per-tensor oracle (:func:`fastattn_icl.reference.deep_thinking.
deep_thinking_update`, applied to the whole ``[R, C]`` state at once: it is element-wise) and with the eager chunked
path it replaces, in every dtype; the tolerance rule against the float64 oracle (``fastattn_icl.testing``) is checked
as well. The AVX2 body runs on a machine that has it; a subprocess with ``ATEN_CPU_CAPABILITY=default`` runs the
portable ``at::vec`` body. Outputs are poisoned with NaN before a first update.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastattn_icl.ops.deep_thinking as dt_ops
from fastattn_icl import _ext
from fastattn_icl.ops import _torch_backend
from fastattn_icl.ops._torch_backend import _deep_thinking_update_eager
from fastattn_icl.ops.deep_thinking import deep_thinking_update_
from fastattn_icl.reference import deep_thinking as ref
from fastattn_icl.testing import check_close

OP = "fused_deep_thinking_update_"
needs_ext = pytest.mark.skipif(
    not _ext.has_op(OP),
    reason=f"fastattn_icl._C is not built or lacks {OP} ({_ext.load_error() or 'built from older sources'}); "
    f"{_ext.BUILD_HINT}",
)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK = 8192  # the kernel's column block per task
# (R, C): R·C not a multiple of any vector width, C = 1, rows across column blocks, one long row, vector-sized rows
SHAPES = [(5, 17), (7, 1), (1, 1), (3, 2 * BLOCK + 77), (1, 3 * BLOCK + 5), (4, 16), (2, 9), (0, 8), (2, 0)]


def _op(work, m, eta, beta, first):
    torch.ops.fastattn_icl.fused_deep_thinking_update_(work, m, eta, beta, first)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float32)).to(dtype)


def _state(R, C, dtype, seed, layout="contiguous"):
    """``work [R, 2, C]`` (its ``X̂`` of mixed magnitudes, ``X_new`` nearby) and ``m [R, C]`` (float32), both possibly
    views of larger buffers, plus the buffers (``big``, ``m_big``) to check that nothing outside the views changes."""
    if layout == "contiguous":
        big, m_big = torch.empty(R, 2, C, dtype=dtype), torch.empty(R, C)
        work, m = big, m_big
    elif layout == "padded":  # rows further apart than 2·C, m's rows too
        big, m_big = torch.full((R, 2, C + 5), 7.0, dtype=dtype), torch.full((R, C + 3), 3.0)
        work, m = big[:, :, :C], m_big[:, :C]
    elif layout == "three-slots":  # X̂ and X_new in slots 0 and 2 of three: slots 2·C apart, rows 3·C
        big, m_big = torch.full((R, 3, C), 7.0, dtype=dtype), torch.full((2 * R, C), 3.0)
        work, m = big[:, ::2], m_big[::2]
    else:
        raise ValueError(layout)
    scale = torch.logspace(-3, 2, max(R, 1))[:R, None] if R else 1.0
    x_hat = _randn(R, C, seed=seed) * scale
    work[:, 0] = x_hat.to(dtype)
    work[:, 1] = (x_hat + 0.1 * _randn(R, C, seed=seed + 1) * scale).to(dtype)
    m.copy_(_randn(R, C, seed=seed + 2))
    return work, m, big, m_big


def _oracle(work, m, eta, beta, first):
    """The per-tensor oracle in the state's dtype, and in float64: ``((X̂, m), (X̂64, m64))``."""
    x_hat, x_new, m_prev = work[:, 0].clone(), work[:, 1].clone(), None if first else m.clone()
    same = ref.deep_thinking_update(x_hat, x_new, m_prev, eta=eta, beta=beta)
    high = ref.deep_thinking_update(x_hat.double(), x_new.double(), None if first else m_prev.double(), eta=eta,
                                    beta=beta)
    return same, high


def _bits_equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=[f"R{r}-C{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize("beta", [0.9, 0.0])
def test_matches_the_oracle_and_the_eager_path(beta, first, dtype, shape):
    R, C = shape
    eta = 0.05
    work, m, _, _ = _state(R, C, dtype, seed=R * 131 + C)
    if first:
        m.fill_(float("nan"))  # never read by a first update
    twin, m_twin = work.clone(), m.clone()
    (x_exp, m_exp), (x64, m64) = _oracle(work, m, eta, beta, first)
    x_new = work[:, 1].clone()
    _op(work, m, eta, beta, first)
    _deep_thinking_update_eager(twin, m_twin, eta, beta, first)
    assert _bits_equal(work[:, 0], x_exp) and _bits_equal(m, m_exp), "not the oracle's bits"
    assert _bits_equal(work, twin) and _bits_equal(m, m_twin), "not the eager path's bits"
    assert _bits_equal(work[:, 1], x_new), "X_new must only be read"
    check_close("X̂", work[:, 0], x_exp, x64)
    check_close("m", m, m_exp, m64)


@needs_ext
@pytest.mark.parametrize("layout", ["padded", "three-slots"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows_over_steps(dtype, layout):
    """``work`` and ``m`` views of larger buffers (rows further apart than ``2·C``, slots further apart than ``C``):
    three steps, each the oracle's, and nothing outside the views is written."""
    R, C = 6, BLOCK + 19
    work, m, big, m_big = _state(R, C, dtype, seed=3, layout=layout)
    assert work.stride(2) == 1 and not work.is_contiguous() and not m.is_contiguous()
    inside, m_inside = torch.zeros_like(big, dtype=torch.bool), torch.zeros_like(m_big, dtype=torch.bool)
    if layout == "padded":
        inside[:, :, :C], m_inside[:, :C] = True, True
    else:
        inside[:, ::2], m_inside[::2] = True, True
    for step in range(3):
        if step:
            work[:, 1] = (work[:, 0].float() + _randn(R, C, seed=10 + step)).to(dtype)
        (x_exp, m_exp), (x64, m64) = _oracle(work, m, 0.2, 0.5, step == 0)
        _op(work, m, 0.2, 0.5, step == 0)
        assert _bits_equal(work[:, 0], x_exp) and _bits_equal(m, m_exp), f"step {step + 1}"
        check_close(f"X̂, step {step + 1}", work[:, 0], x_exp, x64)
    assert (big[~inside] == 7.0).all(), "wrote outside work's view"
    assert (m_big[~m_inside] == 3.0).all(), "wrote outside m's view"


@needs_ext
def test_empty_views_write_nothing():
    for R, C in ((0, 8), (2, 0)):
        big, m_big = torch.full((2, 2, 8), 7.0), torch.full((2, 8), 3.0)
        _op(big[:R, :, :C], m_big[:R, :C], 0.1, 0.9, False)
        assert (big == 7.0).all() and (m_big == 3.0).all()


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threads_give_the_same_bits(dtype):
    """Enough rows and columns for several tasks per thread: 2 threads give 1 thread's bits."""
    R, C = 9, 2 * BLOCK + 3
    work, m, _, _ = _state(R, C, dtype, seed=21)
    work2, m2 = work.clone(), m.clone()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _op(work, m, 0.01, 0.9, False)
        torch.set_num_threads(2)
        _op(work2, m2, 0.01, 0.9, False)
    finally:
        torch.set_num_threads(threads)
    assert _bits_equal(work, work2) and _bits_equal(m, m2)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_round_like_the_oracle(dtype):
    """Overflow to inf, inf and NaN states, subnormals, values near rounding ties of the half dtypes; 24 columns, so
    both a vector body and a scalar tail see them."""
    x_hat = torch.tensor([6e4, 65504.0, 3e38, 1e-41, 1 + 2**-11, 1 + 3 * 2**-11, -2.5, float("inf")])
    x_new = torch.tensor([65504.0, -65504.0, -3e38, 3e-41, 1 + 2**-10, 1.0, 2.5, 1.0])
    m_old = torch.tensor([1e30, 2.0, -3e38, 1e-40, 0.5, 0.25, 0.0, float("nan")])
    work = torch.stack([x_hat, x_new]).repeat(2, 1, 3).to(dtype)  # [2, 2, 24]
    m = m_old.repeat(2, 3)
    (x_exp, m_exp), _ = _oracle(work, m, 0.9, 0.9, False)
    _op(work, m, 0.9, 0.9, False)
    for got, exp in ((work[:, 0], x_exp), (m, m_exp)):
        nan = torch.isnan(exp)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan], exp[~nan])


@needs_ext
@pytest.mark.parametrize("first", [True, False])
def test_opcheck(first):
    work, m, _, _ = _state(3, 40, torch.float32, seed=30)
    torch.library.opcheck(torch.ops.fastattn_icl.fused_deep_thinking_update_.default, (work, m, 0.1, 0.9, first))


@needs_ext
def test_opcheck_half_strided_rows():
    for dtype in (torch.float16, torch.bfloat16):
        work, m, _, _ = _state(2, 41, dtype, seed=31, layout="padded")
        torch.library.opcheck(torch.ops.fastattn_icl.fused_deep_thinking_update_.default, (work, m, 0.01, 0.0, False))


@needs_ext
def test_the_wrapper_and_the_meta_device_use_it():
    """``deep_thinking_update_`` (backend ``torch`` or ``auto``) on CPU is the compiled op's result, and the fake kernel
    (registered by fastattn_icl.ops.deep_thinking, the module the C++ schema names) serves meta tensors."""
    assert dt_ops._registered
    assert torch._C._dispatch_pystub(f"fastattn_icl::{OP}", "")[0] == "fastattn_icl.ops.deep_thinking"
    for backend in ("torch", "auto"):
        work, m, _, _ = _state(4, 33, torch.float16, seed=40)
        twin, m_twin = work.clone(), m.clone()
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=False, backend=backend)
        _op(twin, m_twin, 0.1, 0.9, False)
        assert _bits_equal(work, twin) and _bits_equal(m, m_twin)
    _op(torch.empty(3, 2, 5, device="meta"), torch.empty(3, 5, device="meta"), 0.1, 0.9, True)


@needs_ext
def test_the_op_itself_checks_inputs():
    op = torch.ops.fastattn_icl.fused_deep_thinking_update_
    m = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match=r"work must be \[R, 2, C\]"):
        op(torch.zeros(2, 3, 8), m, 0.1, 0.9, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        op(torch.zeros(2, 2, 8, dtype=torch.float64), m, 0.1, 0.9, True)
    with pytest.raises(RuntimeError, match="m must be float32"):
        op(torch.zeros(2, 2, 8), m.half(), 0.1, 0.9, True)
    with pytest.raises(RuntimeError, match=r"m must be \[R, C\] = \[2, 8\]"):
        op(torch.zeros(2, 2, 8), torch.zeros(2, 9), 0.1, 0.9, True)
    with pytest.raises(RuntimeError, match="unit stride along C"):
        op(torch.zeros(2, 2, 16)[:, :, ::2], m, 0.1, 0.9, True)
    with pytest.raises(RuntimeError, match="unit stride along C"):
        op(torch.zeros(2, 2, 8), torch.zeros(2, 16)[:, ::2], 0.1, 0.9, True)


# --- the portable body, and the build without the op -------------------------------------------------------------


@needs_ext
def test_portable_body_gives_the_same_bits():
    """With ``ATEN_CPU_CAPABILITY=default`` the kernel runs its ``at::vec`` body instead of the AVX2 one: the same
    bits as the eager path in every dtype, in a fresh interpreter (the choice is made once per process)."""
    code = textwrap.dedent(
        """
        import torch
        import fastattn_icl.ops.deep_thinking
        from fastattn_icl.ops._torch_backend import _deep_thinking_update_eager
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for first in (True, False):
                for C in (1, 15, 16, 33, 8192 + 37):
                    g = torch.Generator().manual_seed(C)
                    work = (torch.randn(3, 2, C, generator=g) * 10).to(dtype)
                    m = torch.randn(3, C, generator=g)
                    twin, m_twin = work.clone(), m.clone()
                    torch.ops.fastattn_icl.fused_deep_thinking_update_(work, m, 0.3, 0.9, first)
                    _deep_thinking_update_eager(twin, m_twin, 0.3, 0.9, first)
                    assert torch.equal(work, twin) and torch.equal(m, m_twin), (dtype, first, C)
        print("ok")
        """
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def test_without_the_op_warns_once_and_runs_the_eager_path(monkeypatch):
    """No silent fallback: without the compiled op the torch backend says so once, with the build command, and still
    computes the oracle's update."""
    monkeypatch.setattr(_ext, "has_op", lambda name: False)
    monkeypatch.setitem(_ext._state, "error", "ImportError: simulated")
    monkeypatch.setattr(_torch_backend, "_warned_no_fused", False)
    work, m, _, _ = _state(3, 20, torch.float16, seed=50)
    (x_exp, m_exp), _ = _oracle(work, m, 0.1, 0.9, False)
    with pytest.warns(RuntimeWarning, match=r"eager PyTorch ops.*simulated.*pip install --no-build-isolation -e \."):
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=False, backend="torch")
    assert _bits_equal(work[:, 0], x_exp) and _bits_equal(m, m_exp)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=False, backend="torch")
    assert not [w for w in record if "eager PyTorch ops" in str(w.message)], "warned twice"
