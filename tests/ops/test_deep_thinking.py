"""The fused Deep-Thinking state update (docs/methods.md §7) against the per-tensor oracle.

``deep_thinking_update_(work [R, 2, C], m [R, C])`` updates every row in place: ``work[:, 0]`` is the state ``X̂``,
``work[:, 1]`` the re-run's ``X_new``; ``g = X_new - X̂``, ``m = g`` (first) else ``g + β m``, ``X̂ <- X̂ + η m``,
in float32. The oracle is :func:`fastattn_icl.reference.deep_thinking.deep_thinking_update` (float32 arithmetic,
``X̂`` cast back to its dtype), applied row by row.

On CPU (the torch backend, and Triton under the interpreter) the result is bit-identical to the oracle: the same
float32 operations in the same order, one rounding each. On CUDA the Triton compiler may contract ``a + b * c``
into a fused multiply-add (one rounding instead of two), so there ``m`` may differ by a float32 ulp and ``X̂`` by one
ulp of its dtype; there the tolerance rule against the float64 oracle applies (``fastattn_icl.testing``). bf16
and a GPT2-XL-sized state run behind ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastattn_icl.ops.deep_thinking import deep_thinking_update_
from fastattn_icl.reference import deep_thinking as ref
from fastattn_icl.testing import check_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
CPU_DTYPES = [torch.float32, torch.float16]
BLOCK = 1024  # the Triton kernel's column block
# (R, C): C across block boundaries, C == block, C < block, one row
SHAPES = [(3, 2 * BLOCK + 77), (2, BLOCK), (5, 17), (1, 300), (1, 1)]


def _randn(*shape, dtype, seed, device=DEVICE, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float32)).to(device=device, dtype=dtype)


def _exact(backend: str, device) -> bool:
    """Bit-exact, except Triton on CUDA, which may fuse a multiply-add (see the module docstring)."""
    return not (backend == "triton" and torch.device(device).type == "cuda")


def oracle64(x_hat, x_new, m_prev, eta: float, beta: float):
    """The oracle on float64 copies of one update's inputs: what the tolerance rule measures against."""
    m64 = None if m_prev is None else m_prev.double()
    return ref.deep_thinking_update(x_hat.double(), x_new.double(), m64, eta=eta, beta=beta)


def assert_update(actual_x, actual_m, expected_x, expected_m, exact: bool, what: str, high=None) -> None:
    """``X̂`` and ``m`` after one update against the oracle's (``expected_*``, same dtype): bit-exact (the same
    float32 operations in the same order), or with a fused multiply-add the tolerance rule against ``high()``, the
    float64 oracle's ``(X̂, m)``."""
    if exact:
        assert torch.equal(actual_x, expected_x), f"{what}: X̂ differs, max {_maxdiff(actual_x, expected_x):.3e}"
        assert torch.equal(actual_m, expected_m), f"{what}: m differs, max {_maxdiff(actual_m, expected_m):.3e}"
        return
    high_x, high_m = high()
    check_close(f"{what}: X̂", actual_x, expected_x, high_x)
    check_close(f"{what}: m", actual_m, expected_m, high_m)


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def _oracle_chain(x0, news, eta, beta):
    """The oracle's states and momenta after each step of a sequence (fresh ``X_new`` per step)."""
    x_hat, m, out = x0, None, []
    for x_new in news:
        x_hat, m = ref.deep_thinking_update(x_hat, x_new, m, eta=eta, beta=beta)
        out.append((x_hat, m))
    return out


