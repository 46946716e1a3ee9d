"""The four classification tasks of the "Label Words are Anchors" study, with data written for this project.

Each task is a JSONL file in ``fastattn_icl/lab/data/`` (one ``{"id", "split", "label", "text"}`` object per
line; splits ``train`` / ``dev`` / ``test``, balanced per class) plus the paper's prompt template and one label
word per class. The label words are lower-case versions of the paper's (``World`` → ``world``); each must be a
single token of the tokenizer after the template's separator, which :meth:`Task.check_tokenizer` checks before
any run starts.

- ``sst2``: ``Review: {x}\\nSentiment: {y}\\n``; negative, positive.
- ``agnews``: ``Article: {x}\\nAnswer: {y}\\n``; world, sports, business, technology.
- ``trec``: ``Question: {x}\\nAnswer Type: {y}\\n``; abbreviation, entity, description, person, location, number.
- ``emoc``: ``Dialogue: {x}\\nEmotion: {y}\\n`` (three chat turns joined by `` | ``); others, happy, sad, angry.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATA_DIR", "SPLITS", "TASKS", "Example", "Task", "TaskDataError", "load_task"]

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "dev", "test")


class TaskDataError(ValueError):
    """A task file or template that cannot be used (the message names the file and line, or the word)."""


@dataclass(frozen=True)
class Example:
    """One labelled input: ``text`` and its class index ``label`` into the task's label words."""

    id: str
    text: str
    label: int


