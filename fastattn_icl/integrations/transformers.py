"""The Hugging Face seam: ``attn_implementation="fastattn_icl"`` for decoder models.

Two functions are registered under the name ``"fastattn_icl"`` (see :func:`register`):

- :func:`fastattn_icl_mask` with ``transformers.masking_utils.AttentionMaskInterface``. transformers
  calls it once per forward (from ``create_causal_mask`` / ``create_sliding_window_causal_mask``)
  with ``(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, ...)``.
  It never builds an O(T²) mask: it returns ``None`` (plain causal attention over all keys) or a bool
  key-padding mask ``[B, n]``, True = keep, over the key positions ``kv_offset .. kv_offset + n - 1``.
  ``n < kv_length`` happens only with static caches, whose trailing slots are not yet written: the
  attention function then drops those keys. A mask pattern that is not plain causal raises
  ``NotImplementedError`` naming the feature (binding sliding window, chunked attention, packed
  sequences, ``or_mask_function`` / ``and_mask_function`` overlays, bidirectional attention); a
  sliding window that cannot bind (window > every query-key distance) is plain causal and allowed.
- :func:`fastattn_icl_attention_forward` with ``transformers.AttentionInterface``. It receives
  ``query [B, H, Tq, D]``, ``key``/``value [B, Hkv, Tk, D]`` (GQA not repeated) and the mask above,
  and returns ``(out [B, Tq, H, D] contiguous, weights)``. Causal unless ``is_causal=False`` is passed
  or the module has ``is_causal = False``; ``scaling`` is honoured exactly (``None``: ``D ** -0.5``).

Method state (see :mod:`fastattn_icl.integrations.controller`), validated when it is set and read per layer as
a :class:`~fastattn_icl.integrations.method_state.LayerMethods` through ``module.layer_idx`` (the per-layer path
reads no tensor value on the host, so a decode step never waits for the device): ``anchors``
(:class:`AnchorState`) with ``beta`` (``[L, H, C]``, layer ``l`` uses ``beta[l]``) runs
:func:`fastattn_icl.anchor_reweight_attention`; ``isolation`` (:class:`IsolationState`) passes
``isolation_rows`` to the kernel; ``saliency`` (a :class:`fastattn_icl.Saliency` request) records
layer ``layer_idx``'s information-flow saliency into ``request.results[layer_idx]`` during the backward
(whole-prompt forwards only, ``Tq == Tk``); ``shared_prefix`` (:class:`SharedPrefixState`, with a
:class:`~fastattn_icl.integrations.prefix_cache.SharedPrefixCache`) makes ``key``/``value`` the rows' own keys
after a prefix the batch shares, read in place by :func:`fastattn_icl.shared_prefix_attention` (forward only,
not combinable with the other states; the mask covers ``[prefix, own keys]`` and must keep the whole
prefix); ``momentum`` (η, a float in ``[0, 1)``) runs :func:`fastattn_icl.momentum_attention` over the layer's
keys, which a Hugging Face cache holds from position 0, so prefill, chunks and decode steps add the momentum of
absolute positions (not combinable with the other states yet); ``attention_row``
(:class:`~fastattn_icl.integrations.controller.AttentionRowProbe`) records the last query row's attention on a few
key positions from the fused forward's log-sum-exp (plain attention only). Positions in the state are absolute key
positions; a call over a chunk of ``Tq`` queries and ``Tk`` keys (cached decoding) puts query row ``i`` at
position ``i + Tk - Tq``,
so ``AnchorState.reweight_from`` (an absolute position) becomes the row ``reweight_from - (Tk - Tq)``,
clamped to the chunk: a chunk entirely before it is not re-weighted (per batch row). Label words or
isolated positions that are not keys yet (``>= Tk``) are ignored in that call. Any other state name raises when
it is set.

Errors instead of silent fallbacks: a 4D (custom or pre-built) attention mask, attention dropout > 0
in training, logit soft-capping, attention sinks, additive position bias, varlen ``cu_seq_lens``.

``output_attentions=True`` returns real attention weights ``[B, H, Tq, Tk]``: they are recomputed by the
PyTorch backend's probability helper (:func:`fastattn_icl.ops._torch_backend.attention_probs`) from the same
``q``, ``k``, mask, scale and method tables as the kernel (O(Tq·Tk) memory per head, as eager; only when asked
for, and differentiable). Query rows that see no key (left padding) get all-zero weights
where eager spreads them uniformly.

Registration happens when ``fastattn_icl`` is imported, without importing transformers or Triton and
without touching CUDA: :func:`install_import_hook` registers at once if transformers' modules are
already imported, and otherwise as soon as they are.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from fastattn_icl.integrations.controller import find_controller
from fastattn_icl.integrations.method_state import PLAIN, DeviceCopies, Isolation, Reweighting, SharedPrefix
from fastattn_icl.integrations.updated_layers import take_updated_layer
from fastattn_icl.ops._torch_backend import attention_probs
from fastattn_icl.ops.attention import attention_from_tables
from fastattn_icl.ops.features import anchor_columns, isolation_limit_table, key_log_weight_table
from fastattn_icl.ops.momentum import momentum_attention, momentum_attention_with_state
from fastattn_icl.ops.prefix import shared_prefix_attention

ATTN_IMPLEMENTATION = "fastattn_icl"

# kwargs some models pass to the attention function whose meaning this seam does not implement
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping (softcap)",
    "s_aux": "attention sinks (s_aux)",
    "sinks": "attention sinks",
    "position_bias": "an additive position bias (position_bias)",
    "cu_seq_lens_q": "packed variable-length sequences (cu_seq_lens_q)",
    "cu_seq_lens_k": "packed variable-length sequences (cu_seq_lens_k)",
}

# (substring of a mask function's qualified name, feature it stands for), most specific first
_MASK_FEATURES = (
    ("packed_sequence", "packed sequences (several sequences in one row, detected from position_ids)"),
    ("chunked_overlay", "chunked attention"),
    ("blockwise_overlay", "block-wise bidirectional attention (block_sequence_ids)"),
    ("sliding_window_bidirectional", "bidirectional sliding-window attention"),
    ("sliding_window_overlay", "sliding-window attention combined with other mask functions"),
    ("bidirectional_mask_function", "bidirectional (non-causal) attention"),
)

_HINT = "use attn_implementation='eager' or 'sdpa' for this model or input"


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def _mask_combination(fn: Callable) -> tuple[str, tuple] | None:
    """``("and_mask" | "or_mask", parts)`` for functions built by ``masking_utils.and_masks`` /
    ``or_masks``, else ``None``."""
    name = getattr(fn, "__name__", "")
    if name not in ("and_mask", "or_mask") or getattr(fn, "__closure__", None) is None:
        return None
    parts = inspect.getclosurevars(fn).nonlocals.get("mask_functions")
    return (name, parts) if isinstance(parts, tuple) else None


def _leaf_names(fn: Callable) -> list[str]:
    combined = _mask_combination(fn)
    if combined is None:
        return [getattr(fn, "__qualname__", repr(fn))]
    return [name for part in combined[1] for name in _leaf_names(part)]


def _sliding_window_of(fn: Callable, causal_fn: Callable) -> int | None:
    """The window ``W`` if ``fn`` is exactly ``sliding_window_causal_mask_function(W)``, else None."""
    combined = _mask_combination(fn)
    if combined is None or combined[0] != "and_mask" or len(combined[1]) != 2:
        return None
    overlay, causal = combined[1]
    if causal is not causal_fn or not getattr(overlay, "__qualname__", "").startswith("sliding_window_overlay"):
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return int(window) if isinstance(window, int) else None


def _unsupported_mask_feature(mask_function: Callable) -> str:
    leaves = _leaf_names(mask_function)
    for key, feature in _MASK_FEATURES:
        if any(key in leaf for leaf in leaves):
            return feature
    custom = [leaf for leaf in leaves if "causal_mask_function" not in leaf] or leaves
    return f"a custom mask function (or_mask_function / and_mask_function: {', '.join(custom)})"


def _check_mask_function(mask_function: Callable, q_offset: int, q_end: int, kv_offset: int) -> None:
    """Raise unless ``mask_function`` is plain causal over these positions."""
    from transformers import masking_utils

    if mask_function is masking_utils.causal_mask_function:
        return
    window = _sliding_window_of(mask_function, masking_utils.causal_mask_function)
    if window is not None:
        # kv_idx > q_idx - window for every visible pair iff the largest distance stays below window
        largest_distance = q_end - 1 - kv_offset
        if largest_distance < window:
            return
        raise NotImplementedError(
            f"fastattn_icl: sliding-window attention binds here (window {window}, query positions "
            f"{q_offset}..{q_end - 1} over keys from position {kv_offset}); the seam computes full causal "
            f"attention only: keep sequences within the window or {_HINT}"
        )
    feature = _unsupported_mask_feature(mask_function)
    raise NotImplementedError(f"fastattn_icl: {feature} is not supported by the attention seam; {_HINT}")


def fastattn_icl_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The ``AttentionMaskInterface`` entry of the seam (see the module docstring).

    Args:
        batch_size, q_length, kv_length: sizes of the coming attention call.
        q_offset, kv_offset: absolute positions of the first query and first key.
        mask_function: transformers' mask pattern; only the plain causal one (or a sliding window
            that cannot bind) is accepted.
        attention_mask: optional 2D ``[B, >= kv_offset + kv_length]`` padding mask (True/1 = keep).

    Returns:
        ``None`` when every key is visible (plain causal attention), else a bool ``[B, n]`` key-padding
        mask over key positions ``kv_offset .. kv_offset + n - 1``.
    """
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    q_end = q_offset + q_length
    _check_mask_function(mask_function, q_offset, q_end, kv_offset)
    # keys at or after q_end are never visible to a causal query: only static caches have them
    visible = q_end - kv_offset
    if visible > kv_length:
        raise NotImplementedError(
            f"fastattn_icl: queries at positions {q_offset}..{q_end - 1} end after the keys "
            f"({kv_offset}..{kv_offset + kv_length - 1}); bottom-right causal alignment does not hold"
        )
    if attention_mask is None:
        if visible == kv_length:
            return None
        return torch.ones(batch_size, visible, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    if attention_mask.dim() != 2:
        raise NotImplementedError(
            f"fastattn_icl: expected a 2D padding mask [B, T], got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(torch.bool)
    stop = kv_offset + visible
    if mask.shape[1] < stop:
        # transformers pads a short mask with False (keys it does not cover are masked)
        mask = torch.nn.functional.pad(mask, (0, stop - mask.shape[1]), value=False)
    mask = mask[:, kv_offset:stop]
    if mask.shape[0] != batch_size:
        mask = mask.expand(batch_size, -1)
    if visible == kv_length and not _is_tracing() and bool(mask.all()):
        return None
    return mask.contiguous()


def _key_padding_mask(attention_mask: Any, tk: int, device: torch.device) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise NotImplementedError(
            f"fastattn_icl: the attention seam takes a 2D padding mask [B, T] (True/1 = keep) and builds "
            f"causality itself; a 4D (custom or pre-built) attention mask {shape} is not supported: {_HINT}"
        )
    if attention_mask.dtype != torch.bool:
        raise TypeError(
            f"fastattn_icl: expected a bool key-padding mask [B, Tk={tk}] from the fastattn_icl mask "
            f"interface, got dtype {attention_mask.dtype}"
        )
    if attention_mask.shape[1] > tk:
        raise ValueError(
            f"fastattn_icl: key-padding mask covers {attention_mask.shape[1]} keys but only {tk} were given"
        )
    return attention_mask.to(device, non_blocking=True)  # layers may sit on other devices than the mask


def _attentions_requested(kwargs: dict[str, Any]) -> bool:
    """Whether the caller asked for attention weights: ``output_attentions`` in the kwargs (most
    models), or transformers' output recorder collecting ``"attentions"`` (GPT-2 pops the flag)."""
    if kwargs.get("output_attentions"):
        return True
    recorder = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(recorder, "_active_collector", None)
    if collector is None:
        return False
    collected = collector.get()
    return isinstance(collected, dict) and "attentions" in collected


def _batched(name: str, t: torch.Tensor, B: int, device: torch.device, copies: DeviceCopies) -> torch.Tensor:
    """A validated ``[B or 1, N]`` state tensor as ``[B, N]`` on ``device`` (copied there once, on first use)."""
    if t.shape[0] not in (1, B):
        raise ValueError(f"fastattn_icl: method state {name} has shape {tuple(t.shape)}, expected [B={B}, N] or [1, N]")
    return copies.on(t, device).expand(B, -1)


def _reweighting_tables(
    rw: Reweighting, layer_idx: int | None, B: int, H: int, Tq: int, Tk: int, device: torch.device
):
    """``(key_log_weights [B, H, Tk] float32, reweight_from [B] int32, key_weight_columns [A] int64 or None)`` of one
    call (``None`` three times when ``beta`` has no class: plain attention). Anchors that are not keys of
    this call yet (a chunk before them) are unused; a batch row with no anchor among its keys, or whose queries all
    come before ``reweight_from``, gets β = 0, which is exactly plain attention: no branch on the device's values."""
    if layer_idx is None or not 0 <= layer_idx < rw.beta.shape[0]:
        raise ValueError(f"fastattn_icl: beta has {rw.beta.shape[0]} layers, no entry for layer {layer_idx}")
    layer_beta = rw.beta[layer_idx].to(device)  # [H, C] or [B, H, C]; read live: a copy only if on another device
    if layer_beta.dim() == 2:
        layer_beta = layer_beta[None].expand(B, -1, -1)
    if tuple(layer_beta.shape[:2]) != (B, H):
        raise ValueError(
            f"fastattn_icl: beta[{layer_idx}] has shape {tuple(rw.beta[layer_idx].shape)}, expected [H={H}, C] or "
            f"[B={B}, H={H}, C]"
        )
    positions = _batched("anchors.positions", rw.positions, B, device, rw.copies)
    classes = _batched("anchors.classes", rw.classes, B, device, rw.copies)
    # a position that is not a key yet (chunked prefill, cached decoding) is unused in this call; the seam cannot
    # tell it from one past the end of the whole input, so the workflows check positions against their input
    positions = torch.where(positions >= Tk, -1, positions)
    active = (positions >= 0).any(dim=1)  # [B]
    if rw.reweight_from is None:
        rows = torch.full((B,), max(Tq - 1, 0), dtype=torch.long, device=device)
    else:
        if rw.reweight_from.numel() not in (1, B):
            raise ValueError(
                f"fastattn_icl: anchors.reweight_from must be an int or have shape [B={B}], got "
                f"{tuple(rw.reweight_from.shape)}"
            )
        # query row i sits at absolute position i + Tk - Tq (bottom-right alignment)
        row = rw.copies.on(rw.reweight_from, device).expand(B) - (Tk - Tq)
        active = active & (row <= Tq - 1)
        rows = row.clamp(0, max(Tq - 1, 0))
    if layer_beta.shape[-1] == 0:  # C = 0: no anchor can be used (checked when set), so plain attention
        return None, None, None
    layer_beta = torch.where(active[:, None, None], layer_beta, torch.zeros((), dtype=layer_beta.dtype, device=device))
    return key_log_weight_table(layer_beta, positions, classes, Tk), rows.to(torch.int32), anchor_columns(positions, Tk)


def _isolation_table(iso: Isolation, B: int, Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """``isolation_limit [B, Tq]`` int32 of one call (positions that are not keys yet are unused)."""
    if iso.window_past_end(Tk):
        raise NotImplementedError(
            f"fastattn_icl: an isolation window (window {iso.window}) runs past the last key ({Tk - 1}) of this "
            "call: every window must end inside the sequence; in cached decoding, process the prompt up to the end "
            "of every window in one pass"
        )
    return isolation_limit_table(_batched("isolation.rows", iso.rows, B, device, iso.copies), iso.window, Tq, Tk)


def _shared_prefix_forward(
    prefix: SharedPrefix,
    layer_idx: int | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    is_causal: bool,
    scale: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seam with controller state ``shared_prefix``: ``key``/``value`` are the row's own keys, which follow
    the shared prefix ``prefix.state.keys[layer_idx]``; the mask (if any) covers ``[prefix, own keys]``."""
    state = prefix.state
    if layer_idx is None or not 0 <= layer_idx < state.keys.shape[0]:
        raise ValueError(f"fastattn_icl: the shared prefix has {state.keys.shape[0]} layers, none for {layer_idx}")
    pk, pv = state.keys[layer_idx], state.values[layer_idx]
    M, Tk = state.length, key.shape[2]
    key_padding_mask = _key_padding_mask(attention_mask, M + Tk, query.device)
    if key_padding_mask is not None:
        if key_padding_mask.shape[1] != M + Tk:
            raise ValueError(
                f"fastattn_icl: with a shared prefix of {M} keys the padding mask must cover {M} + {Tk} keys, got "
                f"{key_padding_mask.shape[1]} (a static cache cannot hold a shared prefix)"
            )
        # one read of the mask per forward: every layer gets the same mask object
        if state.check_mask and not _is_tracing() and not prefix.mask_checks.seen(key_padding_mask):
            if not bool(key_padding_mask[:, :M].all()):
                raise ValueError("fastattn_icl: the attention mask hides positions of the shared prefix; its first "
                                 f"{M} columns must be 1 (every row sees the whole prefix)")
            prefix.mask_checks.passed(key_padding_mask)
        key_padding_mask = key_padding_mask[:, M:]
    if pk.device != query.device or pk.dtype != query.dtype:
        raise ValueError(
            f"fastattn_icl: the shared prefix is {pk.dtype} on {pk.device} but layer {layer_idx} runs "
            f"{query.dtype} on {query.device}"
        )
    out = shared_prefix_attention(query, pk, pv, key, value, causal=is_causal, scale=scale,
                                  key_padding_mask=key_padding_mask)
    weights = None
    if _attentions_requested(kwargs):  # only when weights are asked for
        B = query.shape[0]
        probs = attention_probs(query, key, key_padding_mask, None, None, None, is_causal, scale,
                                prefix_keys=pk.expand(B, -1, -1, -1))
        weights = probs.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _momentum_forward(layer_idx, query, key, value, eta: float, is_causal, scale, key_padding_mask) -> torch.Tensor:
    """Momentum attention (``eta`` validated at entry) over the layer's whole cache; with a
    :class:`~fastattn_icl.integrations.momentum_cache.MomentumCache` the layer's carried state (``M`` at the first new
    position, same η) replaces the rescan of the earlier values, and the new state is stored back."""
    layer = take_updated_layer(layer_idx)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if layer is None or eta == 0.0 or needs_grad:
        return momentum_attention(query, key, value, eta, causal=is_causal, scale=scale,
                                  key_padding_mask=key_padding_mask)
    if layer.values is None or layer.values.data_ptr() != value.data_ptr():
        layer = None  # not the cache whose values this call reads: never touch its state
    B, Tq, Tk = query.shape[0], query.shape[2], key.shape[2]
    state = None if layer is None else layer.state
    usable = (
        state is not None and layer.state_eta == eta and layer.state_position == Tk - Tq
        and layer.get_seq_length() == Tk and state.shape[0] == B and state.device == query.device
    )
    out, new_state = momentum_attention_with_state(
        query, key, value, eta, state if usable else None, causal=is_causal, scale=scale,
        key_padding_mask=key_padding_mask,
    )
    if layer is not None:
        layer.state, layer.state_position, layer.state_eta = new_state, Tk, eta
    return out


def fastattn_icl_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``AttentionInterface`` entry of the seam.

    Args:
        module: the calling attention module (``layer_idx`` selects method state, ``is_causal`` and
            ``training`` are read).
        query: ``[B, H, Tq, D]``; key, value: ``[B, Hkv, Tk, D]`` (grouped-query, not repeated).
        attention_mask: ``None`` or the bool key-padding mask ``[B, n <= Tk]`` made by
            :func:`fastattn_icl_mask` (True = keep; keys past ``n`` are unwritten static-cache slots).
        scaling: logit scale, used as given (``None``: ``D ** -0.5``).
        dropout: must be 0 while training (attention dropout is not implemented).

    Returns:
        ``(out, weights)``: ``out [B, Tq, H, D]`` contiguous; ``weights [B, H, Tq, Tk]`` when attention
        weights were requested, else ``None``.
    """
    for name, feature in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"fastattn_icl: {feature} is not supported by the attention seam; {_HINT}")
    if dropout and module.training:
        raise NotImplementedError(
            f"fastattn_icl: attention dropout ({dropout}) is not implemented; call model.eval() or set the "
            "config's attention dropout (attn_pdrop / attention_dropout) to 0.0 for training"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    layer_idx = getattr(module, "layer_idx", None)
    controller = find_controller(module)
    methods = PLAIN if controller is None else controller.methods(layer_idx)
    methods.check_complete()
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    if methods.shared_prefix is not None:
        return _shared_prefix_forward(methods.shared_prefix, layer_idx, query, key, value, attention_mask, is_causal,
                                      scale, kwargs)
    key_padding_mask = _key_padding_mask(attention_mask, key.shape[2], query.device)
    if key_padding_mask is not None and key_padding_mask.shape[1] < key.shape[2]:
        n = key_padding_mask.shape[1]
        key, value = key[:, :, :n], value[:, :, :n]
    window = kwargs.get("sliding_window")
    if window is not None and is_causal and key.shape[2] > window:
        raise NotImplementedError(
            f"fastattn_icl: sliding-window attention binds here (window {window}, {key.shape[2]} keys); "
            f"the seam computes full causal attention only: keep sequences within the window or {_HINT}"
        )
    B, H, Tq, _ = query.shape
    Tk = key.shape[2]
    logw = row_from = limit = columns = None
    if methods.reweighting is not None:
        logw, row_from, columns = _reweighting_tables(methods.reweighting, layer_idx, B, H, Tq, Tk, query.device)
    if methods.isolation is not None:
        limit = _isolation_table(methods.isolation, B, Tq, Tk, query.device)
    if methods.momentum is not None:
        # the cache holds every key from position 0, so the decayed sum counts absolute positions
        out = _momentum_forward(layer_idx, query, key, value, methods.momentum, is_causal, scale, key_padding_mask)
    else:
        out, lse = attention_from_tables(
            query, key, value, causal=is_causal, scale=scale, key_padding_mask=key_padding_mask,
            key_log_weights=logw, reweight_from=row_from, isolation_limit=limit, saliency=methods.saliency,
            saliency_key=layer_idx, key_weight_columns=columns,
        )
        if methods.attention_row is not None:
            methods.attention_row.record(layer_idx, query, key, lse, scale)
    weights = None
    if _attentions_requested(kwargs):
        weights = attention_probs(query, key, key_padding_mask, logw, row_from, limit, is_causal, scale)
        weights = weights.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights


def _register_attention(modeling_utils: ModuleType) -> None:
    modeling_utils.AttentionInterface.register(ATTN_IMPLEMENTATION, fastattn_icl_attention_forward)


def _register_mask(masking_utils: ModuleType) -> None:
    masking_utils.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, fastattn_icl_mask)


_REGISTRARS: dict[str, Callable[[ModuleType], None]] = {
    "transformers.modeling_utils": _register_attention,
    "transformers.masking_utils": _register_mask,
}


def register() -> None:
    """Register ``"fastattn_icl"`` with transformers now (imports transformers' modeling code)."""
    import transformers.masking_utils
    import transformers.modeling_utils

    _register_attention(transformers.modeling_utils)
    _register_mask(transformers.masking_utils)


def _run_registrar(name: str, module: ModuleType) -> None:
    try:
        _REGISTRARS[name](module)
    except Exception as exc:  # never break importing transformers
        warnings.warn(f"fastattn_icl could not register its attention with {name}: {exc!r}", stacklevel=2)


class _LoaderThenRegister(importlib.abc.Loader):
    """Delegates to the real loader, then runs the registrar on the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader, name: str, finder: _RegisterOnImport):
        self._loader, self._name, self._finder = loader, name, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._finder.done(self._name)
        _run_registrar(self._name, module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' modeling/masking modules so the seam is
    registered right after they are imported, and removes itself once both are."""

    def __init__(self, names: set[str]):
        self.pending = set(names)

    def done(self, name: str) -> None:
        self.pending.discard(name)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.pending:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _LoaderThenRegister(spec.loader, fullname, self)
        return spec


def install_import_hook() -> None:
    """Register with transformers' modules that are already imported, and arrange for the others to be
    registered when they are imported. Imports nothing from transformers itself."""
    if "transformers" not in sys.modules and importlib.util.find_spec("transformers") is None:
        return
    pending = set()
    for name in _REGISTRARS:
        module = sys.modules.get(name)
        if module is not None:
            _run_registrar(name, module)
        else:
            pending.add(name)
    if pending and not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport(pending))
