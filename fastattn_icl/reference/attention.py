"""Oracle for base attention (docs/methods.md §1): masks, scores, probabilities, output and ``lse``.

Shapes: ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]`` with ``H % Hkv == 0``.
Query head ``h`` reads kv head ``h // (H // Hkv)`` (GQA); the oracle simply repeats K/V.

Masks (``True`` = the query row may attend to the key):

* causal is **bottom-right aligned**: row ``i`` sees key ``j`` iff ``j <= i + (Tk - Tq)``, so
  query row ``i`` sits at absolute position ``i + Tk - Tq`` of a cache that starts at key 0;
* ``key_padding_mask`` is a bool ``[B, Tk]`` tensor, ``True`` = keep;
* a row with no visible key has ``P = 0``, output ``0`` and ``lse = -inf`` (never NaN).

Precision follows Hugging Face eager attention: ``Q Kᵀ`` is a matmul in the input dtype, the
scaled logits, masking and softmax are done in the accumulation dtype (float32, or float64 for
float64 input), ``P`` is cast back to the input dtype and ``P V`` is a matmul in the input dtype.
Scores, probabilities-in-acc-dtype and ``lse`` are returned in the accumulation dtype.
"""

from __future__ import annotations

import torch

from fastattn_icl.reference.isolation import isolate_scores

__all__ = ["visible_mask", "attention_scores", "attention_probs", "attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the oracle: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, t, dims: int, *, dtypes=_FLOAT_DTYPES, layout: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    return t


def check_index_tensor(name: str, t, dims: int, layout: str) -> torch.Tensor:
    """An integer tensor with ``dims`` dims; returned as int64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor {layout}, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
    return t.long()


def check_qkv(q, k, v=None) -> tuple[int, int, int, int, int, int]:
    """Validate ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]``.

    Returns ``(B, H, Hkv, Tq, Tk, D)``.
    """
    check_tensor("q", q, 4, layout="[B, H, Tq, D]")
    check_tensor("k", k, 4, layout="[B, Hkv, Tk, D]")
    if v is not None:
        check_tensor("v", v, 4, layout="[B, Hkv, Tk, Dv]")
    tensors = (q, k) if v is None else (q, k, v)
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"q, k, v must share one dtype, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {[str(t.device) for t in tensors]}")
    B, H, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k must have batch size {B} (as q), got {Bk}")
    if Dk != D:
        raise ValueError(f"k must have head_dim {D} (as q), got {Dk}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads ({H}) must be a positive multiple of k/v heads ({Hkv}) (GQA)")
    if Tq == 0 or Tk == 0 or D == 0:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v is not None and tuple(v.shape[:3]) != (B, Hkv, Tk):
        raise ValueError(f"v must have shape [B={B}, Hkv={Hkv}, Tk={Tk}, Dv], got {tuple(v.shape)}")
    return B, H, Hkv, Tq, Tk, D


def check_key_padding_mask(mask, B: int, Tk: int, device: torch.device) -> None:
    """``mask`` is ``None`` or a bool ``[B, Tk]`` tensor (True = keep) on ``device``."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Tk], got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be torch.bool [B={B}, Tk={Tk}] (True = keep), got {mask.dtype}")
    if tuple(mask.shape) != (B, Tk):
        raise ValueError(f"key_padding_mask must have shape [B={B}, Tk={Tk}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask must be on {device} (as q), got {mask.device}")


