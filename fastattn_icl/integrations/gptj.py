"""GPT-J through the attention seam, on both shapes of transformers' GPT-J.

**Routed GPT-J** (transformers 5.24 and newer): ``GPTJAttention.forward`` calls the attention function
that ``config._attn_implementation`` names (``ALL_ATTENTION_FUNCTIONS``) and has no ``_attn``. GPT-J then
is a routed family like Llama: ``attn_implementation="fastattn_icl"`` and
:func:`fastattn_icl.integrations.enable` use the seam directly, with no patch. :func:`patch_gptj` still
works there: its handle switches the model with ``model.set_attn_implementation("fastattn_icl")`` and its
``revert()`` switches back to the previous implementation (so code written for either shape runs on both).

**Eager-core GPT-J** (transformers up to 5.23, e.g. 5.17): transformers' GPT-J does not route attention
through ``AttentionInterface``: ``GPTJAttention.forward`` projects, applies its rotary embedding, updates
the cache and then calls its own eager core ``self._attn(query, key, value, attention_mask)``.
:func:`patch_gptj` replaces that core, per instance, with a call to
:func:`fastattn_icl.integrations.transformers.fastattn_icl_attention_forward`, so GPT-J gets the fused
kernel and the per-layer method state of the model's controller exactly like the routed families:

- layout: ``_attn`` receives ``query [B, H, Tq, D]`` and ``key``/``value [B, H, Tk, D]`` (after the
  cache update) and must return ``[B, H, Tq, D]``; the seam returns ``[B, Tq, H, D]`` contiguous, which
  is handed back as a transposed view (GPT-J's ``_merge_heads`` permutes it back without a copy).
- scale: GPT-J divides the logits by ``module.scale_attn = sqrt(head_dim)``; the seam gets
  ``scaling=1 / scale_attn`` (read at every call).
- precision: GPT-J upcasts ``q`` and ``k`` to float32 before ``q kᵀ`` so that half-precision products
  cannot overflow, and takes the softmax in float32. ``q``, ``k`` and ``v`` are passed to the seam in
  the model's dtype (float16 / bfloat16 / float32), not upcast: the kernels accumulate ``q kᵀ`` and the
  softmax statistics in float32 (upcasting half-precision inputs is exact, so nothing is lost), and
  ``P·V`` is accumulated in float32 as well.
- masks: for the duration of each forward of every ``GPTJModel`` in the model, the config's
  ``_attn_implementation`` is switched to ``"fastattn_icl"`` (a forward pre-hook, restored by an
  ``always_call`` forward hook, also when the forward raises), so transformers' ``create_causal_mask``
  goes through :func:`~fastattn_icl.integrations.transformers.fastattn_icl_mask` and the attention
  core receives ``None`` or a bool key-padding mask ``[B, n]`` (True = keep), never an O(T²) mask. That
  mask function rejects every pattern that is not causal + key padding (packed sequences, custom mask
  functions). A 4D mask that reaches the core anyway (a custom 4D ``attention_mask``, or ``generate``
  with a static / compileable cache, which builds the mask before the forward) raises
  ``NotImplementedError``: it is never converted. Caveat: a config object shared with another model
  (two models built from one config instance) names ``"fastattn_icl"`` for that other model too while
  this model's forward runs, which matters only if both run at the same time (threads, nesting).
- ``output_attentions=True`` returns real weights ``[B, H, Tq, Tk]`` from the seam (a forward pre-hook
  on each attention module reads the flag, which GPT-J does not pass to ``_attn``); without it the
  weights are ``None`` (eager GPT-J always computes them). Query rows that see no key (left padding)
  get all-zero weights and a zero output, where eager spreads them uniformly over the keys.
- attention dropout (``attn_pdrop > 0`` in training) raises, as in the seam. GPT-J in these
  transformers versions has no ``head_mask``.

``module.layer_idx`` (which selects the method state) is set by GPT-J itself; a module whose index is
``None`` gets its position in ``GPTJModel.h`` while patched, and ``None`` back on revert.

Which shape is installed is decided by feature detection (:func:`routes_attention_interface`: the class has
no ``_attn`` and its ``forward`` reads ``ALL_ATTENTION_FUNCTIONS``), never by comparing version strings.

Patching a model twice raises ``RuntimeError`` (revert the first handle); ``revert()`` is idempotent.
A ``copy.deepcopy`` of a patched model is patched too (the bound methods and hooks follow the copy) but
has no handle to revert it: copy before patching.
The patch never touches the class ``GPTJAttention``, so other models are unaffected. It does not attach
the controller: use :func:`fastattn_icl.integrations.get_controller` (before or after patching) to set
method state.

Typical use::

    with patch_gptj(model):
        with get_controller(model).override(...):
            out = model(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import types
from typing import Any

import torch

from fastattn_icl.integrations import transformers as seam
from fastattn_icl.ops._validate import check_head_dim

__all__ = ["GPTJPatch", "patch_gptj", "routes_attention_interface"]

# set by the attention pre-hook for the duration of one forward: GPT-J passes output_attentions to forward,
# not to _attn
_OUTPUT_ATTENTIONS_ATTR = "_fastattn_icl_output_attentions"
# GPTJAttention.forward(hidden_states, layer_past, attention_mask, position_ids, use_cache, output_attentions)
_OUTPUT_ATTENTIONS_POSITION = 5


def routes_attention_class(attention_class: type) -> bool:
    """True when ``attention_class.forward`` calls the attention interface instead of an eager ``_attn``."""
    forward = getattr(attention_class, "forward", None)
    names = getattr(getattr(forward, "__code__", None), "co_names", ())
    return not hasattr(attention_class, "_attn") and "ALL_ATTENTION_FUNCTIONS" in names


def routes_attention_interface() -> bool:
    """Whether the installed transformers routes GPT-J's attention through ``ALL_ATTENTION_FUNCTIONS``
    (transformers 5.24 and newer; then GPT-J needs no patch), detected on ``GPTJAttention`` itself."""
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    return routes_attention_class(GPTJAttention)


def _fastattn_icl_attn(
    self: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replacement of ``GPTJAttention._attn``, bound to one module instance.

    Args:
        query: ``[B, H, Tq, D]`` (rotary applied); key, value: ``[B, H, Tk, D]``, cache included.
        attention_mask: ``None`` or the bool key-padding mask ``[B, n <= Tk]`` (True = keep) made by the
            ``"fastattn_icl"`` mask interface.

    Returns:
        ``(out [B, H, Tq, D], weights [B, H, Tq, Tk] or None)``, as GPT-J's ``_attn``.
    """
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool
    ):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise NotImplementedError(
            f"fastattn_icl (patched GPT-J): the attention core takes None or a bool key-padding mask [B, Tk] "
            f"built by the 'fastattn_icl' mask interface, got {shape} "
            f"({getattr(attention_mask, 'dtype', '')}). A 4D attention mask is not supported: pass a 2D padding "
            "mask [B, T], and use a DynamicCache (generate() with a static/compileable cache builds a 4D mask "
            "before the forward); or revert the patch for this input"
        )
    kwargs: dict[str, Any] = {}
    if self.__dict__.get(_OUTPUT_ATTENTIONS_ATTR):
        kwargs["output_attentions"] = True
    # q, k, v stay in the model dtype: the kernels accumulate q kᵀ, the softmax and P·V in float32, which
    # is what GPT-J's float32 upcast of q and k (an exact conversion) buys the eager path
    out, weights = seam.fastattn_icl_attention_forward(
        self,
        query,
        key,
        value,
        attention_mask,
        scaling=1.0 / float(self.scale_attn),
        dropout=self.attn_dropout.p,
        **kwargs,
    )
    return out.transpose(1, 2), weights  # [B, Tq, H, D] -> [B, H, Tq, D]


