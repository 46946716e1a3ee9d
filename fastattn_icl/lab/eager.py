"""The studies the way the papers' code runs them: eager attention that materialises ``P [B, H, T, T]``.

This is the independent yardstick of the reproduction: the fused ``"fastattn_icl"`` path must give the same
numbers on a real model, and the report states how long each step takes here versus there. It registers the
attention implementation ``"icl_eager"`` with transformers (eager's mask, eager's math) and adds, per layer,

- a **probe**: ``P`` is multiplied by a tensor of ones that requires grad (the paper's saliency method; the
  probe's gradient is ``P ⊙ ∂L/∂P``);
- **isolation** (docs/methods.md §3): logits of the queries ``p .. p + window`` towards keys ``< p`` overwritten with
  ``-1e4`` after scaling and masking;
- **anchor re-weighting** (docs/methods.md §2): the last query row's ``P`` at each label word multiplied by
  ``exp(β[l, h, c])``, not renormalised.

Nothing here is fast or meant to be: it is the O(T²)-memory baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.methods.anchors import ICLExample, collate

__all__ = ["EAGER", "EagerState", "eager_information_flow", "eager_study"]

EAGER = "icl_eager"
_ATTR = "_fastattn_icl_eager_state"


@dataclass
class EagerState:
    """What :func:`eager_study` adds to eager attention (``None`` = nothing)."""

    probe: bool = False
    isolation: torch.Tensor | None = None  # [B, R] positions, -1 unused
    isolation_layers: frozenset[int] | None = None  # None = every layer
    window: int = 0
    anchor_positions: torch.Tensor | None = None  # [B, A]
    anchor_classes: torch.Tensor | None = None
    beta: torch.Tensor | None = None  # [L, H, C]
    probes: dict[int, torch.Tensor] = field(default_factory=dict)


def _attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    state: EagerState | None = module.__dict__.get(_ATTR)
    layer = getattr(module, "layer_idx", None)
    B, H, Tq, D = query.shape
    rep = H // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1)
    scale = D ** -0.5 if scaling is None else scaling
    s = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        s = s + attention_mask[:, :, :, : k.shape[2]]
    Tk = k.shape[2]
    if state is not None and state.isolation is not None and (
            state.isolation_layers is None or layer in state.isolation_layers):
        rows = state.isolation.to(s.device).expand(B, -1)
        q_pos = torch.arange(Tq, device=s.device) + (Tk - Tq)  # absolute position of each query row
        k_pos = torch.arange(Tk, device=s.device)
        cut = torch.zeros(B, Tq, Tk, dtype=torch.bool, device=s.device)
        for r in range(rows.shape[1]):
            p = rows[:, r, None, None]  # [B, 1, 1]
            hit = (p >= 0) & (q_pos[None, :, None] >= p) & (q_pos[None, :, None] <= p + state.window)
            cut |= hit & (k_pos[None, None, :] < p)
        s = s.masked_fill(cut[:, None], -1e4)
    P = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)  # float32, float64 stays
    if state is not None and state.beta is not None:
        pos = state.anchor_positions.to(s.device).expand(B, -1)
        cls = state.anchor_classes.to(s.device).expand(B, -1)
        weight = torch.exp(state.beta[layer].to(s.device)[:, cls].permute(1, 0, 2))  # [B, H, A]
        weight = torch.where(pos[:, None, :] >= 0, weight, torch.ones_like(weight))
        scale_row = torch.ones(B, H, Tk, device=s.device, dtype=P.dtype)
        scale_row = scale_row.scatter_reduce(2, pos.clamp(min=0)[:, None, :].expand(B, H, -1), weight, "prod")
        P = torch.cat([P[:, :, :-1], P[:, :, -1:] * scale_row[:, :, None]], dim=2)
    if state is not None and state.probe:
        probe = torch.ones_like(P, requires_grad=True)
        state.probes[layer] = probe
        P = P * probe
    out = torch.matmul(P.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), P


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER, _attention)
    AttentionMaskInterface.register(EAGER, eager_mask)
    _registered = True


@contextlib.contextmanager
def eager_study(model: torch.nn.Module, *, probe: bool = False, isolation: torch.Tensor | None = None,
                isolation_layers: Iterable[int] | None = None, window: int = 0,
                anchor_positions: torch.Tensor | None = None, anchor_classes: torch.Tensor | None = None,
                beta: torch.Tensor | None = None) -> Iterator[EagerState]:
    """Run ``model`` with ``"icl_eager"`` attention and the given additions inside the block; the previous
    attention implementation is restored on exit."""
    _register()
    state = EagerState(probe, isolation, None if isolation_layers is None else frozenset(isolation_layers), window,
                       anchor_positions, anchor_classes, beta)
    previous = model.config._attn_implementation
    modules = [m for m in model.modules() if hasattr(m, "layer_idx")]
    model.set_attn_implementation(EAGER)
    try:
        for m in modules:
            object.__setattr__(m, _ATTR, state)
        yield state
    finally:
        for m in modules:
            m.__dict__.pop(_ATTR, None)
        model.set_attn_implementation(previous)


def eager_information_flow(model: torch.nn.Module, examples: Sequence[ICLExample],
                           label_token_ids: Sequence[int] | torch.Tensor, *, progress: bool = False) -> torch.Tensor:
    """float64 ``[N, L, 3]`` raw ``(S_wp, S_pq, S_ww)`` by the paper's probe method, one prompt at a time."""
    from fastattn_icl.methods._model import frozen_weights
    from fastattn_icl.reference.saliency import flow_scores

    device = next(model.parameters()).device
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=device)
    L = model.config.num_hidden_layers
    out = []
    with frozen_weights(model):
        for e in tqdm(examples, desc="information flow (eager probe)", disable=not progress):
            batch = collate([e])
            with eager_study(model, probe=True) as state:
                logits = model(input_ids=batch["input_ids"].to(device), use_cache=False,
                               logits_to_keep=1).logits[:, -1, ids]
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"].to(device))
                grads = torch.autograd.grad(loss, [state.probes[layer] for layer in range(L)])
            T = batch["input_ids"].shape[1]
            rows = []
            for g in grads:
                I = g.double().sum(1).abs().cpu()  # noqa: E741 - heads summed before the absolute value (docs/methods.md §4)
                rows.append(torch.stack(flow_scores(I[0], e.anchor_positions, T - 1)))
            out.append(torch.stack(rows))
    return torch.stack(out)
