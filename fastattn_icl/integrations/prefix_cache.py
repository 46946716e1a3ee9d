"""A Hugging Face cache whose layers hold only each row's own keys, after a prefix the whole batch shares.

:class:`SharedPrefixCache` is a ``DynamicCache`` whose layers store the keys and values of the tokens that
follow a shared prefix of ``M`` positions (the test inputs and what is decoded after them) and report
``M`` more in their length. transformers therefore counts the prefix in the query positions and in the
attention mask (``[B, M + own]``), while the prefix itself lives once, in the controller state
:class:`~fastattn_icl.integrations.controller.SharedPrefixState`, and the ``"fastattn_icl"`` seam reads it
in place with :func:`fastattn_icl.shared_prefix_attention` (batch stride 0: never ``B`` copies).

It only works through the seam, with that state set: any other attention implementation would see the
row's own keys alone, so :meth:`SharedPrefixCache.update` refuses to run unless the cache is
:meth:`~SharedPrefixCache.bound` (the compression workflow binds it around its forwards).

Hugging Face ``generate`` is not supported: it derives the test tokens' positions from the cache length
(``M`` plus the own tokens), while a compressed prefix continues at its own offset (the last kept original
position + 1); use :meth:`fastattn_icl.methods.CompressedDemonstrations.generate`, which passes explicit
``position_ids``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = ["SharedPrefixCache"]


class _SuffixLayer(DynamicLayer):
    """A ``DynamicLayer`` holding the keys after a shared prefix of ``prefix_length`` positions."""

    def __init__(self, prefix_length: int, owner: SharedPrefixCache):
        super().__init__()
        self.prefix_length = prefix_length
        self._owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self._owner.is_bound:
            raise RuntimeError(
                "a SharedPrefixCache holds only the keys after its shared prefix: it must be used inside "
                "`with cache.bound(model):` (which routes attention through the fastattn_icl seam and hands it the "
                "prefix), e.g. through CompressedDemonstrations.forward / .generate"
            )
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()


class SharedPrefixCache(DynamicCache):
    """A ``DynamicCache`` of ``num_layers`` layers after a shared prefix of ``prefix_length`` positions.

    Args:
        prefix_length: ``M``, the prefix's length (the controller state's ``keys.shape[3]``).
        num_layers: the model's decoder layers.
    """

    def __init__(self, prefix_length: int, num_layers: int):
        if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 1:
            raise ValueError(f"prefix_length must be a positive int, got {prefix_length!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        Cache.__init__(self, layers=[_SuffixLayer(prefix_length, self) for _ in range(num_layers)])
        self.prefix_length = prefix_length
        self._bound = 0

    @property
    def is_bound(self) -> bool:
        return self._bound > 0

    @contextlib.contextmanager
    def bound(
        self, model: torch.nn.Module, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, *, check_mask: bool = True
    ) -> Iterator[None]:
        """Route ``model``'s attention through the seam and give every layer its shared prefix
        ``prefix_keys[l]``/``prefix_values[l]`` (``[L, 1, Hkv, M, D]``) for the duration of the block.
        ``check_mask=False`` skips the check, once per forward, that the mask keeps the prefix (see
        :class:`~fastattn_icl.integrations.controller.SharedPrefixState`)."""
        from fastattn_icl.integrations import routed
        from fastattn_icl.integrations.controller import SharedPrefixState

        L, M = len(self.layers), self.prefix_length
        if prefix_keys.dim() != 5 or prefix_keys.shape[0] != L or prefix_keys.shape[3] != M:
            raise ValueError(
                f"prefix keys must be [L={L}, 1, Hkv, M={M}, D], "
                f"got {tuple(prefix_keys.shape)}"
            )
        state = SharedPrefixState(prefix_keys, prefix_values, check_mask=check_mask)
        with routed(model) as controller, controller.override(shared_prefix=state):
            self._bound += 1
            try:
                yield
            finally:
                self._bound -= 1
