"""Anchor re-weighting (docs/methods.md §2) and isolation (docs/methods.md §3) as flags of the fused kernel, against
the oracle: forward, dq/dk/dv and dβ, under the Triton interpreter on CPU and on CUDA behind the ``gpu`` marker."""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.reference.anchors import anchor_reweight_attention as reweight_ref
from fastattn_icl.reference.attention import attention as attention_ref
from fastattn_icl.testing import FWD_FACTOR, GRAD_FACTOR, check_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B, H, Hkv, Tq, Tk, D, dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h, T in ((H, Tq), (Hkv, Tk), (Hkv, Tk)))
    do = torch.randn(B, H, Tq, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def _anchors(B, Tk, C, per_class, seed, device=DEVICE, include=()):
    """Distinct random anchor positions per row (``per_class`` of each class, rows may differ in count:
    the second row drops one anchor into a -1 slot), plus any positions in ``include`` in row 0."""
    g = torch.Generator().manual_seed(seed)
    A = C * per_class
    pos = torch.stack([torch.randperm(Tk, generator=g)[:A] for _ in range(B)])
    for i, p in enumerate(include):
        pos[0, i] = p
        pos[0, i + 1:] = torch.where(pos[0, i + 1:] == p, (p + 1 + torch.arange(A - i - 1)) % Tk, pos[0, i + 1:])
    cls = torch.arange(A).remainder(C).repeat(B, 1)
    if B > 1 and A > 1:
        pos[1, -1] = -1
    return pos.to(device), cls.to(device)


def _compare(ours, oracle, leaves, do, names):
    """Forward and gradients of ``ours`` vs the same-dtype and float64 oracle (DESIGN.md rule)."""
    def run(fn, dtype=None):
        xs = [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in leaves]
        out = fn(*xs)
        grads = torch.autograd.grad(out, xs, do.to(out.dtype))
        return (out.detach(), *grads)

    got, same, high = run(ours), run(oracle), run(oracle, torch.float64)
    for name, g, s, h in zip(("out", *names), got, same, high):
        check_close(name, g, s, h, factor=FWD_FACTOR if name == "out" else GRAD_FACTOR)


CASES = [
    # B, H, Hkv, Tq, Tk, D, C, per_class, reweight_from
    (1, 2, 2, 17, 17, 16, 1, 1, None),
    (2, 4, 2, 33, 33, 16, 2, 1, None),
    (2, 4, 1, 17, 63, 32, 4, 2, 5),  # GQA 4:1, chunk over a cache, several demonstrations per class
    (3, 2, 2, 40, 40, 16, 6, 1, 0),  # every row re-weighted
    (1, 2, 1, 1, 129, 64, 2, 3, None),  # one decode step
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_reweighting_matches_oracle(backend, case, dtype):
    B, H, Hkv, Tq, Tk, D, C, per_class, start = case
    q, k, v, do = _qkv(B, H, Hkv, Tq, Tk, D, dtype, seed=sum(case[:6]))
    pos, cls = _anchors(B, Tk, C, per_class, seed=B + C, include=(0, Tk - 1) if C * per_class > 1 else ())
    beta = torch.randn(H, C, generator=torch.Generator().manual_seed(C), device="cpu").to(DEVICE) * 0.7

    def ours(q_, k_, v_, b_):
        return fastattn_icl.anchor_reweight_attention(q_, k_, v_, b_, pos, cls, reweight_from=start,
                                                      backend=backend)

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=start)

    _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [True, False])
