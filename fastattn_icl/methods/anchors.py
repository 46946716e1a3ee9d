"""Label-word anchors: where each demonstration's label word sits in a prompt, and prompts built from a template.

A prompt is a sequence of demonstrations rendered with a template such as ``"Review: {x}\\nSentiment: {y}\\n"``
(``{y}`` is the label word, every other field is free text), followed by the query rendered up to ``{y}``
(trailing spaces stripped, so the next token is the label word with its leading space, as in the
demonstrations). Nothing here knows a dataset: the template and the label words are arguments.

Positions are token indices of the encoded prompt (0-based, as the model sees it, special tokens
included when the tokenizer adds them). Both ``tokenizers.Tokenizer`` and transformers' fast tokenizers
work (character offsets are needed, so slow tokenizers do not).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ICLExample",
    "LabelWordPositions",
    "PromptBuilder",
    "collate",
    "label_token_ids",
    "label_word_positions",
]


@dataclass(frozen=True)
class LabelWordPositions:
    """The label words found in one prompt, in order of appearance.

    Attributes:
        positions: int64 ``[A]`` token positions of the label words.
        classes: int64 ``[A]`` class of each (index into ``label_words``).
        token_ids: int64 ``[A]`` the token id at each position.
    """

    positions: torch.Tensor
    classes: torch.Tensor
    token_ids: torch.Tensor


@dataclass(frozen=True)
class ICLExample:
    """One encoded prompt (demonstrations + query) ready for the model.

    Attributes:
        input_ids: int64 ``[T]``; the model predicts the query's label word after the last token.
        anchor_positions: int64 ``[A]`` label-word positions of the demonstrations, indices into ``input_ids``
            (``A = 0`` for a zero-shot prompt).
        anchor_classes: int64 ``[A]`` their classes.
        label: the query's gold class, or ``None``.
    """

    input_ids: torch.Tensor
    anchor_positions: torch.Tensor
    anchor_classes: torch.Tensor
    label: int | None = None


def tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", None)
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``text``."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        encoding = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return list(encoding.ids), [tuple(o) for o in encoding.offsets]
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a tokenizers.Tokenizer or a transformers tokenizer, got {tokenizer_name(tokenizer)}"
        )
    try:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise TypeError(
            f"{tokenizer_name(tokenizer)} gives no character offsets: label-word positions need a fast tokenizer"
        ) from exc
    return list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]


def encode_prefix(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Like :func:`_encode` for text that the model continues (demonstrations before a query): special tokens the
    tokenizer appends at the end (an EOS, with an empty character span) are dropped, leading ones (BOS) kept."""
    ids, offsets = _encode(tokenizer, text, add_special_tokens)
    end = len(ids)
    while end > 0 and offsets[end - 1][0] == offsets[end - 1][1]:
        end -= 1
    if end == 0:  # nothing but special tokens: keep them (the caller's checks name the problem)
        return ids, offsets
    return ids[:end], offsets[:end]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def template_fields(template: str) -> list[tuple[str, str | None]]:
    parsed = [(literal, field) for literal, field, _, _ in string.Formatter().parse(template)]
    names = [field for _, field in parsed if field is not None]
    if names.count("y") != 1:
        raise ValueError(f"template must contain the label field {{y}} exactly once, got {template!r}")
    if any(not name for name in names):
        raise ValueError(f"template fields must be named (e.g. {{x}}, {{y}}), got {template!r}")
    return parsed


def template_regex(template: str, label_words: Sequence[str]) -> re.Pattern:
    """A regex matching one rendered demonstration; group ``label`` is the label word."""
    parsed = template_fields(template)
    words = sorted(set(label_words), key=len, reverse=True)
    label = "(?P<label>" + "|".join(re.escape(w) for w in words) + ")"
    parts = []
    for i, (literal, field) in enumerate(parsed):
        parts.append(re.escape(literal))
        if field == "y":
            following = parsed[i + 1][0] if i + 1 < len(parsed) else ""
            parts.append(label + (r"(?!\w)" if not following else ""))
        elif field is not None:
            parts.append(r"[\s\S]*?")
    return re.compile("".join(parts))


