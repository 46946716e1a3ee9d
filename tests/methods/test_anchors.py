"""Label-word positions in templated prompts, prompt building and left-padded batching."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from fastattn_icl.methods import PromptBuilder, collate, label_predictions, label_token_ids, label_word_positions
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, byte_bpe_tokenizer, dataset, word_tokenizer

PROMPT = (
    "Review: the film was great\nSentiment: positive\n"
    "Review: dull plot\nSentiment: negative\n"
    "Review: a superb story\nSentiment: positive\n"
    "Review: the acting was bad\nSentiment:"
)


def _tokens(tokenizer, text):
    return tokenizer.encode(text).tokens


def test_word_level_positions_and_classes():
    tokenizer = word_tokenizer()
    found = label_word_positions(tokenizer, PROMPT, TEMPLATE, LABEL_WORDS)
    tokens = _tokens(tokenizer, PROMPT)
    assert [tokens[p] for p in found.positions] == ["positive", "negative", "positive"]
    assert found.classes.tolist() == [1, 0, 1]
    assert found.token_ids.tolist() == [tokenizer.token_to_id(w) for w in ("positive", "negative", "positive")]
    # the query's own "Sentiment:" has no label yet and is not an anchor
    assert int(found.positions.max()) < len(tokens) - 3


def test_byte_level_bpe_label_tokens_carry_the_leading_space():
    tokenizer = byte_bpe_tokenizer()
    found = label_word_positions(tokenizer, PROMPT, TEMPLATE, LABEL_WORDS)
    tokens = _tokens(tokenizer, PROMPT)
    assert [tokens[p] for p in found.positions] == ["Ġpositive", "Ġnegative", "Ġpositive"]
    ids = label_token_ids(tokenizer, TEMPLATE, LABEL_WORDS)
    assert ids.tolist() == [tokenizer.token_to_id("Ġnegative"), tokenizer.token_to_id("Ġpositive")]


def test_transformers_fast_tokenizer_and_token_ids_input():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_bpe_tokenizer(), name_or_path="tiny-bpe")
    found = label_word_positions(tokenizer, PROMPT, TEMPLATE, LABEL_WORDS)
    ids = tokenizer(PROMPT)["input_ids"]
    from_ids = label_word_positions(tokenizer, torch.tensor(ids), TEMPLATE, LABEL_WORDS)
    assert torch.equal(found.positions, from_ids.positions) and torch.equal(found.classes, from_ids.classes)
    assert [ids[p] for p in found.positions] == found.token_ids.tolist()


def test_any_template_and_any_number_of_classes():
    template = "Question: {x}\nAnswer type: {y}\n\n"
    words = ["location", "number", "person"]
    tokenizer = word_tokenizer(extra_words=("Question", "Answer", "type", "where", "how", "many", "who", "location",
                                            "number", "person", "is", "it"))
    prompt = (template.format(x="where is it", y="location") + template.format(x="how many", y="number")
              + template.format(x="who is it", y="person") + template.format(x="where", y="location")
              + "Question: how many\nAnswer type:")
    found = label_word_positions(tokenizer, prompt, template, words)
    assert found.classes.tolist() == [0, 1, 2, 0]
    assert [_tokens(tokenizer, prompt)[p] for p in found.positions] == ["location", "number", "person", "location"]
    # the template may end right after the label: the next demonstration follows directly
    bare = "Q: {x} A: {y}"
    tokenizer = word_tokenizer(extra_words=("Q", "A"))
    prompt = "Q: great film A: positive Q: bad A: negative Q: fun"
    assert label_word_positions(tokenizer, prompt, bare, LABEL_WORDS).positions.tolist() == [6, 12]


def test_label_word_that_is_not_a_single_token_raises_naming_word_and_tokenizer():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), name_or_path="tiny-words")
    words = ["negative", "very-positive"]  # the pre-tokenizer splits at "-"
    prompt = "Review: great\nSentiment: very-positive\nReview: bad\nSentiment: negative\nReview: fun\nSentiment:"
    with pytest.raises(ValueError, match=r"'very-positive' is not a single token for .*tiny-words"):
        label_word_positions(tokenizer, prompt, TEMPLATE, words)
    with pytest.raises(ValueError, match=r"'very-positive' is not a single token"):
        label_token_ids(tokenizer, TEMPLATE, words)
    # a byte-level BPE that never merged a rare word splits it into pieces
    with pytest.raises(ValueError, match=r"'xylophonic' is not a single token"):
        label_token_ids(byte_bpe_tokenizer(), TEMPLATE, ["negative", "xylophonic"])


def test_label_word_not_found_raises():
    tokenizer = word_tokenizer()
    prompt = "Review: great\nSentiment: negative\nReview: fun\nSentiment:"
    with pytest.raises(ValueError, match=r"\['positive'\] not found .*tokenizer Tokenizer"):
        label_word_positions(tokenizer, prompt, TEMPLATE, LABEL_WORDS)
    found = label_word_positions(tokenizer, prompt, TEMPLATE, LABEL_WORDS, require_all_classes=False)
    assert found.classes.tolist() == [0]
    with pytest.raises(ValueError, match="no demonstration"):
        label_word_positions(tokenizer, "Review: fun\nSentiment:", TEMPLATE, LABEL_WORDS)
    with pytest.raises(ValueError, match=r"\{y\} exactly once"):
        label_word_positions(tokenizer, prompt, "Review: {x}\n", LABEL_WORDS)


def test_token_ids_that_do_not_round_trip_raise():
    tokenizer = byte_bpe_tokenizer()
    ids = tokenizer.encode(PROMPT).ids
    merged = tokenizer.token_to_id("Ġpositive")
    at = ids.index(merged)
    split = ids[:at] + [tokenizer.token_to_id(ch) for ch in "Ġpositive"] + ids[at + 1 :]  # same text, not canonical
    assert tokenizer.decode(split) == tokenizer.decode(ids)
    with pytest.raises(ValueError, match="re-encoding"):
        label_word_positions(tokenizer, split, TEMPLATE, LABEL_WORDS)


def test_prompt_builder_and_left_padded_collate():
    tokenizer = word_tokenizer()
    builder = PromptBuilder(tokenizer, TEMPLATE, LABEL_WORDS, dataset(2, seed=1))
    assert builder.prompt("fun film").endswith("Review: fun film\nSentiment:")
    short, long = builder.example("fun", 1), builder.example("the film was really fun", 0)
    assert len(short.anchor_positions) == 2 and short.label == 1
    assert torch.equal(short.input_ids[short.anchor_positions], builder.label_token_ids[short.anchor_classes])
    batch = collate([short, long], pad_token_id=0)
    pad = len(long.input_ids) - len(short.input_ids)
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short.input_ids)
    assert batch["position_ids"][0, pad:].tolist() == list(range(len(short.input_ids)))
    assert torch.equal(batch["anchor_positions"][0], short.anchor_positions + pad)
    ids = batch["input_ids"]
    assert torch.equal(ids[0, batch["anchor_positions"][0]], builder.label_token_ids[batch["anchor_classes"][0]])
    assert batch["labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="demonstration class"):
        PromptBuilder(tokenizer, TEMPLATE, LABEL_WORDS, [("fun", 2)])


def test_label_word_outside_the_vocabulary_raises():
    # a word-level tokenizer maps an unknown label word to [UNK] as one token: that must not pass as a label
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="'nope' is not in the vocabulary"):
        label_token_ids(tok, TEMPLATE, ["negative", "nope"])


def test_zero_shot_prompt_builder():
    """No demonstrations: the prompt is the query up to its label; examples carry empty int64 label positions, and
    collating (also next to few-shot prompts) and reading label predictions off the logits work."""
    from tests.models import tiny_model

    tokenizer = word_tokenizer()
    builder = PromptBuilder(tokenizer, TEMPLATE, LABEL_WORDS, [])
    assert builder.demonstrations_text() == "" and builder.prompt("fun film") == "Review: fun film\nSentiment:"
    example = builder.example("fun film", 1)
    assert example.input_ids.tolist() == tokenizer.encode("Review: fun film\nSentiment:").ids
    for t in (example.anchor_positions, example.anchor_classes):
        assert t.dtype == torch.long and t.shape == (0,)
    assert example.label == 1 and builder.example("dull").label is None
    batch = collate([example, builder.example("the film was really quite fun", 0)])
    assert batch["anchor_positions"].shape == (2, 0) and batch["anchor_positions"].dtype == torch.long
    assert batch["anchor_classes"].shape == (2, 0) and batch["labels"].tolist() == [1, 0]
    few_shot = PromptBuilder(tokenizer, TEMPLATE, LABEL_WORDS, dataset(2, seed=1)).example("fun", 0)
    mixed = collate([example, few_shot])
    pad = len(few_shot.input_ids) - len(example.input_ids)
    assert mixed["anchor_positions"][0].tolist() == [-1, -1]
    assert torch.equal(mixed["anchor_positions"][1], few_shot.anchor_positions)
    assert mixed["attention_mask"][0].tolist() == [0] * pad + [1] * len(example.input_ids)
    model = tiny_model("gpt2", layers=1)
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
    predictions = label_predictions(logits, builder.label_token_ids)
    assert predictions.shape == (2,) and predictions.dtype == torch.long
    # a query that itself contains a rendered demonstration is still caught
    with pytest.raises(ValueError, match="found 1 label words for 0 demonstrations"):
        builder.example("great\nSentiment: positive\nReview: fun")
