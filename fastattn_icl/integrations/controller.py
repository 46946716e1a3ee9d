"""Per-model method state for the attention seam: one :class:`ICLController` per model.

The research methods (anchor re-weighting β, anchor positions, momentum η, isolation rows, saliency
buffers, a shared compressed-demonstration prefix) change what the ``"fastattn_icl"`` attention computes
in some layers. Their state lives in one controller object per model instead of in module attributes or
globals, so that

- it never enters ``state_dict()`` / ``save_pretrained`` (it is a plain attribute, not a Module,
  Parameter or buffer),
- every attention call finds it in O(1) through its module (``module.layer_idx`` picks the layer),
- it is changed through context managers that put the previous state back on exit, also when the
  block raises.

State is a set of named values. A value set without ``layers`` applies to every layer; a value set
with ``layers=[...]`` applies to those layers only and wins over the all-layer value there. Setting
a name to ``None`` removes it (the neutral setting). An empty controller means plain attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

CONTROLLER_ATTR = "_fastattn_icl_controller"


@dataclass(frozen=True)
class AnchorState:
    """Controller state ``anchors`` (SPEC §2): where the label words are and which rows are re-weighted.

    Used together with the state ``beta``: a floating tensor indexed by layer first, ``[L, H, C]`` (or
    ``[L, B, H, C]``); layer ``l`` uses ``beta[l]``.

    Attributes:
        positions: integer ``[B, A]`` absolute key positions of the label words (with left padding or a
            KV cache: the index into the layer's key sequence), ``-1`` = unused slot. ``B = 1`` is
            broadcast over the batch. Positions not yet in the key sequence (a chunk before them) are
            ignored for that chunk.
        classes: integer ``[B, A]`` class of each anchor, in ``[0, C)``.
        reweight_from: which query rows are re-weighted. ``None``: the last query row of every attention
            call (the paper's setting for a prompt; in cached decoding, each new single-token step).
            An int or an integer tensor ``[B]``: an absolute position; every query at that position or
            later is re-weighted, so a chunk whose queries all come before it is not re-weighted and a
            chunk that starts after it is re-weighted from its first row.
    """

    positions: torch.Tensor
    classes: torch.Tensor
    reweight_from: int | torch.Tensor | None = None


@dataclass(frozen=True)
class IsolationState:
    """Controller state ``isolation`` (SPEC §3): cut the information flow into some positions.

    Attributes:
        rows: integer ``[B, R]`` absolute key positions ``p`` (``-1`` = unused; ``B = 1`` broadcasts):
            queries at positions ``p .. p + window`` get their logits towards keys ``0 .. p - 1``
            overwritten with ``-1e4``.
        window: int >= 0.
    """

    rows: torch.Tensor
    window: int = 0


@dataclass(frozen=True)
class SharedPrefixState:
    """Controller state ``shared_prefix`` (SPEC §5 serving): every layer's keys start with a prefix that the
    whole batch shares, held once and read in place by the kernel (never copied per row).

    Used with :class:`~fastattn_icl.integrations.prefix_cache.SharedPrefixCache`, whose layers hold only each
    row's own keys (the test inputs and the tokens decoded after them) and report the prefix in their length,
    so the key-padding mask and the query positions count it.

    Attributes:
        keys, values: ``[L, 1, Hkv, M, D]`` (or ``[L, B, Hkv, M, D]``): layer ``l`` reads ``keys[l]``; post-RoPE
            keys, in the model's dtype and on its device.
        check_mask: the seam checks in every layer that the attention mask keeps every prefix column (one
            device-to-host sync per layer and step); a caller that builds the mask itself as
            ``[ones(M), own mask]`` (the compression workflow) passes ``False``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    check_mask: bool = True

    @property
    def length(self) -> int:
        return self.keys.shape[3]


@dataclass
class AttentionRowProbe:
    """Controller state ``attention_row``: record the post-softmax attention of each prompt's last query row
    (the target position) on a few key positions, in every layer it applies to.

    The row is formed from the fused forward's log-sum-exp: ``P[q, p] = exp(scale · q · k_p − lse_q)`` for the
    asked positions only, so no ``[T, T]`` map (nor a full row) is ever stored. Plain attention only: the seam
    refuses it together with other method state.

    Attributes:
        positions: integer ``[B, A]`` absolute key positions (``-1`` = unused; ``B = 1`` broadcasts).
        results: filled by the forward, ``{layer_idx: float32 [B, H, A]}`` (0 at unused slots), detached.
    """

    positions: torch.Tensor
    results: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, layer_idx: int | None, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
               scale: float) -> None:
        """Record layer ``layer_idx`` from ``query [B, H, Tq, D]``, ``key [B, Hkv, Tk, D]`` and the fused
        forward's ``lse [B, H, Tq]``."""
        if layer_idx is None:
            raise ValueError("attention_row needs attention modules with a layer_idx")
        B, H, _, D = query.shape
        Hkv, Tk = key.shape[1], key.shape[2]
        pos = self.positions.to(query.device).long()
        if pos.dim() != 2 or pos.shape[0] not in (1, B):
            raise ValueError(f"attention_row positions must be [B={B} or 1, A], got {tuple(pos.shape)}")
        if bool((pos >= Tk).any()) or bool((pos < -1).any()):
            raise ValueError(f"attention_row positions must be key positions in [0, {Tk}) or -1, got {pos.tolist()}")
        pos = pos.expand(B, -1)
        with torch.no_grad():
            idx = pos.clamp(min=0)[:, None, :, None].expand(B, Hkv, pos.shape[1], D)
            keys = key.detach().gather(2, idx).float()  # [B, Hkv, A, D]
            q = query.detach()[:, :, -1].float().reshape(B, Hkv, H // Hkv, D)
            logits = torch.einsum("bgrd,bgad->bgra", q, keys).reshape(B, H, -1) * scale
            p = torch.exp(logits - lse.detach()[:, :, -1, None].float())
            self.results[layer_idx] = torch.where(pos[:, None, :] >= 0, p, torch.zeros_like(p))


class ICLController:
    """Method state of one model, global or per layer.

    Args:
        num_layers: number of decoder layers, used to check ``layers=`` arguments (``None``: only
            non-negativity is checked).
    """

    def __init__(self, num_layers: int | None = None):
        if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 0):
            raise ValueError(f"num_layers must be a non-negative int or None, got {num_layers!r}")
        self.num_layers = num_layers
        self._all_layers: dict[str, Any] = {}
        self._per_layer: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        layers = {i: sorted(s) for i, s in sorted(self._per_layer.items())}
        return f"ICLController(num_layers={self.num_layers}, all_layers={sorted(self._all_layers)}, layers={layers})"

    def _check_layers(self, layers: Iterable[int]) -> list[int]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be an iterable of layer indices, got {type(layers).__name__}")
        checked = []
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"layer indices must be ints, got {layer!r}")
            if layer < 0 or (self.num_layers is not None and layer >= self.num_layers):
                bound = "" if self.num_layers is None else f" and < num_layers={self.num_layers}"
                raise ValueError(f"layer index must be >= 0{bound}, got {layer}")
            checked.append(layer)
        return checked

    def set(self, *, layers: Iterable[int] | None = None, **state: Any) -> None:
        """Set named state for every layer (``layers=None``) or for the given layers; ``None`` removes a
        name. Prefer :meth:`override`, which restores the previous state."""
        targets = (
            [self._all_layers]
            if layers is None
            else [self._per_layer.setdefault(i, {}) for i in self._check_layers(layers)]
        )
        for target in targets:
            for name, value in state.items():
                if value is None:
                    target.pop(name, None)
                else:
                    target[name] = value
        self._per_layer = {i: s for i, s in self._per_layer.items() if s}

    @contextlib.contextmanager
    def override(self, *, layers: Iterable[int] | None = None, **state: Any) -> Iterator[ICLController]:
        """Set ``state`` (as :meth:`set`) for the duration of the block, then restore exactly the state
        that was there before, also when the block raises. Blocks nest."""
        saved = self._snapshot()
        try:
            self.set(layers=layers, **state)
            yield self
        finally:
            self._restore(saved)

    def clear(self) -> None:
        """Remove all state (plain attention everywhere)."""
        self._all_layers = {}
        self._per_layer = {}

    def layer_state(self, layer_idx: int | None) -> dict[str, Any]:
        """The state that applies to layer ``layer_idx``: all-layer values, overridden by that layer's
        own. ``layer_idx=None`` (a module without a layer index) sees the all-layer values only."""
        if not self._per_layer or layer_idx is None or layer_idx not in self._per_layer:
            return dict(self._all_layers)
        return {**self._all_layers, **self._per_layer[layer_idx]}

    def get(self, name: str, layer_idx: int | None = None, default: Any = None) -> Any:
        """One named value as seen by layer ``layer_idx``."""
        if layer_idx is not None and name in self._per_layer.get(layer_idx, ()):
            return self._per_layer[layer_idx][name]
        return self._all_layers.get(name, default)

    def is_empty(self) -> bool:
        """True when no state is set for any layer (plain attention everywhere)."""
        return not self._all_layers and not self._per_layer

    def is_neutral(self, layer_idx: int | None) -> bool:
        """True when no state applies to layer ``layer_idx`` (plain attention there)."""
        return not self._all_layers and (layer_idx is None or layer_idx not in self._per_layer)

    def _snapshot(self) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
        return dict(self._all_layers), {i: dict(s) for i, s in self._per_layer.items()}

    def _restore(self, saved: tuple[dict[str, Any], dict[int, dict[str, Any]]]) -> None:
        self._all_layers, self._per_layer = saved


def get_controller(model: torch.nn.Module) -> ICLController:
    """Return the model's :class:`ICLController`, creating and attaching it on first use.

    The controller is stored as a plain (non-Module) attribute on ``model`` and on every submodule that
    has a ``layer_idx`` attribute (the attention modules of the routed families), where the attention
    seam looks it up. It does not enter ``state_dict()``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    controller = model.__dict__.get(CONTROLLER_ATTR)
    if controller is None:
        config = getattr(model, "config", None)
        num_layers = getattr(config, "num_hidden_layers", None)
        controller = ICLController(num_layers if isinstance(num_layers, int) else None)
        object.__setattr__(model, CONTROLLER_ATTR, controller)
    for module in model.modules():
        if hasattr(module, "layer_idx") and module.__dict__.get(CONTROLLER_ATTR) is not controller:
            object.__setattr__(module, CONTROLLER_ATTR, controller)
    return controller


def find_controller(module: torch.nn.Module) -> ICLController | None:
    """The controller attached to an attention module, or ``None`` (plain attention)."""
    return module.__dict__.get(CONTROLLER_ATTR)