def check_label_words(label_words: Sequence[str]) -> list[str]:
    if isinstance(label_words, str) or not isinstance(label_words, Sequence) or len(label_words) < 1:
        raise TypeError(f"label_words must be a sequence of strings, one per class, got {label_words!r}")
    words = list(label_words)
    if any(not isinstance(w, str) or not w.strip() for w in words):
        raise ValueError(f"label words must be non-empty strings, got {words!r}")
    if len(set(words)) != len(words):
        raise ValueError(f"label words must differ between classes, got {words!r}")
    return words


def token_at(
    ids: list[int], offsets: list[tuple[int, int]], start: int, end: int, text: str, word: str, tokenizer: Any
) -> int:
    """The index of the single token spelling ``text[start:end]`` (the label word)."""
    overlapping = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if len(overlapping) != 1:
        pieces = [text[offsets[i][0] : offsets[i][1]] for i in overlapping]
        raise ValueError(
            f"label word {word!r} is not a single token for {tokenizer_name(tokenizer)} in this prompt: "
            f"it is split into {pieces!r}"
        )
    i = overlapping[0]
    s, e = offsets[i]
    if text[s:e].strip() != word.strip():
        raise ValueError(
            f"label word {word!r} is not a single token for {tokenizer_name(tokenizer)} in this prompt: "
            f"its token {text[s:e]!r} also covers neighbouring text"
        )
    if ids[i] == _unknown_token_id(tokenizer):
        raise ValueError(
            f"label word {word!r} is not in the vocabulary of {tokenizer_name(tokenizer)}: it encodes as the "
            "unknown token"
        )
    return i


def _unknown_token_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's unknown token, or ``None`` (byte-level tokenizers have none)."""
    unk_id = getattr(tokenizer, "unk_token_id", None)  # transformers tokenizers
    if isinstance(unk_id, int):
        return unk_id
    unk = getattr(getattr(tokenizer, "model", None), "unk_token", None)  # tokenizers.Tokenizer
    if isinstance(unk, str) and hasattr(tokenizer, "token_to_id"):
        return tokenizer.token_to_id(unk)
    return None


def _find_label_words(
    tokenizer: Any, text: str, ids: list[int], offsets: list[tuple[int, int]], template: str, words: list[str]
) -> tuple[list[int], list[int]]:
    """Token positions and classes of every rendered demonstration's label word in ``text`` (possibly none)."""
    positions, classes = [], []
    for match in template_regex(template, words).finditer(text):
        word = match.group("label")
        start, end = match.span("label")
        positions.append(token_at(ids, offsets, start, end, text, word, tokenizer))
        classes.append(words.index(word))
    return positions, classes


