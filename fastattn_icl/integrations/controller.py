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

Setting state validates it at once: the values that apply to each layer become one typed
:class:`~fastattn_icl.integrations.method_state.LayerMethods` (see that module), which the seam reads in every
call through :meth:`ICLController.methods`. Bad state raises when it is set, and leaves the previous state.
Each value passed to :meth:`ICLController.set` / :meth:`ICLController.override` is checked and captured once
(see :mod:`~fastattn_icl.integrations.method_state`), however many layers it applies to; a value set earlier keeps
the capture it got then. ``anchors`` and ``beta`` may be set in two steps: a forward raises while only one is set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fastattn_icl.integrations.method_state import (
    AnchorState,
    AttentionRowProbe,
    IsolationState,
    LayerMethods,
    SharedPrefixState,
    layer_methods,
)

__all__ = [
    "CONTROLLER_ATTR",
    "AnchorState",
    "AttentionRowProbe",
    "ICLController",
    "IsolationState",
    "SharedPrefixState",
    "find_controller",
    "get_controller",
]

CONTROLLER_ATTR = "_fastattn_icl_controller"


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
        self._methods_all = layer_methods({}, None, num_layers)
        self._methods: dict[int, LayerMethods] = {}
        # (name, id(value)) -> (value, validated value) of the values set now
        self._checked: dict[tuple[str, int], tuple[Any, Any]] = {}

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
        name. Prefer :meth:`override`, which restores the previous state.

        Raises the typed error of the first bad value (see :mod:`~fastattn_icl.integrations.method_state`), and
        then leaves the state as it was."""
        saved = self._snapshot()
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
        # the values passed now are checked (and captured) again; the others keep their earlier check
        fresh = {(name, id(value)) for name, value in state.items()}
        try:
            self._validate({k: v for k, v in self._checked.items() if k not in fresh})
        except Exception:
            self._restore(saved)
            raise

    def _validate(self, checked: dict[tuple[str, int], tuple[Any, Any]]) -> None:
        """Build every layer's :class:`LayerMethods` from the named state; each value not in ``checked`` is checked
        here, once for all the layers it applies to."""
        methods_all = layer_methods(self._all_layers, None, self.num_layers, checked)
        methods = {
            i: layer_methods({**self._all_layers, **s}, i, self.num_layers, checked) for i, s in self._per_layer.items()
        }
        values = {(name, id(v)) for s in (self._all_layers, *self._per_layer.values()) for name, v in s.items()}
        self._checked = {k: v for k, v in checked.items() if k in values}
        self._methods_all, self._methods = methods_all, methods

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
        self._restore(({}, {}, layer_methods({}, None, self.num_layers), {}, {}))

    def methods(self, layer_idx: int | None) -> LayerMethods:
        """The validated method state of layer ``layer_idx`` (``None``: a module without a layer index, which sees
        the all-layer state only)."""
        return self._methods.get(layer_idx, self._methods_all) if layer_idx is not None else self._methods_all

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

    def _snapshot(self) -> tuple:
        """The named state and the validated state built from it (restored together: no second validation)."""
        per_layer = {i: dict(s) for i, s in self._per_layer.items()}
        return dict(self._all_layers), per_layer, self._methods_all, dict(self._methods), dict(self._checked)

    def _restore(self, saved: tuple) -> None:
        self._all_layers, self._per_layer, self._methods_all, self._methods, self._checked = saved


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
