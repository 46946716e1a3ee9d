"""The fused base attention op against the oracle (docs/methods.md §1), forward and all input gradients.

On a machine without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest),
so these cases are small; the bf16 and long-sequence cases run on CUDA behind the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.ops.backend import resolve_backend
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import GRAD_FACTOR, check_close

CPU_DTYPES = [torch.float32, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, H, Hkv, Tq, Tk, D, dtype, device=DEVICE, pad=False, seed=0, layout="bhtd"):
    g = torch.Generator().manual_seed(seed)

    def make(heads, T):
        if layout == "bthd":  # a [B, T, H, D] tensor seen through a transpose, as HF models hold it
            return torch.randn(B, T, heads, D, generator=g).transpose(1, 2)
        return torch.randn(B, heads, T, D, generator=g)

    q, k, v = make(H, Tq), make(Hkv, Tk), make(Hkv, Tk)
    kpm = None
    if pad:
        kpm = torch.rand(B, Tk, generator=g) > 0.3
        kpm[0, :] = True  # one row unpadded, the others with holes anywhere
        kpm = kpm.to(device)
    do = torch.randn(B, H, Tq, D, generator=g)
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), do.to(**to), kpm


def _grads(fn, q, k, v, do, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out.detach(), *grads)


def _check_against_oracle(backend, q, k, v, do, kpm, causal, scale=None):
    def ours(q_, k_, v_):
        return fastattn_icl.attention(q_, k_, v_, causal=causal, scale=scale, key_padding_mask=kpm,
                                      backend=backend)

    def oracle(q_, k_, v_):
        return attention_ref(q_, k_, v_, causal=causal, scale=scale, key_padding_mask=kpm)

    got = _grads(ours, q, k, v, do)
    same = _grads(oracle, q, k, v, do)
    high = _grads(oracle, q, k, v, do, dtype=torch.float64)
    for name, g, s, h, factor in zip(("out", "dq", "dk", "dv"), got, same, high, (2.0, *[GRAD_FACTOR] * 3)):
        assert g.shape == h.shape and g.dtype == q.dtype, name
        check_close(name, g, s, h, factor=factor)


SHAPES = [
    # B, H, Hkv, Tq, Tk, D
    (1, 2, 2, 1, 1, 16),
    (2, 2, 2, 17, 17, 16),
    (1, 2, 1, 63, 63, 32),
    (1, 1, 1, 129, 129, 64),
    (2, 4, 1, 17, 63, 16),  # GQA 4:1, a chunk of queries over a longer cache
    (1, 4, 2, 1, 129, 64),  # one decode step
    (1, 2, 2, 40, 17, 16),  # Tq > Tk: early rows see no key under bottom-right causal
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matches_oracle(backend, shape, causal, dtype):
    q, k, v, do, kpm = _inputs(*shape, dtype)
    _check_against_oracle(backend, q, k, v, do, kpm, causal)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 2, 33, 33, 16), (2, 4, 1, 17, 50, 32)], ids=str)
def test_key_padding(backend, causal, shape):
    q, k, v, do, kpm = _inputs(*shape, torch.float32, pad=True, seed=3)
    kpm[1, :] = False  # a batch row with every key padded: its output is 0, never NaN
    _check_against_oracle(backend, q, k, v, do, kpm, causal)
    out = fastattn_icl.attention(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    q, k, v, do, kpm = _inputs(1, 2, 1, 33, 33, head_dim, torch.float16, seed=head_dim)
    _check_against_oracle("triton", q, k, v, do, kpm, True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bthd_strided_views(backend):
    q, k, v, do, kpm = _inputs(2, 4, 2, 31, 31, 32, torch.float32, layout="bthd", seed=5)
    assert not q.is_contiguous()
    _check_against_oracle(backend, q, k, v, do, kpm, True, scale=0.3)


def _query(layout: str, B=2, H=4, T=9, D=16):
    """``q [B, H, T, D]``: contiguous, a ``[B, T, H, D]`` tensor's transpose (a Hugging Face model's), or a slice of
    a fused q/k/v projection seen that way (GPT-2's ``c_attn``: not dense)."""
    g = torch.Generator().manual_seed(3)
    if layout == "bhtd":
        return torch.randn(B, H, T, D, generator=g)
    if layout == "bthd":
        return torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    return torch.randn(B, T, 3 * H * D, generator=g)[..., : H * D].view(B, T, H, D).transpose(1, 2)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["bhtd", "bthd", "fused"])
