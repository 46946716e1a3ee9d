"""isolate(): chosen layers only, restored on exit (also on exceptions); the random non-label control."""

from __future__ import annotations

import pytest
import torch

from fastattn_icl.integrations import ATTN_IMPLEMENTATION, get_controller
from fastattn_icl.methods import (
    PromptBuilder,
    collate,
    first_layers,
    isolate,
    label_loyalty,
    label_predictions,
    last_layers,
    pad_positions,
    random_non_label_positions,
    word_loyalty,
)
from fastattn_icl.testing import check_close
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, dataset, word_tokenizer
from tests.models import float64_twin, tiny_model


@pytest.fixture(scope="module")
def batch():
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(4, seed=1))
    examples = [builder.example(x, y) for x, y in dataset(4, seed=2)]
    return collate(examples), builder.label_token_ids


def _all_logits(model, batch):
    """Logits of every position ``[B, T, V]``, padded positions set to 0 (their logits are meaningless)."""
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits
    return logits * batch["attention_mask"][:, :, None]


def _logits(model, batch):
    """Logits at the final position ``[B, V]``, where the label is predicted."""
    with torch.no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=batch["position_ids"], use_cache=False).logits[:, -1]


def test_layer_helpers():
    model = tiny_model("llama", layers=3)
    assert first_layers(model, 2) == [0, 1] and last_layers(model, 2) == [1, 2] and last_layers(model, 0) == []
    with pytest.raises(ValueError, match="k must be in"):
        first_layers(model, 4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_isolation_changes_logits_only_inside_the_block_and_per_layer_choice(family, batch):
    inputs, _ = batch
    model = tiny_model(family, **({"sliding_window": 128} if family == "mistral" else {}))  # prompts are longer than 32
    plain = _all_logits(model, inputs)
    labels = inputs["anchor_positions"]
    results = {}
    for name, layers in (("first", first_layers(model, 1)), ("last", last_layers(model, 1)), ("all", None)):
        with isolate(model, labels, layers=layers) as controller:
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            assert controller.layer_state(0).keys() == ({"isolation"} if name != "last" else set())
            results[name] = _all_logits(model, inputs)
        assert get_controller(model).is_empty() and model.config._attn_implementation == "eager"
    for name, logits in results.items():
        assert (logits - plain).abs().max() > 1e-3, f"isolating the {name} layer(s) changed nothing"
    assert (results["first"] - results["last"]).abs().max() > 1e-3
    # in the last layer only the isolated rows themselves change (no later layer reads them)
    isolated = torch.zeros(plain.shape[:2], dtype=torch.bool)
    for b, row in enumerate(labels.tolist()):
        isolated[b, [p for p in row if p >= 0]] = True
    high = _all_logits(float64_twin(model), inputs)  # plain eager in float64
    check_close("rows the last layer leaves alone", results["last"][~isolated], plain[~isolated], high[~isolated])
    assert (results["last"][isolated] - plain[isolated]).abs().max() > 1e-3
    assert torch.equal(_all_logits(model, inputs), plain)  # bit-exact: after the context, the same eager forward


def test_isolate_restores_on_exception_and_checks_arguments(batch):
    inputs, _ = batch
    model = tiny_model("gpt2", attn_implementation=ATTN_IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="boom"):
        with isolate(model, [[3, 7]], layers=[1], window=1):
            assert get_controller(model).get("isolation", layer_idx=1).window == 1
            raise RuntimeError("boom")
    assert get_controller(model).is_empty() and model.config._attn_implementation == ATTN_IMPLEMENTATION
    with pytest.raises(ValueError, match="window"):
        with isolate(model, [[3]], window=-1):
            pass
    with pytest.raises(ValueError, match="layer index"):
        with isolate(model, [[3]], layers=[5]):
            pass
    assert get_controller(model).is_empty()


def test_pad_positions():
    assert pad_positions([[1, 2], [5]]).tolist() == [[1, 2], [5, -1]]
    assert pad_positions(torch.tensor([4, 6])).tolist() == [[4, 6]]
    with pytest.raises(TypeError):
        pad_positions(torch.tensor([1.0]))


def test_random_non_label_positions():
    labels = torch.tensor([[4, 9, 14], [7, 12, -1]])
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    drawn = random_non_label_positions(labels, mask, seed=3)
    assert drawn.shape == labels.shape and drawn[1, 2] == -1
    for row, lab in zip(drawn, labels):
        used, pick = lab[lab >= 0], row[row >= 0]
        assert len(pick) == len(used) == len(set(pick.tolist()))
        assert not set(pick.tolist()) & set(used.tolist())
        assert int(pick.max()) <= int(used.max())  # from the demonstrations, not the query
    assert int(drawn[1][drawn[1] >= 0].min()) >= 5  # never a padding position
    assert torch.equal(drawn, random_non_label_positions(labels, mask, seed=3))
    assert not torch.equal(drawn, random_non_label_positions(labels, mask, seed=4))
    anywhere = random_non_label_positions([[2]], seq_len=6, high=6, seed=0)
    assert anywhere.shape == (1, 1) and int(anywhere) in {0, 1, 3, 4, 5}
    with pytest.raises(ValueError, match="non-label positions"):
        random_non_label_positions([[0, 1]], seq_len=2)


def test_isolation_study_with_loyalty(batch):
    """The paper's comparison on a tiny model: loyalty is 1 without isolation; with it, the metrics are the
    fraction of unchanged predictions and the mean top-5 overlap, computed here by hand."""
    inputs, label_ids = batch
    model = tiny_model("gpt2", layers=2)
    reference = _logits(model, inputs)
    ref_pred = label_predictions(reference, label_ids)
    assert label_loyalty(label_predictions(_logits(model, inputs), label_ids), ref_pred) == 1.0
    assert word_loyalty(_logits(model, inputs), reference) == 1.0
    control = random_non_label_positions(inputs["anchor_positions"], inputs["attention_mask"], seed=0)
    for rows in (inputs["anchor_positions"], control):
        with isolate(model, rows, layers=first_layers(model, 1)):
            logits = _logits(model, inputs)
        pred = label_predictions(logits, label_ids)
        assert label_loyalty(pred, ref_pred) == pytest.approx((pred == ref_pred).float().mean().item())
        overlaps = [
            len(set(a.topk(5).indices.tolist()) & set(r.topk(5).indices.tolist()))
            / len(set(a.topk(5).indices.tolist()) | set(r.topk(5).indices.tolist()))
            for a, r in zip(logits, reference)
        ]
        assert word_loyalty(logits, reference, k=5) == pytest.approx(sum(overlaps) / len(overlaps))
        assert (logits - reference).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# Left-padded batches: which positions isolate() takes, and refusing positions on padding
# ------------------------------------------------------------------------------------------------


def _two_lengths():
    """A short and a long prompt (same demonstrations): in their left-padded batch the short one's own label
    positions fall on its padding."""
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(2, seed=1))
    short = builder.example("fun", 1)
    long = builder.example(" ".join(["the film was really quite fun and the story was a lovely one"] * 2), 0)
    pad = len(long.input_ids) - len(short.input_ids)
    assert pad > int(short.anchor_positions.max())
    return short, long, pad