@dataclass(frozen=True)
class Task:
    """A classification task: template, label words, and its examples per split.

    Attributes:
        name: short name (``sst2``). description: what it is like.
        template: the prompt template, with ``{x}`` (the input) and ``{y}`` (the label word).
        label_words: one per class; ``classes`` are the names used in the data file (here the same words).
        splits: ``{"train" | "dev" | "test": [Example]}``.
    """

    name: str
    description: str
    template: str
    label_words: tuple[str, ...]
    splits: dict[str, list[Example]] = field(repr=False)
    path: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            raise KeyError(f"task {self.name} has no split {name!r} (splits: {', '.join(self.splits)})")
        return self.splits[name]

    def pairs(self, split: str) -> list[tuple[str, int]]:
        """``(text, class)`` pairs of a split, the form the workflows take."""
        return [(e.text, e.label) for e in self.split(split)]

    def per_class(self, split: str, k: int, *, seed: int = 0, exclude: Sequence[str] = ()) -> list[tuple[str, int]]:
        """``k`` examples of each class from ``split``, drawn with ``seed``, interleaved class by class
        (``c0, c1, ..., c0, c1, ...``), skipping the ids in ``exclude``."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        pools = []
        for c in range(self.num_classes):
            pool = [e for e in self.split(split) if e.label == c and e.id not in set(exclude)]
            if len(pool) < k:
                raise ValueError(f"task {self.name}: split {split} has {len(pool)} usable examples of class "
                                 f"{self.label_words[c]!r}, {k} asked")
            pools.append(rng.sample(pool, k))
        return [(pools[c][i].text, c) for i in range(k) for c in range(self.num_classes)]

    def check_tokenizer(self, tokenizer: Any) -> list[int]:
        """The label words' token ids, checking each is one token both in a demonstration and right after a query
        (the query is rendered up to ``{y}`` with trailing spaces stripped, so the predicted token must be the
        demonstrations' own, leading space included).

        Raises:
            TaskDataError: a label word that is not a single token, or whose token after a query differs (named).
        """
        from fastattn_icl.methods.anchors import label_token_ids

        try:
            ids = label_token_ids(tokenizer, self.template, list(self.label_words)).tolist()
        except ValueError as exc:
            raise TaskDataError(f"task {self.name}: {exc}; choose a word that is one token") from exc
        head = self.template.split("{y}")[0].split("{x}")[-1]  # e.g. "\nSentiment: "
        stripped = head.rstrip()
        alone = tokenizer(stripped, add_special_tokens=False)["input_ids"]
        for word, expected in zip(self.label_words, ids):
            full = tokenizer(head + word, add_special_tokens=False)["input_ids"]
            tail = full[len(alone):] if full[: len(alone)] == alone else full
            if tail != [expected]:
                pieces = [tokenizer.decode([t]) for t in tail]
                raise TaskDataError(f"task {self.name}: after a query ({stripped!r}) the label word {word!r} is "
                                    f"{len(tail)} token(s) {pieces}, not the demonstrations' single token "
                                    f"{tokenizer.decode([expected])!r}; choose a word that is one token")
        return ids

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "template": self.template,
                "label_words": list(self.label_words), "path": self.path,
                "sizes": {s: len(v) for s, v in self.splits.items()}}


# name: (description, template, label words); the data file is <name>.jsonl with these words as labels
TASKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sst2": ("movie-review sentiment, 2 classes (like SST-2)", "Review: {x}\nSentiment: {y}\n",
             ("negative", "positive")),
    "agnews": ("news topic, 4 classes (like AGNews)", "Article: {x}\nAnswer: {y}\n",
               ("world", "sports", "business", "technology")),
    "trec": ("question type, 6 classes (like TREC)", "Question: {x}\nAnswer Type: {y}\n",
             ("abbreviation", "entity", "description", "person", "location", "number")),
    "emoc": ("emotion of the last turn of a three-turn chat, 4 classes (like EmoC)", "Dialogue: {x}\nEmotion: {y}\n",
             ("others", "happy", "sad", "angry")),
}


def check_template(template: str, where: str) -> None:
    """A template needs exactly one ``{x}`` and one ``{y}``, ``{y}`` after ``{x}``."""
    if template.count("{y}") != 1 or template.count("{x}") != 1:
        raise TaskDataError(f"{where}: the template {template!r} must contain {{x}} and {{y}} exactly once")
    if template.index("{y}") < template.index("{x}"):
        raise TaskDataError(f"{where}: the template {template!r} must put {{y}} (the label) after {{x}}")


def read_jsonl(path: str | os.PathLike, label_words: Sequence[str], template: str) -> dict[str, list[Example]]:
    """Read and check a task file: every line an object with a known split and label and a non-empty one-line
    text that does not contain the template's prefixes (which would confuse label-word search).

    Raises:
        TaskDataError: naming the file and line of the first problem.
    """
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"no task file {path}")
    markers = [part.strip() for part in template.replace("{x}", "\0").replace("{y}", "\0").split("\0") if part.strip()]
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not {"id", "split", "label", "text"} <= set(row):
            raise TaskDataError(f"{where}: needs an object with keys id, split, label, text")
        if row["split"] not in splits:
            raise TaskDataError(f"{where}: split {row['split']!r} is not one of {SPLITS}")
        if row["label"] not in label_words:
            raise TaskDataError(f"{where}: label {row['label']!r} is not one of the label words {list(label_words)}")
        text = row["text"]
        if not isinstance(text, str) or not text.strip() or "\n" in text or text != text.strip():
            raise TaskDataError(f"{where}: text must be a non-empty single line without surrounding spaces")
        for marker in markers:
            if marker in text:
                raise TaskDataError(f"{where}: text contains the template's {marker!r}")
        if row["id"] in seen:
            raise TaskDataError(f"{where}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        splits[row["split"]].append(Example(str(row["id"]), text, list(label_words).index(row["label"])))
    for split, rows in splits.items():
        if not rows:
            raise TaskDataError(f"{path}: split {split!r} is empty")
    return splits


def load_task(name: str, *, path: str | os.PathLike | None = None) -> Task:
    """One of :data:`TASKS` (``sst2``, ``agnews``, ``trec``, ``emoc``), read from the shipped data or ``path``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    description, template, words = TASKS[name]
    check_template(template, f"task {name}")
    file = Path(path) if path is not None else DATA_DIR / f"{name}.jsonl"
    return Task(name, description, template, words, read_jsonl(file, words, template), str(file))
