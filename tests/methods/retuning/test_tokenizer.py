"""The character-level tokenizer: one token per character, decoding back character for character, saved and loaded."""

import pytest
from transformers import AutoTokenizer

from fastattn_icl.methods.retuning.tokenizer import DEFAULT_ALPHABET, SPECIAL_TOKENS, char_tokenizer

TEXT = "73199 + 21439\nSolution: Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: Carry 0 , Output 94638"


def test_one_token_per_character_and_back():
    tok = char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert ids == [len(SPECIAL_TOKENS) + DEFAULT_ALPHABET.index(c) for c in TEXT]
    assert tok.decode(ids) == TEXT  # ' ,' and the newlines survive
    assert len(tok) == len(SPECIAL_TOKENS) + len(DEFAULT_ALPHABET)


def test_special_tokens():
    tok = char_tokenizer("0123456789")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    ids = tok("12x", add_special_tokens=False)["input_ids"]
    assert ids == [5, 6, 3]  # outside the alphabet: <unk>
    assert tok.decode([1, 5, 2, 0], skip_special_tokens=True) == "1"
    batch = tok(["1", "123"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0] == [0, 0, 5] and batch["attention_mask"][0] == [0, 0, 1]  # left padding


def test_save_and_load(tmp_path):
    char_tokenizer().save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == char_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == TEXT and loaded.eos_token_id == 2 and loaded.padding_side == "left"


@pytest.mark.parametrize(("alphabet", "error", "match"), [
    ("", ValueError, "empty"),
    ("0123451", ValueError, r"repeats the characters \['1'\]"),
    (list("0123"), TypeError, "str"),
])
def test_bad_alphabet(alphabet, error, match):
    with pytest.raises(error, match=match):
        char_tokenizer(alphabet)
