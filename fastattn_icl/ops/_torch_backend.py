"""Plain-PyTorch backend of every op (attention, saliency, momentum, Deep-Thinking): the CPU path. It implements the
functions that :func:`fastattn_icl.ops.backend.kernel` names.

Flash-style contract, same as the Triton kernels: the forward returns ``o`` and the natural-log ``lse`` (``-inf`` on
rows with no visible key, whose output is 0); the backward recomputes ``P`` from ``lse``.

On CPU tensors the attention leans on PyTorch's own CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward), which returns the ``lse`` this contract
needs. The method features are added on top of it, exactly, at a cost linear in ``T`` (docs/methods.md §1):

- key padding: a left-padded batch (each row's masked keys all before its kept ones, as Hugging Face pads a batch)
  runs unpadded, each run of equally padded rows as attention of the rows that see a kept key over the kept keys, so
  the kernel neither reads a mask nor computes the padded blocks; any other key mask is an additive one;
- bottom-right causal masking with ``Tq < Tk`` (a chunk over a cache, a shared prefix): the keys are split into
  the part every row sees (no mask) and the causal square, and the two flash results are merged by their ``lse``;
- anchor re-weighting: when no row before the first re-weighted one sees an anchor (re-weighting from the first
  label word on, or from row 0), ``P̂ V = (P ⊙ w) V = P (w ⊙ V)``: one flash pass, where that pays (one kv head
  per query head, as many re-weighted (row, anchor) pairs as keys: :func:`_folded_weights`); the compiled forward
  scales ``P``'s columns, PyTorch's kernel (an additive mask) and the backward take the weighted values;
  otherwise ``O = O_flash + Σ_a (w_a − 1) · P[:, a] · v_a`` over the anchor columns ``a`` only, with
  ``P[:, a] = exp(s[:, a] − lse)``. Either way the denominator (``lse``) is the unweighted one, as the method says;
- isolation: the isolated rows (a few per prompt) are recomputed and overwrite the flash rows; in the backward their
  output gradient is taken out of the flash pass and added by the recomputed rows. On a causal call a row isolated
  at ``p`` sees only its keys ``p .. i`` at their logits (the isolated keys' probability is an exact 0 under the
  ``exp`` floor), so it is attention over that window (:func:`_window_forward`); otherwise (logits near −1e4, rows
  that see only isolated keys, re-weighting or a shared prefix in the same call, no compiled kernels) the exact rows
  over query chunks.

On CPU tensors the per-row work of both features (the anchor correction and its backward, the key windows) runs in
the compiled kernels of ``csrc/cpu_features.cpp`` (:mod:`fastattn_icl.ops._cpu_kernels`): one call each instead of
tens of small PyTorch ops, a fixed cost that dominated short prompts. Without the extension the anchor terms run as
eager ops and isolated rows as exact rows, with a warning, once.

Every other case (other devices, for ``backend="torch"`` on a GPU; causal ``Tq > Tk``) runs the exact chunked
computation over query chunks of all rows. Work is in float32 (float64 for float64 inputs): fp16/bf16 inputs
accumulate in float32, the caller's tensors are never changed. This is an implementation, not the oracle: tests
compare it with ``fastattn_icl.reference`` like every other backend.

:func:`deep_thinking_update_` runs the compiled one-pass kernel of ``fastattn_icl._C`` when it is built (and warns
once, then runs eager ops, when it is not).
"""

from __future__ import annotations

import bisect
import functools
import math
import warnings

import torch

from fastattn_icl import _ext
from fastattn_icl.ops._validate import output_like
from fastattn_icl.ops.features import ISOLATION_VALUE

