"""The shipped task data and its reader: sizes, balance, splits, and errors that name the file and line."""

import json
from collections import Counter

import pytest

from fastattn_icl.lab import TASKS, TaskDataError, load_task
from fastattn_icl.lab.tasks import check_template, read_jsonl


@pytest.mark.parametrize("name", list(TASKS))
def test_shipped_task_is_large_balanced_and_split(name):
    task = load_task(name)
    everything = [e for split in ("train", "dev", "test") for e in task.split(split)]
    assert len(everything) >= 200
    counts = Counter(e.label for e in everything)
    assert sorted(counts) == list(range(task.num_classes))
    assert len(set(counts.values())) == 1, f"{name} is not balanced: {counts}"
    for split in ("train", "dev", "test"):
        per_class = Counter(e.label for e in task.split(split))
        assert len(set(per_class.values())) == 1 and len(per_class) == task.num_classes, (split, per_class)
    texts = [e.text.lower() for e in everything]
    assert len(set(texts)) == len(texts), "duplicate texts"
    assert len({e.id for e in everything}) == len(everything)
    # varied: many distinct words, and lengths that are not all the same
    lengths = [len(e.text.split()) for e in everything]
    assert max(lengths) - min(lengths) >= 5
    assert len({w for t in texts for w in t.split()}) > 4 * len(everything) // 3


def test_per_class_draws_each_class_and_respects_exclude():
    task = load_task("agnews")
    demos = task.per_class("train", 2, seed=3)
    assert [y for _, y in demos] == [0, 1, 2, 3, 0, 1, 2, 3]
    again = task.per_class("train", 2, seed=3)
    assert demos == again
    assert demos != task.per_class("train", 2, seed=4)
    ids = {e.id for e in task.split("train") if (e.text, e.label) in set(demos)}
    rest = task.per_class("train", 2, seed=3, exclude=ids)
    assert not set(rest) & set(demos)
    with pytest.raises(ValueError, match="usable examples of class"):
        task.per_class("train", 999)


def _write(tmp_path, rows):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = [{"id": f"{s}{i}", "split": s, "label": w, "text": f"some text {s} {i}"}
        for s in ("train", "dev", "test") for i, w in enumerate(["negative", "positive"])]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"t\.jsonl:7: not JSON"),
        ({"id": "x", "split": "train", "label": "neutral", "text": "a"}, r"t\.jsonl:7: label 'neutral'"),
        ({"id": "x", "split": "validation", "label": "positive", "text": "a"}, r"t\.jsonl:7: split 'validation'"),
        ({"id": "x", "split": "train", "label": "positive", "text": "Review: nice"}, r"t\.jsonl:7: .*'Review:'"),
        ({"id": "x", "split": "train", "label": "positive", "text": " padded "}, r"t\.jsonl:7: text must"),
        ({"id": "train0", "split": "train", "label": "positive", "text": "a b"}, r"t\.jsonl:7: duplicate id"),
        ({"id": "x", "split": "train", "text": "a b"}, r"t\.jsonl:7: needs an object"),
    ],
)
def test_a_bad_line_is_named(tmp_path, bad, message):
    path = _write(tmp_path, GOOD + [bad])
    with pytest.raises(TaskDataError, match=message):
        read_jsonl(path, ["negative", "positive"], "Review: {x}\nSentiment: {y}\n")


def test_good_file_reads_and_empty_split_is_refused(tmp_path):
    splits = read_jsonl(_write(tmp_path, GOOD), ["negative", "positive"], "Review: {x}\nSentiment: {y}\n")
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [2, 2, 2]
    with pytest.raises(TaskDataError, match="split 'dev' is empty"):
        read_jsonl(_write(tmp_path, [r for r in GOOD if r["split"] != "dev"]), ["negative", "positive"],
                   "Review: {x}\nSentiment: {y}\n")


@pytest.mark.parametrize("template", ["Review: {x}\nSentiment:\n", "Sentiment: {y} Review: {x}\n", "{x} {y} {y}"])
def test_template_needs_x_then_y(template):
    with pytest.raises(TaskDataError, match="template"):
        check_template(template, "here")


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(KeyError, match="unknown task 'sst5'"):
        load_task("sst5")
    with pytest.raises(TaskDataError, match="no task file"):
        load_task("sst2", path=tmp_path / "missing.jsonl")
