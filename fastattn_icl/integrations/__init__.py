"""Hugging Face integration: the ``"fastattn_icl"`` attention implementation and per-model method state.

Importing this package (which ``import fastattn_icl`` does) registers ``"fastattn_icl"`` with
transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` as soon as transformers' modeling
code is imported, so ``AutoModelForCausalLM.from_config(cfg, attn_implementation="fastattn_icl")``
and ``model.set_attn_implementation("fastattn_icl")`` work. It imports neither transformers nor
Triton and does not touch CUDA. See :mod:`fastattn_icl.integrations.transformers` for what the seam
supports and what it rejects.

Typical use::

    with fastattn_icl.integrations.enabled(model) as controller:
        out = model(input_ids, attention_mask=attention_mask)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from fastattn_icl.integrations.controller import (
    AnchorState,
    AttentionRowProbe,
    ICLController,
    IsolationState,
    SharedPrefixState,
    get_controller,
)
from fastattn_icl.integrations.transformers import ATTN_IMPLEMENTATION, install_import_hook, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AnchorState",
    "AttentionRowProbe",
    "ICLController",
    "IsolationState",
    "SharedPrefixState",
    "disable",
    "enable",
    "enabled",
    "get_controller",
    "register",
    "routed",
]


def _implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with .config and .set_attn_implementation), "
            f"got {type(model).__name__}"
        )
    return config._attn_implementation


# the GPTJPatch that enable() made for a GPT-J model, kept on the model (a plain attribute, outside the
# state dict) so that disable() reverts exactly that patch
_GPTJ_PATCH_ATTR = "_fastattn_icl_gptj_patch"
# families without AttentionInterface routing that a patch routes through the seam (model_type -> how)
_PATCHED_FAMILIES = {"gptj": "fastattn_icl.integrations.gptj.patch_gptj"}


def _gptj_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``GPTJAttention`` modules of ``model`` that need the instance patch: none if transformers' GPT-J
    was never imported, or if it routes attention through the attention interface (transformers 5.24+;
    then GPT-J is switched like every routed family)."""
    modeling_gptj = sys.modules.get("transformers.models.gptj.modeling_gptj")
    if modeling_gptj is None:
        return []
    from fastattn_icl.integrations.gptj import routes_attention_class

    if routes_attention_class(modeling_gptj.GPTJAttention):
        return []
    return [m for m in model.modules() if isinstance(m, modeling_gptj.GPTJAttention)]


def _gptj_patched(modules: list[torch.nn.Module]) -> bool:
    from fastattn_icl.integrations.gptj import is_patched

    return any(is_patched(m) for m in modules)


def _current(model: torch.nn.Module) -> str | None:
    """The implementation ``model`` runs: ``"fastattn_icl"`` for a patched GPT-J, else its config's."""
    previous = _implementation(model)
    modules = _gptj_attention(model)
    if modules and _gptj_patched(modules):
        return ATTN_IMPLEMENTATION
    return previous


def _family(model: torch.nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None) or "unknown"
    return f"{type(model).__name__} (model_type {model_type!r})"


def enable(model: torch.nn.Module) -> str | None:
    """Route ``model``'s attention through the ``"fastattn_icl"`` seam and attach its controller.

    Families that route attention through transformers' ``AttentionInterface`` are switched with
    ``model.set_attn_implementation("fastattn_icl")``; so are GPT-J and CodeGen where transformers routes
    them (5.24 and newer). An eager-core GPT-J (older transformers, e.g. 5.17) gets
    :func:`fastattn_icl.integrations.gptj.patch_gptj`; the handle is kept on the model and reverted by
    :func:`disable`. A GPT-J that is already patched (by an earlier :func:`enable` or by a
    ``patch_gptj`` handle of the caller) is left as it is.

    Returns:
        the previous implementation name, to hand to :func:`disable` (``"fastattn_icl"`` when the model
        already ran through the seam, also for an already patched GPT-J).

    Raises:
        RuntimeError: the model neither routes attention through ``AttentionInterface`` nor belongs to a
            family with a patch (the message names the family); nothing is changed then.
        NotImplementedError, ValueError: from ``patch_gptj`` for a GPT-J it cannot patch (e.g. loaded
            with ``flash_attention_2``).
    """
    previous = _implementation(model)
    gptj = _gptj_attention(model)
    if gptj:
        if _gptj_patched(gptj):
            previous = ATTN_IMPLEMENTATION
        else:
            from fastattn_icl.integrations.gptj import patch_gptj

            object.__setattr__(model, _GPTJ_PATCH_ATTR, patch_gptj(model))
        get_controller(model)
        return previous
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        patched = ", ".join(f"{family!r} ({how})" for family, how in _PATCHED_FAMILIES.items())
        raise RuntimeError(
            f"fastattn_icl cannot be enabled on {_family(model)}: it kept "
            f"attn_implementation={model.config._attn_implementation!r} because this family does not route "
            f"attention through transformers' AttentionInterface, and fastattn_icl has no patch for it "
            f"(patched families: {patched})"
        )
    get_controller(model)
    return previous


def disable(model: torch.nn.Module, previous: str | None) -> None:
    """Switch ``model`` back to the implementation :func:`enable` returned (``None``: transformers'
    default choice). For GPT-J: revert the patch :func:`enable` made (exactly: the modules are as before),
    or leave the model patched when ``previous`` is ``"fastattn_icl"``. The controller stays attached,
    with its state.

    Raises:
        RuntimeError: a GPT-J patched by a ``patch_gptj`` handle that :func:`enable` did not make is to be
            switched back (revert that handle instead).
    """
    _implementation(model)
    gptj = _gptj_attention(model)
    if not gptj:
        model.set_attn_implementation(previous)
        return
    if previous == ATTN_IMPLEMENTATION:
        enable(model)  # stays (or becomes) patched
        return
    handle = model.__dict__.get(_GPTJ_PATCH_ATTR)
    if handle is not None:
        handle.revert()
        del model.__dict__[_GPTJ_PATCH_ATTR]
    elif _gptj_patched(gptj):
        raise RuntimeError(
            f"{_family(model)} was patched by a patch_gptj() handle that fastattn_icl.integrations.enable() did "
            "not make: revert that handle instead"
        )


@contextlib.contextmanager
def enabled(model: torch.nn.Module) -> Iterator[ICLController]:
    """Run the block with attention routed through ``"fastattn_icl"`` (see :func:`enable`; GPT-J is
    patched on entry and reverted on exit); the previous implementation is restored on exit, also when
    the block raises. Yields the model's :class:`ICLController`."""
    previous = enable(model)
    try:
        yield get_controller(model)
    finally:
        disable(model, previous)


@contextlib.contextmanager
def routed(model: torch.nn.Module) -> Iterator[ICLController]:
    """Like :func:`enabled`, but leaves a model that already runs ``"fastattn_icl"`` untouched (the method
    workflows use it so they work on models loaded with ``attn_implementation="fastattn_icl"`` or GPT-J
    models already patched, as well as on eager/sdpa ones, which are switched or patched for the block)."""
    if _current(model) == ATTN_IMPLEMENTATION:
        yield get_controller(model)
        return
    with enabled(model) as controller:
        yield controller


install_import_hook()