def run_steps(backend, x0, news, eta, beta, device=DEVICE, work=None):
    """Run the fused update over ``news`` (fresh ``X_new`` each step, ``m`` poisoned with NaN before the first);
    check every step against the oracle applied to the kernel's own previous state; return the final ``work, m``."""
    R, C = x0.shape
    if work is None:
        work = torch.empty(R, 2, C, dtype=x0.dtype, device=device)
    work[:, 0] = x0
    m = torch.full((R, C), float("nan"), dtype=torch.float32, device=device)
    exact = _exact(backend, device)
    for step, x_new in enumerate(news):
        work[:, 1] = x_new  # the re-run writes a fresh X_new into the second half every step
        first = step == 0
        x_before, m_before = work[:, 0].clone(), m.clone()
        deep_thinking_update_(work, m, eta=eta, beta=beta, first=first, backend=backend)
        x_exp, m_exp = ref.deep_thinking_update(x_before, x_new, None if first else m_before, eta=eta, beta=beta)
        assert torch.equal(work[:, 1], x_new), "X_new must only be read"
        m_prev = None if first else m_before
        high = lambda: oracle64(x_before, x_new, m_prev, eta, beta)  # noqa: B023, E731 (called at once)
        assert_update(work[:, 0], m, x_exp, m_exp, exact, f"step {step + 1}", high)
    return work, m


# ------------------------------------------------------------------------------------------------
# Against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=[f"R{r}-C{c}" for r, c in SHAPES])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_oracle_over_steps(backend, dtype, shape):
    R, C = shape
    eta, beta = 0.05, 0.9
    x0 = _randn(R, C, dtype=dtype, seed=0)
    news = [_randn(R, C, dtype=dtype, seed=1 + s) for s in range(4)]
    work, m = run_steps(backend, x0, news, eta, beta)
    if _exact(backend, DEVICE):  # then the whole chain is the oracle's chain, bit for bit
        x_exp, m_exp = _oracle_chain(x0, news, eta, beta)[-1]
        assert torch.equal(work[:, 0], x_exp) and torch.equal(m, m_exp)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_small_steps(backend, dtype):
    """15 steps (the authors' default) of η = 0.01 towards a fixed target: the float32 momentum keeps motion that
    would round away in a half-precision buffer, and the state does move."""
    R, C = 2, 40
    x0, target = _randn(R, C, dtype=dtype, seed=3), _randn(R, C, dtype=dtype, seed=4)
    work, _ = run_steps(backend, x0, [target] * 14, 0.01, 0.9)
    assert not torch.equal(work[:, 0], x0)
    assert (work[:, 0].float() - target.float()).abs().sum() < (x0.float() - target.float()).abs().sum()


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_zero_is_the_gate_form(backend, dtype):
    """β = 0 on a later step (the old momentum is read and multiplied by 0) is ``η X_new + (1 - η) X̂``: the same
    value by another formula, so equal up to float32 rounding (within one ulp of a half dtype)."""
    R, C = 3, BLOCK + 5
    eta = 0.3
    x_hat, x_new = _randn(R, C, dtype=dtype, seed=5), _randn(R, C, dtype=dtype, seed=6)
    work = torch.stack([x_hat, x_new], dim=1)
    m_old = _randn(R, C, dtype=torch.float32, seed=7)  # an earlier step's momentum, forgotten with β = 0
    m = m_old.clone()
    deep_thinking_update_(work, m, eta=eta, beta=0.0, first=False, backend=backend)
    assert torch.equal(m, x_new.float() - x_hat.float())
    x_exp, m_exp = ref.deep_thinking_update(x_hat, x_new, m_old, eta=eta, beta=0.0)
    high = oracle64(x_hat, x_new, m_old, eta, 0.0)
    assert_update(work[:, 0], m, x_exp, m_exp, _exact(backend, DEVICE), "β = 0", lambda: high)
    gate = ref.gate_update(x_hat, x_new, eta)
    check_close("X̂ vs the gate form", work[:, 0], gate, high[0])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_first_update_never_reads_m(backend, dtype):
    R, C = 2, BLOCK + 3
    x_hat, x_new = _randn(R, C, dtype=dtype, seed=8), _randn(R, C, dtype=dtype, seed=9)
    work = torch.stack([x_hat, x_new], dim=1)
    m = torch.full((R, C), float("nan"), dtype=torch.float32, device=DEVICE)
    deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=True, backend=backend)
    assert torch.isfinite(m).all() and torch.isfinite(work).all()
    x_exp, m_exp = ref.deep_thinking_update(x_hat, x_new, None, eta=0.1, beta=0.9)
    assert torch.equal(m, m_exp)  # g itself: one subtraction, exact in every backend
    high = lambda: oracle64(x_hat, x_new, None, 0.1, 0.9)  # noqa: E731
    assert_update(work[:, 0], m, x_exp, m_exp, _exact(backend, DEVICE), "first", high)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eta_zero_keeps_the_state(backend):
    R, C = 2, 33
    x_hat, x_new = _randn(R, C, dtype=torch.float16, seed=10), _randn(R, C, dtype=torch.float16, seed=11)
    work = torch.stack([x_hat, x_new], dim=1)
    m = torch.empty(R, C, dtype=torch.float32, device=DEVICE)
    deep_thinking_update_(work, m, eta=0.0, beta=0.9, first=True, backend=backend)
    assert torch.equal(work[:, 0], x_hat) and torch.equal(m, x_new.float() - x_hat.float())