def label_word_positions(
    tokenizer: Any,
    prompt_or_ids: str | Sequence[int] | torch.Tensor,
    template: str,
    label_words: Sequence[str],
    *,
    add_special_tokens: bool = True,
    require_all_classes: bool = True,
) -> LabelWordPositions:
    """Find every demonstration's label word in a prompt.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
        prompt_or_ids: the prompt text, or its token ids ``[T]`` (they must be what the tokenizer makes of
            their decoded text).
        template: demonstration template with a ``{y}`` label field and any other named fields, e.g.
            ``"Review: {x}\\nSentiment: {y}\\n"``.
        label_words: the label word of each class (class ``c`` is ``label_words[c]``).
        add_special_tokens: as the tokenizer's flag; must match how the model input is encoded.
        require_all_classes: raise when a class's label word appears in no demonstration.

    Returns:
        :class:`LabelWordPositions` in order of appearance.

    Raises:
        ValueError: a label word is not a single token in context, no demonstration matches the template,
            or (``require_all_classes``) a label word is not found; the message names the word and the
            tokenizer.
    """
    words = check_label_words(label_words)
    if isinstance(prompt_or_ids, str):
        text = prompt_or_ids
        ids, offsets = _encode(tokenizer, text, add_special_tokens)
    else:
        given = [int(i) for i in (prompt_or_ids.tolist() if isinstance(prompt_or_ids, torch.Tensor) else prompt_or_ids)]
        text = _decode(tokenizer, given)
        ids, offsets = _encode(tokenizer, text, add_special_tokens)
        if ids != given:
            raise ValueError(
                f"the token ids do not survive decoding and re-encoding with {tokenizer_name(tokenizer)} "
                f"(add_special_tokens={add_special_tokens}): pass the prompt text instead"
            )
    positions, classes = _find_label_words(tokenizer, text, ids, offsets, template, words)
    if not positions:
        raise ValueError(
            f"no demonstration of the template {template!r} with label words {words!r} was found in the prompt "
            f"(tokenizer {tokenizer_name(tokenizer)})"
        )
    if require_all_classes:
        missing = [w for c, w in enumerate(words) if c not in classes]
        if missing:
            raise ValueError(
                f"label word(s) {missing!r} not found in any demonstration of the prompt "
                f"(template {template!r}, tokenizer {tokenizer_name(tokenizer)})"
            )
    pos = torch.tensor(positions, dtype=torch.long)
    return LabelWordPositions(pos, torch.tensor(classes, dtype=torch.long), torch.tensor(ids, dtype=torch.long)[pos])


def render_template(template: str, label: str | None, **fields: str) -> str:
    """The template with ``fields``; ``label=None`` renders up to ``{y}`` with trailing spaces stripped."""
    if label is not None:
        return template.format(y=label, **fields)
    head = template[: template.index("{y}")]
    return head.format(**fields).rstrip(" ")