@pytest.mark.parametrize("op", ["attention", "anchors-folded", "anchors-corrected", "momentum", "prefix", "exact-path",
                                "attention-fp16"])
def test_output_layout(backend, layout, op):
    """Every attention op's output is laid out as ``q`` when ``q`` is contiguous (as SDPA's; no copy of the CPU
    flash kernel's output), else as ``[B, Tq, H, D]`` memory, so that a Hugging Face model's ``out.transpose(1, 2)``
    is contiguous: the layout the fake kernels promise (``output_like``), on every backend and path."""
    from fastattn_icl.ops._validate import output_like

    dtype = torch.float16 if op == "attention-fp16" else torch.float32  # the CPU path computes in float32: a copy
    q = _query(layout).to(DEVICE, dtype)
    heads = 4 if op.startswith("anchors") else 2  # the folded re-weighting takes one kv head per query head
    k, v = (torch.randn(2, heads, 9, 16, generator=torch.Generator().manual_seed(s)).to(DEVICE, dtype) for s in (4, 5))
    kw = dict(backend=backend)
    if op.startswith("anchors"):  # from row 2, before every anchor: folded into the values on CPU; the last row: not
        pos = torch.tensor([[2, 5], [3, -1]], device=DEVICE)
        beta, cls = torch.ones(4, 2, device=DEVICE), torch.zeros_like(pos)
        out = fastattn_icl.anchor_reweight_attention(q, k, v, beta, pos, cls,
                                                     reweight_from=2 if op == "anchors-folded" else None, **kw)
    elif op == "momentum":  # with gradients: the attention part is kept for the backward, in the same layout
        q.requires_grad_(True)
        out = fastattn_icl.momentum_attention(q, k, v, eta=0.5, **kw)
        out.backward(torch.ones_like(out))
    elif op == "prefix":
        out = fastattn_icl.shared_prefix_attention(q, k[:1], v[:1], k, v, causal=True, **kw)
    else:  # causal with more query rows than keys: the CPU backend's exact chunked path
        out = fastattn_icl.attention(q, k[:, :, :5], v[:, :, :5], causal=op == "exact-path", **kw)
    want = output_like(q)
    assert out.shape == q.shape and out.stride() == want.stride(), (out.stride(), want.stride())
    assert (out.is_contiguous() if layout == "bhtd" else out.transpose(1, 2).is_contiguous())


