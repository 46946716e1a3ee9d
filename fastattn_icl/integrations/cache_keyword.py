"""The name transformers gives the KV cache of a model call, in both generations of its API.

transformers 5.24 renamed the ``past_key_values`` keyword of model calls (and the field of model outputs)
to ``cache``; the old name still works there with a ``FutureWarning`` and is to be removed in 5.40.
Earlier releases (e.g. 5.17) know only ``past_key_values``. The name is read off the model's own
``forward`` signature (feature detection, not a version comparison).

Typical use::

    out = model(input_ids, use_cache=True, **cache_kwargs(cache, model))
    cache = output_cache(out)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

__all__ = ["cache_keyword", "cache_kwargs", "output_cache"]


@functools.cache
def _keyword_of(forward: Any) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no introspectable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: torch.nn.Module | None = None) -> str:
    """``"cache"`` if ``model.forward`` takes a ``cache`` argument (transformers 5.24+), else
    ``"past_key_values"``. Without a model: the name of the installed transformers' causal-LM outputs."""
    if model is None:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return _keyword_of(type(model).forward)


def cache_kwargs(cache: Any, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of ``model`` (see :func:`cache_keyword`)."""
    return {cache_keyword(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model call returned: ``outputs.cache`` where the output class has that field
    (transformers 5.24+), else ``outputs.past_key_values``; without a deprecation warning."""
    fields = getattr(type(outputs), "__dataclass_fields__", {})
    if "cache" in fields:
        return outputs.cache
    return outputs.past_key_values