_CHUNK_ELEMENTS = 1 << 20  # scores per query chunk of the exact passes, summed over batch and heads: 4 MiB in float32
_MIN_CHUNK_ROWS = 16  # below this, the chunk's matmuls are too thin to run at speed
# what one more CPU flash call costs (about 40 us: the call and its slices), in the units of the kernel's work,
# score x head x head dim (about 0.1 ns each in float32 on one core)
_CALL_SCORES = 400_000
_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# exp of an argument below about -87 (float32) is a denormal or 0, and the CPU's vectorised exp takes a slow path for
# it (60-170x slower per element, also for -inf), as do matmuls over denormal inputs: arguments below the floor, whose
# exp is less than 1e-31 (float32; 1e-299 in float64) and could reach a denormal once divided by a row sum (< e^14),
# give an exact 0
_EXP_FLOOR = {torch.float32: -72.0, torch.float64: -688.0}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (fp16/bf16 accumulate in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _exp_floored(x: torch.Tensor, headroom: float = 0.0) -> torch.Tensor:
    """``exp(x)``, 0 where ``x < _EXP_FLOOR − headroom`` (see there; ``headroom``: how far a re-weighting can still
    lift the result, :func:`_headroom`). In place (``x`` is a temporary) unless ``x`` needs a gradient."""
    floor = _EXP_FLOOR[x.dtype] - headroom
    low = x < floor
    if x.requires_grad and torch.is_grad_enabled():  # attention_probs is differentiable
        return torch.where(low, 0.0, x.clamp(min=floor).exp())
    return x.clamp_(min=floor).exp_().masked_fill_(low, 0.0)


def _headroom(key_log_weights: torch.Tensor | None) -> float:
    """``max(0, max log w)`` (a host read): a probability the weights multiply by up to ``e^that`` must not be cut
    at the plain floor."""
    if key_log_weights is None or key_log_weights.numel() == 0:
        return 0.0
    return max(0.0, float(key_log_weights.detach().max()))


def _softmax_floored(s: torch.Tensor, headroom: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, lse)`` of logits ``s [..., n]`` (``-inf`` at hidden keys), normalised by each row's own max and sum (as
    the kernels' online softmax is), ``exp`` floored (:func:`_exp_floored`): ``p`` 0 and ``lse`` ``-inf`` on a row
    that sees no key. Relative to the row max, not ``exp(s − lse)``: that would lose digits when every visible logit
    is huge, e.g. a row that sees only isolated (-1e4) keys."""
    row_max = s.amax(dim=-1, keepdim=True)
    p = _exp_floored(s - row_max.masked_fill(torch.isinf(row_max), 0.0), headroom)
    denom = p.sum(dim=-1, keepdim=True)
    return p / denom.masked_fill(denom == 0, 1.0), (row_max + torch.log(denom)).squeeze(-1)


def _rows_per_chunk(B: int, H: int, Tq: int, Tk: int) -> int:
    return max(1, min(Tq, max(_MIN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(1, B * H * Tk))))


def _row_chunks(rows: torch.Tensor, step: int):
    """``rows`` (int64, ascending) in pieces of at most ``step``."""
    for i in range(0, rows.numel(), step):
        yield rows[i : i + step]


def _key_limit(rows: torch.Tensor, Tq: int, Tk: int, causal: bool) -> int:
    """How many leading keys a chunk of ascending query ``rows`` can see: causal rows never see later keys."""
    if not causal or rows.numel() == 0:
        return Tk
    return max(0, min(Tk, int(rows[-1]) + 1 + Tk - Tq))


def _visible(rows: torch.Tensor, Tq: int, Tk: int, causal: bool, kpm: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B or 1, 1, 1, len(rows), Tk]``: which of the first ``Tk`` keys each query row in ``rows`` may see."""
    return _visible_at(rows, torch.arange(Tk, device=rows.device), Tq, Tk, causal, kpm)


def _visible_at(rows, cols, Tq, Tk, causal, kpm) -> torch.Tensor:
    """Bool ``[B or 1, 1, 1, len(rows), len(cols)]``: which of the key columns ``cols`` each query row may see."""
    if causal:
        vis = cols[None, :] <= rows[:, None] + (Tk - Tq)
    else:
        vis = torch.ones(rows.numel(), cols.numel(), dtype=torch.bool, device=rows.device)
    vis = vis[None, None, None]
    if kpm is not None:
        vis = vis & kpm[:, cols][:, None, None, None, :]
    return vis


def _grouped(x: torch.Tensor, Hkv: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, Hkv, G, T, D]`` in the compute dtype (query heads grouped by their kv head)."""
    B, H, T, D = x.shape
    return x.to(_compute_dtype(x)).reshape(B, Hkv, H // Hkv, T, D)


def _chunk_features(rows, B, H, Hkv, Tk, key_log_weights, reweight_from, isolation_limit, device):
    """Per chunk of query rows: the isolated entries ``[B, 1, 1, n, Tk]`` (or None) and the post-softmax
    weights ``[B, Hkv, G, n, Tk]`` with the re-weighted-row mask ``[B, 1, 1, n, 1]`` (or None, None)."""
    iso = weights = rw = None
    if isolation_limit is not None:
        cols = torch.arange(Tk, device=device)
        iso = (cols[None, None, :] < isolation_limit[:, rows].long()[:, :, None])[:, None, None]
    if key_log_weights is not None:
        rw = (rows[None, :] >= reweight_from.long()[:, None])[:, None, None, :, None]
        w = key_log_weights[:, :, :Tk].exp().reshape(B, Hkv, H // Hkv, 1, Tk)
        weights = torch.where(rw, w, torch.ones((), device=device))
    return iso, weights, rw


def _prefix_scores(q_c: torch.Tensor, pkf: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, Hkv, G, n, Tp]`` of a chunk of grouped queries against the shared prefix keys ``pkf``
    (``[1 or B, Hkv, Tp, D]``); a batch-1 prefix is contracted once per kv head, never expanded."""
    if pkf.shape[0] == 1:
        return torch.einsum("bhgnd,hpd->bhgnp", q_c, pkf[0])
    return torch.matmul(q_c, pkf[:, :, None].transpose(-1, -2))


def _prefix_output(p: torch.Tensor, pvf: torch.Tensor) -> torch.Tensor:
    """``p [B, Hkv, G, n, Tp] @ pvf [1 or B, Hkv, Tp, D]`` without expanding a batch-1 prefix."""
    if pvf.shape[0] == 1:
        return torch.einsum("bhgnp,hpd->bhgnd", p, pvf[0])
    return torch.matmul(p, pvf[:, :, None])


def _shared_prefix(prefix, dtype: torch.dtype):
    """``(pk, pv)`` of a shared prefix in ``dtype``, batch 1 when every row reads the same copy (batch stride 0)."""
    if prefix is None:
        return None
    pk, pv = prefix
    if pk.shape[0] > 1 and pk.stride(0) == 0 and pv.stride(0) == 0:
        pk, pv = pk[:1], pv[:1]
    return pk.to(dtype), pv.to(dtype)


def _chunk_softmax(qg_c, kf, rows, Tq, Tk, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                   isolation_limit, prefix_keys, headroom):
    """``(P̂, lse)`` of a chunk of grouped query rows ``qg_c [B, Hkv, G, n, D]`` over the first ``kf.shape[-2]`` of the
    ``Tk`` keys (``kf [B, Hkv, 1, ., D]``; later keys are hidden from these rows): the post-softmax, re-weighted
    probabilities the forward multiplies with the values, ``[B, Hkv, G, n, Tp + .]`` (the shared prefix keys first,
    if any), and the unweighted ``lse [B, Hkv, G, n]``."""
    B, Hkv, G = qg_c.shape[:3]
    Tc = kf.shape[-2]
    s = torch.matmul(qg_c, kf.transpose(-1, -2)) * scale
    vis = _visible(rows, Tq, Tk, causal, key_padding_mask)[..., :Tc]
    s = s.masked_fill(~vis, float("-inf"))
    iso, weights, _ = _chunk_features(rows, B, Hkv * G, Hkv, Tc, key_log_weights, reweight_from, isolation_limit,
                                      qg_c.device)
    if iso is not None:  # overwrite after scaling and masking; a masked key stays masked
        s = s.masked_fill(iso & vis, ISOLATION_VALUE)
    if prefix_keys is not None:  # every row sees every prefix key
        s = torch.cat([_prefix_scores(qg_c, prefix_keys) * scale, s], dim=-1)
    p, row_lse = _softmax_floored(s, headroom)  # a hidden key's -inf falls below the floor: exactly 0
    if weights is not None:  # numerator only: the denominator (lse) stays unweighted
        p = p * weights
    return p, row_lse


def _exact_rows_fwd(qg, kf, vf, rows, Tk, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                    isolation_limit, prefix, o, lse):
    """Writes ``o [B, Hkv, G, Tq, D]`` and ``lse [B, Hkv, G, Tq]`` at the query ``rows`` (ascending), computed over
    query chunks with every feature: the exact path."""
    B, Hkv, G, Tq, D = qg.shape
    Tp = 0 if prefix is None else prefix[0].shape[2]
    headroom = _headroom(key_log_weights)
    for rows_c in _row_chunks(rows, _rows_per_chunk(B, Hkv * G, Tq, Tk + Tp)):
        Tc = _key_limit(rows_c, Tq, Tk, causal)
        p, row_lse = _chunk_softmax(qg[:, :, :, rows_c], kf[..., :Tc, :], rows_c, Tq, Tk, causal, key_padding_mask,
                                    scale, key_log_weights, reweight_from, isolation_limit,
                                    None if prefix is None else prefix[0], headroom)
        out_c = torch.matmul(p[..., Tp:], vf[..., :Tc, :])
        if prefix is not None:
            out_c = out_c + _prefix_output(p[..., :Tp], prefix[1])
        o[:, :, :, rows_c] = out_c
        lse[:, :, :, rows_c] = row_lse.to(lse.dtype)


def _flash_ok(q: torch.Tensor, Tq: int, Tk: int, causal: bool) -> bool:
    """Whether the CPU flash kernel serves this call (the exact chunked path serves every other)."""
    return q.device.type == "cpu" and Tq > 0 and not (causal and Tq > Tk)  # the kernel traps on 0 rows


def _key_segments(Tq: int, Tk: int, causal: bool) -> list[tuple[int, int, bool]]:
    """``(start, stop, causal)`` ranges of the keys whose flash passes make up bottom-right causal attention
    (the CPU kernel's own causal mask is top-left aligned, which equals it only on a square)."""
    if not causal or Tq == 1:
        segments = [(0, Tk, False)]
    else:  # Tq <= Tk: every row sees the keys before the square, the square is causal
        segments = [(0, Tk - Tq, False), (Tk - Tq, Tk, True)]
    return [seg for seg in segments if seg[1] > seg[0]]


def _segment_mask(kpm, start, stop, causal, Tq, dtype):
    """``(additive mask [B, 1, 1, n] or None, rows with no visible key [B, Tq] or None)`` of one key segment."""
    if kpm is None:
        return None, None
    keep = kpm[:, start:stop]
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))[:, None, None]
    seen = keep.cumsum(1) > 0 if causal else keep.any(1, keepdim=True).expand(-1, Tq)
    return mask, ~seen


def _left_pad_runs(kpm: torch.Tensor, B: int) -> list[tuple[int, int, int]] | None:
    """``[(b0, b1, p)]``: the maximal runs of batch rows ``b0 .. b1 - 1`` whose key mask ``kpm [B, Tk]`` is ``p``
    masked keys followed by kept keys only (left padding, the layout of a batched Hugging Face prompt), or ``None``
    when some row's mask has another pattern. Read on the host (a CPU tensor's memory, no copy)."""
    m = kpm.numpy()
    if m.shape[1] > 1 and (m[:, 1:] < m[:, :-1]).any():  # a kept key before a masked one
        return None
    runs: list[list[int]] = []
    for b, p in enumerate((m.shape[1] - m.sum(1)).tolist()):
        if runs and runs[-1][2] == p:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1, p])
    return [(b0, b1, p) for b0, b1, p in runs]


def _first_seen_row(p: int, Tq: int, Tk: int, causal: bool) -> int:
    """The first query row that sees a key at or after ``p`` (``Tq``: none); bottom-right causal when ``causal``."""
    if p >= Tk:
        return Tq
    return min(Tq, max(0, p - (Tk - Tq))) if causal else 0