def check_scale(scale, head_dim: int) -> float:
    """``None`` -> ``head_dim ** -0.5``; otherwise a finite positive number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (0.0 < scale < float("inf")):
        raise ValueError(f"scale must be a finite positive number, got {scale}")
    return scale


def repeat_kv(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, H, T, D]``: query head ``h`` gets kv head ``h // (H // Hkv)``."""
    return x.repeat_interleave(H // x.shape[1], dim=1)


def visible_mask(
    Tq: int,
    Tk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which keys each query row may attend to.

    Returns a bool tensor ``[B or 1, 1, Tq, Tk]`` (``B`` when ``key_padding_mask`` is given), True =
    visible. Causal is bottom-right aligned: row ``i`` sees key ``j`` iff ``j <= i + (Tk - Tq)``.
    ``key_padding_mask``: bool ``[B, Tk]``, True = keep. ``device`` defaults to the mask's device
    (or CPU).
    """
    for name, n in (("Tq", Tq), ("Tk", Tk)):
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    if device is None:
        device = key_padding_mask.device if isinstance(key_padding_mask, torch.Tensor) else "cpu"
    device = torch.device(device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dim() != 2:
            raise ValueError("key_padding_mask must be a bool tensor [B, Tk]")
        check_key_padding_mask(key_padding_mask, key_padding_mask.shape[0], Tk, device)
    if causal:
        rows = torch.arange(Tq, device=device)[:, None]
        cols = torch.arange(Tk, device=device)[None, :]
        vis = cols <= rows + (Tk - Tq)
    else:
        vis = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    vis = vis[None, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :]
    return vis


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
) -> torch.Tensor:
    """Scaled, masked logits ``S = scale · Q Kᵀ`` (docs/methods.md §1), with the §3 isolation overwrite.

    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``; ``key_padding_mask`` bool ``[B, Tk]`` (True = keep).
    Returns ``S [B, H, Tq, Tk]`` in the accumulation dtype (float32, float64 for float64 input):
    invisible entries are ``-inf``; then, if ``isolation_rows`` (LongTensor ``[B, R]``, ``-1`` =
    padding) is given, :func:`~fastattn_icl.reference.isolation.isolate_scores` overwrites the
    isolated entries with ``-1e4``. ``scale`` defaults to ``D ** -0.5``.
    """
    B, H, _, Tq, Tk, D = check_qkv(q, k)
    check_key_padding_mask(key_padding_mask, B, Tk, q.device)
    scale = check_scale(scale, D)
    raw = torch.matmul(q, repeat_kv(k, H).transpose(-1, -2))  # [B, H, Tq, Tk], input dtype
    s = raw.to(acc_dtype(q.dtype)) * scale
    vis = visible_mask(Tq, Tk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    if isolation_rows is not None:
        s = isolate_scores(s, isolation_rows, isolation_window)
    return s


def softmax_rows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of masked logits; a row of all ``-inf`` gives ``P = 0`` and ``lse = -inf``.

    Returns ``(P, lse)`` in the dtype of ``s``. Gradients stay finite on empty rows.
    """
    lse = torch.logsumexp(s, dim=-1)  # -inf on empty rows
    empty = torch.isneginf(lse)[..., None]
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return p, lse


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
) -> torch.Tensor:
    """Post-softmax ``P = softmax(S)`` ``[B, H, Tq, Tk]``, in the accumulation dtype.

    Same arguments and mask convention as :func:`attention_scores`. Rows with no visible key are
    all zeros (never NaN).
    """
    s = attention_scores(
        q,
        k,
        causal=causal,
        scale=scale,
        key_padding_mask=key_padding_mask,
        isolation_rows=isolation_rows,
        isolation_window=isolation_window,
    )
    return softmax_rows(s)[0]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    isolation_rows: torch.Tensor | None = None,
    isolation_window: int = 0,
):
    """Base attention ``O = softmax(scale · Q Kᵀ + mask) V`` (docs/methods.md §1).

    ``q [B, H, Tq, D]``, ``k [B, Hkv, Tk, D]``, ``v [B, Hkv, Tk, Dv]``; ``key_padding_mask`` bool
    ``[B, Tk]`` (True = keep); causal is bottom-right aligned. Returns ``O [B, H, Tq, Dv]`` in the
    input dtype and, with ``return_lse``, ``lse [B, H, Tq]`` (natural log, accumulation dtype,
    ``-inf`` on rows with no visible key, whose output is 0). ``isolation_rows``/``isolation_window``
    apply the docs/methods.md §3 knockout (see :func:`attention_scores`); ``None`` is plain attention.
    """
    check_qkv(q, k, v)
    s = attention_scores(
        q,
        k,
        causal=causal,
        scale=scale,
        key_padding_mask=key_padding_mask,
        isolation_rows=isolation_rows,
        isolation_window=isolation_window,
    )
    p, lse = softmax_rows(s)
    out = torch.matmul(p.to(q.dtype), repeat_kv(v, q.shape[1]))
    return (out, lse) if return_lse else out
