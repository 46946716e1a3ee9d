"""Which demonstration tokens anchor compression keeps (docs/methods.md §5), and its two baselines.

Anchor compression ("Label Words are Anchors", Hidden_anchor) runs the demonstrations once, keeps a few
positions of their KV cache and uses that as the prefix cache of every test input. The kept positions are,
per demonstration, the label word **and the formatting tokens**: every token that spells only the template's
literal text (``"Review: "``, ``"\\nSentiment: "``, the trailing ``"\\n"``), about 6-8 tokens per
demonstration. The rule is a function of the prompt template and the label words, never of a dataset:

- :func:`hidden_anchor_keep` / :func:`hidden_anchor_positions`: the Hidden_anchor keep set.
- :func:`hidden_random_positions`: the Hidden_random baseline, as many random non-anchor positions.
- :func:`text_anchor_text`: the Text_anchor baseline, the formatting and label words re-encoded as text.

Positions index the encoding of the demonstrations text (the rendered demonstrations, without the query),
special tokens included when the tokenizer adds them; :func:`fastattn_icl.ops.gather.gather_kv` takes them
as its ``index``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastattn_icl.methods.anchors import (
    check_label_words,
    encode_prefix,
    render_template,
    template_fields,
    template_regex,
    token_at,
    tokenizer_name,
)

__all__ = [
    "KeepSet",
    "hidden_anchor_keep",
    "hidden_anchor_positions",
    "hidden_random_positions",
    "text_anchor_text",
]


@dataclass(frozen=True)
class KeepSet:
    """The Hidden_anchor keep set of one demonstrations text.

    Attributes:
        positions: int64 ``[M]``, sorted and unique: the kept token positions (formatting tokens, label
            words and, when kept, the special tokens).
        label_positions: int64 ``[A]``: the label-word token of each demonstration, in order (a subset of
            ``positions``).
        label_classes: int64 ``[A]``: the class of each (index into ``label_words``).
        special_positions: int64 ``[S]``: the special tokens the tokenizer added around the text (e.g.
            BOS), whether kept or not.
        num_tokens: ``T``, the number of tokens of the demonstrations encoding.
        input_ids: int64 ``[T]``: the demonstrations encoding.
    """

    positions: torch.Tensor
    label_positions: torch.Tensor
    label_classes: torch.Tensor
    special_positions: torch.Tensor
    num_tokens: int
    input_ids: torch.Tensor


def _literal_spans(template: str, match: re.Match) -> list[tuple[str, int, int]]:
    """``(literal, start, end)`` of each non-empty literal part of ``template`` inside one demonstration that
    :func:`~fastattn_icl.methods.anchors.template_regex` matched.

    The demonstration is matched again, over exactly the same characters and with the same label word,
    by a pattern of the same structure whose literal parts are groups; the regex engine therefore splits
    the free fields exactly as the original match did.
    """
    parsed = template_fields(template)
    parts = []
    for i, (literal, field) in enumerate(parsed):
        parts.append(f"(?P<l{i}>{re.escape(literal)})")
        if field == "y":
            following = parsed[i + 1][0] if i + 1 < len(parsed) else ""
            parts.append("(?P<label>" + re.escape(match.group("label")) + ")" + (r"(?!\w)" if not following else ""))
        elif field is not None:
            parts.append(r"[\s\S]*?")
    grouped = re.compile("".join(parts)).fullmatch(match.string, match.start(), match.end())
    if grouped is None or grouped.span("label") != match.span("label"):  # pragma: no cover - same structure
        raise RuntimeError(f"could not split the demonstration {match.group(0)!r} into the parts of {template!r}")
    return [(literal, *grouped.span(f"l{i}")) for i, (literal, _) in enumerate(parsed) if literal]


def _merge(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of half-open character intervals, touching ones joined (sorted)."""
    merged: list[list[int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _special_positions(offsets: list[tuple[int, int]]) -> list[int]:
    """Tokens with an empty character span at the start or the end of the encoding: those the tokenizer
    adds around the text (BOS, EOS), which spell no character of it."""
    empty = [s == e for s, e in offsets]
    lead = 0
    while lead < len(empty) and empty[lead]:
        lead += 1
    trail = len(empty)
    while trail > lead and empty[trail - 1]:
        trail -= 1
    return list(range(lead)) + list(range(trail, len(empty)))


def hidden_anchor_keep(
    tokenizer: Any,
    demonstrations: str,
    template: str,
    label_words: Sequence[str],
    *,
    add_special_tokens: bool = True,
    keep_special_tokens: bool = True,
) -> KeepSet:
    """The Hidden_anchor keep set of a demonstrations text: per demonstration, the formatting tokens and the
    label word.

    A token is a formatting token when its character span lies entirely inside the template's literal
    text of a demonstration (the text before the first field, between fields and after ``{y}``;
    whitespace-only tokens such as the newline included). Literal text separated only by an empty free
    field counts as one piece, and whitespace between demonstrations or after the last one is formatting
    too. A token that straddles literal text and a free field's text (e.g. GPT-2's ``" the"`` after
    ``"Review:"``) is text and is not kept. The label word's token is kept (it usually carries the
    literal space before it). Text before the first demonstration (an instruction) is not kept.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (offsets are needed).
        demonstrations: the rendered demonstrations, concatenated, without the query: e.g.
            ``PromptBuilder(...).prompt(x)`` minus the rendered query, or
            ``"".join(template.format(x=x, y=label_words[c]) for x, c in demos)``.
        template: demonstration template with a ``{y}`` label field and named free fields, e.g.
            ``"Review: {x}\\nSentiment: {y}\\n"``.
        label_words: the label word of each class.
        add_special_tokens: as the tokenizer's flag; must match how the demonstrations are encoded for the
            model.
        keep_special_tokens: keep the special tokens the tokenizer adds (empty character span at the start
            or end, e.g. BOS). Default ``True``: BOS is the attention sink of Llama-style models, it takes
            a large share of every head's attention, so dropping it from the cache changes every layer's
            attention distribution, not only the demonstrations' contribution.

    Returns:
        :class:`KeepSet` with ``positions`` int64 ``[M]`` sorted and unique.

    Raises:
        TypeError: ``label_words`` is not a sequence of strings, or the tokenizer gives no offsets.
        ValueError: no demonstration matches the template (naming the template and the tokenizer); a label
            word is not a single token (naming the word and the tokenizer); a non-whitespace literal part of
            the template gives no token of its own in some demonstration (naming the literal and the
            demonstration's index); non-whitespace text between two demonstrations; or text after the last
            demonstration (a rendered query: the text must end after the last demonstration).
    """
    words = check_label_words(label_words)
    if not isinstance(demonstrations, str):
        raise TypeError(f"demonstrations must be the rendered demonstrations text, got {type(demonstrations)}")
    ids, offsets = encode_prefix(tokenizer, demonstrations, add_special_tokens)
    matches = list(template_regex(template, words).finditer(demonstrations))
    if not matches:
        raise ValueError(
            f"no demonstration of the template {template!r} with label words {words!r} was found in the "
            f"demonstrations text (tokenizer {tokenizer_name(tokenizer)})"
        )
    tail = demonstrations[matches[-1].end() :]
    if tail.strip():
        raise ValueError(
            f"the demonstrations text must end after the last demonstration of the template {template!r}, "
            f"but {tail!r} follows it (a rendered query?): pass the demonstrations without the query"
        )
    literals: list[tuple[int, int]] = []
    per_demo: list[list[tuple[str, int, int]]] = []
    for d, match in enumerate(matches):
        if d > 0:
            gap = demonstrations[matches[d - 1].end() : match.start()]
            if gap.strip():
                raise ValueError(
                    f"{gap!r} between demonstrations {d - 1} and {d} is not part of a demonstration of the "
                    f"template {template!r}"
                )
            literals.append((matches[d - 1].end(), match.start()))
        spans = _literal_spans(template, match)
        per_demo.append(spans)
        literals.extend((s, e) for _, s, e in spans)
    literals.append((matches[-1].end(), len(demonstrations)))
    intervals = _merge([(a, b) for a, b in literals if b > a])

    special = _special_positions(offsets)
    special_set = set(special)
    kept = set(special) if keep_special_tokens else set()
    for i, (s, e) in enumerate(offsets):
        if i not in special_set and any(a <= s and e <= b for a, b in intervals):
            kept.add(i)
    label_positions, label_classes = [], []
    for match in matches:
        word = match.group("label")
        start, end = match.span("label")
        label_positions.append(token_at(ids, offsets, start, end, demonstrations, word, tokenizer))
        label_classes.append(words.index(word))
    kept.update(label_positions)

    for d, spans in enumerate(per_demo):
        for literal, a, b in spans:
            if not literal.strip():
                continue
            if not any(offsets[i][1] > offsets[i][0] and offsets[i][0] < b and offsets[i][1] > a for i in kept):
                raise ValueError(
                    f"the template literal {literal!r} gives no token of its own in demonstration {d} with "
                    f"{tokenizer_name(tokenizer)}: every token covering it also covers free-field text "
                    f"(template {template!r})"
                )
    return KeepSet(
        positions=torch.tensor(sorted(kept), dtype=torch.long),
        label_positions=torch.tensor(label_positions, dtype=torch.long),
        label_classes=torch.tensor(label_classes, dtype=torch.long),
        special_positions=torch.tensor(special, dtype=torch.long),
        num_tokens=len(ids),
        input_ids=torch.tensor(ids, dtype=torch.long),
    )


def hidden_anchor_positions(
    tokenizer: Any,
    demonstrations: str,
    template: str,
    label_words: Sequence[str],
    *,
    add_special_tokens: bool = True,
    keep_special_tokens: bool = True,
) -> torch.Tensor:
    """int64 ``[M]``, sorted and unique: the Hidden_anchor positions, ``hidden_anchor_keep(...).positions``.

    See :func:`hidden_anchor_keep` for the arguments, the rule and the errors.
    """
    return hidden_anchor_keep(
        tokenizer,
        demonstrations,
        template,
        label_words,
        add_special_tokens=add_special_tokens,
        keep_special_tokens=keep_special_tokens,
    ).positions


def hidden_random_positions(keep: KeepSet, *, seed: int = 0, keep_special_tokens: bool = True) -> torch.Tensor:
    """The Hidden_random baseline: the anchor set with every label word replaced by a random non-anchor position
    of the same demonstration; int64 ``[M]``, sorted, ``M = len(keep.positions)`` (docs/methods.md §5: "random
    non-anchor positions instead of label words").

    The formatting tokens stay, so the baseline differs from Hidden_anchor only in which token of each
    demonstration carries its label slot. Demonstration ``i`` draws uniformly (a ``torch.Generator`` seeded
    with ``seed``) among the positions after the previous demonstration's label word and before its own that
    are neither anchors nor special tokens, i.e. its text. Special tokens of ``keep.positions`` (BOS) stay when
    ``keep_special_tokens``, else they are dropped (then ``M`` is smaller by their number).

    Raises:
        TypeError: ``keep`` is not a :class:`KeepSet`.
        ValueError: a demonstration has no non-anchor position to draw.
    """
    if not isinstance(keep, KeepSet):
        raise TypeError(f"keep must be a KeepSet (from hidden_anchor_keep), got {type(keep).__name__}")
    anchors = set(keep.positions.tolist())
    special = set(keep.special_positions.tolist())
    labels = sorted(keep.label_positions.tolist())
    generator = torch.Generator().manual_seed(seed)
    drawn, start = [], 0
    for i, label in enumerate(labels):
        pool = [p for p in range(start, label) if p not in anchors and p not in special]
        if not pool:
            raise ValueError(
                f"demonstration {i} has no non-anchor position before its label word (position {label}) to draw "
                "a random replacement from"
            )
        drawn.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        start = label + 1
    kept = anchors - set(labels)
    if not keep_special_tokens:
        kept -= special
    return torch.tensor(sorted(kept | set(drawn)), dtype=torch.long)


def text_anchor_text(template: str, label_words: Sequence[str], demonstrations: Sequence[tuple[str, int]]) -> str:
    """The Text_anchor baseline's demonstrations text: each demonstration rendered with every free field
    empty, only its formatting and its label word (``"Review: \\nSentiment: positive\\n"``), concatenated.

    Args:
        template: as in :func:`hidden_anchor_keep`.
        label_words: the label word of each class.
        demonstrations: ``(x, class)`` pairs; only the class is used.

    Raises:
        ValueError: a class is not an integer in ``[0, len(label_words))``, or the template is invalid.
    """
    words = check_label_words(label_words)
    empty = {name: "" for _, name in template_fields(template) if name is not None and name != "y"}
    pieces = []
    for i, demo in enumerate(demonstrations):
        y = demo[1]
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < len(words):
            raise ValueError(f"demonstration {i} has class {y!r}; classes must be integers in [0, {len(words)})")
        pieces.append(render_template(template, words[y], **empty))
    return "".join(pieces)