def _record_output_attentions(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    flag = kwargs.get("output_attentions")
    if flag is None and len(args) > _OUTPUT_ATTENTIONS_POSITION:
        flag = args[_OUTPUT_ATTENTIONS_POSITION]
    module.__dict__[_OUTPUT_ATTENTIONS_ATTR] = bool(flag)


def _forget_output_attentions(module: torch.nn.Module, args: tuple, output: Any) -> None:
    module.__dict__.pop(_OUTPUT_ATTENTIONS_ATTR, None)


class _MaskSwitch:
    """Forward hooks of one ``GPTJModel``: its config names ``"fastattn_icl"`` only during its forward."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, Any]] = []  # (config, its previous implementation), one per active forward

    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        config = module.config
        self.saved.append((config, config._attn_implementation))
        config._attn_implementation = seam.ATTN_IMPLEMENTATION

    def exit(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if self.saved:
            config, previous = self.saved.pop()
            config._attn_implementation = previous

    def reset(self) -> None:
        while self.saved:
            config, previous = self.saved.pop()
            config._attn_implementation = previous


class GPTJPatch:
    """Handle of one :func:`patch_gptj` call; also a context manager that reverts on exit (also when the
    block raises).

    Attributes:
        model: the patched model.
        modules: the patched ``GPTJAttention`` instances, in ``model.modules()`` order.
        routed: True on a routed GPT-J (transformers 5.24+): the handle switched the model's attention
            implementation to ``"fastattn_icl"`` and ``revert()`` switches it back; no module is touched.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: list[torch.nn.Module],
        gptj_models: list[torch.nn.Module],
        routed: bool = False,
    ):
        self.model = model
        self.modules = tuple(modules)
        self.routed = routed
        self._previous: str | None = None  # routed: the implementation before the switch
        self._gptj_models = tuple(gptj_models)
        self._hooks: list[Any] = []
        self._switches: list[_MaskSwitch] = []
        self._layer_idx: list[tuple[torch.nn.Module, int]] = []  # modules whose None index was filled in
        self.active = False

    def _apply(self) -> None:
        self.active = True
        try:
            self._install()
        except BaseException:
            self.revert()
            raise

    def _install(self) -> None:
        if self.routed:
            self._previous = self.model.config._attn_implementation
            self.model.set_attn_implementation(seam.ATTN_IMPLEMENTATION)
            return
        for gptj_model in self._gptj_models:
            for index, block in enumerate(gptj_model.h):
                attn = block.attn
                if attn in self.modules and attn.layer_idx is None:
                    attn.layer_idx = index
                    self._layer_idx.append((attn, index))
            switch = _MaskSwitch()
            self._switches.append(switch)
            self._hooks.append(gptj_model.register_forward_pre_hook(switch.enter, with_kwargs=True, prepend=True))
            self._hooks.append(gptj_model.register_forward_hook(switch.exit, always_call=True))
        for module in self.modules:
            self._hooks.append(module.register_forward_pre_hook(_record_output_attentions, with_kwargs=True))
            self._hooks.append(module.register_forward_hook(_forget_output_attentions, always_call=True))
            module.__dict__["_attn"] = types.MethodType(_fastattn_icl_attn, module)

    def revert(self) -> None:
        """Restore every patched module exactly: the class's ``_attn`` is visible again, the hooks and the
        patch's attributes are gone, ``layer_idx`` values filled in by the patch are ``None`` again. A
        second call does nothing."""
        if not self.active:
            return
        if self.routed:
            if self.model.config._attn_implementation == seam.ATTN_IMPLEMENTATION:
                self.model.set_attn_implementation(self._previous)
            self.active = False
            return
        for module in self.modules:
            module.__dict__.pop("_attn", None)
            module.__dict__.pop(_OUTPUT_ATTENTIONS_ATTR, None)
        for hook in reversed(self._hooks):
            hook.remove()
        for switch in self._switches:
            switch.reset()
        for module, _ in self._layer_idx:
            module.layer_idx = None
        self._hooks, self._switches, self._layer_idx = [], [], []
        self.active = False

    def __enter__(self) -> GPTJPatch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.revert()

    def __repr__(self) -> str:
        state = "active" if self.active else "reverted"
        how = "routed" if self.routed else "patched"
        return f"GPTJPatch({type(self.model).__name__}, {len(self.modules)} attention modules, {how}, {state})"


