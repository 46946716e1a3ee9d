"""A small generated sentiment-style ICL task for the method tests: reviews, a word-level tokenizer built
with ``tokenizers`` from the generated text, and prompt builders (no downloads)."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

TEMPLATE = "Review: {x}\nSentiment: {y}\n"
LABEL_WORDS = ["negative", "positive"]
POSITIVE = ["great", "lovely", "superb", "fun", "charming", "moving", "brilliant", "warm"]
NEGATIVE = ["awful", "dull", "boring", "bad", "clumsy", "tedious", "weak", "bland"]
NEUTRAL = ["the", "film", "movie", "was", "plot", "and", "acting", "story", "a", "very", "quite", "really"]
SPECIALS = ["[PAD]", "[UNK]", "[BOS]"]


def review(rng: random.Random, label: int) -> str:
    words = rng.sample(NEUTRAL, 3) + rng.sample(POSITIVE if label else NEGATIVE, 2)
    rng.shuffle(words)
    return " ".join(words)


def dataset(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (review, class) pairs, classes alternating."""
    rng = random.Random(seed)
    return [(review(rng, i % 2), i % 2) for i in range(n)]


def corpus() -> str:
    rng = random.Random(123)
    return "".join(TEMPLATE.format(x=x, y=LABEL_WORDS[y]) for x, y in dataset(40, seed=rng.randrange(1000)))


def word_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
    """WordLevel tokenizer over every word of the task (ids < 60: fits the tiny models' vocabulary of 100)."""
    words = sorted(set(POSITIVE + NEGATIVE + NEUTRAL + LABEL_WORDS + ["Review", "Sentiment", ":"] + list(extra_words)))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def byte_bpe_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on the generated corpus (label words carry a leading space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([corpus()] * 5, trainer=trainer)
    return tokenizer
