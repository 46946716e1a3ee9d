"""Anchor-compression keep sets (docs/methods.md §5): Hidden_anchor positions, the Hidden_random and Text_anchor
baselines."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from fastattn_icl.methods import PromptBuilder
from fastattn_icl.methods.keep_sets import (
    KeepSet,
    hidden_anchor_keep,
    hidden_anchor_positions,
    hidden_random_positions,
    text_anchor_text,
)
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, byte_bpe_tokenizer, dataset, word_tokenizer

DEMOS = [("the film was great", 1), ("dull plot", 0), ("a superb story", 1), ("the acting was bad", 0)]
QA_TEMPLATE = "Question: {x}\nContext: {c}\nAnswer: {y}\n\n"


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def render_template(demos, template=TEMPLATE, words=LABEL_WORDS):
    """The demonstrations text and the character span of every free-field text in it."""
    text, fields = "", []
    for x, y in demos:
        piece = template.format(x=x, y=words[y])
        start = len(text) + piece.index(x)
        fields.append((start, start + len(x)))
        text += piece
    return text, fields


def _kept_pieces(tokenizer, keep):
    return [tokenizer.decode([int(keep.input_ids[p])]) for p in keep.positions]


def _word_tokenizer_with_bos():
    tokenizer = word_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
    )
    return tokenizer


def _check_no_field_text_and_all_labels(tokenizer, text, fields, keep):
    offsets = tokenizer.encode(text).offsets
    for p in keep.positions.tolist():
        s, e = offsets[p]
        assert not any(s < b and e > a for a, b in fields), (p, text[s:e])
    assert set(keep.label_positions.tolist()) <= set(keep.positions.tolist())


def test_byte_level_bpe_keeps_formatting_newlines_and_labels(bpe):
    text, fields = render_template(DEMOS)
    keep = hidden_anchor_keep(bpe, text, TEMPLATE, LABEL_WORDS)
    # the space after "Review:" is its own token unless the review's first word absorbs it (" a" in demo 2)
    assert _kept_pieces(bpe, keep) == [
        "Review", ":", " ", "\n", "Sentiment", ":", " positive", "\n",
        "Review", ":", " ", "\n", "Sentiment", ":", " negative", "\n",
        "Review", ":", "\n", "Sentiment", ":", " positive", "\n",
        "Review", ":", " ", "\n", "Sentiment", ":", " negative", "\n",
    ]  # fmt: skip
    assert keep.num_tokens == len(bpe.encode(text).ids) and keep.input_ids.tolist() == bpe.encode(text).ids
    assert keep.positions.dtype == torch.long and torch.equal(keep.positions, keep.positions.unique())
    assert keep.label_classes.tolist() == [1, 0, 1, 0]
    labels = [bpe.decode([int(keep.input_ids[p])]) for p in keep.label_positions]
    assert labels == [" positive", " negative", " positive", " negative"]
    assert keep.special_positions.numel() == 0
    _check_no_field_text_and_all_labels(bpe, text, fields, keep)
    # per demonstration: the tokens between two "Review" tokens, 4 to 10 of them
    starts = [p for p in keep.positions.tolist() if bpe.decode([int(keep.input_ids[p])]) == "Review"]
    counts = [sum(a <= p < b for p in keep.positions.tolist()) for a, b in zip(starts, starts[1:] + [10**9])]
    assert all(4 <= c <= 10 for c in counts), counts
    assert torch.equal(hidden_anchor_positions(bpe, text, TEMPLATE, LABEL_WORDS), keep.positions)


def test_keep_set_is_the_literal_text_of_every_demonstration(bpe):
    """What the kept tokens spell is the template's literal text and the label, less the spaces that merge
    into the review's first token."""
    for n, seed in ((2, 0), (4, 1), (4, 7)):
        demos = dataset(n, seed=seed)
        text, fields = render_template(demos)
        keep = hidden_anchor_keep(bpe, text, TEMPLATE, LABEL_WORDS)
        spelled = "".join(_kept_pieces(bpe, keep))
        allowed = {f"Review:{space}\nSentiment: {LABEL_WORDS[y]}\n" for _, y in demos for space in ("", " ")}
        pieces = spelled.split("Review:")[1:]
        assert len(pieces) == n and all("Review:" + p in allowed for p in pieces), spelled
        _check_no_field_text_and_all_labels(bpe, text, fields, keep)


