"""Label and word loyalty, hand-checked."""

from __future__ import annotations

import pytest
import torch

from fastattn_icl.methods import label_loyalty, label_predictions, topk_jaccard, word_loyalty


def test_label_predictions_and_loyalty():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 1.0, 3.0, 9.0], [7.0, 0.0, 0.5, 0.2]])
    # label words are tokens 2 and 1 (class 0 = token 2, class 1 = token 1)
    assert label_predictions(logits, [2, 1]).tolist() == [1, 0, 0]
    assert label_predictions(logits[:, None], [2, 1]).tolist() == [1, 0, 0]  # [N, T, V]: last position
    assert label_loyalty(torch.tensor([1, 0, 0]), torch.tensor([1, 1, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        label_loyalty(torch.tensor([1, 0]), torch.tensor([1]))


def test_word_loyalty_is_topk_jaccard():
    a = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    b = torch.tensor([[9.0, 0.0, 7.0, 8.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # row 0: top-3 {0, 1, 2} vs {0, 3, 2}: |∩| = 2, |∪| = 4; row 1: identical
    assert topk_jaccard(a, b, k=3).tolist() == [0.5, 1.0]
    assert word_loyalty(a, b, k=3) == pytest.approx(0.75)
    # top-1: {0} vs {0}, {5} vs {5}
    assert word_loyalty(a, b, k=1) == 1.0
    assert word_loyalty(a, -a, k=2) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        word_loyalty(a, b, k=7)
    with pytest.raises(ValueError, match="shapes"):
        word_loyalty(a, b[:1])
    import inspect

    assert inspect.signature(word_loyalty).parameters["k"].default == 10
