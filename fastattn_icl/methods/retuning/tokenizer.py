"""A character-level tokenizer for Re-Tuning models trained from scratch: one token per character.

Re-Tuning's tasks (addition, the DP problem, parity) are digit strings; a character vocabulary keeps every digit
its own token, so a model never has to split a multi-digit token to recurse on a shorter number. Built with the
``tokenizers`` library (a BPE model without merges, so every character stays a token, and a ``Fuse`` decoder, so
decoding concatenates them) and wrapped as a ``transformers`` fast tokenizer: it saves with ``save_pretrained`` and
loads back with ``AutoTokenizer.from_pretrained``.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the alphabet in its order. A character outside the
alphabet becomes ``<unk>``. A literal ``<eos>`` (etc.) in a text is read as that special token.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

__all__ = ["DEFAULT_ALPHABET", "SPECIAL_TOKENS", "char_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# printable ASCII: digits, letters, punctuation, space and newline (no tab, carriage return or form feeds)
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one token per character of ``alphabet`` (after the 4 special tokens), left padding.

    Raises ``TypeError`` unless ``alphabet`` is a str, ``ValueError`` if it is empty or repeats a character.
    """
    if not isinstance(alphabet, str):
        raise TypeError(f"alphabet must be a str of distinct characters, got {type(alphabet).__name__}")
    if not alphabet:
        raise ValueError("alphabet is empty")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ValueError(f"alphabet repeats the characters {repeated}")
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    pad, bos, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        padding_side="left",
        clean_up_tokenization_spaces=False,  # ' ,' stays ' ,': a text decodes character for character
    )