def _unpadded(kpm, q: torch.Tensor, Tk: int, causal: bool, prefix=None):
    """The left-padding runs (:func:`_left_pad_runs`) when the flash passes take the padded batch rows unpadded
    (``[(0, B, 0)]`` without a mask), ``None`` when they take the mask. A left-padded row is attention of its rows
    ``r0 ..`` over its keys ``p ..``, without a mask and with the same bottom-right causal alignment; its rows before
    ``r0`` see no key. So the kernel neither reads the mask nor computes the padded blocks (a shared prefix, visible
    to every row, keeps the mask).
    Each run is a kernel call of its own, so the runs are taken only where the scores they skip outweigh their calls
    (:data:`_CALL_SCORES` each): a prefill, not a decode step of a batch padded row by row."""
    B, H, Tq, D = q.shape
    if prefix is not None and prefix[0].shape[2] > 0:
        return None
    if kpm is None:
        return [(0, B, 0)]
    if kpm.device.type != "cpu":
        return None
    if B * Tq * Tk * H * D < 2 * _CALL_SCORES and not bool(kpm.all()):  # too little work to pay for a second call
        return None
    runs = _left_pad_runs(kpm, B)
    if runs is None or runs == [(0, B, 0)]:
        return runs
    cost = 0
    for b0, b1, p in runs:
        r0 = _first_seen_row(p, Tq, Tk, causal)
        if r0 < Tq:
            cost += (b1 - b0) * (Tq - r0) * (Tk - p) * H * D + _CALL_SCORES
    return runs if cost < B * Tq * Tk * H * D else None


def _flash_fwd(q, k, v, kpm, causal, scale, prefix, w=None):
    """``(o [B, H, Tq, D], lse [B, H, Tq])`` of plain attention by the CPU flash kernel: a left-padded batch by runs of
    equal padding, unpadded (:func:`_unpadded`); any other mask as an additive one. ``w``: ``None`` or the folded
    re-weighting's key weights ``[B, H, Tk]`` (:func:`_folded_weights`): ``o = (P ⊙ w) V`` on every row, ``lse``
    unweighted; the compiled kernel scales ``P``'s columns, PyTorch's kernel takes the weighted values
    (:func:`_weighted_values`)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    runs = _unpadded(kpm, q, Tk, causal, prefix)
    if runs is None:
        return _flash_fwd_masked(q, k, v, kpm, causal, scale, prefix, w)
    if runs == [(0, B, 0)]:
        return _flash_fwd_plain(q, k, v, causal, scale, w)
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Tq, dtype=q.dtype, device=q.device)  # the kernel's lse dtype (float32 or float64)
    for b0, b1, p in runs:
        r0 = _first_seen_row(p, Tq, Tk, causal)
        if r0 > 0:  # rows that see no key
            o[b0:b1, :, :r0] = 0.0
            lse[b0:b1, :, :r0] = float("-inf")
        if r0 < Tq:
            o_r, lse_r = _flash_fwd_plain(q[b0:b1, :, r0:], k[b0:b1, :, p:], v[b0:b1, :, p:], causal, scale,
                                          None if w is None else w[b0:b1, :, p:])
            o[b0:b1, :, r0:] = o_r
            lse[b0:b1, :, r0:] = lse_r
    return o, lse


def _flash_fwd_plain(q, k, v, causal, scale, w=None):
    """:func:`_flash_fwd` without a key mask or a shared prefix: the compiled forward (``csrc/cpu_flash.cpp``: the
    flash blocks with BLAS GEMMs; README.md, CPU section), or PyTorch's CPU flash kernel without the extension."""
    if _compiled(q):
        if w is None:
            return torch.ops.fastattn_icl.flash_attention_fwd(q, k, v, causal, scale)
        return torch.ops.fastattn_icl.flash_attention_fwd(q, k, v, causal, scale, w.to(q.dtype))
    return _flash_fwd_masked(q, k, v, None, causal, scale, None, w)


def _flash_fwd_masked(q, k, v, kpm, causal, scale, prefix, w=None):
    """:func:`_flash_fwd` with the key mask as an additive one: one call per key segment (and one for a shared
    prefix), merged by their ``lse``; PyTorch's kernel takes the key weights ``w`` as weighted values."""
    B, H, Tq, D = q.shape
    if w is not None:
        v = _weighted_values(v, w)
    parts = []
    if prefix is not None and prefix[0].shape[2] > 0:
        pk, pv = prefix
        parts.append(_FLASH_FWD(q, pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1), 0.0, False, scale=scale))
    for start, stop, seg_causal in _key_segments(Tq, k.shape[2], causal):
        mask, empty = _segment_mask(kpm, start, stop, seg_causal, Tq, q.dtype)
        o, lse = _FLASH_FWD(q, k[:, :, start:stop], v[:, :, start:stop], 0.0, seg_causal, attn_mask=mask, scale=scale)
        if empty is not None:  # the kernel leaves lse 0 on a row that sees none of the segment's keys
            lse = lse.masked_fill(empty[:, None], float("-inf"))
        parts.append((o, lse))
    if not parts:
        return q.new_zeros(B, H, Tq, D), q.new_full((B, H, Tq), float("-inf"))
    if len(parts) == 1:
        return parts[0]
    lse = torch.stack([part[1] for part in parts]).logsumexp(0)
    finite = lse.masked_fill(torch.isinf(lse), 0.0)
    o = sum(part[0] * torch.exp(part[1] - finite)[..., None].to(q.dtype) for part in parts)
    return o, lse


def _anchor_columns(key_log_weights: torch.Tensor) -> torch.Tensor:
    """int64 ``[A]``: the key columns with a weight other than 1 in some batch row or head (host memory: CPU only)."""
    return torch.nonzero((key_log_weights != 0).any(1).any(0)).flatten()


def _folded_weights(key_log_weights, reweight_from, columns, isolation_limit, causal: bool, Tq: int, Tk: int,
                    G: int):
    """``w [B, H, Tk]``, every key's weight, when the re-weighting rides in the values, else ``None``. The ops'
    contract for ``key_weight_columns`` (every key with a weight other than 1) makes ``w`` exactly 1 off ``columns``.

    ``P̂ V = P (w ⊙ V)`` on the re-weighted rows (docs/methods.md §2: post-softmax weights, unweighted denominator),
    so when no row before ``reweight_from`` sees an anchor column (every anchor at or after the first re-weighted
    row, causal), attention over the weighted values ``w_j · v_j`` is the whole forward, and its ``lse`` the
    unweighted one. Taken where it pays: one kv head per query head (the CPU flash kernel reads a query head's values
    from its kv head, so grouped heads would need K and V repeated), and as many re-weighted (row, anchor) pairs as
    keys, the values' copy against the correction's work (a decode step or a short chunk over a long cache keeps the
    correction). Asked with the anchor columns only (the dense ``d log w`` of every key needs the re-weighted rows
    alone), ascending and distinct (else the correction's kernel raises), and without isolation, whose rows the
    weighted values would not see. Host reads: a CPU call."""
    if key_log_weights is None or columns is None or isolation_limit is not None or G != 1 \
            or reweight_from.numel() == 0:
        return None
    cols, starts = columns.tolist(), reweight_from.tolist()
    if not cols or (Tq - min(starts)) * len(cols) < Tk or cols[0] < 0 or cols[-1] >= Tk \
            or any(a >= b for a, b in zip(cols, cols[1:])):
        return None
    last_plain = max(starts) - 1  # the last row some batch row leaves unweighted
    if last_plain >= 0 and cols[0] <= (last_plain + Tk - Tq if causal else Tk - 1):
        return None
    return key_log_weights.exp()  # exp(0) = 1 exactly: the product leaves the other keys' values as they are


def _weighted_values(v, w):
    """``w ⊙ v`` (``v [B, H, Tk, D]``, one kv head per query head, ``w [B, H, Tk]``): one product, where scaling the
    anchor rows of a copy of ``v`` in place took four ops (clone, index, multiply, index_put) for the same values."""
    return v * w[..., None].to(v.dtype)


def _anchor_correction(qg, kf, vf, o, lse, Tk, causal, kpm, key_log_weights, reweight_from, scale, columns):
    """Adds ``Σ_a (w_a − 1) · P[:, a] · v_a`` to the re-weighted rows of ``o [B, Hkv, G, Tq, D]`` (docs/methods.md §2:
    post-softmax weights, unweighted denominator), over the anchor columns only (``columns``, or the columns
    with a weight other than 1 when ``None``)."""
    cols = _anchor_columns(key_log_weights) if columns is None else columns
    if cols.numel() == 0:  # every weight is 1 (beta = 0): the plain result, bit for bit
        return
    B, Hkv, G, Tq, D = qg.shape
    if _compiled(qg):
        torch.ops.fastattn_icl.anchor_correction_(
            o, _unit_rows(qg), _unit_rows(kf[:, :, 0]), _unit_rows(vf[:, :, 0]), lse, _mask_rows(kpm),
            _unit_rows(key_log_weights.reshape(B, Hkv, G, Tk)), reweight_from.contiguous(), cols, causal, scale)
        return
    first = int(reweight_from.min())
    rows = torch.arange(first, Tq, device=qg.device)
    p = _anchor_probs(qg[:, :, :, first:], kf, lse[:, :, :, first:], rows, cols, Tq, Tk, causal, kpm, scale,
                      _headroom(key_log_weights))
    u = _anchor_gain(key_log_weights, cols, rows, reweight_from, Hkv, G)
    o[:, :, :, first:] += torch.matmul(p * u, vf[:, :, :, cols])