@pytest.mark.parametrize("causal", [True, False])
def test_every_output_element_is_written(causal, nan_empty):
    """Poison the kernel's outputs with NaN: an element it never writes fails the comparison."""
    if DEVICE == "cpu" and resolve_backend("triton", torch.device("cpu")) != "triton":
        pytest.fail("the Triton interpreter should be on in tests without a GPU")
    from fastattn_icl._triton import attention as kernels

    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 37, 45, 80
    q, k, v, do, kpm = _inputs(B, H, Hkv, Tq, Tk, D, torch.float32, pad=True, seed=7)
    scale = D**-0.5
    with nan_empty():
        out, lse = kernels.attention_fwd(q, k, v, kpm, None, None, None, causal, scale)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=causal,
                                     key_padding_mask=kpm, return_lse=True)
    same_out, same_lse = attention_ref(q, k, v, causal=causal, key_padding_mask=kpm, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    check_close("out", out, same_out, ref_out)
    check_close("lse", lse, same_lse, ref_lse)
    with nan_empty():
        *grads, _ = kernels.attention_bwd(do, q, k, v, out, lse, kpm, None, None, None, causal, scale)
    for g in grads:
        assert not torch.isnan(g).any()


def test_nan_empty_leaves_what_no_kernel_writes_nan(nan_empty, monkeypatch):
    """The poisoning reaches the launchers' outputs: with the attention kernels not launched, every element of out,
    lse, dq, dk, dv and d(log-weights) is NaN, so an element a kernel never writes fails the tests above."""
    from fastattn_icl._triton.attention import backward, forward

    monkeypatch.setattr(forward, "launch", lambda *args, **kwargs: None)
    monkeypatch.setattr(backward, "launch", lambda *args, **kwargs: None)
    q, k, v, do, kpm = _inputs(1, 2, 1, 5, 7, 16, torch.float32, pad=True)
    logw = torch.zeros(1, 2, 7, device=DEVICE)
    start = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    momentum = torch.zeros(1, 1, 5, 16, device=DEVICE)
    allocators = (torch.empty, torch.empty_like)
    with nan_empty():
        out, lse = forward.attention_fwd(q, k, v, kpm, None, None, None, True, 0.25)
        mom_out, mom_lse, out_attn = forward.momentum_attention_fwd(q, k, v, kpm, True, 0.25, momentum, True)
        grads = backward.attention_bwd(do, q, k, v, q, lse, kpm, logw, start, None, True, 0.25)
    for t in (out, lse, mom_out, mom_lse, out_attn, *grads):
        assert t.numel() and torch.isnan(t).all()
    assert (torch.empty, torch.empty_like) == allocators  # restored after the block


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_rows_give_zero_not_nan(backend):
    q, k, v, do, _ = _inputs(1, 2, 2, 20, 8, 16, torch.float32)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = fastattn_icl.attention(*leaves, causal=True, backend=backend)  # rows 0..11 see no key
    assert torch.all(out[:, :, :12] == 0)
    out.backward(do)
    assert all(torch.isfinite(t.grad).all() for t in leaves)
    assert torch.all(q.grad[:, :, :12] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_with_huge_logits_stay_out(causal):
    """A padded key whose logit dwarfs every visible one must not leak into any output or gradient
    (the backward does not mask padded keys per tile, it zeroes their dk/dv rows at the end)."""
    q, k, v, do, kpm = _inputs(2, 2, 1, 40, 40, 16, torch.float32, pad=True, seed=13)
    kpm[:, 5] = False
    k[:, :, 5] = 60.0 * q[:, 0].mean(1, keepdim=True).sign()  # logit far above the rest: exp2 overflows
    _check_against_oracle("triton", q, k, v, do, kpm, causal)


def test_gqa_never_repeats_kv_memory():
    """Gradients land on the kv heads exactly as if K/V were repeated: sum over the query group. The grouped
    path may be at most 2x (3x for gradients) as far from the float64 oracle as the repeated one, plus eps."""
    q, k, v, do, _ = _inputs(1, 8, 2, 17, 17, 16, torch.float32, seed=11)
    got = _grads(lambda a, b, c: fastattn_icl.attention(a, b, c, backend="triton"), q, k, v, do)
    rep = _grads(
        lambda a, b, c: fastattn_icl.attention(a, b.repeat_interleave(4, 1), c.repeat_interleave(4, 1),
                                               backend="triton"),
        q, k, v, do,
    )
    high = _grads(attention_ref, q, k, v, do, dtype=torch.float64)
    for name, a, b, h, factor in zip(("out", "dq", "dk", "dv"), got, rep, high, (2.0, *[GRAD_FACTOR] * 3)):
        check_close(name, a, b, h, factor=factor)


def test_torch_compile_fullgraph_traces_the_op():
    q, k, v, do, kpm = _inputs(1, 2, 1, 9, 9, 16, torch.float32, pad=True)

    def f(q_, k_, v_):
        return fastattn_icl.attention(q_, k_, v_, key_padding_mask=kpm) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = _grads(compiled, q, k, v, do)
    b = _grads(f, q, k, v, do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # bit-exact: aot_eager traces the graph and runs the same op and kernels


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_opcheck_backward_with_bthd_inputs(backend):
    """Gradients must have the strides the fake kernel promises (those of q, k, v), also for the
    transposed [B, T, H, D] views Hugging Face models pass, or compiled code reads the wrong memory."""
    q, k, v, do, kpm = _inputs(2, 4, 2, 9, 9, 16, torch.float32, pad=True, layout="bthd")
    out, lse = torch.ops.fastattn_icl.attention_fwd(q, k, v, kpm, None, None, None, True, 0.25, backend)
    torch.library.opcheck(
        torch.ops.fastattn_icl.attention_bwd.default,
        (do, q, k, v, out, lse, kpm, None, None, None, True, 0.25, backend),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_opcheck_forward_and_backward():
    q, k, v, do, kpm = _inputs(1, 2, 1, 9, 12, 16, torch.float32, pad=True)
    fwd = torch.ops.fastattn_icl.attention_fwd.default
    args = (q, k, v, kpm, None, None, None, True, 0.25, "torch")
    torch.library.opcheck(fwd, args)
    q.requires_grad_(True)
    torch.library.opcheck(fwd, args, test_utils=("test_autograd_registration",))


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _ok(**over):
    base = dict(q=torch.randn(1, 4, 5, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16))
    base.update(over)
    return base


@pytest.mark.parametrize(
    "inputs, err, match",
    [
        (_ok(q=torch.randn(4, 5, 16)), ValueError, "4 dims"),
        (_ok(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16)), ValueError, "multiple of k/v heads"),
        (_ok(v=torch.randn(1, 2, 6, 16)), ValueError, "shape of k"),
        (_ok(k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16)), ValueError, "batch size 1"),
        (_ok(k=torch.randn(1, 2, 5, 32), v=torch.randn(1, 2, 5, 32)), ValueError, "head_dim 16"),
        (_ok(q=torch.randn(1, 4, 5, 16).half()), TypeError, "one dtype"),
        (_ok(q=torch.randn(1, 4, 5, 16).double(), k=torch.randn(1, 2, 5, 16).double(),
             v=torch.randn(1, 2, 5, 16).double()), TypeError, "float16, bfloat16 or float32"),
        (_ok(q=torch.randn(1, 4, 5, 12), k=torch.randn(1, 2, 5, 12), v=torch.randn(1, 2, 5, 12)),
         ValueError, "multiple of 8"),
        (_ok(q=torch.randn(1, 4, 5, 264), k=torch.randn(1, 2, 5, 264), v=torch.randn(1, 2, 5, 264)),
         ValueError, "between 8 and 256"),
        (_ok(q=[1.0]), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors(inputs, err, match):
    with pytest.raises(err, match=match):
        fastattn_icl.attention(**inputs)


@pytest.mark.parametrize(
    "kpm, err, match",
    [
        (torch.ones(1, 5), TypeError, "torch.bool"),
        (torch.ones(1, 6, dtype=torch.bool), ValueError, r"shape \[B=1, Tk=5\]"),
        (torch.ones(5, dtype=torch.bool), ValueError, r"shape \[B=1, Tk=5\]"),
    ],
)
def test_bad_padding_mask(kpm, err, match):
    with pytest.raises(err, match=match):
        fastattn_icl.attention(**_ok(), key_padding_mask=kpm)


def test_bad_scale_and_backend():
    with pytest.raises(ValueError, match="scale"):
        fastattn_icl.attention(**_ok(), scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn_icl.attention(**_ok(), backend="cuda")
    with pytest.raises(TypeError, match="causal"):
        fastattn_icl.attention(**_ok(), causal=1)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


# ------------------------------------------------------------------------------------------------
# CUDA: bf16, long sequences, torch.compile with inductor
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 2, 1024, 1024, 128), (1, 4, 4, 2047, 2047, 64), (1, 2, 1, 8192, 8192, 128),
     (1, 4, 1, 300, 4096, 256), (2, 4, 4, 1000, 1000, 80), (2, 4, 4, 777, 777, 96)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_matches_oracle(dtype, shape, causal):
    q, k, v, do, kpm = _inputs(*shape, dtype, device="cuda", pad=shape[3] < 2048, seed=sum(shape))
    _check_against_oracle("triton", q, k, v, do, kpm, causal)


@pytest.mark.gpu
def test_cuda_batch_times_heads_beyond_grid_y_limit():
    """B·H = 70400 programs per query block: more than CUDA's 65535 cap on grid axes y and z."""
    q, k, v, do, _ = _inputs(2200, 32, 8, 1, 24, 64, torch.float16, device="cuda")
    _check_against_oracle("triton", q, k, v, do, None, True)


@pytest.mark.gpu
def test_cuda_torch_compile_inductor_fullgraph():
    q, k, v, do, _ = _inputs(2, 8, 2, 256, 256, 64, torch.bfloat16, device="cuda")

    def f(q_, k_, v_):
        return fastattn_icl.attention(q_, k_, v_).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    loss = compiled(*leaves)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(t.grad).all() for t in leaves)