@pytest.mark.parametrize("layout", ["padded-columns", "three-slots"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend, layout):
    """``work`` a view whose row stride exceeds ``2 C`` (unit column stride), and ``m`` with padded rows: the update
    is the oracle's and touches only the views' elements."""
    R, C = 3, BLOCK + 9
    x0 = _randn(R, C, dtype=torch.float16, seed=12)
    if layout == "padded-columns":  # [R, 2, C + 7] storage, the last 7 columns not part of the view
        big = torch.full((R, 2, C + 7), 7.0, dtype=torch.float16, device=DEVICE)
        work = big[:, :, :C]
    else:  # [R, 3, C] storage: rows 3 C apart
        big = torch.full((R, 3, C), 7.0, dtype=torch.float16, device=DEVICE)
        work = big[:, :2]
    assert work.stride(0) > 2 * C and work.stride(2) == 1 and not work.is_contiguous()
    m_big = torch.full((R, C + 5), 3.0, dtype=torch.float32, device=DEVICE)
    m = m_big[:, :C]
    work[:, 0] = x0
    for step in range(3):
        x_new = _randn(R, C, dtype=torch.float16, seed=13 + step)
        work[:, 1] = x_new
        x_before, m_before = work[:, 0].clone(), m.clone()
        deep_thinking_update_(work, m, eta=0.2, beta=0.5, first=step == 0, backend=backend)
        m_prev = None if step == 0 else m_before
        x_exp, m_exp = ref.deep_thinking_update(x_before, x_new, m_prev, eta=0.2, beta=0.5)
        high = lambda: oracle64(x_before, x_new, m_prev, 0.2, 0.5)  # noqa: B023, E731 (called at once)
        assert_update(work[:, 0], m, x_exp, m_exp, _exact(backend, DEVICE), f"step {step + 1}", high)
        assert torch.equal(work[:, 1], x_new)
    outside = torch.ones_like(big, dtype=torch.bool)
    if layout == "padded-columns":
        outside[:, :, :C] = False
    else:
        outside[:, :2] = False
    assert (big[outside] == 7.0).all(), "wrote outside the view"
    assert (m_big[:, C:] == 3.0).all(), "wrote outside m's view"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_buffers(backend):
    """Views with no row or no column of larger buffers: the update returns and writes nothing around them."""
    for R, C in ((0, 8), (2, 0)):
        big = torch.full((2, 2, 8), 7.0, device=DEVICE)
        m_big = torch.full((2, 8), 3.0, device=DEVICE)
        work, m = big[:R, :, :C], m_big[:R, :C]
        assert work.numel() == 0 and m.numel() == 0
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=R == 0, backend=backend)
        assert (big == 7.0).all() and (m_big == 3.0).all(), f"R={R}, C={C}: wrote outside an empty view"


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _ok(R=2, C=8):
    return torch.randn(R, 2, C), torch.zeros(R, C)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 16), torch.zeros(2, 8)), TypeError, r"\[R, 2, C\]"),
        (lambda: (torch.randn(1, 2, 2, 8), torch.zeros(2, 8)), TypeError, r"\[R, 2, C\]"),
        (lambda: (torch.randn(2, 3, 8), torch.zeros(2, 8)), TypeError, r"\[R, 2, C\]"),
        (lambda: (torch.randn(2, 1, 8), torch.zeros(2, 8)), TypeError, r"\[R, 2, C\]"),
        (lambda: (torch.ones(2, 2, 8, dtype=torch.int32), torch.zeros(2, 8)), TypeError, "floating"),
        (lambda: (torch.randn(2, 2, 8, dtype=torch.float64), torch.zeros(2, 8)), TypeError, "float16"),
        (lambda: (torch.randn(2, 2, 16)[:, :, ::2], torch.zeros(2, 8)), ValueError, "unit stride"),
        (lambda: (torch.randn(2, 8, 2).transpose(1, 2), torch.zeros(2, 8)), ValueError, "unit stride"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 8, dtype=torch.float16)), TypeError, "float32"),
        (
            lambda: (torch.randn(2, 2, 8, dtype=torch.float16), torch.zeros(2, 8, dtype=torch.float16)),
            TypeError,
            "float32",
        ),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 8, dtype=torch.float64)), TypeError, "float32"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(3, 8)), TypeError, r"\[R=2, C=8\]"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 9)), TypeError, r"\[R=2, C=8\]"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 2, 8)), TypeError, r"\[R=2, C=8\]"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 16)[:, ::2]), ValueError, "unit stride"),
        (lambda: (torch.randn(2, 2, 8), torch.zeros(2, 8, device="meta")), ValueError, "device|on"),
        (lambda: (torch.randn(2, 2, 8), None), TypeError, "m must"),
        (lambda: (torch.randn(2, 2, 8).numpy(), torch.zeros(2, 8)), TypeError, "work must"),
    ],
    ids=[
        "2d",
        "4d",
        "three-slots",
        "one-slot",
        "int",
        "float64",
        "column-stride",
        "transposed",
        "m-fp16",
        "both-fp16",
        "m-fp64",
        "m-rows",
        "m-cols",
        "m-3d",
        "m-column-stride",
        "m-device",
        "m-none",
        "numpy",
    ],
)
def test_bad_buffers(make, error, match):
    work, m = make()
    with pytest.raises(error, match=match):
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=True, backend="torch")