def is_patched(module: torch.nn.Module) -> bool:
    method = module.__dict__.get("_attn")
    return getattr(method, "__func__", None) is _fastattn_icl_attn


def patch_gptj(model: torch.nn.Module) -> GPTJPatch:
    """Route every ``GPTJAttention`` of ``model`` through the ``"fastattn_icl"`` attention seam.

    On a routed GPT-J (transformers 5.24+) this is ``model.set_attn_implementation("fastattn_icl")`` with a
    handle that switches back. Otherwise it is instance-level: only ``model``'s modules change, the classes
    do not. See the module docstring for what is mapped (layout, scale, dtype, masks,
    ``output_attentions``) and what is rejected.

    Args:
        model: a GPT-J model (``GPTJForCausalLM``, ``GPTJModel``, the classification / QA heads) or any
            module containing eager ``GPTJAttention`` modules. Attention modules outside a ``GPTJModel``
            are patched too, but then the caller must give them ``attention_mask=None`` or a bool
            ``[B, Tk]`` key-padding mask.

    Returns:
        a :class:`GPTJPatch`; call ``revert()`` or use it as a context manager.

    Raises:
        TypeError: ``model`` is not a module or contains no GPT-J attention; on a routed GPT-J also when
            ``model`` is not a transformers model (a block or a list of attention modules: pass the model,
            or load it with ``attn_implementation="fastattn_icl"``).
        NotImplementedError: a GPT-J attention module does not use the eager core (``flash_attention_2``,
            or a subclass that overrides ``forward``), or already has an instance-level ``_attn`` set by
            someone else.
        ValueError: the head dimension is not a multiple of 8 in [8, 256].
        RuntimeError: the model is already patched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_gptj expects a torch.nn.Module, got {type(model).__name__}")
    from transformers.models.gptj.modeling_gptj import GPTJAttention, GPTJModel

    seam.register()
    modules = [m for m in model.modules() if isinstance(m, GPTJAttention)]
    if not modules:
        raise TypeError(f"{type(model).__name__} contains no GPT-J attention modules (GPTJAttention)")
    if routes_attention_class(GPTJAttention):
        return _route(model, modules)
    for module in modules:
        if is_patched(module):
            raise RuntimeError(
                f"{type(model).__name__} is already patched for fastattn_icl (GPT-J); revert() the existing "
                "handle before patching again"
            )
        if type(module).forward is not GPTJAttention.forward:
            raise NotImplementedError(
                f"{type(module).__name__} does not call the eager attention core GPTJAttention._attn (load the "
                "model with attn_implementation='eager' to patch it)"
            )
        if "_attn" in module.__dict__:
            raise NotImplementedError(
                f"{type(module).__name__} already has an instance-level _attn (another patch?); remove it first"
            )
        check_head_dim(module.head_dim)
    gptj_models = [m for m in model.modules() if isinstance(m, GPTJModel)]
    patch = GPTJPatch(model, modules, gptj_models)
    patch._apply()
    return patch


def _route(model: torch.nn.Module, modules: list[torch.nn.Module]) -> GPTJPatch:
    """:func:`patch_gptj` on a routed GPT-J: switch the implementation, keep a handle that switches back."""
    if not hasattr(model, "set_attn_implementation") or getattr(model, "config", None) is None:
        raise TypeError(
            f"this transformers routes GPT-J attention through the attention interface, so fastattn_icl switches "
            f"the whole model (set_attn_implementation); {type(model).__name__} is not a transformers model: pass "
            "the model itself, call fastattn_icl.integrations.enable(model), or load it with "
            "attn_implementation='fastattn_icl'"
        )
    if model.config._attn_implementation == seam.ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"{type(model).__name__} is already patched for fastattn_icl (GPT-J): it runs "
            "attn_implementation='fastattn_icl'; revert() the existing handle, or switch it back with "
            "set_attn_implementation, before patching again"
        )
    for module in modules:
        check_head_dim(module.head_dim)
    patch = GPTJPatch(model, modules, [], routed=True)
    patch._apply()
    return patch
