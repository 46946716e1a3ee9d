"""Fixtures shared by the workflow tests: the plain-PyTorch backend (fast on CPU; the Triton kernels are
proven in tests/ops) and a prompt builder with one demonstration per class."""

import pytest

import fastattn_icl
from fastattn_icl.methods import PromptBuilder
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, dataset, word_tokenizer


@pytest.fixture(autouse=True)
def _torch_backend():
    with fastattn_icl.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def builder():
    return PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(2, seed=1))  # 1 demonstration per class
