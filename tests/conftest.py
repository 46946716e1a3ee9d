"""Test-session setup.

Without a GPU, Triton kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set
before ``triton`` decorates any kernel, so it is set here, before any test imports the package.

Under pytest-xdist each worker gets its share of the cores for torch's intra-op threads (2 workers on 2 cores: 1
thread each): the default, every core per worker, oversubscribes the machine and spins OpenMP threads against the
other workers (measured: tests/integrations + tests/methods 136 s -> 109 s on 2 cores). The compiled CPU kernels'
own tests run on 2 threads whatever the share (tests/csrc/conftest.py), so ``at::parallel_for`` still splits work.
"""

import os

import pytest


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _share_cores_between_workers() -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


_share_cores_between_workers()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (gpu marker)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