@pytest.mark.parametrize("name", ["eta", "beta"])
@pytest.mark.parametrize(
    "value, error",
    [
        (-0.1, ValueError),
        (-1e-12, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        (-math.inf, ValueError),
        ("0.1", TypeError),
        (True, TypeError),
        (None, TypeError),
        (torch.tensor(0.1), TypeError),
    ],
    ids=["negative", "tiny-negative", "nan", "inf", "-inf", "str", "bool", "none", "tensor"],
)
def test_bad_coefficients(name, value, error):
    work, m = _ok()
    before = work.clone()
    kwargs = {"eta": 0.1, "beta": 0.9, name: value}
    with pytest.raises(error, match=name):
        deep_thinking_update_(work, m, first=True, backend="torch", **kwargs)
    assert torch.equal(work, before)


def test_coefficients_accept_ints_and_zero():
    work, m = _ok()
    x_hat, x_new = work[:, 0].clone(), work[:, 1].clone()
    deep_thinking_update_(work, m, eta=1, beta=0, first=True, backend="torch")
    # η = 1: X̂ + (X_new - X̂) is X_new in exact arithmetic, rounded twice in float32 like the oracle's
    check_close("X̂", work[:, 0], ref.deep_thinking_update(x_hat, x_new, None, eta=1.0, beta=0.0)[0], x_new.double())


@pytest.mark.parametrize("first", [1, 0, None, "yes", torch.tensor(True)])
def test_first_must_be_a_bool(first):
    work, m = _ok()
    with pytest.raises(TypeError, match="first"):
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=first, backend="torch")