def label_token_ids(
    tokenizer: Any, template: str, label_words: Sequence[str], *, fill: str = "x", add_special_tokens: bool = True
) -> torch.Tensor:
    """int64 ``[C]``: the token id of each class's label word as it appears in a demonstration (e.g. GPT-2's
    ``" positive"`` with its leading space), i.e. the token the model should predict after a query.

    Every free field of the template is filled with ``fill`` to render one demonstration per class.
    Raises ``ValueError`` naming the word and the tokenizer when a label word is not a single token.
    """
    words = check_label_words(label_words)
    fields = {name: fill for _, name in template_fields(template) if name is not None and name != "y"}
    ids = []
    for c, word in enumerate(words):
        text = render_template(template, word, **fields)
        found = label_word_positions(tokenizer, text, template, [word], add_special_tokens=add_special_tokens)
        if found.classes.tolist() != [0]:
            raise ValueError(f"could not locate label word {word!r} of class {c} in the rendered template")
        ids.append(int(found.token_ids[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words!r} share a token with {tokenizer_name(tokenizer)}: {ids}")
    return torch.tensor(ids, dtype=torch.long)


class PromptBuilder:
    """Build ICL prompts from a template, label words and demonstrations.

    Args:
        tokenizer: see :func:`label_word_positions`.
        template: e.g. ``"Review: {x}\\nSentiment: {y}\\n"`` (the free field must be ``{x}``).
        label_words: one per class.
        demonstrations: ``(x, class)`` pairs, rendered in this order; empty for zero-shot prompts (the prompt is
            the query rendered up to its label, and examples have no label-word positions).
        add_special_tokens: passed to the tokenizer.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        label_words: Sequence[str],
        demonstrations: Sequence[tuple[str, int]],
        *,
        add_special_tokens: bool = True,
    ):
        self.tokenizer, self.template = tokenizer, template
        self.label_words = check_label_words(label_words)
        self.add_special_tokens = add_special_tokens
        for x, y in demonstrations:
            if not isinstance(y, int) or not 0 <= y < len(self.label_words):
                raise ValueError(f"demonstration class must be in [0, {len(self.label_words)}), got {y!r} for {x!r}")
        self.demonstrations = list(demonstrations)
        self.label_token_ids = label_token_ids(
            tokenizer, template, self.label_words, add_special_tokens=add_special_tokens
        )

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def demonstrations_text(self) -> str:
        """The rendered demonstrations, each ending where the template ends."""
        return "".join(render_template(self.template, self.label_words[y], x=dx) for dx, y in self.demonstrations)

    def query_text(self, x: str) -> str:
        """The query ``x`` rendered up to its label (trailing spaces stripped)."""
        return render_template(self.template, None, x=x)

    def prompt(self, x: str) -> str:
        """Demonstrations followed by the query ``x`` rendered up to its label."""
        return self.demonstrations_text() + self.query_text(x)

    def example(self, x: str, label: int | None = None) -> ICLExample:
        """Encode the prompt for ``x`` and locate the demonstrations' label words (none when zero-shot: then
        ``anchor_positions`` and ``anchor_classes`` are empty int64 ``[0]``)."""
        text = self.prompt(x)
        ids, offsets = _encode(self.tokenizer, text, self.add_special_tokens)
        positions, classes = _find_label_words(self.tokenizer, text, ids, offsets, self.template, self.label_words)
        if len(positions) != len(self.demonstrations):
            raise ValueError(
                f"found {len(positions)} label words for {len(self.demonstrations)} demonstrations in the "
                f"prompt for {x!r}: a query or demonstration text contains the template's label pattern"
            )
        return ICLExample(
            torch.tensor(ids, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            torch.tensor(classes, dtype=torch.long),
            label,
        )


def checked_examples(who: str, examples: Sequence[ICLExample], *, need_label: bool = False,
                     label_words_needed: str | None = None, batch_size: int | None = None) -> list[ICLExample]:
    """The examples as a list, checked for a workflow named ``who``: at least one, each an :class:`ICLExample`,
    with a gold label when ``need_label``, with label words when ``label_words_needed`` (the reason, for the
    message), and ``batch_size`` (if given) an int >= 1.

    Raises:
        TypeError, ValueError: naming the example and what it lacks.
    """
    examples = list(examples)
    if not examples:
        raise ValueError(f"{who} needs at least one example")
    for i, e in enumerate(examples):
        if not isinstance(e, ICLExample):
            raise TypeError(f"examples[{i}] must be an ICLExample, got {type(e).__name__}")
        if need_label and e.label is None:
            raise ValueError(f"examples[{i}] has no gold label: the loss needs one")
        if label_words_needed is not None and len(e.anchor_positions) == 0:
            raise ValueError(f"examples[{i}] has no label-word positions (a zero-shot prompt?): {label_words_needed}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return examples


def collate(examples: Sequence[ICLExample], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Left-pad a batch so every prompt ends at the last column (where the label is predicted).

    Returns:
        ``input_ids``, ``attention_mask`` (1 = real token) and ``position_ids`` ``[B, T]`` (positions count
        real tokens only); ``anchor_positions``/``anchor_classes`` ``[B, A]`` as key positions in the padded
        sequence, i.e. each prompt's own positions shifted by its left padding (``-1`` = unused; ``A = 0`` when
        every prompt is zero-shot); ``labels`` ``[B]`` (``-1`` where unknown).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples)
    A = max(len(e.anchor_positions) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    anchor_positions = torch.full((B, A), -1, dtype=torch.long)
    anchor_classes = torch.zeros(B, A, dtype=torch.long)
    for b, e in enumerate(examples):
        pad = T - len(e.input_ids)
        ids[b, pad:] = e.input_ids
        mask[b, pad:] = 1
        anchor_positions[b, : len(e.anchor_positions)] = e.anchor_positions + pad
        anchor_classes[b, : len(e.anchor_classes)] = e.anchor_classes
    labels = torch.tensor([-1 if e.label is None else e.label for e in examples], dtype=torch.long)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "anchor_positions": anchor_positions,
        "anchor_classes": anchor_classes,
        "labels": labels,
    }