def test_word_level_two_and_four_demonstrations():
    tokenizer = word_tokenizer()
    for demos in (DEMOS[:2], DEMOS):
        text, fields = render_template(demos)
        keep = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS)
        tokens = tokenizer.encode(text).tokens
        expected = [t for _, y in demos for t in ("Review", ":", "Sentiment", ":", LABEL_WORDS[y])]
        assert [tokens[p] for p in keep.positions] == expected  # the newlines are no tokens here
        _check_no_field_text_and_all_labels(tokenizer, text, fields, keep)


def test_prompt_builder_demonstrations_text():
    tokenizer = word_tokenizer()
    builder = PromptBuilder(tokenizer, TEMPLATE, LABEL_WORDS, DEMOS[:2])
    prompt = builder.prompt("fun film")
    demonstrations = prompt[: prompt.rindex("Review:")]
    keep = hidden_anchor_keep(tokenizer, demonstrations, TEMPLATE, LABEL_WORDS)
    # the demonstrations encode to a prefix of the prompt: the kept positions are the prompt's positions too
    example = builder.example("fun film")
    assert torch.equal(example.input_ids[: keep.num_tokens], keep.input_ids)
    assert torch.equal(keep.label_positions, example.anchor_positions)


def test_two_free_fields_template(bpe):
    demos = [("the film was", "plot and acting", 1), ("a story", "really dull", 0)]
    text, fields = "", []
    for x, c, y in demos:
        piece = QA_TEMPLATE.format(x=x, c=c, y=LABEL_WORDS[y])
        for field in (x, c):
            start = len(text) + piece.index(field)
            fields.append((start, start + len(field)))
        text += piece
    keep = hidden_anchor_keep(bpe, text, QA_TEMPLATE, LABEL_WORDS)
    spelled = "".join(_kept_pieces(bpe, keep))
    assert spelled == "Question: \nContext:\nAnswer: positive\n\nQuestion:\nContext: \nAnswer: negative\n\n"
    _check_no_field_text_and_all_labels(bpe, text, fields, keep)

    words = word_tokenizer(extra_words=("Question", "Context", "Answer"))
    keep = hidden_anchor_keep(words, text, QA_TEMPLATE, LABEL_WORDS)
    tokens = words.encode(text).tokens
    assert [tokens[p] for p in keep.positions] == [
        t for label in ("positive", "negative") for t in ("Question", ":", "Context", ":", "Answer", ":", label)
    ]


def test_bos_is_kept_by_flag():
    tokenizer = _word_tokenizer_with_bos()
    text, _ = render_template(DEMOS[:2])
    keep = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS)
    assert tokenizer.encode(text).tokens[0] == "[BOS]"
    assert keep.special_positions.tolist() == [0] and keep.positions[0] == 0
    dropped = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS, keep_special_tokens=False)
    assert dropped.positions.tolist() == keep.positions[1:].tolist()
    assert dropped.special_positions.tolist() == [0]
    # without the special tokens the positions shift by one
    plain = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS, add_special_tokens=False)
    assert plain.positions.tolist() == (keep.positions[1:] - 1).tolist()
    # the same through a transformers fast tokenizer
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, name_or_path="tiny-words", bos_token="[BOS]")
    assert torch.equal(hidden_anchor_positions(fast, text, TEMPLATE, LABEL_WORDS), keep.positions)


def _check_random_replaces_labels(keep, random, specials_kept=True):
    labels = keep.label_positions.tolist()
    formatting = set(keep.positions.tolist()) - set(labels)
    if not specials_kept:
        formatting -= set(keep.special_positions.tolist())
    got = set(random.tolist())
    assert random.dtype == torch.long and random.tolist() == sorted(got)
    assert formatting <= got and not got & set(labels)  # formatting kept, every label word replaced
    drawn = sorted(got - formatting)
    assert len(drawn) == len(labels)
    starts = [0] + [p + 1 for p in labels[:-1]]
    for p, lo, hi in zip(drawn, starts, labels):  # one draw inside each demonstration, before its label
        assert lo <= p < hi and p not in keep.special_positions.tolist()


def test_hidden_random_replaces_each_label_word_and_is_seeded(bpe):
    text, _ = render_template(DEMOS)
    keep = hidden_anchor_keep(bpe, text, TEMPLATE, LABEL_WORDS)
    random0 = hidden_random_positions(keep, seed=0)
    assert len(random0) == len(keep.positions)
    _check_random_replaces_labels(keep, random0)
    assert torch.equal(random0, hidden_random_positions(keep, seed=0))
    assert not torch.equal(random0, hidden_random_positions(keep, seed=1))


