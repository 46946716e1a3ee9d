"""Shared-prefix attention (docs/methods.md §5 serving) against the oracle over the concatenated keys.

``shared_prefix_attention(q, pk, pv, k, v)`` must equal ``attention(q, [pk, k], [pv, v])`` with the prefix
always visible: bottom-right causal alignment over the concatenation puts every prefix key before every query
(``Tk >= Tq``), and the padding mask of the concatenation is ``[ones(Tp), key_padding_mask]``. The tolerance
rule is :func:`fastattn_icl.testing.check_close` (2x the same-dtype oracle's error against float64).

Without a GPU the Triton kernel runs under the interpreter (32x32 blocks), so these cases are small; the
prefix lengths 1, 17, 64, 65 cross its key-block boundaries. bf16, large shapes and the memory check of a
batch-64 decode step over a stride-0 prefix run on CUDA behind the ``gpu`` marker.
"""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.ops import _torch_backend
from fastattn_icl.ops._validate import output_like
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import check_close

CPU_DTYPES = [torch.float32, torch.float16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]


def _inputs(
    B, H, Hkv, Tq, Tk, Tp, D, dtype, *, prefix_batch=1, device=DEVICE, seed=0, layout="bhtd", prefix_layout="bhtd"
):
    """``q, k, v`` and a prefix ``pk, pv`` of batch ``prefix_batch`` (1: shared by every row)."""
    g = torch.Generator().manual_seed(seed)

    def make(batch, heads, T, lay):
        if lay == "bthd":  # a [B, T, H, D] tensor seen through a transpose, as HF models hold it
            t = torch.randn(batch, T, heads, D, generator=g).to(device=device, dtype=dtype)
            return t.transpose(1, 2)
        return torch.randn(batch, heads, T, D, generator=g).to(device=device, dtype=dtype)

    q, k, v = make(B, H, Tq, layout), make(B, Hkv, Tk, layout), make(B, Hkv, Tk, layout)
    pk, pv = make(prefix_batch, Hkv, Tp, prefix_layout), make(prefix_batch, Hkv, Tp, prefix_layout)
    return q, pk, pv, k, v


def _oracle(q, pk, pv, k, v, *, causal, scale=None, kpm=None, dtype=None, return_lse=False):
    """Attention over ``[pk, k]`` with the prefix always kept (optionally in another dtype)."""
    B, Tp = q.shape[0], pk.shape[2]
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    full_k = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    full_v = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    full_kpm = None
    if kpm is not None:
        full_kpm = torch.cat([torch.ones(B, Tp, dtype=torch.bool, device=kpm.device), kpm], dim=1)
    return attention_ref(
        cast(q),
        cast(full_k),
        cast(full_v),
        causal=causal,
        scale=scale,
        key_padding_mask=full_kpm,
        return_lse=return_lse,
    )


