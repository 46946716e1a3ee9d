"""The compiled CPU kernels run on (at least) 2 intra-op threads here, whatever share of the cores the session gives a
test worker (tests/conftest.py), so ``at::parallel_for`` splits their work and a race between tasks shows."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _several_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)