def test_hidden_random_keeps_bos_by_flag():
    tokenizer = _word_tokenizer_with_bos()
    demos = [(f"{x} and {x}", y) for x, y in dataset(4, seed=0)]  # 11 review words, 5 anchors per demonstration
    text, _ = render_template(demos)
    keep = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS)
    with_bos = hidden_random_positions(keep, seed=3)
    assert len(with_bos) == len(keep.positions) and with_bos[0] == 0
    _check_random_replaces_labels(keep, with_bos)
    without = hidden_random_positions(keep, seed=3, keep_special_tokens=False)
    assert len(without) == len(keep.positions) - 1 and 0 not in without.tolist()
    _check_random_replaces_labels(keep, without, specials_kept=False)


def test_hidden_random_needs_text_in_every_demonstration():
    tokenizer = word_tokenizer()
    text, _ = render_template([("fun", 1), ("", 0)])  # the second demonstration has no text token
    keep = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS)
    with pytest.raises(ValueError, match=r"demonstration 1 has no non-anchor position"):
        hidden_random_positions(keep)
    with pytest.raises(TypeError, match="KeepSet"):
        hidden_random_positions(keep.positions)
    assert isinstance(keep, KeepSet)


def test_text_anchor_text():
    assert text_anchor_text(TEMPLATE, LABEL_WORDS, DEMOS[:3]) == (
        "Review: \nSentiment: positive\nReview: \nSentiment: negative\nReview: \nSentiment: positive\n"
    )
    assert text_anchor_text(QA_TEMPLATE, LABEL_WORDS, [("q", 0)]) == "Question: \nContext: \nAnswer: negative\n\n"
    assert text_anchor_text(TEMPLATE, LABEL_WORDS, []) == ""
    with pytest.raises(ValueError, match=r"demonstration 1 has class 2.*\[0, 2\)"):
        text_anchor_text(TEMPLATE, LABEL_WORDS, [("a", 0), ("b", 2)])
    with pytest.raises(ValueError, match=r"demonstration 0 has class -1"):
        text_anchor_text(TEMPLATE, LABEL_WORDS, [("a", -1)])
    # the Text_anchor text is itself a demonstrations text: everything in it is kept
    tokenizer = word_tokenizer()
    text = text_anchor_text(TEMPLATE, LABEL_WORDS, DEMOS)
    keep = hidden_anchor_keep(tokenizer, text, TEMPLATE, LABEL_WORDS)
    assert keep.positions.tolist() == list(range(keep.num_tokens))


def test_no_demonstration_names_template_and_tokenizer():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_tokenizer(), name_or_path="tiny-words")
    with pytest.raises(ValueError, match=r"no demonstration of the template 'Review: \{x\}\\nSentiment.*tiny-words"):
        hidden_anchor_keep(tokenizer, "Review: fun film\n", TEMPLATE, LABEL_WORDS)


def test_rendered_query_raises(bpe):
    text, _ = render_template(DEMOS[:2])
    with pytest.raises(ValueError, match=r"must end after the last demonstration.*'Review: fun\\nSentiment:'"):
        hidden_anchor_keep(bpe, text + "Review: fun\nSentiment:", TEMPLATE, LABEL_WORDS)
    with pytest.raises(ValueError, match=r"'garbage ' between demonstrations 0 and 1"):
        hidden_anchor_keep(bpe, text.replace("\nReview", "\ngarbage Review", 1), TEMPLATE, LABEL_WORDS)
    # whitespace after the last demonstration is formatting and is kept
    keep = hidden_anchor_keep(bpe, text + "\n", TEMPLATE, LABEL_WORDS)
    assert bpe.decode([int(keep.input_ids[keep.positions[-1]])]).strip() == ""


def test_literal_without_a_token_of_its_own_names_literal_and_demonstration(bpe):
    template = "Re{x}\nSentiment: {y}\n"
    text = template.format(x=" great", y="positive") + template.format(x="view is fun", y="negative")
    # "Re" + "view" is one token "Review": the literal "Re" of demonstration 1 has no token of its own
    with pytest.raises(ValueError, match=r"template literal 'Re' gives no token of its own in demonstration 1"):
        hidden_anchor_keep(bpe, text, template, LABEL_WORDS)
    # a whitespace-only literal may merge with text without error (the word-level tokenizer drops newlines)
    keep = hidden_anchor_keep(word_tokenizer(), render_template(DEMOS)[0], TEMPLATE, LABEL_WORDS)
    assert len(keep.label_positions) == 4


def test_label_word_not_a_single_token_names_word(bpe):
    words = ["negative", "xylophonic"]
    text, _ = render_template([("fun", 1), ("bad", 0)], words=words)
    with pytest.raises(ValueError, match=r"'xylophonic' is not a single token for Tokenizer"):
        hidden_anchor_keep(bpe, text, TEMPLATE, words)
