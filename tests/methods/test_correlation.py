"""Deep-layer correlation: the target row's attention on the label words from the fused forward, and its AUC-ROC."""

from __future__ import annotations

import math

import pytest
import torch

from fastattn_icl.integrations import AttentionRowProbe, get_controller
from fastattn_icl.methods import PromptBuilder, collate
from fastattn_icl.methods.correlation import _correlation, auc_roc, deep_layer_correlation
from fastattn_icl.testing import check_close
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, dataset, word_tokenizer
from tests.models import tiny_model


def _brute_auc(scores, positive):
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def test_auc_roc_counts_pairs_and_ties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.randint(0, 5, (30,), generator=gen).double()  # many ties
        positive = torch.rand(30, generator=gen) > 0.4
        assert auc_roc(scores, positive) == pytest.approx(_brute_auc(scores.tolist(), positive.tolist()))
    assert auc_roc(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([False, False, True])) == 1.0
    assert auc_roc(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([False, False, True])) == 0.0
    assert math.isnan(auc_roc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])))
    with pytest.raises(ValueError, match="one shape"):
        auc_roc(torch.zeros(3), torch.zeros(2, dtype=torch.bool))


def _paper_auc(attention, pred):
    """The paper's deep_analysis notebook, re-derived with pair counts: predicted classes only; 2 classes: AUC of the
    second class's raw attention; more: shares over the classes, one-vs-one macro average (sklearn's 'ovo')."""
    N, C = attention.shape
    classes = [c for c in range(C) if (pred == c).any()]
    att = attention[:, classes].tolist()
    p = pred.tolist()
    if len(classes) == 2:
        return _brute_auc([row[1] for row in att], [y == classes[1] for y in p])
    shares = [[v / sum(row) for v in row] for row in att]
    total = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            rows = [i for i in range(N) if p[i] in (classes[a], classes[b])]
            ab = _brute_auc([shares[i][a] for i in rows], [p[i] == classes[a] for i in rows])
            ba = _brute_auc([shares[i][b] for i in rows], [p[i] == classes[b] for i in rows])
            total.append((ab + ba) / 2)
    return sum(total) / len(total)


@pytest.mark.parametrize("C, predicted", [(2, 2), (3, 3), (4, 3), (4, 2)])
def test_layer_auc_is_the_papers(C, predicted):
    gen = torch.Generator().manual_seed(C * 10 + predicted)
    attention = torch.rand(40, 2, C, generator=gen).double()
    pred = torch.randint(0, predicted, (40,), generator=gen)
    auc, _ = _correlation(attention, pred)
    for layer in range(2):
        assert float(auc[layer]) == pytest.approx(_paper_auc(attention[:, layer], pred))
    one_class = _correlation(attention, torch.zeros(40, dtype=torch.long))[0]
    assert bool(one_class.isnan().all())  # nothing to separate


def test_binary_auc_uses_raw_attention_not_shares():
    # raw attention on class 1 ranks prompt 2 (pred 1) above prompt 1 (pred 0); its share ranks it below
    attention = torch.tensor([[[0.1, 0.2]], [[0.01, 0.3]], [[0.9, 0.4]]]).double()  # [N=3, L=1, C=2]
    pred = torch.tensor([0, 0, 1])
    auc, _ = _correlation(attention, pred)
    assert float(auc[0]) == 1.0  # raw: 0.4 > 0.3 > 0.2; shares would give 0.31 < 0.67, 0.97: AUC 0.0


@pytest.fixture(scope="module")
def examples():
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(4, seed=1))
    return [builder.example(x, y) for x, y in dataset(6, seed=2)], builder.label_token_ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_probe_equals_eager_attention_weights_on_a_padded_batch(family, examples):
    exs, _ = examples
    model = tiny_model(family, attn_implementation="fastattn_icl", layers=2)
    model64 = tiny_model(family, attn_implementation="eager", layers=2).double()
    eager32 = tiny_model(family, attn_implementation="eager", layers=2)
    batch = collate(exs[:3] + [PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(2, seed=3))
                                .example("the film was very dull", 0)])
    assert (batch["attention_mask"] == 0).any()
    probe = AttentionRowProbe(batch["anchor_positions"])
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": batch["position_ids"], "use_cache": False}
    with torch.no_grad(), get_controller(model).override(attention_row=probe):
        model(**kwargs)
    with torch.no_grad():
        ref32 = eager32(**kwargs, output_attentions=True).attentions
        ref64 = model64(**kwargs, output_attentions=True).attentions
    pos = batch["anchor_positions"]
    used = pos >= 0
    for layer in range(2):
        index = pos.clamp(min=0)[:, None, :].expand(-1, ref32[layer].shape[1], -1)
        r32 = ref32[layer][:, :, -1].gather(2, index) * used[:, None]
        r64 = ref64[layer][:, :, -1].gather(2, index) * used[:, None]
        check_close(f"{family} layer {layer}", probe.results[layer], r32, r64)


def test_deep_layer_correlation_shapes_predictions_and_errors(examples):
    exs, label_ids = examples
    model = tiny_model("llama", attn_implementation="eager", layers=3)
    result = deep_layer_correlation(model, exs, label_ids, batch_size=4, progress=False)
    assert result.attention.shape == (6, 3, 2) and result.auc.shape == result.R.shape == (3,)
    assert bool((result.attention > 0).all()) and bool((result.attention <= 1).all())
    with torch.no_grad():
        logits = model(collate(exs)["input_ids"], attention_mask=collate(exs)["attention_mask"],
                       position_ids=collate(exs)["position_ids"]).logits[:, -1]
    assert result.predictions.tolist() == logits[:, label_ids].argmax(-1).tolist()
    assert model.config._attn_implementation == "eager"  # routed only for the call
    zero_shot = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, []).example("the film", 1)
    with pytest.raises(ValueError, match="no label-word positions"):
        deep_layer_correlation(model, [zero_shot], label_ids, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        deep_layer_correlation(model, exs, label_ids, batch_size=0, progress=False)


def test_the_probe_refuses_other_method_state(examples):
    exs, _ = examples
    model = tiny_model("llama", attn_implementation="fastattn_icl", layers=2)
    batch = collate(exs[:2])
    probe = AttentionRowProbe(batch["anchor_positions"])
    with pytest.raises(NotImplementedError, match="attention_row cannot be combined"):
        with get_controller(model).override(attention_row=probe, momentum=0.5):  # refused when entered
            model(batch["input_ids"])