def test_bad_backend():
    work, m = _ok()
    with pytest.raises(ValueError, match="backend"):
        deep_thinking_update_(work, m, eta=0.1, beta=0.9, first=True, backend="cuda")


def test_keyword_only():
    work, m = _ok()
    with pytest.raises(TypeError):
        deep_thinking_update_(work, m, 0.1, 0.9, True)  # the coefficients and `first` are keyword-only


# ------------------------------------------------------------------------------------------------
# The registered op
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [True, False])
def test_opcheck(first):
    work = _randn(3, 2, 40, dtype=torch.float32, seed=14, device="cpu")
    m = _randn(3, 40, dtype=torch.float32, seed=15, device="cpu")
    torch.library.opcheck(
        torch.ops.fastattn_icl.deep_thinking_update_.default,
        (work, m, 0.1, 0.9, first, "torch"),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_opcheck_half_and_strided_rows():
    work = _randn(2, 3, 40, dtype=torch.float16, seed=16, device="cpu")[:, :2]
    m = _randn(2, 40, dtype=torch.float32, seed=17, device="cpu")
    torch.library.opcheck(
        torch.ops.fastattn_icl.deep_thinking_update_.default,
        (work, m, 0.01, 0.0, False, "torch"),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 and a GPT2-XL-sized state
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_the_oracle(backend):
    R, C = 6, 3 * BLOCK + 11
    x0 = _randn(R, C, dtype=torch.bfloat16, seed=19, device="cuda")
    news = [_randn(R, C, dtype=torch.bfloat16, seed=20 + s, device="cuda") for s in range(3)]
    run_steps(backend, x0, news, 0.05, 0.9, device="cuda")


@pytest.mark.gpu
def test_gpt2_xl_state_triton_vs_torch():
    """GPT2-XL: 48 layers × 25 heads, K and V (R = 2400 rows), N = 300 demonstration tokens × d = 64, fp16. Each
    step the Triton kernel and the torch backend update the same state; Triton within one fp16 ulp, torch exact."""
    R, C = 2 * 48 * 25, 300 * 64
    work = torch.empty(R, 2, C, dtype=torch.float16, device="cuda")
    work[:, 0] = _randn(R, C, dtype=torch.float16, seed=30, device="cuda")
    m = torch.full((R, C), float("nan"), dtype=torch.float32, device="cuda")
    before = None
    for step in range(3):
        work[:, 1] = _randn(R, C, dtype=torch.float16, seed=31 + step, device="cuda")
        twin, m_twin = work.clone(), m.clone()
        high = oracle64(work[:, 0], work[:, 1], None if step == 0 else m, 0.01, 0.9)  # the inputs of this step
        deep_thinking_update_(work, m, eta=0.01, beta=0.9, first=step == 0, backend="triton")
        deep_thinking_update_(twin, m_twin, eta=0.01, beta=0.9, first=step == 0, backend="torch")
        assert torch.equal(work[:, 1], twin[:, 1])
        # the torch backend is the oracle's arithmetic: the same-dtype reference of the rule
        assert_update(work[:, 0], m, twin[:, 0], m_twin, False, f"triton vs torch, step {step + 1}", lambda h=high: h)
        if before is not None:  # the torch backend on CUDA is the oracle's arithmetic (no fused multiply-add)
            x_exp, m_exp = ref.deep_thinking_update(before[0], work[:, 1], before[1], eta=0.01, beta=0.9)
            assert torch.equal(twin[:, 0], x_exp) and torch.equal(m_twin, m_exp)
            before = None
        elif step == 0:
            before = (work[:, 0].clone(), m.clone())