@torch.no_grad()
def _eager_isolated_logits(model, example, dtype):
    """``[T, V]`` logits of one prompt with every layer's label-word rows cut from the text before them, by an eager
    model in ``dtype`` with an explicit mask: row ``p`` sees no key ``< p`` (the ``-1e4`` the seam writes there is an
    exact 0 after the softmax, since the row still sees key ``p``)."""
    T = len(example.input_ids)
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    for p in example.anchor_positions.tolist():
        visible[p, :p] = False
    mask = torch.zeros(T, T, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return model.to(dtype)(example.input_ids[None], attention_mask=mask[None, None], use_cache=False).logits[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_isolation_equals_per_prompt(family):
    from fastattn_icl.testing import check_close

    short, long, pad = _two_lengths()
    model = tiny_model(family)
    batch = collate([short, long])

    def batched(positions, **kw):
        with isolate(model, positions, **kw), torch.no_grad():
            return model(batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False).logits

    from_examples = batched([short, long])
    assert torch.equal(batched(batch), from_examples)  # collate's dict
    assert torch.equal(batched(batch["anchor_positions"]), from_examples)  # shifted by hand (collate did)
    assert torch.equal(batched(batch["anchor_positions"], attention_mask=batch["attention_mask"]), from_examples)
    for b, (example, shift) in enumerate(((short, pad), (long, 0))):
        with isolate(model, [example]), torch.no_grad():
            alone = model(example.input_ids[None], use_cache=False).logits[0]
        ref64 = _eager_isolated_logits(model, example, torch.float64)
        ref32 = _eager_isolated_logits(model, example, torch.float32)
        check_close(f"{family} prompt {b} batched", from_examples[b, shift:], ref32, ref64)
        check_close(f"{family} prompt {b} alone", alone, ref32, ref64)
    with torch.no_grad():
        plain = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], use_cache=False).logits
    assert (from_examples[0, pad:] - plain[0, pad:]).abs().max() > 1e-3  # the isolation did something


def test_unshifted_positions_on_padding_raise():
    short, long, pad = _two_lengths()
    model = tiny_model("llama")
    batch = collate([short, long])
    own = [short.anchor_positions.tolist(), long.anchor_positions.tolist()]  # each prompt's own positions
    with pytest.raises(ValueError, match=r"land on padding of the forward's attention_mask \(row: positions \{0:"):
        with isolate(model, own), torch.no_grad():
            model(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    with pytest.raises(ValueError, match="pass the ICLExample objects"):  # positional mask argument too
        with isolate(model, own), torch.no_grad():
            model(batch["input_ids"], batch["attention_mask"], use_cache=False)
    with pytest.raises(ValueError, match="land on padding of the attention mask"):  # checked before any forward
        with isolate(model, own, attention_mask=batch["attention_mask"]):
            pass
    with pytest.raises(ValueError, match="past the batch"):
        with isolate(model, [[3, batch["input_ids"].shape[1]]], attention_mask=batch["attention_mask"]):
            pass
    with pytest.raises(ValueError, match="differs from the padding"):
        with isolate(model, [short, long], attention_mask=torch.ones_like(batch["attention_mask"])):
            pass
    assert get_controller(model).is_empty() and model.config._attn_implementation == "eager"
    assert not model._forward_pre_hooks  # the check is removed on exit, also after an error
    with torch.no_grad():  # and a later forward with those positions outside isolate() runs
        model(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_zero_shot_examples_cannot_isolate_label_words():
    zero_shot = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, [])
    few_shot = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(2, seed=1))
    examples = [few_shot.example("fun", 1), zero_shot.example("dull", 0)]
    model = tiny_model("gpt2", layers=1)
    with pytest.raises(ValueError, match=r"examples \[1\] have no label words \(zero-shot prompts\?\)"):
        with isolate(model, examples):
            pass
    with pytest.raises(ValueError, match=r"the batch \[1\] have no label words"):
        with isolate(model, collate(examples)):
            pass
    assert get_controller(model).is_empty()
    # the random control of a zero-shot row is empty too (nothing to draw), not an error
    batch = collate(examples)
    assert random_non_label_positions(batch["anchor_positions"], batch["attention_mask"])[1].tolist() == [-1, -1]
