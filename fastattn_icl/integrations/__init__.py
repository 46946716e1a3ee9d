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
from collections.abc import Iterator

import torch

from fastattn_icl.integrations.controller import AnchorState, ICLController, IsolationState, get_controller
from fastattn_icl.integrations.transformers import ATTN_IMPLEMENTATION, install_import_hook, register

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AnchorState",
    "ICLController",
    "IsolationState",
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


def enable(model: torch.nn.Module) -> str | None:
    """Switch ``model`` to ``attn_implementation="fastattn_icl"`` and attach its controller.

    Returns:
        the previous implementation name, to hand to :func:`disable`.

    Raises:
        RuntimeError: if the model does not let its attention implementation be changed (a model that
            does not route attention through transformers' ``AttentionInterface``).
    """
    previous = _implementation(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(
            f"{type(model).__name__} kept attn_implementation={model.config._attn_implementation!r}: it does not "
            "route attention through transformers' AttentionInterface, so fastattn_icl cannot be enabled on it"
        )
    get_controller(model)
    return previous


def disable(model: torch.nn.Module, previous: str | None) -> None:
    """Switch ``model`` back to the implementation :func:`enable` returned (``None``: transformers'
    default choice). The controller stays attached, with its state."""
    _implementation(model)
    model.set_attn_implementation(previous)


@contextlib.contextmanager
def enabled(model: torch.nn.Module) -> Iterator[ICLController]:
    """Run the block with ``attn_implementation="fastattn_icl"``; the previous implementation is restored
    on exit, also when the block raises. Yields the model's :class:`ICLController`."""
    previous = enable(model)
    try:
        yield get_controller(model)
    finally:
        disable(model, previous)


@contextlib.contextmanager
def routed(model: torch.nn.Module) -> Iterator[ICLController]:
    """Like :func:`enabled`, but leaves a model that already runs ``"fastattn_icl"`` untouched (the method
    workflows use it so they work on models loaded with ``attn_implementation="fastattn_icl"`` as well as
    on eager/sdpa ones)."""
    if _implementation(model) == ATTN_IMPLEMENTATION:
        yield get_controller(model)
        return
    with enabled(model) as controller:
        yield controller


install_import_hook()
