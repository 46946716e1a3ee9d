"""Fixtures of the op tests."""

from __future__ import annotations

import contextlib

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """A context manager under which ``torch.empty`` and ``torch.empty_like`` return floating tensors filled with NaN.

    The launchers allocate their outputs with these, so an output element a kernel never writes stays NaN and fails
    the test; integer tensors are returned as allocated. Only the code inside the ``with`` block is affected.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @contextlib.contextmanager
    def poisoning():
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", lambda *args, **kwargs: poisoned(empty(*args, **kwargs)))
            patch.setattr(torch, "empty_like", lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs)))
            yield

    return poisoning