def _check_against_oracle(backend, q, pk, pv, k, v, *, causal, scale=None, kpm=None):
    out = fastattn_icl.shared_prefix_attention(
        q, pk, pv, k, v, causal=causal, scale=scale, key_padding_mask=kpm, backend=backend
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    assert out.stride() == output_like(q).stride(), "the output is laid out as the ops promise"
    assert torch.isfinite(out).all()
    same = _oracle(q, pk, pv, k, v, causal=causal, scale=scale, kpm=kpm)
    high = _oracle(q, pk, pv, k, v, causal=causal, scale=scale, kpm=kpm, dtype=torch.float64)
    check_close("out", out, same, high, factor=2.0)
    return out


SHAPES = [
    # B, H, Hkv, Tq, Tk, Tp, D, prefix batch
    (2, 4, 2, 1, 40, 17, 16, 1),  # one decode step, GQA 2:1, shared prefix
    (3, 4, 1, 1, 1, 65, 16, 1),  # the first decode step after the prefix: one own key, GQA 4:1
    (2, 4, 1, 5, 5, 64, 16, 1),  # a chunk of queries over its own keys, a prefix of exactly two key blocks
    (1, 2, 2, 33, 33, 65, 16, 1),  # MHA, two query blocks, a prefix one past a block boundary
    (2, 4, 2, 33, 40, 1, 16, 2),  # a per-row prefix of one key
    (2, 2, 2, 5, 40, 17, 32, 2),  # MHA, per-row prefix
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matches_oracle(backend, shape, causal, dtype):
    *dims, prefix_batch = shape
    q, pk, pv, k, v = _inputs(*dims, dtype, prefix_batch=prefix_batch, seed=sum(shape))
    _check_against_oracle(backend, q, pk, pv, k, v, causal=causal)


def _padding_mask(B, Tk, seed, kind="mixed"):
    """Row 0 left-padded, row 1 with holes anywhere (``left``: left-padded too), row 2 with every own key masked (it
    sees only the prefix)."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[0, : Tk // 3] = False
    kpm[1] = torch.rand(Tk, generator=g) > 0.4
    kpm[1, -1] = True
    if kind == "left":
        kpm[1] = torch.arange(Tk) >= Tk // 2
    kpm[2] = False
    return kpm.to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "shape", [(3, 4, 2, 1, 40, 17, 16), (3, 4, 2, 33, 40, 64, 16)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("kind", ["mixed", "left"])
def test_key_padding(backend, causal, shape, kind, monkeypatch):
    """``left``: a batch that is only left-padded, which the CPU path would run unpadded without a prefix (here it
    must not: the prefix is visible to the rows that see none of their own keys), at any size."""
    monkeypatch.setattr(_torch_backend, "_CALL_SCORES", 0)
    q, pk, pv, k, v = _inputs(*shape, torch.float32, seed=3)
    kpm = _padding_mask(shape[0], shape[4], seed=4, kind=kind)
    out = _check_against_oracle(backend, q, pk, pv, k, v, causal=causal, kpm=kpm)
    # the row whose own keys are all masked attends to the prefix alone (not 0, not NaN)
    prefix_only = attention_ref(q[2:].double(), pk.double(), pv.double(), causal=False)
    check_close("prefix-only row", out[2:], attention_ref(q[2:], pk, pv, causal=False), prefix_only)
    # the op's lse is that of the concatenation
    B, H, Tq, D = q.shape
    _, lse = torch.ops.fastattn_icl.shared_prefix_attention_fwd(
        q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), k, v, kpm, causal, D**-0.5, backend
    )
    _, ref_lse = _oracle(q, pk, pv, k, v, causal=causal, kpm=kpm, dtype=torch.float64, return_lse=True)
    _, same_lse = _oracle(q, pk, pv, k, v, causal=causal, kpm=kpm, return_lse=True)
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32 and torch.isfinite(lse).all()
    check_close("lse", lse, same_lse, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefix_batch", [1, 2], ids=["shared", "per-row"])
def test_strided_views(backend, prefix_batch):
    """q/k/v and the prefix as transposed [B, T, H, D] tensors (non-contiguous), with a scale given."""
    q, pk, pv, k, v = _inputs(
        2, 4, 2, 5, 40, 17, 16, torch.float32, prefix_batch=prefix_batch, seed=5, layout="bthd", prefix_layout="bthd"
    )
    assert not q.is_contiguous() and not k.is_contiguous() and not pk.is_contiguous()
    _check_against_oracle(backend, q, pk, pv, k, v, causal=True, scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_odd_head_dim_and_scale(backend, dtype):
    """head_dim 24 (the kernel pads it to a block of 32) with an explicit scale."""
    q, pk, pv, k, v = _inputs(2, 4, 2, 5, 40, 17, 24, dtype, seed=6)
    _check_against_oracle(backend, q, pk, pv, k, v, causal=True, scale=0.15)


def test_prefix_expanded_by_the_caller():
    """A prefix the caller already expanded to batch B (stride 0) is the same as the batch-1 one."""
    q, pk, pv, k, v = _inputs(3, 4, 2, 5, 5, 17, 16, torch.float32, seed=8)
    shared = fastattn_icl.shared_prefix_attention(q, pk, pv, k, v, backend="torch")
    expanded = fastattn_icl.shared_prefix_attention(
        q, pk.expand(3, -1, -1, -1), pv.expand(3, -1, -1, -1), k, v, backend="torch"
    )
    assert torch.equal(shared, expanded)  # bit-exact: the op expands a batch-1 prefix to the same stride-0 view


def test_every_output_element_is_written(nan_empty):
    """The Triton launcher with NaN-poisoned outputs and a stride-0 prefix: no element left unwritten."""
    from fastattn_icl._triton import attention as kernels

    B, H, Hkv, Tq, Tk, Tp, D = 2, 4, 2, 37, 45, 65, 24
    q, pk, pv, k, v = _inputs(B, H, Hkv, Tq, Tk, Tp, D, torch.float32, seed=7)
    kpm = _padding_mask(3, Tk, seed=9)[1:]  # a row with holes and a row with every own key masked
    prefix = (pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1))
    with nan_empty():
        out, lse = kernels.attention_fwd(q, k, v, kpm, None, None, None, True, D**-0.5, prefix=prefix)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_out, ref_lse = _oracle(q, pk, pv, k, v, causal=True, kpm=kpm, dtype=torch.float64, return_lse=True)
    same_out, same_lse = _oracle(q, pk, pv, k, v, causal=True, kpm=kpm, return_lse=True)
    check_close("out", out, same_out, ref_out)
    check_close("lse", lse, same_lse, ref_lse)


# ------------------------------------------------------------------------------------------------
# The shared prefix is read in place: batch stride 0, never B copies
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("caller_expands", [False, True], ids=["batch-1", "caller-expanded"])
def test_batch_one_prefix_reaches_the_backend_with_stride_0(backend, caller_expands, monkeypatch):
    if backend == "triton":
        from fastattn_icl._triton import attention as module
    else:
        from fastattn_icl.ops import _torch_backend as module
    seen = []
    launcher = module.attention_fwd

    def spy(*args, prefix=None, **kwargs):
        seen.append(prefix)
        return launcher(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(module, "attention_fwd", spy)
    B = 3
    q, pk, pv, k, v = _inputs(B, 4, 2, 1, 9, 17, 16, torch.float32, seed=10)
    pk_in, pv_in = (pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)) if caller_expands else (pk, pv)
    _check_against_oracle(backend, q, pk_in, pv_in, k, v, causal=True)
    assert len(seen) == 1 and seen[0] is not None
    for got, original in zip(seen[0], (pk, pv)):
        assert got.shape == (B, *original.shape[1:])
        assert got.stride(0) == 0, "the batch-1 prefix was materialised per row"
        assert got.data_ptr() == original.data_ptr(), "the prefix was copied"


def test_torch_backend_contracts_the_prefix_once(monkeypatch):
    """The exact path of the plain-PyTorch backend turns a stride-0 prefix back into batch 1 and never expands it."""
    from fastattn_icl.ops import _torch_backend

    monkeypatch.setattr(_torch_backend, "_flash_ok", lambda *args: False)
    batches = []
    scores, output = _torch_backend._prefix_scores, _torch_backend._prefix_output

    def spy_scores(q_c, pkf):
        batches.append(pkf.shape[0])
        return scores(q_c, pkf)

    def spy_output(p, pvf):
        batches.append(pvf.shape[0])
        return output(p, pvf)

    monkeypatch.setattr(_torch_backend, "_prefix_scores", spy_scores)
    monkeypatch.setattr(_torch_backend, "_prefix_output", spy_output)
    q, pk, pv, k, v = _inputs(4, 4, 2, 5, 9, 17, 16, torch.float32, seed=11)
    _check_against_oracle("torch", q, pk, pv, k, v, causal=True)
    assert batches and set(batches) == {1}


def test_cpu_flash_path_reads_the_prefix_through_stride_0(monkeypatch):
    """On CPU the flash kernel reads one copy of a batch-1 prefix through a batch stride of 0: nothing is copied."""
    from fastattn_icl.ops import _torch_backend

    seen = []
    flash = _torch_backend._FLASH_FWD

    def spy(q, k, v, *args, **kwargs):
        seen.append((k.shape[2], k.stride(0), v.stride(0)))
        return flash(q, k, v, *args, **kwargs)

    monkeypatch.setattr(_torch_backend, "_FLASH_FWD", spy)
    q, pk, pv, k, v = _inputs(4, 4, 2, 5, 9, 17, 16, torch.float32, seed=11)
    _check_against_oracle("torch", q, pk, pv, k, v, causal=True)
    assert (17, 0, 0) in seen, f"prefix keys read through (length, k batch stride, v batch stride): {seen}"


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _ok(**over):
    base = dict(
        q=torch.randn(2, 4, 5, 16),
        prefix_k=torch.randn(1, 2, 7, 16),
        prefix_v=torch.randn(1, 2, 7, 16),
        k=torch.randn(2, 2, 5, 16),
        v=torch.randn(2, 2, 5, 16),
    )
    base.update(over)
    return base


def _both(shape, **kw):
    return dict(prefix_k=torch.randn(*shape, **kw), prefix_v=torch.randn(*shape, **kw))


@pytest.mark.parametrize(
    "inputs, err, match",
    [
        (_ok(**_both((1, 4, 7, 16))), ValueError, r"Hkv=2"),
        (_ok(**_both((1, 1, 7, 16))), ValueError, r"Hkv=2"),
        (_ok(**_both((1, 2, 7, 32))), ValueError, r"D=16"),
        (_ok(**_both((3, 2, 7, 16))), ValueError, r"1 or B=2"),
        (_ok(**_both((2, 7, 16))), ValueError, r"1 or B=2"),
        (_ok(**_both((1, 2, 0, 16))), ValueError, "empty"),
        (_ok(prefix_v=torch.randn(1, 2, 8, 16)), ValueError, "one shape"),
        (_ok(prefix_v=torch.randn(2, 2, 7, 16)), ValueError, "one shape"),
        (_ok(**_both((1, 2, 7, 16), dtype=torch.float16)), TypeError, "float32"),
        (_ok(prefix_v=torch.randn(1, 2, 7, 16, dtype=torch.float16)), TypeError, "float32"),
        (_ok(**_both((1, 2, 7, 16), device="meta")), TypeError, "cpu"),
        (_ok(prefix_k=[1.0]), TypeError, "prefix_k must be a tensor"),
        (
            _ok(
                q=torch.randn(2, 4, 5, 12),
                k=torch.randn(2, 2, 5, 12),
                v=torch.randn(2, 2, 5, 12),
                **_both((1, 2, 7, 12)),
            ),
            ValueError,
            "multiple of 8",
        ),
        (_ok(k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16)), ValueError, "batch size 2"),
    ],
)
def test_bad_tensors(inputs, err, match):
    with pytest.raises(err, match=match):
        fastattn_icl.shared_prefix_attention(**inputs)


@pytest.mark.parametrize(
    "kpm, err, match",
    [
        (torch.ones(2, 5), TypeError, "torch.bool"),
        (torch.ones(2, 6, dtype=torch.bool), ValueError, r"shape \[B=2, Tk=5\]"),
        (torch.ones(2, 12, dtype=torch.bool), ValueError, r"shape \[B=2, Tk=5\]"),  # over [prefix, k]: wrong
        (torch.ones(5, dtype=torch.bool), ValueError, r"shape \[B=2, Tk=5\]"),
    ],
)
def test_bad_padding_mask(kpm, err, match):
    with pytest.raises(err, match=match):
        fastattn_icl.shared_prefix_attention(**_ok(), key_padding_mask=kpm)


def test_bad_scale_causal_and_backend():
    with pytest.raises(ValueError, match="scale"):
        fastattn_icl.shared_prefix_attention(**_ok(), scale=0.0)
    with pytest.raises(TypeError, match="causal"):
        fastattn_icl.shared_prefix_attention(**_ok(), causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn_icl.shared_prefix_attention(**_ok(), backend="cuda")


@pytest.mark.parametrize("name", ["q", "prefix_k", "prefix_v", "k", "v"])
def test_forward_only(name):
    inputs = _ok()
    inputs[name].requires_grad_(True)
    with pytest.raises(RuntimeError, match="forward-only"):
        fastattn_icl.shared_prefix_attention(**inputs, backend="torch")
    with torch.no_grad():
        a = fastattn_icl.shared_prefix_attention(**inputs, backend="torch")
    with torch.inference_mode():
        b = fastattn_icl.shared_prefix_attention(**inputs, backend="torch")
    assert not a.requires_grad and torch.equal(a, b)
    plain = {n: t.detach() for n, t in inputs.items()}
    # bit-exact: the same op on the same values, only without requires_grad
    assert torch.equal(a, fastattn_icl.shared_prefix_attention(**plain, backend="torch"))


def test_opcheck():
    q, pk, pv, k, v = _inputs(2, 4, 2, 5, 9, 7, 16, torch.float32, seed=12, layout="bthd")
    kpm = _padding_mask(3, 9, seed=13)[1:]
    op = torch.ops.fastattn_icl.shared_prefix_attention_fwd.default
    shared = (pk.expand(2, -1, -1, -1), pv.expand(2, -1, -1, -1))  # batch stride 0
    per_row = (pk.repeat(2, 1, 1, 1), pv.repeat(2, 1, 1, 1))
    for prefix in (shared, per_row):
        torch.library.opcheck(
            op,
            (q, *prefix, k, v, kpm, True, 0.25, "torch"),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


# ------------------------------------------------------------------------------------------------
# CUDA: bf16/fp16 at model-like sizes, and the memory of a batch decode step over a shared prefix
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Tq, Tk", [(1, 64), (1, 200), (64, 64), (64, 137), (64, 200)])
@pytest.mark.parametrize("prefix_batch", [1, 16], ids=["shared", "per-row"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_matches_oracle(dtype, Tq, Tk, prefix_batch, causal):
    B, H, Hkv, Tp, D = 16, 32, 8, 300, 128
    q, pk, pv, k, v = _inputs(
        B, H, Hkv, Tq, Tk, Tp, D, dtype, prefix_batch=prefix_batch, device="cuda", seed=Tq + Tk, layout="bthd"
    )
    g = torch.Generator().manual_seed(Tk)
    kpm = torch.rand(B, Tk, generator=g) > 0.2
    kpm[0] = True
    kpm[1, : Tk // 2] = False  # left padding
    kpm[2] = False  # every own key masked: the prefix alone
    _check_against_oracle("triton", q, pk, pv, k, v, causal=causal, kpm=kpm.cuda())


@pytest.mark.gpu
def test_cuda_batch_decode_never_materialises_the_prefix():
    B, H, Hkv, Tk, Tp, D = 64, 32, 8, 16, 4096, 128
    dtype = torch.float16
    q, pk, pv, k, v = _inputs(B, H, Hkv, 1, Tk, Tp, D, dtype, device="cuda", seed=14)
    prefix_bytes = 2 * pk.numel() * pk.element_size()  # keys and values, one copy
    fastattn_icl.shared_prefix_attention(q, pk, pv, k, v)  # warm up: compile and autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    out = fastattn_icl.shared_prefix_attention(q, pk, pv, k, v)
    torch.cuda.synchronize()
    delta = torch.cuda.max_memory_allocated() - start
    assert delta < prefix_bytes * B / 4, f"{delta} bytes allocated for a prefix of {prefix_bytes} bytes"
    same = _oracle(q[:2], pk, pv, k[:2], v[:2], causal=True)
    high = _oracle(q[:2], pk, pv, k[:2], v[:2], causal=True, dtype=torch.float64)
    check_close("out", out[:2], same, high)


def test_causal_with_more_queries_than_own_keys_raises():
    # with Tq > Tk the first queries would sit inside the prefix: the op refuses instead of diverging from the
    # concatenated attention
    q = torch.randn(1, 2, 6, 16)
    k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16)
    pk, pv = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        fastattn_icl.shared_prefix_attention(q, pk, pv, k, v, backend="torch")
    out = fastattn_icl.shared_prefix_attention(q, pk, pv, k, v, causal=False, backend="torch")
    assert out.shape == q.shape