def _anchor_probs(q_r, kf, lse_r, rows, cols, Tq, Tk, causal, kpm, scale, headroom):
    """``P[rows, cols]`` ``[B, Hkv, G, n, A]`` from the unweighted ``lse``; 0 where a key is hidden from a row."""
    s = torch.matmul(q_r, kf[:, :, :, cols].transpose(-1, -2)) * scale
    return _exp_floored(s - lse_r[..., None], headroom).masked_fill_(~_visible_at(rows, cols, Tq, Tk, causal, kpm),
                                                                     0.0)


def _anchor_gain(key_log_weights, cols, rows, reweight_from, Hkv, G):
    """``w − 1`` ``[B, Hkv, G, n, A]`` at the anchor columns for the re-weighted rows, 0 on the other rows."""
    B = key_log_weights.shape[0]
    u = torch.expm1(key_log_weights[:, :, cols]).reshape(B, Hkv, G, 1, -1)
    rw = (rows[None, :] >= reweight_from.long()[:, None])[:, None, None, :, None]
    return torch.where(rw, u, 0.0)


def _isolated_rows(isolation_limit: torch.Tensor | None) -> torch.Tensor | None:
    """int64 ``[R]``: the query rows isolated in some batch row, or None when there are none (host memory)."""
    if isolation_limit is None:
        return None
    rows = torch.nonzero((isolation_limit > 0).any(0)).flatten()
    return rows if rows.numel() else None


def _compiled(x: torch.Tensor) -> bool:
    """Whether the compiled feature kernels (:mod:`fastattn_icl.ops._cpu_kernels`) serve a call on ``x``: a CPU tensor
    and the extension built (else a warning, once, and the eager code). Imported here, on first use: importing the
    ops must not load the extension."""
    if x.device.type != "cpu":
        return False
    from fastattn_icl.ops import _cpu_kernels

    if _cpu_kernels.available():
        return True
    _cpu_kernels.warn_missing()
    return False


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when its last dimension is not unit-strided (the compiled kernels read rows)."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def _mask_rows(kpm: torch.Tensor | None) -> torch.Tensor | None:
    return None if kpm is None else _unit_rows(kpm)


def _window_may_serve(exact, causal: bool, key_log_weights, prefix=None) -> bool:
    """Whether the key windows may serve a call's isolated rows ``exact`` (None: there are none; the forward passes
    ``True`` before it looks for them, as a table without isolated rows is served either way): on a causal call
    without re-weighting or a shared prefix, which the windows do not carry. The forward and the backward ask the same
    question, so that both take the same path."""
    return exact is not None and causal and key_log_weights is None and prefix is None


def _window_forward(qg, k, v, kpm, isolation_limit, scale, o, lse) -> bool:
    """Overwrites the isolated rows of a causal call in ``o [B, Hkv, G, Tq, D]`` and ``lse [B, Hkv, G, Tq]`` by
    attention over their key windows (docs/methods.md §3: a row isolated at ``p`` sees its keys ``p .. i`` at their
    logits and its isolated keys at ``exp(-1e4 − max)``, an exact 0 under the floor, when one of its window keys is
    visible and the window's largest logit is above ``-1e4 − _EXP_FLOOR``; ``csrc/cpu_features.cpp``). Whether it
    did: it writes nothing when a row fails that test, and then the exact rows serve the call."""
    if not _compiled(qg):
        return False
    return bool(torch.ops.fastattn_icl.isolation_window_fwd_(o, lse, _unit_rows(qg), _unit_rows(k), _unit_rows(v),
                                                            _mask_rows(kpm), isolation_limit.contiguous(), scale))


def _window_serves(qg, k, kpm, isolation_limit, scale) -> bool:
    """Whether :func:`_window_forward` served (serves) the isolated rows of these inputs."""
    return _compiled(qg) and bool(torch.ops.fastattn_icl.isolation_window_ok(
        _unit_rows(qg), _unit_rows(k), _mask_rows(kpm), isolation_limit.contiguous(), scale))


def _window_backward(dq, dk, dv, qg, k, v, dog, og, lse_g, kpm, isolation_limit, scale) -> None:
    """Adds the windowed rows' share to ``dq [B, Hkv, G, Tq, D]`` (0 there: their output gradient was taken out of the
    flash pass), ``dk``/``dv`` ``[B, Hkv, Tk, D]``, from the rows' output gradient, output and ``lse``."""
    torch.ops.fastattn_icl.isolation_window_bwd_(dq, dk, dv, _unit_rows(qg), _unit_rows(k), _unit_rows(v),
                                                 _unit_rows(dog), _unit_rows(og), lse_g, _mask_rows(kpm),
                                                 isolation_limit.contiguous(), scale)


def attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                  scale: float, *, prefix=None, key_weight_columns=None):
    """The forward; ``prefix``: ``None`` or shared prefix keys/values ``(pk, pv)`` ``[B or 1, Hkv, Tp, D]`` that
    precede ``k``/``v`` and are visible to every query row (method features must then be off);
    ``key_weight_columns``: ``None`` or the anchor columns (fastattn_icl.ops.attention's module docstring)."""
    o, lse = _attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale,
                            prefix, key_weight_columns)
    return _as_promised(o, q), lse


