"""Plain-PyTorch backend of every op (attention, saliency, momentum, Deep-Thinking): the CPU path until faster CPU
kernels exist. It implements the functions that :func:`fastattn_icl.ops.backend.kernel` names.

Flash-style contract, same as the Triton kernels: the forward returns ``o`` and the natural-log
``lse`` (``-inf`` on rows with no visible key, whose output is 0); the backward recomputes ``P``
from ``lse``. Work is done in float32 over query chunks so memory stays ``O(chunk · Tk)`` per head,
not ``O(Tq · Tk)``. This is an implementation, not the oracle: tests compare it with
``fastattn_icl.reference`` like every other backend.
"""

from __future__ import annotations

import torch

from fastattn_icl.ops.features import ISOLATION_VALUE

_CHUNK_ELEMENTS = 1 << 24  # scores per chunk, summed over batch and heads


def _rows_per_chunk(B: int, H: int, Tq: int, Tk: int) -> int:
    return max(1, min(Tq, _CHUNK_ELEMENTS // max(1, B * H * Tk)))


def _visible(rows: torch.Tensor, Tq: int, Tk: int, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B or 1, 1, 1, len(rows), Tk]``: which keys each query row in ``rows`` may see."""
    cols = torch.arange(Tk, device=rows.device)
    vis = torch.ones(rows.numel(), Tk, dtype=torch.bool, device=rows.device)
    if causal:
        vis = cols[None, :] <= rows[:, None] + (Tk - Tq)
    vis = vis[None, None, None]
    if kpm is not None:
        vis = vis & kpm[:, None, None, None, :]
    return vis


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> float32 ``[B, Hkv, G, T, D]`` (query heads grouped by their kv head)."""
    B, H, T, D = x.shape
    return x.float().reshape(B, Hkv, H // Hkv, T, D)


def _chunk_features(rows, B, H, Hkv, Tk, key_log_weights, reweight_from, isolation_limit, device):
    """Per chunk of query rows: the isolated entries ``[B, 1, 1, n, Tk]`` (or None) and the post-softmax
    weights ``[B, Hkv, G, n, Tk]`` with the re-weighted-row mask ``[B, 1, 1, n, 1]`` (or None, None)."""
    iso = weights = rw = None
    if isolation_limit is not None:
        cols = torch.arange(Tk, device=device)
        iso = (cols[None, None, :] < isolation_limit[:, rows].long()[:, :, None])[:, None, None]
    if key_log_weights is not None:
        rw = (rows[None, :] >= reweight_from.long()[:, None])[:, None, None, :, None]
        w = key_log_weights.exp().reshape(B, Hkv, H // Hkv, 1, Tk)
        weights = torch.where(rw, w, torch.ones((), device=device))
    return iso, weights, rw


def _prefix_scores(q_c: torch.Tensor, pkf: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, Hkv, G, n, Tp]`` of a chunk of grouped queries against the shared prefix keys ``pkf``
    (float32 ``[1 or B, Hkv, Tp, D]``); a batch-1 prefix is contracted once per kv head, never expanded."""
    if pkf.shape[0] == 1:
        return torch.einsum("bhgnd,hpd->bhgnp", q_c, pkf[0])
    return torch.matmul(q_c, pkf[:, :, None].transpose(-1, -2))


def _prefix_output(p: torch.Tensor, pvf: torch.Tensor) -> torch.Tensor:
    """``p [B, Hkv, G, n, Tp] @ pvf [1 or B, Hkv, Tp, D]`` without expanding a batch-1 prefix."""
    if pvf.shape[0] == 1:
        return torch.einsum("bhgnp,hpd->bhgnd", p, pvf[0])
    return torch.matmul(p, pvf[:, :, None])


def _shared_prefix(prefix):
    """Float32 ``(pk, pv)`` of a shared prefix, batch 1 when every row reads the same copy (batch stride 0)."""
    if prefix is None:
        return None
    pk, pv = prefix
    if pk.shape[0] > 1 and pk.stride(0) == 0 and pv.stride(0) == 0:
        pk, pv = pk[:1], pv[:1]
    return pk.float(), pv.float()


def _chunk_softmax(qg_c, kf, rows, Tq, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                   isolation_limit, prefix_keys):
    """``(P̂, lse)`` of a chunk of grouped query rows ``qg_c [B, Hkv, G, n, D]`` over ``kf`` (float32 ``[B, Hkv, 1, Tk,
    D]``): the post-softmax, re-weighted probabilities the forward multiplies with the values, ``[B, Hkv, G, n, Tp +
    Tk]`` (the shared prefix keys first, if any), and the unweighted ``lse [B, Hkv, G, n]``."""
    B, Hkv, G = qg_c.shape[:3]
    Tk = kf.shape[-2]
    s = torch.matmul(qg_c, kf.transpose(-1, -2)) * scale
    vis = _visible(rows, Tq, Tk, causal, key_padding_mask)
    s = s.masked_fill(~vis, float("-inf"))
    iso, weights, _ = _chunk_features(rows, B, Hkv * G, Hkv, Tk, key_log_weights, reweight_from, isolation_limit,
                                      qg_c.device)
    if iso is not None:  # overwrite after scaling and masking; a masked key stays masked
        s = s.masked_fill(iso & vis, ISOLATION_VALUE)
    if prefix_keys is not None:  # every row sees every prefix key
        s = torch.cat([_prefix_scores(qg_c, prefix_keys) * scale, s], dim=-1)
    # normalise relative to the row max (as the kernel's online softmax does): exp(s - lse) would lose
    # digits when every visible logit is huge, e.g. a row that sees only isolated (-1e4) keys
    row_max = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - row_max.masked_fill(torch.isinf(row_max), 0.0))
    denom = p.sum(dim=-1, keepdim=True)
    row_lse = (row_max + torch.log(denom)).squeeze(-1)  # -inf on rows that see no key
    p = p / denom.masked_fill(denom == 0, 1.0)
    if weights is not None:  # numerator only: the denominator (lse) stays unweighted
        p = p * weights
    return p, row_lse


def attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                  scale: float, *, prefix=None):
    """The forward; ``prefix``: ``None`` or shared prefix keys/values ``(pk, pv)`` ``[B or 1, Hkv, Tp, D]`` that
    precede ``k``/``v`` and are visible to every query row (method features must then be off)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg = _grouped(q, Hkv)
    kf = k.float()[:, :, None]
    vf = v.float()[:, :, None]
    prefix = _shared_prefix(prefix)
    Tp = 0 if prefix is None else prefix[0].shape[2]
    out = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device)
    o_bhtd = out.transpose(1, 2)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(B, H, Tq, Tk + Tp)
    for r0 in range(0, Tq, step):
        rows = torch.arange(r0, min(Tq, r0 + step), device=q.device)
        p, row_lse = _chunk_softmax(qg[:, :, :, rows], kf, rows, Tq, causal, key_padding_mask, scale, key_log_weights,
                                    reweight_from, isolation_limit, None if prefix is None else prefix[0])
        if prefix is not None:
            o = _prefix_output(p[..., :Tp], prefix[1]) + torch.matmul(p[..., Tp:], vf)
        else:
            o = torch.matmul(p, vf)
        o_bhtd[:, :, r0 : r0 + rows.numel()] = o.reshape(B, H, rows.numel(), D).to(q.dtype)
        lse[:, :, r0 : r0 + rows.numel()] = row_lse.reshape(B, H, rows.numel())
    return o_bhtd, lse


def attention_probs(q, k, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                    scale: float, *, prefix_keys=None) -> torch.Tensor:
    """``P̂ [B, H, Tq, Tp + Tk]`` float32: the probabilities :func:`attention_fwd` multiplies with the values, for all
    rows at once (``O(Tq · (Tp + Tk))`` memory per head: for callers that return attention weights), differentiable.
    Arguments as in :func:`attention_fwd`; ``prefix_keys``: ``None`` or the shared prefix keys ``[B or 1, Hkv, Tp,
    D]``, whose columns come first. Rows that see no key are 0."""
    B, H, Tq, _ = q.shape
    Hkv = k.shape[1]
    pk = None if prefix_keys is None else _shared_prefix((prefix_keys, prefix_keys))[0]
    rows = torch.arange(Tq, device=q.device)
    p, _ = _chunk_softmax(_grouped(q, Hkv), k.float()[:, :, None], rows, Tq, causal, key_padding_mask, scale,
                          key_log_weights, reweight_from, isolation_limit, pk)
    return p.reshape(B, H, Tq, p.shape[-1])


def _chunk_probs(q_c, kf, lse_c, rows, Tq, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                 isolation_limit):
    """The backward's ``P`` of a chunk of query rows, recomputed from ``lse`` (``[B, Hkv, G, n, Tk]``), with
    the chunk's isolated entries and post-softmax weights (see :func:`_chunk_features`)."""
    B, Hkv, G = q_c.shape[:3]
    Tk = kf.shape[-2]
    s = torch.matmul(q_c, kf.transpose(-1, -2)) * scale
    vis = _visible(rows, Tq, Tk, causal, key_padding_mask)
    iso, weights, rw = _chunk_features(rows, B, Hkv * G, Hkv, Tk, key_log_weights, reweight_from, isolation_limit,
                                       q_c.device)
    if iso is not None:
        s = s.masked_fill(iso, ISOLATION_VALUE)
    row_lse = lse_c.masked_fill(torch.isinf(lse_c), float("inf"))
    return torch.exp(s - row_lse[..., None]).masked_fill(~vis, 0.0), iso, weights, rw


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                  causal: bool, scale: float):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    qg, dog, og = _grouped(q, Hkv), _grouped(do, Hkv), _grouped(o, Hkv)
    kf = k.float()[:, :, None]
    vf = v.float()[:, :, None]
    lse_g = lse.reshape(B, Hkv, H // Hkv, Tq)
    delta = (dog * og).sum(-1)
    dq = torch.empty_like(qg)
    dk = torch.zeros(B, Hkv, Tk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    dlogw = None
    if key_log_weights is not None:
        dlogw = torch.zeros(B, Hkv, H // Hkv, Tk, dtype=torch.float32, device=q.device)
    step = _rows_per_chunk(B, H, Tq, Tk)
    for r0 in range(0, Tq, step):
        rows = torch.arange(r0, min(Tq, r0 + step), device=q.device)
        q_c, do_c = qg[:, :, :, rows], dog[:, :, :, rows]
        p, iso, weights, rw = _chunk_probs(q_c, kf, lse_g[:, :, :, rows], rows, Tq, causal, key_padding_mask, scale,
                                           key_log_weights, reweight_from, isolation_limit)
        dp = torch.matmul(do_c, vf.transpose(-1, -2))
        if weights is not None:
            pw = p * weights
            dlogw += (pw * dp).masked_fill(~rw, 0.0).sum(3)
            ds = p * (weights * dp - delta[:, :, :, rows, None])
        else:
            pw = p
            ds = p * (dp - delta[:, :, :, rows, None])
        if iso is not None:  # the overwritten logits are constants
            ds = ds.masked_fill(iso, 0.0)
        dv += torch.matmul(pw.transpose(-1, -2), do_c).sum(2)
        dq[:, :, :, rows] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q_c).sum(2) * scale
    # gradients take the strides of their inputs, as the op's fake kernel promises (torch.empty_like)
    grads = [torch.empty_like(t).copy_(g.reshape(t.shape)) for t, g in ((q, dq), (k, dk), (v, dv))]
    return (*grads, None if dlogw is None else dlogw.reshape(B, H, Tk))


def attention_saliency(do, q, k, v, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                       causal: bool, scale: float, label_mask, target, *, per_head: bool = False, row_slot=None,
                       rows=None):
    """Saliency sums of docs/methods.md §4 over query chunks; the contract of the Triton launcher of the same name."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg, dog = _grouped(q, Hkv), _grouped(do, Hkv)
    kf = k.float()[:, :, None]
    vf = v.float()[:, :, None]
    lse_g = lse.reshape(B, Hkv, H // Hkv, T)
    label = label_mask != 0  # [B, T]
    cols = torch.arange(T, device=q.device)
    tgt = target.long()
    sums = torch.zeros(B, 3, dtype=torch.float32, device=q.device)
    head_sums = torch.zeros(B, H, 3, dtype=torch.float32, device=q.device) if per_head else None

    def reduce(a, rows_, lower):  # a [B, ..., n, T] -> [B, ..., 3] sums over this chunk
        a_lower = (a * lower).sum(-1)  # Σ_(j<i) per row, rows past the target excluded
        a_label = (a * label.view(B, *([1] * (a.dim() - 2)), T)).sum(-1)
        is_label_row = label[:, rows_].view(B, *([1] * (a.dim() - 3)), -1)
        is_target_row = (rows_[None, :] == tgt[:, None]).view(B, *([1] * (a.dim() - 3)), -1)
        return torch.stack([(a_lower * is_label_row).sum(-1), (a_label * is_target_row).sum(-1), a_lower.sum(-1)], -1)

    step = _rows_per_chunk(B, H, T, T)
    for r0 in range(0, T, step):
        rows_ = torch.arange(r0, min(T, r0 + step), device=q.device)
        p, _, weights, _ = _chunk_probs(qg[:, :, :, rows_], kf, lse_g[:, :, :, rows_], rows_, T, causal,
                                        key_padding_mask, scale, key_log_weights, reweight_from, isolation_limit)
        if weights is not None:
            p = p * weights
        c = p * torch.matmul(dog[:, :, :, rows_], vf.transpose(-1, -2))  # [B, Hkv, G, n, T]
        sal = c.sum(dim=(1, 2)).abs()  # heads summed before the absolute value
        lower = (cols[None, None, :] < rows_[None, :, None]) & (rows_[None, :, None] <= tgt[:, None, None])
        sums += reduce(sal, rows_, lower)
        if per_head:
            head_sums += reduce(c.abs().reshape(B, H, rows_.numel(), T), rows_, lower[:, None])
        if rows is not None:
            slot = row_slot[:, rows_].long()  # [B, n]
            b_idx, r_idx = torch.nonzero(slot >= 0, as_tuple=True)
            rows[b_idx, slot[b_idx, r_idx]] = sal[b_idx, r_idx]
    return sums, head_sums


def _decay(t: torch.Tensor, i: torch.Tensor, eta: float) -> torch.Tensor:
    """float32 ``[len(t), len(i)]``: ``η^(t - i)`` where ``i < t``, else 0 (computed in float64)."""
    lag = (t[:, None] - i[None, :]).double()
    return torch.where(lag > 0, torch.pow(eta, lag.clamp(min=1)), 0.0).float()


def momentum_term(v: torch.Tensor, eta: float, first: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``M [B, Hkv, Tk - first, D]`` float32 at absolute positions ``first .. Tk - 1`` (docs/methods.md §6),
    padded keys 0."""
    B, Hkv, Tk, D = v.shape
    vf = v.float()
    if key_padding_mask is not None:
        vf = vf * key_padding_mask[:, None, :, None]
    keys = torch.arange(Tk, device=v.device)
    out = torch.empty(B, Hkv, Tk - first, D, dtype=torch.float32, device=v.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, Tk * 64))
    for r0 in range(first, Tk, step):
        rows = torch.arange(r0, min(Tk, r0 + step), device=v.device)
        out[:, :, r0 - first : r0 - first + rows.numel()] = torch.matmul(_decay(rows, keys, eta), vf)
    return out


def momentum_continue(v_new: torch.Tensor, eta: float, m0: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, n + 1, D]`` float32: ``M`` at the ``n`` positions of ``v_new`` given the carried state ``m0 [B, Hkv,
    D]`` (``M`` at the first of them), then the state after them."""
    n = v_new.shape[2]
    vf = v_new.float()
    if key_padding_mask is not None:
        vf = vf * key_padding_mask[:, None, :, None]
    rows = torch.arange(n + 1, device=v_new.device)
    carry = torch.pow(eta, rows.double()).float()[:, None]  # η^r, 1 at r = 0
    return carry * m0.float()[:, :, None] + torch.matmul(_decay(rows, rows[:n], eta), vf)


def momentum_value_grad(grad_out: torch.Tensor, eta: float, Hkv: int, Tk: int,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``dV [B, Hkv, Tk, D]`` float32 of the momentum term: ``Σ_{i>j} η^(i-j) G_i``, ``G`` the output gradient summed
    over each kv head's query heads (query rows at positions ``Tk - Tq ..``); 0 at padded keys."""
    B, H, Tq, D = grad_out.shape
    g = grad_out.float().reshape(B, Hkv, H // Hkv, Tq, D).sum(dim=2)
    positions = torch.arange(Tk - Tq, Tk, device=grad_out.device)
    out = torch.empty(B, Hkv, Tk, D, dtype=torch.float32, device=grad_out.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, Tq * 64))
    for c0 in range(0, Tk, step):
        cols = torch.arange(c0, min(Tk, c0 + step), device=grad_out.device)
        out[:, :, c0 : c0 + cols.numel()] = torch.matmul(_decay(positions, cols, eta).transpose(0, 1), g)
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None]
    return out


def momentum_attention_fwd(q, k, v, key_padding_mask, causal: bool, scale: float, momentum: torch.Tensor,
                           store_attn: bool):
    """``(out, lse, out_attn)``: attention plus ``momentum [B, Hkv, Tq, D]`` (float32) per kv head; ``out_attn`` is
    the attention part (the backward's ``o``), or an empty tensor unless ``store_attn``."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    o_attn, lse = attention_fwd(q, k, v, key_padding_mask, None, None, None, causal, scale)
    out = torch.empty(B, Tq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    out.copy_((o_attn.float().reshape(B, Hkv, H // Hkv, Tq, D) + momentum[:, :, None]).reshape(B, H, Tq, D))
    return out, lse, (o_attn if store_attn else q.new_empty(0))


def deep_thinking_update_(work: torch.Tensor, m: torch.Tensor, eta: float, beta: float, first: bool) -> None:
    """The Deep-Thinking update of ``work [R, 2, C]`` and ``m [R, C]`` in place (docs/methods.md §7), in row chunks; the
    contract of the Triton launcher of the same name."""
    R, _, C = work.shape
    step = max(1, (1 << 18) // max(1, C))  # rows per chunk: float32 temporaries of about 1 MiB stay in cache
    for r0 in range(0, R, step):
        x_hat, x_new, m_rows = work[r0 : r0 + step, 0], work[r0 : r0 + step, 1], m[r0 : r0 + step]
        g = x_new.float() - x_hat.float()
        if first:
            m_rows.copy_(g)
        else:
            m_rows.mul_(beta).add_(g)
        x_hat.copy_(x_hat.float() + eta * m_rows)
