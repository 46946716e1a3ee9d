"""Momentum attention (docs/methods.md §6, MoAttn) against the oracle, forward and all input gradients.

``O_t = attention_t + M_t`` with ``M_t = Σ_{i<t} η^{t-i} v_i``: causal whatever ``causal`` says, excluding the
current position, unnormalised, per kv head (shared by its query heads), over absolute cache positions (query
row ``i`` sits at ``t = i + Tk - Tq``), padded keys counting as zero values. The oracle is
:mod:`fastattn_icl.reference.momentum`; the tolerance rule is :func:`fastattn_icl.testing.check_close` (2x the
same-dtype oracle's error against float64 for outputs, ``GRAD_FACTOR`` for gradients).

Without a GPU the Triton kernels run under the interpreter (32-row scan blocks, 32x32 attention blocks, about
0.2 s a launch), so the Triton cases are few and small; lengths 33, 70 and 130 cross the block boundaries.
bf16 and model-like shapes (T 1024 and 4096) run on CUDA behind the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.ops import _torch_backend as torch_impl
from fastattn_icl.ops._validate import output_like
from fastattn_icl.reference import momentum as ref
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import GRAD_FACTOR, check_against_oracle, check_close

CPU_DTYPES = [torch.float32, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
ETAS = [0.0, 0.5, 0.9, 0.99]


def _padding(B, Tk, kind, g, device):
    """``None``, ``"holes"`` (keys dropped anywhere, row 0 unpadded) or ``"left"`` (row ``b`` starts with
    ``b * Tk // (2 B)`` pads, as a left-padded batch of prompts)."""
    if kind is None:
        return None
    if kind == "holes":
        kpm = torch.rand(B, Tk, generator=g) > 0.3
        kpm[0, :] = True
    elif kind == "left":
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        for b in range(B):
            kpm[b, : b * Tk // (2 * B)] = False
    else:
        raise ValueError(kind)
    return kpm.to(device)


def _inputs(B, H, Hkv, Tq, Tk, D, dtype, device=DEVICE, pad=None, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)

    def make(heads, T):
        if layout == "bthd":  # a [B, T, H, D] tensor seen through a transpose, as HF models hold it
            return torch.randn(B, T, heads, D, generator=g).transpose(1, 2)
        return torch.randn(B, heads, T, D, generator=g)

    q, k, v = make(H, Tq), make(Hkv, Tk), make(Hkv, Tk)
    kpm = _padding(B, Tk, pad, g, device)
    do = torch.randn(B, H, Tq, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), do.to(**to), kpm


def _grads(fn, q, k, v, do, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out.detach(), *grads)


def _oracle_grads(q, k, v, do, kpm, eta, causal, scale=None, dtype=None, split=False):
    """Output and gradients of the oracle; ``split`` runs it per (batch row, kv head group), which is exact
    (nothing couples them) and keeps the float64 oracle of the large CUDA cases within memory."""

    def oracle(q_, k_, v_, kpm_):
        return ref.momentum_attention(q_, k_, v_, eta, causal=causal, scale=scale, key_padding_mask=kpm_)

    if not split:
        return _grads(lambda a, b, c: oracle(a, b, c, kpm), q, k, v, do, dtype)
    B, H, Hkv = q.shape[0], q.shape[1], k.shape[1]
    rep = H // Hkv
    res = [torch.empty_like(t, dtype=dtype or t.dtype) for t in (do, q, k, v)]
    for b in range(B):
        for j in range(Hkv):
            hs, bs, ks = slice(j * rep, (j + 1) * rep), slice(b, b + 1), slice(j, j + 1)
            kpm_b = None if kpm is None else kpm[bs]
            parts = _grads(
                lambda a, c, e, kpm_=kpm_b: oracle(a, c, e, kpm_), q[bs, hs], k[bs, ks], v[bs, ks], do[bs, hs], dtype
            )
            for dst, src, heads in zip(res, parts, (hs, hs, ks, ks)):
                dst[bs, heads] = src
    return tuple(res)


def _check_all(got, same, high):
    """The rule on (out, dq, dk, dv): factor 2 for the output, ``GRAD_FACTOR`` for the gradients."""
    for name, g, s, h in zip(("out", "dq", "dk", "dv"), got, same, high):
        check_close(name, g, s, h, factor=2.0 if name == "out" else GRAD_FACTOR)


def _ours(backend, eta, causal, kpm, scale=None):
    def fn(q_, k_, v_):
        return fastattn_icl.momentum_attention(
            q_, k_, v_, eta, causal=causal, scale=scale, key_padding_mask=kpm, backend=backend
        )

    return fn


def _check_against_oracle(backend, q, k, v, do, kpm, eta, causal, scale=None, split=False):
    got = _grads(_ours(backend, eta, causal, kpm, scale), q, k, v, do)
    same = _oracle_grads(q, k, v, do, kpm, eta, causal, scale, split=split)
    high = _oracle_grads(q, k, v, do, kpm, eta, causal, scale, dtype=torch.float64, split=split)
    for name, g, s, h, factor in zip(("out", "dq", "dk", "dv"), got, same, high, (2.0, *[GRAD_FACTOR] * 3)):
        assert g.shape == h.shape and g.dtype == q.dtype, name
        check_close(name, g, s, h, factor=factor)
    return got


# ------------------------------------------------------------------------------------------------
# The op against the oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matches_oracle(backend, eta, dtype):
    q, k, v, do, kpm = _inputs(2, 4, 2, 37, 37, 16, dtype, seed=1)
    out = _check_against_oracle(backend, q, k, v, do, kpm, eta, True)[0]
    assert out.stride() == output_like(q).stride(), "the output is laid out as the ops promise"


SHAPES = [
    # B, H, Hkv, Tq, Tk, D
    (1, 2, 2, 1, 1, 16),  # one token: M = 0
    (2, 2, 2, 17, 17, 16),  # MHA
    (1, 4, 1, 33, 33, 32),  # GQA 4:1, crosses one 32-row block
    (1, 2, 1, 130, 130, 16),  # long: five scan / attention blocks, the last one partial
    (2, 4, 2, 5, 40, 16),  # a chunk of queries over a longer cache
    (1, 4, 2, 1, 70, 24),  # one decode step, head dim not a power of two
    (1, 2, 2, 20, 8, 16),  # Tq > Tk: early rows see no key and get no momentum
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
def test_shapes(backend, shape, causal):
    """The momentum term stays causal when the attention part is not."""
    q, k, v, do, kpm = _inputs(*shape, torch.float32, seed=sum(shape))
    _check_against_oracle(backend, q, k, v, do, kpm, 0.9, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pad", ["left", "holes"])
@pytest.mark.parametrize("causal", [True, False])
def test_key_padding(backend, pad, causal):
    q, k, v, do, kpm = _inputs(3, 4, 2, 35, 35, 16, torch.float32, pad=pad, seed=3)
    _check_against_oracle(backend, q, k, v, do, kpm, 0.9, causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_fp16_chunk(backend):
    q, k, v, do, kpm = _inputs(2, 4, 1, 9, 40, 16, torch.float16, pad="holes", seed=4)
    _check_against_oracle(backend, q, k, v, do, kpm, 0.99, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padding_equals_the_unpadded_sequence(backend):
    """Decay counts position differences, so a left-padded row's real tokens get exactly the output (and the
    gradients) of the unpadded shorter sequence; pad rows output 0 and padded keys get no gradient."""
    T, p = 40, 7
    q, k, v, do, _ = _inputs(1, 4, 2, T, T, 16, torch.float32, seed=5)
    kpm = torch.ones(1, T, dtype=torch.bool, device=DEVICE)
    kpm[:, :p] = False
    padded = _grads(_ours(backend, 0.9, True, kpm), q, k, v, do)
    short = (q[:, :, p:], k[:, :, p:], v[:, :, p:], do[:, :, p:])
    same = _oracle_grads(*short, None, 0.9, True)
    high = _oracle_grads(*short, None, 0.9, True, dtype=torch.float64)
    _check_all([t[:, :, p:] for t in padded], same, high)
    out, dq, dk, dv = padded
    assert torch.all(out[:, :, :p] == 0) and torch.all(dq[:, :, :p] == 0)
    assert torch.all(dk[:, :, :p] == 0) and torch.all(dv[:, :, :p] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_row_is_zero(backend):
    q, k, v, do, kpm = _inputs(2, 2, 1, 12, 12, 16, torch.float32, pad="holes", seed=6)
    kpm[1, :] = False
    got = _check_against_oracle(backend, q, k, v, do, kpm, 0.9, True)
    assert all(torch.all(t[1] == 0) for t in got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bthd_strided_views_and_scale(backend):
    q, k, v, do, kpm = _inputs(2, 4, 2, 31, 31, 32, torch.float32, layout="bthd", pad="holes", seed=7)
    assert not v.is_contiguous()
    _check_against_oracle(backend, q, k, v, do, kpm, 0.5, True, scale=0.3)


def test_gqa_equals_repeated_kv():
    """Query heads of a group share their kv head's M; dv sums the group (like repeat_interleave). The grouped
    path may be at most 2x (3x for gradients) as far from the float64 oracle as the repeated one, plus eps."""
    q, k, v, do, _ = _inputs(1, 8, 2, 17, 17, 16, torch.float32, seed=8)
    got = _grads(_ours("torch", 0.9, True, None), q, k, v, do)
    rep = _grads(
        lambda a, b, c: fastattn_icl.momentum_attention(
            a, b.repeat_interleave(4, 1), c.repeat_interleave(4, 1), 0.9, backend="torch"
        ),
        q,
        k,
        v,
        do,
    )
    _check_all(got, rep, _oracle_grads(q, k, v, do, None, 0.9, True, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Positions: a chunk over a cache and token-by-token decoding give the rows of one full pass
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq", [5, 33])
def test_chunk_equals_last_rows_of_full_pass(backend, Tq):
    """Tq queries over Tk keys are the last Tq rows of the full pass; with dO zero on the earlier rows of the
    full pass every gradient (the momentum's dv contribution included) is that of the chunk."""
    Tk = 40
    q, k, v, do, _ = _inputs(2, 4, 2, Tk, Tk, 16, torch.float32, seed=9)
    do[:, :, : Tk - Tq] = 0
    full = _grads(_ours(backend, 0.9, True, None), q, k, v, do)
    chunk = _grads(_ours(backend, 0.9, True, None), q[:, :, Tk - Tq :], k, v, do[:, :, Tk - Tq :])
    assert torch.all(full[1][:, :, : Tk - Tq] == 0)
    last_rows = lambda res: (res[0][:, :, Tk - Tq :], res[1][:, :, Tk - Tq :], res[2], res[3])  # noqa: E731
    same = _oracle_grads(q, k, v, do, None, 0.9, True)
    high = _oracle_grads(q, k, v, do, None, 0.9, True, dtype=torch.float64)
    _check_all(chunk, last_rows(same), last_rows(high))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_over_a_growing_cache_equals_full_pass(backend):
    """Tq = 1 at each Tk = 1..T (the cache crosses a 32-row block) equals the full pass row by row."""
    T = 36 if backend == "triton" else 70
    q, k, v, _, kpm = _inputs(2, 4, 2, T, T, 16, torch.float32, pad="left", seed=10)
    same = ref.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm)
    high = ref.momentum_attention(q.double(), k.double(), v.double(), 0.9, key_padding_mask=kpm)
    with torch.no_grad():
        for t in range(1, T + 1):
            step = fastattn_icl.momentum_attention(
                q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], 0.9, key_padding_mask=kpm[:, :t], backend=backend
            )
            check_close(f"Tk={t}", step, same[:, :, t - 1 : t], high[:, :, t - 1 : t])


# ------------------------------------------------------------------------------------------------
# η: neutral value, exact small cases, validation, inference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_eta_zero_is_base_attention_bit_for_bit(backend, causal):
    q, k, v, do, kpm = _inputs(2, 4, 2, 33, 33, 16, torch.float32, pad="holes", seed=11)
    got = _grads(_ours(backend, 0.0, causal, kpm), q, k, v, do)
    base = _grads(
        lambda a, b, c: fastattn_icl.attention(a, b, c, causal=causal, key_padding_mask=kpm, backend=backend),
        q,
        k,
        v,
        do,
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, base):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_small_case_by_hand(backend):
    """v = 1, η = 0.5, T = 3: M = [0, η, η + η²] = [0, 0.5, 0.75] (not [0.5, 0.75, 0.875], η^(r+1), nor
    [1, 1.5, 1.75], the current token included). Attention of all-ones values is 1, so O = 1 + M; with dO = 1
    the momentum's dv is Σ_{i>j} η^(i-j) = [0.75, 0.5, 0], which the attention part adds to per key."""
    q, k, _, _, _ = _inputs(1, 1, 1, 3, 3, 16, torch.float32, seed=12)
    v = torch.ones(1, 1, 3, 16, device=DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fastattn_icl.momentum_attention(*leaves, 0.5, backend=backend)
    expected = torch.tensor([1.0, 1.5, 1.75], dtype=torch.float64)[None, None, :, None].expand_as(out)
    check_close("out", out, ref.momentum_attention(q, k, v, 0.5), expected)
    out.backward(torch.ones_like(out))
    # attention part: dv_j = Σ_i P_ij over the rows that see key j; Σ_j of it is the row count, 3
    base = [t.clone().requires_grad_(True) for t in (q, k, v)]
    fastattn_icl.attention(*base, backend=backend).backward(torch.ones_like(out))
    mom_dv = leaves[2].grad - base[2].grad
    by_hand = torch.tensor([0.75, 0.5, 0.0], dtype=torch.float64)
    check_close("momentum dv", mom_dv[0, 0, :, 0], by_hand.float(), by_hand, factor=GRAD_FACTOR)  # exact in fp32


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5, float("nan"), float("inf"), -1e-12])
def test_eta_out_of_range_is_a_value_error(eta):
    q, k, v, _, _ = _inputs(1, 2, 1, 5, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="eta"):
        fastattn_icl.momentum_attention(q, k, v, eta)
    with pytest.raises(ValueError, match="eta"):
        fastattn_icl.momentum_attention(q, k, v, torch.tensor(eta))


@pytest.mark.parametrize("eta", ["0.5", None, True, 0.5j, [0.5], torch.tensor([0.5, 0.5])], ids=repr)
def test_eta_not_a_number_is_a_type_error(eta):
    q, k, v, _, _ = _inputs(1, 2, 1, 5, 5, 16, torch.float32)
    with pytest.raises(TypeError, match="eta"):
        fastattn_icl.momentum_attention(q, k, v, eta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eta_as_tensor_or_int(backend):
    q, k, v, _, _ = _inputs(1, 2, 1, 9, 9, 16, torch.float32, seed=13)
    eta = torch.tensor(0.9, device=DEVICE)
    a = fastattn_icl.momentum_attention(q, k, v, eta, backend=backend)
    b = fastattn_icl.momentum_attention(q, k, v, eta.item(), backend=backend)
    assert torch.equal(a, b)
    c = fastattn_icl.momentum_attention(q, k, v, torch.tensor([0.5], dtype=torch.float64), backend=backend)
    assert torch.equal(c, fastattn_icl.momentum_attention(q, k, v, 0.5, backend=backend))
    assert torch.equal(
        fastattn_icl.momentum_attention(q, k, v, 0, backend=backend), fastattn_icl.attention(q, k, v, backend=backend)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_path_matches_grad_path(backend):
    """Without grad the forward keeps no attention part; the output is the grad path's, bit for bit."""
    q, k, v, do, kpm = _inputs(2, 4, 2, 21, 21, 16, torch.float16, pad="holes", seed=14)
    with_grad = _grads(_ours(backend, 0.9, True, kpm), q, k, v, do)[0]
    with torch.no_grad():
        no_grad = fastattn_icl.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm, backend=backend)
    with torch.inference_mode():
        inference = fastattn_icl.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm, backend=backend)
    plain = fastattn_icl.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm, backend=backend)  # no leaf
    for name, t in (("no_grad", no_grad), ("inference_mode", inference), ("no requires_grad", plain)):
        assert not t.requires_grad
        assert torch.equal(t, with_grad), name


def test_bad_tensors_and_flags():
    q, k, v, _, _ = _inputs(1, 4, 2, 5, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        fastattn_icl.momentum_attention(q, k[:, :1].expand(1, 3, 5, 16), v[:, :1].expand(1, 3, 5, 16), 0.5)
    with pytest.raises(ValueError, match="shape of k"):
        fastattn_icl.momentum_attention(q, k, v[:, :, :4], 0.5)
    with pytest.raises(TypeError, match="torch.bool"):
        fastattn_icl.momentum_attention(q, k, v, 0.5, key_padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"shape \[B=1, Tk=5\]"):
        fastattn_icl.momentum_attention(q, k, v, 0.5, key_padding_mask=torch.ones(1, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="causal"):
        fastattn_icl.momentum_attention(q, k, v, 0.5, causal=1)
    with pytest.raises(ValueError, match="scale"):
        fastattn_icl.momentum_attention(q, k, v, 0.5, scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn_icl.momentum_attention(q, k, v, 0.5, backend="cuda")


# ------------------------------------------------------------------------------------------------
# torch.library registration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_opcheck_forward(layout):
    q, k, v, _, kpm = _inputs(2, 4, 2, 7, 11, 16, torch.float32, pad="holes", layout=layout, seed=15)
    fwd = torch.ops.fastattn_icl.momentum_attention_fwd.default
    for store_attn in (True, False):
        args = (q, k, v, kpm, 0.9, True, 0.25, store_attn, "torch")
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(
        fwd,
        (*leaves, kpm, 0.9, False, 0.25, True, "torch"),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_opcheck_backward(layout, dtype):
    q, k, v, do, kpm = _inputs(2, 4, 2, 7, 11, 16, dtype, pad="holes", layout=layout, seed=16)
    _, lse, out_attn, _ = torch.ops.fastattn_icl.momentum_attention_fwd(q, k, v, kpm, 0.9, True, 0.25, True, "torch")
    torch.library.opcheck(torch.ops.fastattn_icl.momentum_attention_bwd.default,
                          (do, q, k, v, out_attn, lse, kpm, 0.9, True, 0.25, "torch"))


def test_opcheck_triton_fake_strides():
    """The Triton forward's and backward's outputs have the strides the fake kernels promise (the backward sums the
    momentum term's dV into the attention backward's dv in place, so dv must have v's layout)."""
    q, k, v, do, kpm = _inputs(1, 4, 2, 7, 11, 16, torch.float32, pad="holes", layout="bthd", seed=17)
    fwd_args = (q, k, v, kpm, 0.9, True, 0.25, True, "triton")
    torch.library.opcheck(torch.ops.fastattn_icl.momentum_attention_fwd.default, fwd_args,
                          test_utils=("test_faketensor",))
    _, lse, out_attn, _ = torch.ops.fastattn_icl.momentum_attention_fwd(*fwd_args)
    torch.library.opcheck(torch.ops.fastattn_icl.momentum_attention_bwd.default,
                          (do, q, k, v, out_attn, lse, kpm, 0.9, True, 0.25, "triton"), test_utils=("test_faketensor",))


def test_torch_compile_fullgraph_traces_the_op():
    q, k, v, do, kpm = _inputs(1, 4, 2, 9, 9, 16, torch.float32, pad="holes", seed=18)

    def f(q_, k_, v_):
        return fastattn_icl.momentum_attention(q_, k_, v_, 0.9, key_padding_mask=kpm, backend="torch") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(_grads(compiled, q, k, v, do), _grads(f, q, k, v, do)):
        assert torch.equal(a, b)  # bit-exact: aot_eager traces the graph and runs the same op and kernels


# ------------------------------------------------------------------------------------------------
# The scans alone: Triton kernel vs its torch twin vs the oracle
# ------------------------------------------------------------------------------------------------


def _scan(backend):
    if backend == "triton":
        from fastattn_icl._triton import momentum as impl

        return impl
    return torch_impl


SCAN_CASES = [
    # B, Hkv, T, D, eta, first, pad
    (1, 1, 1, 16, 0.5, 0, None),
    (2, 2, 70, 24, 0.9, 0, "holes"),  # head dim 24: a masked head-dim block; T not a multiple of 32
    (1, 2, 33, 16, 0.999, 5, None),  # η close to 1, rows from a later start
    (2, 1, 64, 80, 0.99, 63, "left"),  # two head-dim blocks, one row at the end of two full blocks
    (1, 1, 45, 16, 1e-30, 0, None),  # η tiny: every power underflows to 0
    (1, 2, 100, 16, 0.1, 0, "holes"),  # powers past 0.1^38 are float32 denormals: flushed to 0 on CPU
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_momentum_term_scan(backend, case, dtype):
    B, Hkv, T, D, eta, first, pad = case
    g = torch.Generator().manual_seed(T)
    v = torch.randn(B, T, Hkv, D, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)  # strided
    kpm = _padding(B, T, pad, g, DEVICE)
    got = _scan(backend).momentum_term(v, eta, first, kpm)
    assert got.shape == (B, Hkv, T - first, D) and got.dtype == torch.float32
    same = ref.momentum_term(v, eta, start=first, key_padding_mask=kpm)
    high = ref.momentum_term(v.double(), eta, start=first, key_padding_mask=kpm)
    check_close("M", got, same, high)
    check_against_oracle(  # the oracle's two forms agree
        "closed form vs recurrence",
        lambda v: ref.momentum_term(v, eta, start=first, key_padding_mask=kpm),
        lambda v: ref.momentum_recurrent(v, eta, key_padding_mask=kpm)[:, :, first:],
        v,
    )
    if kpm is not None and pad == "left":  # left pads change nothing for the real rows
        for b in range(B):
            p = int((~kpm[b]).sum())
            if p >= first:
                alone = v[b : b + 1, :, p:]
                check_close(
                    f"row {b} without its pads",
                    got[b : b + 1, :, p - first :],
                    ref.momentum_term(alone, eta),
                    ref.momentum_term(alone.double(), eta),
                )


@pytest.mark.parametrize("dtype, eta", [(torch.float32, 0.06), (torch.float64, 0.1)])
def test_cpu_scan_tables_hold_no_denormals(dtype, eta):
    """A denormal decay weight changes no sum but slows every CPU matmul it enters many times: the CPU scan's tables
    hold η's powers where they are normal numbers and 0 elsewhere (η^32 is a float32 denormal for η = 0.06,
    η^320 a float64 one for η = 0.1)."""
    c, nb = 32, 12
    within, tail, spread, head = torch_impl._scan_tables(eta, c, nb, dtype, torch.device("cpu"))
    r, blocks = torch.arange(c), torch.arange(nb)
    lag, block_lag = r[:, None] - r[None, :], blocks[:, None] - blocks[None, :] - 1
    exact = (  # η^e in float64, rounded to dtype; None where the table holds 0 (the strict upper triangle)
        (within, torch.where(lag > 0, lag, -1)),
        (tail, c - r),
        (spread, torch.where(block_lag >= 0, c * block_lag, -1)),
        (head, r[:, None]),
    )
    tiny, denormals = torch.finfo(dtype).tiny, 0
    for table, exponent in exact:
        raw = torch.where(exponent >= 0, torch.tensor(eta, dtype=torch.float64) ** exponent.double(), 0.0).to(dtype)
        denormals += int(((raw != 0) & (raw < tiny)).sum())
        assert table.dtype == dtype and torch.equal(table, raw.masked_fill(raw < tiny, 0.0))
    assert denormals > 0, "no power of this case is a denormal: it tests nothing"


def test_cpu_scan_tables_made_in_inference_mode_serve_autograd_later():
    """The scan's tables are cached across calls: a first call under ``torch.inference_mode`` must not leave inference
    tensors in the cache, which a later call that autograd records could not save for its backward."""
    torch_impl._block_tables.cache_clear()
    with torch.inference_mode():
        torch_impl.momentum_term(torch.randn(1, 1, 40, 8), 0.5, 0, None)
    v = torch.randn(1, 1, 40, 8, requires_grad=True)
    torch_impl.momentum_term(v, 0.5, 0, None).sum().backward()

    def oracle(dtype):
        leaf = v.detach().to(dtype).requires_grad_(True)
        ref.momentum_term(leaf, 0.5).sum().backward()
        return leaf.grad

    check_close("dv", v.grad, oracle(torch.float32), oracle(torch.float64), factor=GRAD_FACTOR)


VALUE_GRAD_CASES = [
    # B, H, Hkv, Tq, Tk, D, eta, pad
    (2, 4, 2, 70, 70, 24, 0.9, "holes"),
    (2, 2, 1, 5, 40, 16, 0.99, None),  # a chunk over a longer cache: keys before it get decayed state only
    (1, 2, 2, 20, 8, 16, 0.5, None),  # Tq > Tk: rows before the first key reach no value
    (1, 4, 1, 1, 33, 16, 0.999, "left"),  # one decode row
    (1, 2, 1, 64, 64, 80, 0.9, None),
]


def _value_grad_oracle(do, eta, Hkv, Tk, kpm, dtype):
    """Autograd of the oracle's momentum part: d/dv of (M expanded to the query heads * dO).sum()."""
    B, H, Tq, D = do.shape
    v = torch.zeros(B, Hkv, Tk, D, dtype=dtype, device=do.device, requires_grad=True)
    first = Tk - Tq
    mom = ref.momentum_term(v, eta, start=max(first, 0), key_padding_mask=kpm)
    if first < 0:
        mom = torch.cat([mom.new_zeros(B, Hkv, -first, D), mom], dim=2)
    (mom.repeat_interleave(H // Hkv, dim=1) * do.to(mom.dtype)).sum().backward()
    return v.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", VALUE_GRAD_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_momentum_value_grad_scan(backend, case, dtype):
    B, H, Hkv, Tq, Tk, D, eta, pad = case
    g = torch.Generator().manual_seed(Tq * Tk)
    do = torch.randn(B, Tq, H, D, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)  # as autograd hands
    kpm = _padding(B, Tk, pad, g, DEVICE)
    got = _scan(backend).momentum_value_grad(do, eta, Hkv, Tk, kpm)
    assert got.shape == (B, Hkv, Tk, D) and got.dtype == torch.float32
    same = _value_grad_oracle(do, eta, Hkv, Tk, kpm, torch.float32)
    high = _value_grad_oracle(do, eta, Hkv, Tk, kpm, torch.float64)
    check_close("dv", got, same, high, factor=GRAD_FACTOR)
    if kpm is not None:
        assert torch.all(got.transpose(1, 2)[~kpm] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scans_by_hand(backend):
    """η = 0.5, T = 3: M of ones is [0, 0.5, 0.75]; dv of dO = ones is [0.75, 0.5, 0] (off-by-one catchers)."""
    impl = _scan(backend)
    m = impl.momentum_term(torch.ones(1, 1, 3, 16, device=DEVICE), 0.5, 0, None)
    assert torch.equal(m[0, 0, :, 0], torch.tensor([0.0, 0.5, 0.75], device=DEVICE))
    assert torch.equal(
        impl.momentum_term(torch.ones(1, 1, 3, 16, device=DEVICE), 0.5, 2, None)[0, 0, :, 0],
        torch.tensor([0.75], device=DEVICE),
    )
    dv = impl.momentum_value_grad(torch.ones(1, 2, 3, 16, device=DEVICE), 0.5, 1, 3, None)  # two query heads
    assert torch.equal(dv[0, 0, :, 0], torch.tensor([1.5, 1.0, 0.0], device=DEVICE))
    dv = impl.momentum_value_grad(torch.ones(1, 1, 1, 16, device=DEVICE), 0.5, 1, 3, None)  # decode row at t = 2
    assert torch.equal(dv[0, 0, :, 0], torch.tensor([0.25, 0.5, 0.0], device=DEVICE))


def test_oracle_by_hand():
    v = torch.ones(1, 1, 3, 16)
    assert torch.equal(ref.momentum_term(v, 0.5)[0, 0, :, 0], torch.tensor([0.0, 0.5, 0.75]))
    assert torch.equal(ref.momentum_recurrent(v, 0.5)[0, 0, :, 0], torch.tensor([0.0, 0.5, 0.75]))


# ------------------------------------------------------------------------------------------------
# The Triton epilogue alone, with NaN-poisoned outputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("store_attn", [True, False])
def test_epilogue_writes_every_element(causal, store_attn, nan_empty):
    from fastattn_icl._triton import attention as kernels

    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 37, 45, 24
    q, k, v, _, kpm = _inputs(B, H, Hkv, Tq, Tk, D, torch.float32, pad="holes", seed=19)
    g = torch.Generator().manual_seed(20)
    mom = (10 * torch.randn(B, Tq, Hkv, D, generator=g)).to(DEVICE).transpose(1, 2)  # any M, any strides
    scale = D**-0.5
    with nan_empty():
        out, lse, out_attn = kernels.momentum_attention_fwd(q, k, v, kpm, causal, scale, mom, store_attn)
    ref_attn, ref_lse = attention_ref(
        q.double(), k.double(), v.double(), causal=causal, key_padding_mask=kpm, return_lse=True
    )
    same_attn, same_lse = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    with_m = lambda attn: attn + mom.to(attn.dtype).repeat_interleave(H // Hkv, 1)  # noqa: E731
    check_close("out", out, with_m(same_attn), with_m(ref_attn))
    check_close("lse", lse, same_lse, ref_lse)
    if store_attn:
        assert not torch.isnan(out_attn).any()
        check_close("out_attn", out_attn, same_attn, ref_attn)


def test_scan_writes_every_row(nan_empty):
    """The scans' outputs come from torch.empty: poisoned, every row is still written (a chunk start mid-block)."""
    from fastattn_icl._triton import momentum as impl

    v, _, _, do, kpm = _inputs(2, 4, 2, 37, 37, 24, torch.float32, pad="holes", seed=21)
    for first in (0, 30, 37):
        with nan_empty():
            y = impl.momentum_term(v[:, :2], 0.9, first, kpm)
        assert not torch.isnan(y).any()
        check_close(
            "M",
            y,
            ref.momentum_term(v[:, :2], 0.9, start=first, key_padding_mask=kpm),
            ref.momentum_term(v[:, :2].double(), 0.9, start=first, key_padding_mask=kpm),
        )
    with nan_empty():
        y = impl.momentum_value_grad(do, 0.9, 2, 37, kpm)
    assert not torch.isnan(y).any()


# ------------------------------------------------------------------------------------------------
# CUDA: bf16/fp16 at model-like shapes, long sequences
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("eta", [0.9, 0.99])
def test_cuda_matches_oracle(dtype, T, eta):
    q, k, v, do, kpm = _inputs(2, 32, 8, T, T, 128, dtype, device="cuda", pad="left", seed=T)
    _check_against_oracle("triton", q, k, v, do, kpm, eta, True, split=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 2, 1000, 1000, 80), (1, 4, 1, 300, 4096, 128), (1, 8, 8, 1, 2049, 64)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_shapes(dtype, shape, causal):
    q, k, v, do, kpm = _inputs(*shape, dtype, device="cuda", pad="holes", seed=sum(shape))
    _check_against_oracle("triton", q, k, v, do, kpm, 0.99, causal, split=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("eta", [0.9, 0.999])
def test_cuda_scans_long(dtype, eta):
    from fastattn_icl._triton import momentum as impl

    g = torch.Generator().manual_seed(22)
    v = torch.randn(2, 8, 4096, 128, generator=g).to("cuda", dtype)
    do = torch.randn(2, 32, 1000, 128, generator=g).to("cuda", dtype)
    check_close(
        "M",
        impl.momentum_term(v, eta, 0, None),
        torch_impl.momentum_term(v, eta, 0, None),
        ref.momentum_term(v.double(), eta),
    )
    check_close(
        "dv",
        impl.momentum_value_grad(do, eta, 8, 4096, None),
        torch_impl.momentum_value_grad(do, eta, 8, 4096, None),
        _value_grad_oracle(do, eta, 8, 4096, None, torch.float64),
        factor=GRAD_FACTOR,
    )


@pytest.mark.gpu
def test_cuda_torch_compile_inductor_fullgraph():
    q, k, v, _, _ = _inputs(2, 8, 2, 256, 256, 64, torch.bfloat16, device="cuda")

    def f(q_, k_, v_):
        return fastattn_icl.momentum_attention(q_, k_, v_, 0.9).float().square().sum()

    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    loss = torch.compile(f, fullgraph=True)(*leaves)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_carried_state_decode_equals_the_full_pass(backend):
    # a prefill returns the state at its end; each decode step continues from it reading only its new value
    from fastattn_icl.ops.momentum import momentum_attention_with_state

    g = torch.Generator().manual_seed(11)
    B, H, Hkv, T, D = 2, 4, 2, 40, 16
    q, k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(
        B, Hkv, T, D, generator=g)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :5] = False  # left padding
    want = ref.momentum_attention(q.double(), k.double(), v.double(), 0.9, key_padding_mask=kpm)
    same = ref.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm)
    with torch.no_grad():
        out, state = momentum_attention_with_state(q[:, :, :30], k[:, :, :30], v[:, :, :30], 0.9,
                                                   key_padding_mask=kpm[:, :30], backend=backend)
        rows = [out]
        for t in range(30, T):
            out, state = momentum_attention_with_state(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], 0.9,
                                                       state, key_padding_mask=kpm[:, : t + 1], backend=backend)
            rows.append(out)
    check_close("prefill and decode rows", torch.cat(rows, 2), same, want)
    assert state.shape == (B, Hkv, D) and state.dtype == torch.float32


def test_carried_state_errors():
    from fastattn_icl.ops.momentum import momentum_attention_with_state

    q, k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    state = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="eta > 0"):
        momentum_attention_with_state(q, k, v, 0.0, state, backend="torch")
    with pytest.raises(TypeError, match="state must be a float32 tensor"):
        momentum_attention_with_state(q, k, v, 0.5, state.double(), backend="torch")
    with pytest.raises(TypeError, match="state must be a float32 tensor"):
        momentum_attention_with_state(q, k, v, 0.5, state[:, :1], backend="torch")
    with pytest.raises(RuntimeError, match="inference"):
        momentum_attention_with_state(q.requires_grad_(), k, v, 0.5, state, backend="torch")


def test_state_after_a_call_with_no_query_rows():
    from fastattn_icl.ops.momentum import momentum_attention_with_state

    g = torch.Generator().manual_seed(12)
    k, v = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    _, want = ref.momentum_recurrent(v.double(), 0.5, return_state=True)
    _, same = ref.momentum_recurrent(v, 0.5, return_state=True)
    for backend in ("torch", "triton"):
        with torch.no_grad():
            _, state = momentum_attention_with_state(torch.randn(1, 2, 0, 16), k, v, 0.5, causal=False,
                                                     backend=backend)
        check_close(f"state, {backend}", state, same, want)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_cpu_forward_adds_the_term_in_one_pass(monkeypatch, grad, layout):
    """A float32 CPU call with no carried state forms ``M`` inside the add (``fastattn_icl::momentum_add_``), with and
    without a gradient; its output, gradients and state agree with the general term-then-add path (forced here) and
    both with the float64 oracle. bf16, a carried state and ``Tq > Tk`` take the general path."""
    from fastattn_icl.ops import _cpu_kernels
    from fastattn_icl.ops.momentum import momentum_attention_with_state

    if not _cpu_kernels.available():
        pytest.skip("the compiled extension is not built")
    fused = torch_impl.momentum_attention_fwd_fused
    served = []
    monkeypatch.setattr(torch_impl, "momentum_attention_fwd_fused",
                        lambda *a: (lambda r: served.append(r is not None) or r)(fused(*a)))
    q, k, v, do, kpm = _inputs(2, 4, 2, 21, 33, 16, torch.float32, pad="left", seed=5, layout=layout)
    want = _oracle_grads(q, k, v, do, kpm, 0.9, True, dtype=torch.float64)
    same = _oracle_grads(q, k, v, do, kpm, 0.9, True)
    run = (lambda: _grads(_ours("torch", 0.9, True, kpm), q, k, v, do)) if grad else \
        (lambda: (fastattn_icl.momentum_attention(q, k, v, 0.9, key_padding_mask=kpm, backend="torch"),))
    got = run()
    assert served == [True]
    monkeypatch.setattr(torch_impl, "momentum_attention_fwd_fused", lambda *a: served.append(None))
    general = run()
    assert served == [True, None]
    for name, a, b, s, h in zip(("out", "dq", "dk", "dv"), got, general, same, want):
        check_close(f"{name} fused", a, s, h, factor=2.0 if name == "out" else GRAD_FACTOR)
        check_close(f"{name} general", b, s, h, factor=2.0 if name == "out" else GRAD_FACTOR)
    assert got[0].stride() == output_like(q).stride()
    _, state_want = ref.momentum_recurrent((v.double() * kpm[:, None, :, None]), 0.9, return_state=True)
    _, state_same = ref.momentum_recurrent(v * kpm[:, None, :, None], 0.9, return_state=True)
    monkeypatch.setattr(torch_impl, "momentum_attention_fwd_fused", fused)
    with torch.no_grad():
        _, state = momentum_attention_with_state(q, k, v, 0.9, key_padding_mask=kpm, backend="torch")
    check_close("state", state, state_same, state_want)
    calls = []
    monkeypatch.setattr(torch_impl, "momentum_attention_fwd_fused", lambda *a: calls.append(1) or fused(*a))
    with torch.no_grad():
        momentum_attention_with_state(q[:, :, -1:], k, v, 0.9, state, key_padding_mask=kpm, backend="torch")
        assert fused(*(t.bfloat16() for t in (q, k, v)), kpm, True, 0.25, 0.9, False) is None
        assert fused(q, k[:, :, :5], v[:, :, :5], None, True, 0.25, 0.9, False) is None  # Tq > Tk
    assert calls == []