def _as_promised(o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``o`` in the layout and dtype the ops promise (:func:`~fastattn_icl.ops._validate.output_like`); a copy only
    where the flash kernel (which follows ``q``'s layout) or the exact path wrote another."""
    out = output_like(q)
    return o if o.dtype == q.dtype and _same_layout(o, out) else out.copy_(o)


def _attention_fwd(q, k, v, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal, scale, prefix,
                   key_weight_columns):
    """:func:`attention_fwd` before its output takes the promised layout and dtype: ``(o [B, H, Tq, D]`` in the
    compute dtype, any strides, ``lse [B, H, Tq])``."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cd = _compute_dtype(q)
    qg = _grouped(q, Hkv)
    kc, vc = k.to(cd), v.to(cd)  # one conversion each, for every pass below
    kf, vf = kc[:, :, None], vc[:, :, None]
    prefix = _shared_prefix(prefix, cd)
    if _flash_ok(q, Tq, Tk, causal):
        w = _folded_weights(key_log_weights, reweight_from, key_weight_columns, isolation_limit, causal, Tq, Tk,
                            H // Hkv)
        o, lse = _flash_fwd(q.to(cd), kc, vc, key_padding_mask, causal, scale, prefix, w)
        o, lse = o.reshape(qg.shape), lse.to(torch.float32).reshape(B, Hkv, H // Hkv, Tq)
        if key_log_weights is not None and w is None:
            _anchor_correction(qg, kf, vf, o, lse, Tk, causal, key_padding_mask, key_log_weights, reweight_from, scale,
                               key_weight_columns)
        exact = None
        # the isolated rows are looked for only when the windows did not serve them (a table without one: nothing
        # to serve, and no rows either way)
        if isolation_limit is not None and not (
                _window_may_serve(True, causal, key_log_weights, prefix)
                and _window_forward(qg, kc, vc, key_padding_mask, isolation_limit, scale, o, lse)):
            exact = _isolated_rows(isolation_limit)
    else:
        o = torch.empty(qg.shape, dtype=cd, device=q.device)
        lse = torch.empty(B, Hkv, H // Hkv, Tq, dtype=torch.float32, device=q.device)
        exact = torch.arange(Tq, device=q.device)
    if exact is not None:
        _exact_rows_fwd(qg, kf, vf, exact, Tk, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                        isolation_limit, prefix, o, lse)
    return o.reshape(B, H, Tq, D), lse.reshape(B, H, Tq).contiguous()  # the CPU kernel's lse is [B, Tq, H] in memory


def attention_probs(q, k, key_padding_mask, key_log_weights, reweight_from, isolation_limit, causal: bool,
                    scale: float, *, prefix_keys=None) -> torch.Tensor:
    """``P̂ [B, H, Tq, Tp + Tk]``: the probabilities :func:`attention_fwd` multiplies with the values, for all rows at
    once (``O(Tq · (Tp + Tk))`` memory per head: for callers that return attention weights), differentiable, float32
    (float64 for float64 inputs). Arguments as in :func:`attention_fwd`; ``prefix_keys``: ``None`` or the shared
    prefix keys ``[B or 1, Hkv, Tp, D]``, whose columns come first. Rows that see no key are 0."""
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cd = _compute_dtype(q)
    pk = None if prefix_keys is None else _shared_prefix((prefix_keys, prefix_keys), cd)[0]
    rows = torch.arange(Tq, device=q.device)
    p, _ = _chunk_softmax(_grouped(q, Hkv), k.to(cd)[:, :, None], rows, Tq, Tk, causal, key_padding_mask, scale,
                          key_log_weights, reweight_from, isolation_limit, pk, _headroom(key_log_weights))
    return p.reshape(B, H, Tq, p.shape[-1])


def _chunk_probs(q_c, kf, lse_c, rows, Tq, Tk, causal, key_padding_mask, scale, key_log_weights, reweight_from,
                 isolation_limit, headroom):
    """The backward's ``P`` of a chunk of query rows over the first ``kf.shape[-2]`` keys (``[B, Hkv, G, n, .]``),
    recomputed from ``lse`` (or, in a chunk with isolated entries, normalised by each row's own max and sum), with the
    chunk's isolated entries and post-softmax weights (see :func:`_chunk_features`)."""
    B, Hkv, G = q_c.shape[:3]
    Tc = kf.shape[-2]
    s = torch.matmul(q_c, kf.transpose(-1, -2)) * scale
    vis = _visible(rows, Tq, Tk, causal, key_padding_mask)[..., :Tc]
    iso, weights, rw = _chunk_features(rows, B, Hkv * G, Hkv, Tc, key_log_weights, reweight_from, isolation_limit,
                                       q_c.device)
    if iso is None:
        row_lse = lse_c.masked_fill(torch.isinf(lse_c), float("inf"))
        return _exp_floored(s - row_lse[..., None], headroom).masked_fill_(~vis, 0.0), iso, weights, rw
    # a row that sees only isolated keys has lse = -1e4 + log n, which float32 holds to ±5e-4: such rows are
    # normalised by their own max and sum, as the forward does, not by the stored lse
    p, _ = _softmax_floored(s.masked_fill(iso, ISOLATION_VALUE).masked_fill_(~vis, float("-inf")), headroom)
    return p, iso, weights, rw


def _exact_rows_bwd(qg, kf, vf, dog, delta, lse_g, rows, Tk, causal, key_padding_mask, scale, key_log_weights,
                    reweight_from, isolation_limit, dq, dk, dv, dlogw):
    """The backward of the query ``rows`` (ascending) over query chunks, with every feature: sets ``dq`` at the rows
    and adds their part of ``dk``, ``dv`` (``[B, Hkv, Tk, D]``) and ``dlogw`` (``[B, Hkv, G, Tk]``)."""
    B, Hkv, G, Tq, D = qg.shape
    headroom = _headroom(key_log_weights)
    for rows_c in _row_chunks(rows, _rows_per_chunk(B, Hkv * G, Tq, Tk)):
        Tc = _key_limit(rows_c, Tq, Tk, causal)
        q_c, do_c = qg[:, :, :, rows_c], dog[:, :, :, rows_c]
        k_c, v_c = kf[..., :Tc, :], vf[..., :Tc, :]
        p, iso, weights, rw = _chunk_probs(q_c, k_c, lse_g[:, :, :, rows_c], rows_c, Tq, Tk, causal,
                                           key_padding_mask, scale, key_log_weights, reweight_from, isolation_limit,
                                           headroom)
        dp = torch.matmul(do_c, v_c.transpose(-1, -2))
        if weights is not None:
            pw = p * weights
            dlogw[..., :Tc] += (pw * dp).masked_fill(~rw, 0.0).sum(3)
            ds = p * (weights * dp - delta[:, :, :, rows_c, None])
        else:
            pw = p
            ds = p * (dp - delta[:, :, :, rows_c, None])
        if iso is not None:  # the overwritten logits are constants
            ds = ds.masked_fill(iso, 0.0)
        dv[:, :, :Tc] += torch.matmul(pw.transpose(-1, -2), do_c).sum(2)
        dq[:, :, :, rows_c] = torch.matmul(ds, k_c) * scale
        dk[:, :, :Tc] += torch.matmul(ds.transpose(-1, -2), q_c).sum(2) * scale


def _flash_bwd(do, q, k, v, o, lse, kpm, causal, scale):
    """``(dq, dk, dv)`` of plain attention by the CPU flash backward, a left-padded batch unpadded as in
    :func:`_flash_fwd` (0 at the rows and keys the padding hides)."""
    B, H, Tq = q.shape[:3]
    Tk = k.shape[2]
    runs = _unpadded(kpm, q, Tk, causal)
    if runs is None:
        return _flash_bwd_masked(do, q, k, v, o, lse, kpm, causal, scale)
    if runs == [(0, B, 0)]:
        return _flash_bwd_plain(do, q, k, v, o, lse, causal, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b0, b1, p in runs:
        r0 = _first_seen_row(p, Tq, Tk, causal)
        if r0 < Tq:
            rows, keys = (slice(b0, b1), slice(None), slice(r0, None)), (slice(b0, b1), slice(None), slice(p, None))
            dq[rows], dk[keys], dv[keys] = _flash_bwd_plain(do[rows], q[rows], k[keys], v[keys], o[rows], lse[rows],
                                                            causal, scale)
    return dq, dk, dv


def _flash_bwd_plain(do, q, k, v, o, lse, causal, scale):
    """:func:`_flash_bwd` without a key mask: the compiled backward (``csrc/cpu_flash.cpp``: the flash blocks with
    BLAS GEMMs, 1.0-2.0x PyTorch's CPU flash backward on causal calls and decode steps: README.md, CPU section), or
    PyTorch's without the extension, and on a call with several rows and no causal mask, where PyTorch's runs at the
    same GEMM rate and was 4 % faster."""
    if (causal or q.shape[2] == 1) and _compiled(q):
        return torch.ops.fastattn_icl.flash_attention_bwd(do, q, k, v, o, lse.to(q.dtype), causal, scale)
    return _flash_bwd_masked(do, q, k, v, o, lse, None, causal, scale)


def _flash_bwd_masked(do, q, k, v, o, lse, kpm, causal, scale):
    """:func:`_flash_bwd` with the key mask as an additive one: one call per key segment with the merged ``o`` and
    ``lse`` (so each recomputes its share of the global ``P``)."""
    lse = lse.masked_fill(torch.isinf(lse), 0.0).to(q.dtype)  # no key seen: every P entry is masked anyway
    segments = _key_segments(q.shape[2], k.shape[2], causal)
    grads = []
    for start, stop, seg_causal in segments:
        mask, _ = _segment_mask(kpm, start, stop, seg_causal, q.shape[2], q.dtype)
        grads.append(_FLASH_BWD(do, q, k[:, :, start:stop], v[:, :, start:stop], o, lse, 0.0, seg_causal,
                                attn_mask=mask, scale=scale))
    if len(segments) == 1 and segments[0][:2] == (0, k.shape[2]):
        return grads[0]
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for (start, stop, _), (dq_s, dk_s, dv_s) in zip(segments, grads):
        dq += dq_s
        dk[:, :, start:stop] = dk_s
        dv[:, :, start:stop] = dv_s
    return dq, dk, dv


def _anchor_bwd(qg, kf, vf, dog, lse_g, Tk, causal, kpm, key_log_weights, reweight_from, isolation_limit, scale,
                dq, dk, dv, dlogw, columns):
    """The re-weighting's share of the backward for the rows from ``min(reweight_from)`` on, over query chunks:
    ``d log w`` (at the anchor ``columns``, or of every key when ``None``: the dense table of the op's contract), and
    the anchor columns' ``(w − 1) · P · dP`` terms of ``dq``, ``dk`` and ``dv`` that the plain flash backward does
    not see (its ``delta = rowsum(dO · O)`` with the re-weighted ``O`` already carries the denominator's share)."""
    B, Hkv, G, Tq, D = qg.shape
    dense = columns is None
    cols = _anchor_columns(key_log_weights) if dense else columns
    if not dense and cols.numel() == 0:
        return
    if not dense and _compiled(qg):
        torch.ops.fastattn_icl.anchor_backward_(
            dq, dk, dv, dlogw, _unit_rows(qg), _unit_rows(kf[:, :, 0]), _unit_rows(vf[:, :, 0]), _unit_rows(dog), lse_g,
            _mask_rows(kpm), _unit_rows(key_log_weights.reshape(B, Hkv, G, Tk)), reweight_from.contiguous(),
            None if isolation_limit is None else isolation_limit.contiguous(), cols, causal, scale)
        return
    first = int(reweight_from.min())
    w = key_log_weights.exp().reshape(B, Hkv, G, 1, Tk)
    headroom = _headroom(key_log_weights)
    iso_rows = None if isolation_limit is None else isolation_limit > 0
    width = Tk if dense else cols.numel()
    col_list = cols.tolist()
    step = _rows_per_chunk(B, Hkv * G, Tq, width)
    for r0 in range(first, Tq, step):  # contiguous rows: slices are views, sums land in place
        rows = slice(r0, min(Tq, r0 + step))
        rows_c = torch.arange(rows.start, rows.stop, device=qg.device)
        Tc = _key_limit(rows_c, Tq, Tk, causal)
        n_c = bisect.bisect_left(col_list, Tc)  # the anchor columns this chunk can see (cols ascending)
        if not dense and n_c == 0:
            continue
        cols_c = cols[:n_c]
        q_c, do_c = qg[:, :, :, rows], dog[:, :, :, rows]
        at = slice(None, Tc) if dense else cols_c  # the key columns this chunk computes P at
        s = torch.matmul(q_c, kf[:, :, :, at].transpose(-1, -2)) * scale
        vis = _visible(rows_c, Tq, Tk, causal, kpm)[..., :Tc] if dense else \
            _visible_at(rows_c, cols_c, Tq, Tk, causal, kpm)
        vis = vis & (rows_c[None, :] >= reweight_from.long()[:, None])[:, None, None, :, None]
        if iso_rows is not None:  # the exact rows carry their own share
            vis = vis & ~iso_rows[:, rows][:, None, None, :, None]
        p = _exp_floored(s - lse_g[:, :, :, rows, None], headroom).masked_fill_(~vis, 0.0)
        pd = p * torch.matmul(do_c, vf[:, :, :, at].transpose(-1, -2))
        if dense:
            dlogw[..., :Tc] += (pd * w[..., :Tc]).sum(3)
            if n_c == 0:
                continue
            p, pd = p[..., cols_c], pd[..., cols_c]
        else:
            dlogw.index_add_(3, cols_c, (pd * w[..., cols_c]).sum(3).to(dlogw.dtype))
        u = torch.expm1(key_log_weights[:, :, cols_c]).reshape(B, Hkv, G, 1, -1)
        ds = pd * u
        dq[:, :, :, rows] += torch.matmul(ds, kf[:, :, :, cols_c]) * scale
        dk.index_add_(2, cols_c, torch.matmul(ds.transpose(-1, -2), q_c).sum(2), alpha=scale)
        dv.index_add_(2, cols_c, torch.matmul((p * u).transpose(-1, -2), do_c).sum(2))


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides wherever a dimension has more than one element (a size-1 dimension's stride means nothing)."""
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def attention_bwd(do, q, k, v, o, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                  causal: bool, scale: float, key_weight_columns=None):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    cd = _compute_dtype(q)
    kc, vc = k.to(cd), v.to(cd)  # one conversion each, for every pass below
    w = None if not _flash_ok(q, Tq, Tk, causal) else \
        _folded_weights(key_log_weights, reweight_from, key_weight_columns, isolation_limit, causal, Tq, Tk, H // Hkv)
    if w is not None:  # the re-weighting rides in the values (the forward's _folded_weights)
        return _folded_bwd(do.to(cd), q.to(cd), kc, vc, o.to(cd), lse, key_padding_mask, causal, scale, w,
                           key_weight_columns, q, k, v)
    qg, dog = _grouped(q, Hkv), _grouped(do, Hkv)
    kf, vf = kc[:, :, None], vc[:, :, None]
    lse_g = lse.reshape(B, Hkv, H // Hkv, Tq)
    dlogw = None
    if key_log_weights is not None:
        dlogw = torch.zeros(B, Hkv, H // Hkv, Tk, dtype=torch.float32, device=q.device)
    if _flash_ok(q, Tq, Tk, causal):
        exact = _isolated_rows(isolation_limit)
        window = _window_may_serve(exact, causal, key_log_weights) and \
            _window_serves(qg, kc, key_padding_mask, isolation_limit, scale)
        do_flash, lse_flash = do.to(cd), lse
        if exact is not None:  # rows the window (its isolated entries) or the exact rows (every batch row) carry:
            # no output gradient and no P in the flash pass there (exp(s − lse) of such a row can overflow)
            carried = isolation_limit > 0
            if not window:
                carried[:, exact] = True
            do_flash = do_flash.masked_fill(carried[:, None, :, None], 0.0)
            lse_flash = lse.masked_fill(carried[:, None], torch.finfo(torch.float32).max)
        dq, dk, dv = _flash_bwd(do_flash, q.to(cd), kc, vc, o.to(cd), lse_flash, key_padding_mask,
                                causal, scale)
        dq = dq.reshape(qg.shape)
        if window:
            _window_backward(dq, dk, dv, qg, kc, vc, dog, _grouped(o, Hkv), lse_g, key_padding_mask,
                             isolation_limit, scale)
            exact = None
        if key_log_weights is not None:
            _anchor_bwd(qg, kf, vf, _grouped(do_flash, Hkv), lse_g, Tk, causal, key_padding_mask, key_log_weights,
                        reweight_from, isolation_limit, scale, dq, dk, dv, dlogw, key_weight_columns)
    else:
        dq = torch.empty_like(qg)
        dk = torch.zeros(B, Hkv, Tk, D, dtype=cd, device=q.device)
        dv = torch.zeros_like(dk)
        exact = torch.arange(Tq, device=q.device)
    if exact is not None:
        delta = (dog * _grouped(o, Hkv)).sum(-1)
        _exact_rows_bwd(qg, kf, vf, dog, delta, lse_g, exact, Tk, causal, key_padding_mask, scale, key_log_weights,
                        reweight_from, isolation_limit, dq, dk, dv, dlogw)
    return (*_as_inputs((q, k, v), (dq, dk, dv)), None if dlogw is None else dlogw.reshape(B, H, Tk))


def _as_inputs(inputs, grads) -> list[torch.Tensor]:
    """The gradients in their inputs' shapes, dtypes and strides, as the op's fake kernel promises (empty_like)."""
    grads = [g.reshape(t.shape) for t, g in zip(inputs, grads)]
    return [g if g.dtype == t.dtype and _same_layout(g, t) else torch.empty_like(t).copy_(g)
            for t, g in zip(inputs, grads)]


def _folded_bwd(do, q, k, v, o, lse, kpm, causal, scale, w, columns, *inputs):
    """The backward of a forward over weighted values (:func:`_folded_weights`): the flash backward over
    ``(k, w ⊙ v)`` gives ``dq``, ``dk`` and ``d(w ⊙ v)``; then ``dv = w ⊙ d(w ⊙ v)`` and, at the anchor columns,
    ``d log w = d(w ⊙ v) · (w ⊙ v)`` (0 at every other key)."""
    B, H, Tk = k.shape[:3]
    vw = _weighted_values(v, w)
    dq, dk, dvw = _flash_bwd(do, q, k, vw, o, lse, kpm, causal, scale)
    dlogw = torch.zeros(B, H, Tk, dtype=torch.float32, device=q.device)
    dlogw[:, :, columns] = (dvw[:, :, columns] * vw[:, :, columns]).sum(-1).to(torch.float32)
    return (*_as_inputs(inputs, (dq, dk, dvw * w[..., None].to(dvw.dtype))), dlogw)


def attention_saliency(do, q, k, v, lse, key_padding_mask, key_log_weights, reweight_from, isolation_limit,
                       causal: bool, scale: float, label_mask, target, *, per_head: bool = False, row_slot=None,
                       rows=None):
    """Saliency sums of docs/methods.md §4 over query chunks; the contract of the Triton launcher of the same name."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    qg, dog = _grouped(q, Hkv), _grouped(do, Hkv)
    kf, vf = k.to(qg.dtype)[:, :, None], v.to(qg.dtype)[:, :, None]
    lse_g = lse.reshape(B, Hkv, H // Hkv, T)
    label = label_mask != 0  # [B, T]
    cols = torch.arange(T, device=q.device)
    tgt = target.long()
    sums = torch.zeros(B, 3, dtype=torch.float32, device=q.device)
    head_sums = torch.zeros(B, H, 3, dtype=torch.float32, device=q.device) if per_head else None

    def reduce(a, rows_, lower, label_c):  # a [B, ..., n, Tc] -> [B, ..., 3] sums over this chunk
        a_lower = (a * lower).sum(-1)  # Σ_(j<i) per row, rows past the target excluded
        a_label = (a * label_c.view(B, *([1] * (a.dim() - 2)), -1)).sum(-1)
        is_label_row = label[:, rows_].view(B, *([1] * (a.dim() - 3)), -1)
        is_target_row = (rows_[None, :] == tgt[:, None]).view(B, *([1] * (a.dim() - 3)), -1)
        return torch.stack([(a_lower * is_label_row).sum(-1), (a_label * is_target_row).sum(-1), a_lower.sum(-1)], -1)

    headroom = _headroom(key_log_weights)
    fused = key_log_weights is None and isolation_limit is None and _compiled(q)
    for rows_ in _row_chunks(torch.arange(T, device=q.device), _rows_per_chunk(B, H, T, T)):
        Tc = _key_limit(rows_, T, T, causal)  # a causal chunk sees no later key: its saliency there is 0
        if fused:  # the two matmuls here, the rest in one compiled pass (csrc/cpu_saliency.cpp)
            part = _saliency_chunk(qg, kf, dog, vf, lse_g, rows_, Tc, key_padding_mask, scale, label_mask, target,
                                   causal, per_head, row_slot, rows)
            sums += part[:, 0].float()
            if per_head:
                head_sums += part[:, 1:].float()
            continue
        p, _, weights, _ = _chunk_probs(qg[:, :, :, rows_], kf[..., :Tc, :], lse_g[:, :, :, rows_], rows_, T, T,
                                        causal, key_padding_mask, scale, key_log_weights, reweight_from,
                                        isolation_limit, headroom)
        if weights is not None:
            p = p * weights
        c = p * torch.matmul(dog[:, :, :, rows_], vf[..., :Tc, :].transpose(-1, -2))  # [B, Hkv, G, n, Tc]
        sal = c.sum(dim=(1, 2)).abs()  # heads summed before the absolute value
        lower = (cols[None, None, :Tc] < rows_[None, :, None]) & (rows_[None, :, None] <= tgt[:, None, None])
        sums += reduce(sal, rows_, lower, label[:, :Tc])
        if per_head:
            head_sums += reduce(c.abs().reshape(B, H, rows_.numel(), Tc), rows_, lower[:, None], label[:, :Tc])
        if rows is not None:
            slot = row_slot[:, rows_].long()  # [B, n]
            b_idx, r_idx = torch.nonzero(slot >= 0, as_tuple=True)
            rows[b_idx, slot[b_idx, r_idx], :Tc] = sal[b_idx, r_idx].to(rows.dtype)
            rows[b_idx, slot[b_idx, r_idx], Tc:] = 0
    return sums, head_sums


def _saliency_chunk(qg, kf, dog, vf, lse_g, rows_, Tc, kpm, scale, label_mask, target, causal, per_head, row_slot,
                    rows) -> torch.Tensor:
    """One chunk of :func:`attention_saliency` without method features: ``P = exp(s · scale − lse)`` (floored) and
    ``dP = dO · vᵀ`` by matmuls, then ``fastattn_icl::saliency_reduce``; its float64 ``[B, 1 + H·per_head, 3]``."""
    B, Hkv, G = qg.shape[:3]
    r0, n = int(rows_[0]), rows_.numel()  # ascending consecutive rows: slices, not gathers
    floor = _EXP_FLOOR[qg.dtype]
    p = torch.matmul(qg[:, :, :, r0:r0 + n], kf[:, :, :, :Tc].transpose(-1, -2))
    row_lse = lse_g[:, :, :, r0:r0 + n]
    row_lse = row_lse.masked_fill(torch.isinf(row_lse), float("inf"))  # a row that sees no key: P = 0
    p.mul_(scale).sub_(row_lse[..., None].to(p.dtype)).clamp_(min=floor).exp_()
    dp = torch.matmul(dog[:, :, :, r0:r0 + n], vf[:, :, :, :Tc].transpose(-1, -2))
    return torch.ops.fastattn_icl.saliency_reduce(
        p.view(B, Hkv * G, n, Tc), dp.view(B, Hkv * G, n, Tc), _mask_rows(kpm), _unit_rows(label_mask),
        _unit_rows(target), r0, causal, per_head, row_slot, rows, math.exp(floor))


def _powers(eta: float, exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``η^exponent`` formed in float64 and rounded to ``dtype``, with values below its smallest normal number set to
    0: a denormal decay weight (``0.1^40`` in float32) changes no sum, but makes every matmul and product it enters
    many times slower on CPU."""
    p = torch.pow(eta, exponent.double()).to(dtype)
    return p.masked_fill_(p < torch.finfo(dtype).tiny, 0.0)


@functools.lru_cache(maxsize=16)
def _block_tables(eta: float, c: int, dtype: torch.dtype, device: torch.device):
    """The block-sized decay tables of :func:`_decay_scan` (read only, shared between calls; built outside inference
    mode, so that autograd can save them): within a block ``[c, c]`` (``η^(t − i)`` for ``i < t``, else 0), the
    carry of each block element to the next block ``[c]``, and from a block's first position on ``[c, 1]``."""
    with torch.inference_mode(False):
        r = torch.arange(c, device=device)
        lag = r[:, None] - r[None, :]
        within = _powers(eta, lag.clamp(min=1), dtype).masked_fill_(lag <= 0, 0.0)
        return within, _powers(eta, c - r, dtype), _powers(eta, r, dtype)[:, None]


def _scan_tables(eta: float, c: int, nb: int, dtype: torch.dtype, device: torch.device):
    """:func:`_block_tables` and the ``[nb, nb]`` carry between blocks (``η^(c·(b − b' − 1))`` for ``b' < b``),
    in the order ``within, tail, spread, head``."""
    within, tail, head = _block_tables(eta, c, dtype, device)
    blocks = torch.arange(nb, device=device)
    block_lag = blocks[:, None] - blocks[None, :] - 1  # carry of block b' into block b
    spread = _powers(eta, c * block_lag.clamp(min=0), dtype).masked_fill_(block_lag < 0, 0.0)
    return within, tail, spread, head


_SCAN_BLOCK = 32  # positions per block of the decay scan: O(T · block · D) work, not O(T²)


def _decay_scan(x: torch.Tensor, eta: float, reverse: bool = False) -> torch.Tensor:
    """``y_t = Σ_{i<t} η^(t−i) x_i`` (``reverse``: ``Σ_{i>t} η^(i−t) x_i``) along dim -2 of ``x [..., T, D]`` (float32
    or float64). On CPU the compiled recurrence (``fastattn_icl::momentum_scan``: ``O(T · D)``, float64 state) unless
    autograd records the call (the ops' own backward never does); elsewhere in blocks of ``_SCAN_BLOCK``: a decay
    matmul inside each block, and the blocks' sums carried to the later blocks by a second, ``T / block`` times
    smaller, decay matmul. Decay powers are formed in float64 (docs/methods.md §6)."""
    *lead, T, D = x.shape
    if T == 0:
        return x.clone()
    if not (x.requires_grad and torch.is_grad_enabled()) and _compiled(x):  # the op has no autograd formula
        return torch.ops.fastattn_icl.momentum_scan(x.reshape(-1, T, D), float(eta), reverse).reshape(x.shape)
    if reverse:
        return _decay_scan(x.flip(-2), eta).flip(-2)
    c = min(_SCAN_BLOCK, T)
    nb = -(-T // c)
    xb = torch.nn.functional.pad(x, (0, 0, 0, nb * c - T)).reshape(*lead, nb, c, D)
    within, tail, spread, head = _scan_tables(float(eta), c, nb, x.dtype, x.device)
    y = torch.matmul(within, xb)  # within each block
    sums = torch.matmul(tail, xb)  # [..., nb, D]: each block's carry into the next
    carry = torch.matmul(spread, sums)  # M at each block's first position, from the earlier blocks
    y = y + head * carry[..., None, :]
    return y.reshape(*lead, nb * c, D)[..., :T, :]


def momentum_term(v: torch.Tensor, eta: float, first: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``M [B, Hkv, Tk - first, D]`` float32 at absolute positions ``first .. Tk - 1`` (docs/methods.md §6),
    padded keys 0."""
    vf = v.float()
    if key_padding_mask is not None:
        vf = vf * key_padding_mask[:, None, :, None]
    return _decay_scan(vf, eta)[:, :, first:].contiguous()


def momentum_continue(v_new: torch.Tensor, eta: float, m0: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, n + 1, D]`` float32: ``M`` at the ``n`` positions of ``v_new`` given the carried state ``m0 [B, Hkv,
    D]`` (``M`` at the first of them), then the state after them."""
    n = v_new.shape[2]
    vf = v_new.float()
    if key_padding_mask is not None:
        vf = vf * key_padding_mask[:, None, :, None]
    rows = torch.arange(n + 1, device=v_new.device)
    carry = _powers(eta, rows, torch.float32)[:, None]  # η^r, 1 at r = 0
    return carry * m0.float()[:, :, None] + _decay_scan(torch.nn.functional.pad(vf, (0, 0, 0, 1)), eta)


def momentum_value_grad(grad_out: torch.Tensor, eta: float, Hkv: int, Tk: int,
                        key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """``dV [B, Hkv, Tk, D]`` float32 of the momentum term: ``Σ_{i>j} η^(i-j) G_i``, ``G`` the output gradient summed
    over each kv head's query heads (query rows at positions ``Tk - Tq ..``); 0 at padded keys."""
    B, H, Tq, D = grad_out.shape
    g = grad_out.float()
    if H != Hkv:  # (one query head per kv head: G itself, no copy)
        g = g.reshape(B, Hkv, H // Hkv, Tq, D).sum(dim=2)
    if Tk != Tq:  # G at every key position, 0 before the query rows
        g = torch.nn.functional.pad(g, (0, 0, Tk - Tq, 0))
    out = _decay_scan(g, eta, reverse=True)  # Σ over later positions
    if key_padding_mask is not None:
        out = out * key_padding_mask[:, None, :, None]
    return out


def momentum_attention_fwd(q, k, v, key_padding_mask, causal: bool, scale: float, momentum: torch.Tensor,
                           store_attn: bool):
    """``(out, lse, out_attn)``: attention plus ``momentum [B, Hkv, Tq, D]`` (float32) per kv head; ``out_attn`` is
    the attention part (the backward's ``o``), or an empty tensor unless ``store_attn``."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    # the sum is formed from the attention part in float32 and rounded once, as the Triton kernel's epilogue does
    o_attn, lse = _attention_fwd(q, k, v, key_padding_mask, None, None, None, causal, scale, None, None)
    grouped = (B, Hkv, H // Hkv, Tq, D)
    out, kept = _momentum_output(o_attn, q, store_attn)
    if out is o_attn:
        out.view(grouped).add_(momentum[:, :, None])
    else:
        torch.add(o_attn.reshape(grouped), momentum[:, :, None], out=out.view(grouped))
    return out, lse, kept


def _momentum_output(o_attn: torch.Tensor, q: torch.Tensor, store_attn: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, kept)`` for a momentum forward: ``out`` where ``o_attn + M`` goes, ``o_attn`` itself when nothing else
    reads it and it already has the layout and dtype the op promises (the term is then added in place), else a new
    output; ``kept`` the backward's ``o`` in the promised layout (``store_attn``), else an empty tensor."""
    out = output_like(q)
    if store_attn:
        return out, _as_promised(o_attn, q)
    return (o_attn if o_attn.dtype == q.dtype and _same_layout(o_attn, out) else out), q.new_empty(0)


def momentum_attention_fwd_fused(q, k, v, key_padding_mask, causal: bool, scale: float, eta: float,
                                 store_attn: bool):
    """``(out, lse, out_attn, state)`` of the momentum forward with no carried state, its term formed from ``v``
    inside the add (``fastattn_icl::momentum_add_``: one pass, no ``M`` tensor, and the state from the same scan),
    or ``None`` where that kernel does not serve (not a float32 CPU call with the extension built, or ``Tq > Tk``):
    then the caller forms ``M`` with :func:`momentum_term` and calls :func:`momentum_attention_fwd`. ``out`` is that
    pair's, bit for bit (``M`` rounded once and added in float32); the state is rounded once from the float64 sum,
    where the pair forms ``η (M + v)`` in float32 (the two differ by about an ulp; this one is the closer)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    if Tq > Tk or q.dtype != torch.float32 or v.dtype != torch.float32 or not _compiled(q):
        return None
    o_attn, lse = _attention_fwd(q, k, v, key_padding_mask, None, None, None, causal, scale, None, None)
    out, kept = _momentum_output(o_attn, q, store_attn)
    if out is not o_attn:
        out.copy_(o_attn)
    state = torch.ops.fastattn_icl.momentum_add_(out.view(B, Hkv, H // Hkv, Tq, D), _unit_rows(v),
                                                 _mask_rows(key_padding_mask), float(eta))
    return out, lse, kept, state


def deep_thinking_update_(work: torch.Tensor, m: torch.Tensor, eta: float, beta: float, first: bool) -> None:
    """The Deep-Thinking update of ``work [R, 2, C]`` and ``m [R, C]`` in place (docs/methods.md §7); the contract of
    the Triton launcher of the same name. Each product and sum is rounded as the per-tensor reference rounds it
    (``g = X_new − X̂``, ``m = β·m + g``, ``X̂ = X̂ + η·m``, in float32, ``X̂`` rounded once to its dtype), so the result
    is bitwise the reference's.

    On CPU tensors: the compiled one-pass kernel ``fastattn_icl::fused_deep_thinking_update_``
    (``csrc/deep_thinking.cpp``); without the extension (or in a build that lacks the op) the eager chain below, with
    a warning, once per process, saying how to build it. Other devices: the eager chain."""
    if work.device.type == "cpu":
        if _ext.has_op(_FUSED_DEEP_THINKING):
            torch.ops.fastattn_icl.fused_deep_thinking_update_(work, m, eta, beta, first)
            return
        _warn_no_fused_deep_thinking()
    _deep_thinking_update_eager(work, m, eta, beta, first)


_FUSED_DEEP_THINKING = "fused_deep_thinking_update_"
_warned_no_fused = False


def _warn_no_fused_deep_thinking() -> None:
    global _warned_no_fused
    if _warned_no_fused:
        return
    _warned_no_fused = True
    why = _ext.load_error() or f"the build has no op fastattn_icl::{_FUSED_DEEP_THINKING} (built from older sources)"
    warnings.warn(
        f"fastattn_icl: the CPU Deep-Thinking update runs eager PyTorch ops (several passes over the state instead "
        f"of one) because its compiled kernel is missing: {why}; {_ext.BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )


def _deep_thinking_update_eager(work: torch.Tensor, m: torch.Tensor, eta: float, beta: float, first: bool) -> None:
    """:func:`deep_thinking_update_` in eager ops, on any device. In row chunks of about 256 KiB per operand with one
    chunk-sized scratch buffer, so the in-place passes over a chunk run in cache and memory sees each operand about
    once."""
    R, _, C = work.shape
    step = max(1, (1 << 16) // max(1, C))
    scratch = torch.empty(min(step, R), C, dtype=m.dtype, device=m.device)
    for r0 in range(0, R, step):
        x_hat, x_new, m_rows = work[r0 : r0 + step, 0], work[r0 : r0 + step, 1], m[r0 : r0 + step]
        tmp = scratch[: m_rows.shape[0]]
        if x_hat.dtype == m.dtype:
            torch.sub(x_new, x_hat, out=tmp)  # g
        else:
            tmp.copy_(x_new).sub_(x_hat)  # g, formed in m's float32 for an fp16/bf16 state
        if first:
            m_rows.copy_(tmp)
        else:
            m_rows.mul_(beta).add_(tmp)
        torch.mul(m_rows, eta, out=tmp)
        if x_hat.dtype == m.dtype:
            x_hat.add_(tmp)
        else:  # rounded once, to the state's dtype
            x_hat.copy_(tmp.add_(x_hat))