def test_reweighting_with_padding_and_per_row_beta(backend, causal):
    B, H, Hkv, T, D, C = 3, 4, 2, 37, 16, 2
    q, k, v, do = _qkv(B, H, Hkv, T, T, D, torch.float32, seed=21)
    kpm = torch.rand(B, T, generator=torch.Generator().manual_seed(4)) > 0.25
    kpm[:, -1] = True
    kpm = kpm.to(DEVICE)
    pos, cls = _anchors(B, T, C, 2, seed=9)
    beta = torch.randn(B, H, C, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    start = torch.tensor([T - 1, 3, 20], device=DEVICE)

    def ours(q_, k_, v_, b_):
        return fastattn_icl.anchor_reweight_attention(q_, k_, v_, b_, pos, cls, reweight_from=start, causal=causal,
                                                      key_padding_mask=kpm, backend=backend)

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=start, causal=causal, key_padding_mask=kpm)

    _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zero_beta_is_bit_for_bit_base_attention(dtype):
    q, k, v, do = _qkv(2, 4, 2, 45, 45, 32, dtype, seed=1)
    pos, cls = _anchors(2, 45, 3, 2, seed=3)
    beta = torch.zeros(4, 3, device=DEVICE, requires_grad=True)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = fastattn_icl.anchor_reweight_attention(*leaves, beta, pos, cls, reweight_from=0, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    base = fastattn_icl.attention(*leaves, backend="triton")
    base_grads = torch.autograd.grad(base, leaves, do)
    assert torch.equal(out, base)
    for a, b in zip(grads, base_grads):
        assert torch.equal(a, b)


def test_reweighting_is_not_renormalised():
    """With v = 1 every output element is the row sum of P̂: 1 for plain rows, above 1 for re-weighted
    rows whose anchors get β > 0 (the denominator stays unweighted)."""
    q, k, _, _ = _qkv(1, 2, 2, 9, 9, 16, torch.float32, seed=5)
    v = torch.ones_like(k)
    pos = torch.tensor([[2, 5]], device=DEVICE)
    cls = torch.tensor([[0, 1]], device=DEVICE)
    beta = torch.full((2, 2), 1.0, device=DEVICE)
    out = fastattn_icl.anchor_reweight_attention(q, k, v, beta, pos, cls, backend="triton")
    same = reweight_ref(q, k, v, beta, pos, cls)
    check_close("plain rows", out[:, :, :-1], same[:, :, :-1], torch.ones_like(out[:, :, :-1], dtype=torch.float64))
    assert torch.all(out[:, :, -1] > 1.0)


ISO_CASES = [
    # B, H, Hkv, Tq, Tk, D, window
    (1, 2, 2, 17, 17, 16, 0),
    (2, 4, 2, 40, 40, 16, 2),
    (2, 4, 1, 20, 63, 32, 0),  # chunk of queries over a cache
    (1, 2, 1, 129, 129, 64, 1),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", ISO_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_isolation_matches_oracle(backend, case, dtype):
    B, H, Hkv, Tq, Tk, D, window = case
    q, k, v, do = _qkv(B, H, Hkv, Tq, Tk, D, dtype, seed=sum(case))
    g = torch.Generator().manual_seed(window)
    rows = torch.stack([torch.randperm(Tk - window, generator=g)[:3] for _ in range(B)])
    rows[0, 0] = Tk - 1 - window  # an isolated row right at the end of the sequence
    if B > 1:
        rows[1, 2] = -1
    rows = rows.to(DEVICE)

    def ours(q_, k_, v_):
        return fastattn_icl.attention(q_, k_, v_, isolation_rows=rows, isolation_window=window, backend=backend)

    def oracle(q_, k_, v_):
        return attention_ref(q_, k_, v_, isolation_rows=rows, isolation_window=window)

    _compare(ours, oracle, [q, k, v], do, ("dq", "dk", "dv"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_isolation_and_reweighting_together_with_padding(backend):
    B, H, Hkv, T, D, C = 2, 4, 2, 36, 16, 2
    q, k, v, do = _qkv(B, H, Hkv, T, T, D, torch.float32, seed=8)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :4] = False  # left padding
    kpm = kpm.to(DEVICE)
    pos = torch.tensor([[6, 14, 22, 30], [9, 17, 25, -1]], device=DEVICE)
    cls = torch.tensor([[0, 1, 0, 1], [0, 1, 0, 0]], device=DEVICE)
    beta = torch.randn(H, C, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def ours(q_, k_, v_, b_):
        return fastattn_icl.anchor_reweight_attention(q_, k_, v_, b_, pos, cls, reweight_from=30,
                                                      key_padding_mask=kpm, isolation_rows=pos, backend=backend)

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=30, key_padding_mask=kpm, isolation_rows=pos)

    _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_isolated_logits_are_overwritten_not_added(backend):
    """Row 5 is isolated and its own key is padded, so every key it sees (0..4) has its logit overwritten
    with the same -1e4: the softmax is uniform and the output is mean(v[0..4]). Adding -1e4 instead would
    keep the original logits' differences and give a different, non-uniform mix."""
    q, k, v, _ = _qkv(1, 1, 1, 8, 8, 16, torch.float32, seed=2)
    q = q * 4.0  # logits far from uniform, so overwrite and add differ clearly
    kpm = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    kpm[0, 5] = False
    rows = torch.tensor([[5]], device=DEVICE)
    out = fastattn_icl.attention(q, k, v, key_padding_mask=kpm, isolation_rows=rows, backend=backend)
    check_close("isolated row", out[0, 0, 5], v[0, 0, :5].mean(0), v[0, 0, :5].double().mean(0))
    plain = fastattn_icl.attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert (plain[0, 0, 5] - v[0, 0, :5].mean(0)).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [True, False])
def test_every_method_output_element_is_written(causal, nan_empty):
    """NaN-poisoned out, lse, dq, dk, dv and d(log-weights) with anchors, isolation and padding on."""
    from fastattn_icl._triton import attention as kernels

    from fastattn_icl.ops.features import anchor_key_log_weights, isolation_limit, reweight_start

    B, H, Hkv, Tq, Tk, D = 2, 4, 2, 37, 45, 80
    q, k, v, do = _qkv(B, H, Hkv, Tq, Tk, D, torch.float32, seed=17)
    kpm = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
    kpm[1, :6] = False
    pos, cls = _anchors(B, Tk, 2, 3, seed=5)
    beta = torch.randn(H, 2, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logw = anchor_key_log_weights(beta, pos, cls, B, H, Tk)[0]
    start = reweight_start(20, B, Tq, q.device)
    limit = isolation_limit(pos, 0, B, Tq, Tk, q.device)
    with nan_empty():
        out, lse = kernels.attention_fwd(q, k, v, kpm, logw, start, limit, causal, D**-0.5)
    ref = reweight_ref(q, k, v, beta, pos, cls, reweight_from=20, causal=causal, key_padding_mask=kpm,
                       isolation_rows=pos)
    high = reweight_ref(*(t.double() for t in (q, k, v, beta)), pos, cls, reweight_from=20, causal=causal,
                        key_padding_mask=kpm, isolation_rows=pos)
    check_close("out", out, ref, high)
    assert not torch.isnan(lse).any()
    with nan_empty():
        *grads, dlogw = kernels.attention_bwd(do, q, k, v, out, lse, kpm, logw, start, limit, causal, D**-0.5)
    for g in (*grads, dlogw):
        assert not torch.isnan(g).any()


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def _small():
    q, k, v, _ = _qkv(2, 4, 2, 6, 6, 16, torch.float32, seed=0, device="cpu")
    return q, k, v


@pytest.mark.parametrize(
    "pos, cls, beta, err, match",
    [
        ([[1, 6], [2, 3]], [[0, 1], [0, 1]], (4, 2), ValueError, r"in \[0, Tk=6\)"),
        ([[1, 2], [-2, 3]], [[0, 1], [0, 1]], (4, 2), ValueError, r"or -1 \(unused\), got -2"),
        ([[1, 1], [2, 3]], [[0, 1], [0, 1]], (4, 2), ValueError, "must not repeat"),
        ([[1, 2], [2, 3]], [[0, 2], [0, 1]], (4, 2), ValueError, r"in \[0, C=2\)"),
        ([[-1, -1], [-1, -1]], [[0, 0], [0, 0]], (4, 2), ValueError, "empty"),
        ([[1, 2], [2, 3]], [[0, 1], [0, 1]], (3, 2), ValueError, r"beta must have shape \[H=4, C\]"),
        ([[1, 2]], [[0, 1]], (4, 2), ValueError, r"\[B=2, A\]"),
        ([[1.0, 2.0], [2.0, 3.0]], [[0, 1], [0, 1]], (4, 2), TypeError, "integer tensor"),
    ],
)
def test_bad_anchor_input(pos, cls, beta, err, match):
    q, k, v = _small()
    with pytest.raises(err, match=match):
        fastattn_icl.anchor_reweight_attention(q, k, v, torch.zeros(beta), torch.tensor(pos), torch.tensor(cls))


def test_bad_reweight_from_and_isolation():
    q, k, v = _small()
    pos, cls = torch.tensor([[1, 2], [2, 3]]), torch.tensor([[0, 1], [0, 1]])
    with pytest.raises(ValueError, match=r"query row in \[0, Tq=6\)"):
        fastattn_icl.anchor_reweight_attention(q, k, v, torch.zeros(4, 2), pos, cls, reweight_from=6)
    with pytest.raises(ValueError, match="runs past the sequence"):
        fastattn_icl.attention(q, k, v, isolation_rows=torch.tensor([[4], [1]]), isolation_window=2)
    for rows in ([[6], [1]], [[1], [-2]]):
        with pytest.raises(ValueError, match=r"positions in \[0, Tk=6\) or -1"):
            fastattn_icl.attention(q, k, v, isolation_rows=torch.tensor(rows))
    with pytest.raises(ValueError, match=r"\[B=2, R\]"):
        fastattn_icl.attention(q, k, v, isolation_rows=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        fastattn_icl.attention(q, k, v, isolation_rows=torch.tensor([[1], [2]]), isolation_window=-1)


# ------------------------------------------------------------------------------------------------
# CUDA: bf16 and long sequences
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 25, 25, 1024, 1024, 64), (1, 32, 8, 4096, 4096, 128),
                                   (1, 16, 16, 777, 777, 256)], ids=lambda s: "x".join(map(str, s)))
def test_cuda_reweighting_and_isolation(dtype, shape):
    B, H, Hkv, Tq, Tk, D = shape
    q, k, v, do = _qkv(B, H, Hkv, Tq, Tk, D, dtype, seed=Tq)
    pos, cls = _anchors(B, Tk, 4, 4, seed=1)
    beta = torch.randn(H, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def ours(q_, k_, v_, b_):
        return fastattn_icl.anchor_reweight_attention(q_, k_, v_, b_, pos, cls, reweight_from=Tq - 64,
                                                      isolation_rows=pos)

    def oracle(q_, k_, v_, b_):
        return reweight_ref(q_, k_, v_, b_, pos, cls, reweight_from=Tq - 64, isolation_rows=pos)

    _compare(ours, oracle, [q, k, v, beta], do, ("dq", "dk", "dv", "dbeta"))
