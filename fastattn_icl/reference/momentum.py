"""Oracle for momentum attention, MoAttn (docs/methods.md §6).

``O_t = Σ_j P_tj v_j + M_t`` with ``M_t = Σ_{i<t} η^{t−i} v_i``, ``η ∈ [0, 1)``: a causal,
unnormalised, decayed sum of earlier values that excludes the current token. Recurrent form:
``m_0 = 0``, ``m_{t+1} = η (m_t + v_t)``, ``O_t = attn_t + m_t``.

* Positions are absolute over the key/value cache: ``t`` counts from key 0. Query row ``i`` of a
  chunk with ``Tq < Tk`` sits at ``t = i + Tk − Tq`` (the bottom-right convention); a row with
  ``t < 0`` (only when ``Tq > Tk``) gets no momentum.
* GQA: ``M`` is computed per kv head and shared by its query heads (head ``h`` adds kv head
  ``h // (H // Hkv)``'s momentum).
* Key padding: a padded key contributes a zero value to the sum, while the decay exponent still
  counts absolute cache positions. With left padding the pads precede every real token, so the
  real rows get exactly the momentum of the unpadded sequence; with right padding the pads come
  after them. (Padding in the middle of a sequence would stretch the decay across the gap.)
* The term is causal whatever ``causal`` says about the attention part.
* Accumulation is in float32 (float64 for float64 input); ``η = 0`` gives base attention exactly.
* Backward of the momentum part: ``dV_j += Σ_{i>j} η^{i−j} dO_i`` (summed over the query heads of
  the group), which autograd derives from the closed form.
"""

from __future__ import annotations

import math

import torch

from fastattn_icl.reference.attention import (
    acc_dtype,
    attention,
    check_key_padding_mask,
    check_qkv,
    check_tensor,
)

__all__ = ["check_eta", "momentum_term", "momentum_recurrent", "momentum_attention"]


def check_eta(eta) -> float:
    """η must be a real number in ``[0, 1)``; returns it as a float."""
    if isinstance(eta, torch.Tensor):
        if eta.numel() != 1:
            raise TypeError("eta must be a float in [0, 1), got a tensor with several elements")
        eta = eta.item()
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"eta must be a float in [0, 1), got {type(eta).__name__}")
    eta = float(eta)
    if not (0.0 <= eta < 1.0) or math.isnan(eta):
        raise ValueError(f"eta must be in [0, 1) (momentum grows like 1/(1 - eta)), got {eta}")
    return eta


def _masked_values(v: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    vf = v.to(acc_dtype(v.dtype))
    if key_padding_mask is None:
        return vf
    check_key_padding_mask(key_padding_mask, v.shape[0], v.shape[2], v.device)
    return vf * key_padding_mask[:, None, :, None].to(vf.dtype)


def momentum_term(
    v: torch.Tensor,
    eta: float,
    *,
    start: int = 0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Closed form ``M_t = Σ_{i<t} η^{t−i} v_i`` for absolute positions ``t = start .. T−1``.

    ``v``: ``[B, Hkv, T, D]``, the whole cache from position 0. ``start``: absolute position of the
    first row wanted (a query chunk beginning at ``start``). ``key_padding_mask``: bool ``[B, T]``,
    True = keep; padded values count as 0. Returns ``M [B, Hkv, T − start, D]`` in float32
    (float64 for float64 input).
    """
    check_tensor("v", v, 4, layout="[B, Hkv, T, D]")
    eta = check_eta(eta)
    T = v.shape[2]
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"start must be an int, got {type(start).__name__}")
    if not 0 <= start <= T:
        raise ValueError(f"start must be an absolute position in [0, T={T}], got {start}")
    vf = _masked_values(v, key_padding_mask)
    t = torch.arange(start, T, device=v.device, dtype=torch.float64)[:, None]
    i = torch.arange(T, device=v.device, dtype=torch.float64)[None, :]
    lag = t - i  # [T - start, T]
    decay = torch.where(lag > 0, torch.pow(torch.full_like(lag, eta), lag.clamp(min=1)), torch.zeros_like(lag))
    return torch.matmul(decay.to(vf.dtype), vf)


def momentum_recurrent(
    v: torch.Tensor,
    eta: float,
    *,
    m0: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_state: bool = False,
):
    """Recurrent form: ``m_{t+1} = η (m_t + v_t)``, ``M[..., t, :] = m_t``.

    ``v``: ``[B, Hkv, T, D]``. ``m0``: the carried state ``[B, Hkv, D]`` at the first position of
    ``v`` (``None`` = 0, i.e. ``v`` starts the cache). ``key_padding_mask``: bool ``[B, T]``, padded
    values count as 0. Returns ``M [B, Hkv, T, D]`` (accumulation dtype) and, with
    ``return_state``, also ``m_T [B, Hkv, D]``, the state a decode step carries in O(d) memory.
    """
    check_tensor("v", v, 4, layout="[B, Hkv, T, D]")
    eta = check_eta(eta)
    vf = _masked_values(v, key_padding_mask)
    B, Hkv, T, D = v.shape
    if m0 is None:
        m = torch.zeros(B, Hkv, D, dtype=vf.dtype, device=v.device)
    else:
        check_tensor("m0", m0, 3, layout=f"[B={B}, Hkv={Hkv}, D={D}]")
        if tuple(m0.shape) != (B, Hkv, D):
            raise ValueError(f"m0 must have shape [B={B}, Hkv={Hkv}, D={D}], got {tuple(m0.shape)}")
        m = m0.to(device=v.device, dtype=vf.dtype)
    rows = []
    for t in range(T):
        rows.append(m)
        m = eta * (m + vf[:, :, t])
    out = torch.stack(rows, dim=2) if rows else vf.new_zeros(B, Hkv, 0, D)
    return (out, m) if return_state else out


def momentum_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: float,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Momentum attention ``O = attention(q, k, v) + M`` (docs/methods.md §6).

    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]``; ``key_padding_mask`` bool
    ``[B, Tk]`` (True = keep; padded values count as 0 in ``M``); ``causal`` is the bottom-right mask
    of the attention part (the momentum term is always causal). Query row ``i`` adds ``M`` at
    absolute position ``t = i + Tk − Tq`` of its kv head ``h // (H // Hkv)``. The sum is done in
    float32 (float64 for float64 input) and cast to the input dtype: ``O [B, H, Tq, Dv]``.
    Raises ``ValueError`` for ``η ∉ [0, 1)``.
    """
    B, H, Hkv, Tq, Tk, _ = check_qkv(q, k, v)
    eta = check_eta(eta)
    base = attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    first = Tk - Tq
    mom = momentum_term(v, eta, start=max(first, 0), key_padding_mask=key_padding_mask)  # [B, Hkv, ., Dv]
    if first < 0:
        mom = torch.cat([mom.new_zeros(B, Hkv, -first, mom.shape[-1]), mom], dim=2)
    mom = mom.repeat_interleave(H // Hkv, dim=1)  # [B, H, Tq, Dv]
    return (base.to(mom.dtype) + mom).to(q.dtype)
