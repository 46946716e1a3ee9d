"""Test-session setup.

Without a GPU, Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before ``triton`` decorates any kernel, so it is set here, before any test imports the package.
"""

import os

import pytest


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
