"""Anchor compression (docs/methods.md §5, Hidden_anchor): ``compress_demonstrations`` / ``CompressedDemonstrations``.

- exactness: the compressed-cache forward equals a full-context eager forward whose test tokens attend only to
  the kept demonstration positions and to themselves, with the same position ids (GPT-2, Llama; default and
  restarted offsets; shared and expanded prefix; left-padded batches);
- batched serving: the shared prefix (seam, one copy) equals the naive expanded ``DynamicCache``, and both equal
  each row run alone, for the forward and greedy generation, on every family (and once on the Triton backend);
- save / load, bad input, the metrics workflow ``evaluate_compression``, and one ``gather_kv`` per compression.

Tolerance (float32): ``rtol 1e-4, atol 1e-5`` on logits at the compared (non-padded) test positions; observed
errors are about 1e-6. Only non-padded positions are compared: eager spreads a fully masked left-pad query row
uniformly over the keys, the seam returns 0 there.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fastattn_icl
from fastattn_icl.integrations import transformers as seam
from fastattn_icl.integrations.cache_keyword import cache_keyword
from fastattn_icl.methods import compression
from fastattn_icl.methods.compression import (
    METHODS,
    CompressedDemonstrations,
    CompressionEvaluation,
    compress_demonstrations,
    evaluate_compression,
)
from fastattn_icl.methods.metrics import label_loyalty, label_predictions, word_loyalty
from fastattn_icl.testing import check_close
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, byte_bpe_tokenizer, dataset, word_tokenizer
from tests.models import LLAMA_LIKE, float64_twin, tiny_gptj, tiny_model

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gptj"]
PAD_ID = 2  # the tiny models' pad token ([BOS] of the word tokenizer, never a test token)
DEMOS = dataset(4, seed=1)  # 4 demonstrations, 10 tokens each with the word tokenizer: T = 40
TOKENIZER = word_tokenizer()


# -- helpers -------------------------------------------------------------------------------------------------


def _model(family: str, layers: int = 2, **overrides):
    if family == "gptj":
        return tiny_gptj(layers=layers, **overrides).eval()
    if family == "mistral":
        overrides.setdefault("sliding_window", 128)  # a window that never binds on these lengths
    return tiny_model(family, attn_implementation="eager", layers=layers, **overrides)


def _llama(layers: int = 2, **overrides):
    config = LlamaConfig(**{**LLAMA_LIKE, "num_hidden_layers": layers, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def _query_ids(x: str) -> torch.Tensor:
    """The test tokens of ``x``: the template rendered up to its label (no demonstrations)."""
    return torch.tensor(TOKENIZER.encode(TEMPLATE.split("{y}")[0].format(x=x).rstrip()).ids, dtype=torch.long)


def left_pad(rows: list[torch.Tensor], extra: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``rows``; ``extra[b]`` more pad columns before row ``b`` (different padding per row)."""
    extra = extra or [0] * len(rows)
    S = max(len(r) + e for r, e in zip(rows, extra))
    ids = torch.full((len(rows), S), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, S - len(r) :] = r
        mask[b, S - len(r) :] = 1
    return ids, mask


def _test_rows(n: int, seed: int = 7, trim: tuple[int, ...] = ()) -> list[torch.Tensor]:
    """``n`` test inputs; row ``b`` loses its first ``trim[b]`` tokens (different lengths -> different padding)."""
    rows = [_query_ids(x) for x, _ in dataset(n, seed=seed)]
    return [r[t:] for r, t in zip(rows, list(trim) + [0] * n)]


def _reference(model, comp: CompressedDemonstrations, test_ids: torch.Tensor) -> torch.Tensor:
    """``[S, V]`` logits of the test tokens from ONE eager forward over demonstrations ++ test tokens with a 4D
    additive mask: demonstration rows causal over the demonstrations (so their keys are those of the
    demonstrations-only run), test rows over the kept demonstration positions and the test tokens ``j <= i``;
    position ids ``arange(T)`` then ``position_offset + arange(S)``.

    transformers uses a 4D ``attention_mask`` as given; eager *adds* it to the scores, so it must be the
    inverted float mask (0 keep / dtype min masked): a bool mask is added as 0/1 and silently masks nothing.
    """
    assert model.config._attn_implementation == "eager"
    T, S = comp.num_tokens, test_ids.numel()
    ids = torch.cat([comp.input_ids, test_ids])[None]
    allowed = torch.zeros(T + S, T + S, dtype=torch.bool)
    allowed[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[T:, comp.positions] = True
    allowed[T:, T:] = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.zeros(T + S, T + S).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    positions = torch.cat([torch.arange(T), comp.position_offset + torch.arange(S)])[None]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    return out[0, T:]


def _references(model, comp: CompressedDemonstrations, rows: list, like: torch.Tensor):
    """:func:`_reference` of each left-padded row on the model and on its float64 twin, laid out as ``like``."""
    twin = float64_twin(model)
    want, high = torch.zeros_like(like), torch.zeros_like(like, dtype=torch.float64)
    for b, r in enumerate(rows):
        want[b, like.shape[1] - len(r) :] = _reference(model, comp, r)
        high[b, like.shape[1] - len(r) :] = _reference(twin, comp, r)
    return want, high


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor, high: torch.Tensor, mask: torch.Tensor, what: str):
    """The tolerance rule on the real positions of each row: ``want`` in float32, ``high`` its float64 oracle."""
    for b in range(got.shape[0]):
        real = mask[b].bool()
        check_close(f"{what} row {b}", got[b, real], want[b, real], high[b, real])


def _full_prompt_logits(model, x: str) -> torch.Tensor:
    """``[V]`` last-position logits of full ICL: demonstrations ++ query in one prompt."""
    demos = torch.tensor(TOKENIZER.encode("".join(TEMPLATE.format(x=d, y=LABEL_WORDS[c]) for d, c in DEMOS)).ids)
    ids = torch.cat([demos, _query_ids(x)])[None]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0, -1]


@pytest.fixture(scope="module")
def models():
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = _model(family)
        return cache[family]

    return get


# -- 1. exactness --------------------------------------------------------------------------------------------

# a custom keep set (via from_ids) whose last kept position is not the last demonstration token: default
# offset 24 != T, and it drops the demonstrations' first token
CUSTOM_KEEP = [1, 3, 8, 9, 15, 17, 23]


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("offset", [None, 0])
@pytest.mark.parametrize("keep", ["hidden_anchor", "custom"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compressed_forward_equals_masked_full_context(models, family, keep, offset, share_prefix):
    model = models(family)
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS, position_offset=offset)
    assert comp.method == "hidden_anchor" and comp.num_tokens == 40
    if keep == "custom":
        comp = CompressedDemonstrations.from_ids(model, comp.input_ids, CUSTOM_KEEP, position_offset=offset)
        assert comp.method == "custom" and comp.positions.tolist() == CUSTOM_KEEP
        assert comp.position_offset == (CUSTOM_KEEP[-1] + 1 if offset is None else 0)
    else:
        assert comp.position_offset == (int(comp.positions[-1]) + 1 if offset is None else 0)
    L = model.config.num_hidden_layers
    assert comp.keys.shape == (L, 1, comp.geometry.num_kv_heads, len(comp.positions), comp.geometry.head_dim)
    assert comp.values.shape == comp.keys.shape and comp.num_kept == len(comp.positions)

    rows = _test_rows(2, trim=(0, 2))
    ids, mask = left_pad(rows)  # row 1 is 2 tokens shorter: 2 columns of left padding
    got = comp.forward(model, ids, mask, share_prefix=share_prefix)
    assert got.shape == (2, ids.shape[1], model.config.vocab_size)
    want, high = _references(model, comp, rows, got)
    _assert_rows_close(got, want, high, mask, f"{family} {keep} offset={offset} shared={share_prefix}")
    assert model.config._attn_implementation == "eager"  # the shared path switches the model for the call only

    # batch 1, no mask: the default (expanded) path, and logits_to_keep=1
    one = comp.forward(model, rows[0][None], logits_to_keep=1)
    assert one.shape == (1, 1, model.config.vocab_size)
    check_close("batch 1, logits_to_keep=1", one[0, -1], want[0, -1], high[0, -1])


def test_full_method_equals_plain_icl(models):
    """``"full"`` keeps every position at the default offset ``T``: the forward is plain ICL with prefix caching."""
    model = models("llama")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS, method="full")
    assert comp.positions.tolist() == list(range(comp.num_tokens)) and comp.position_offset == comp.num_tokens
    x = dataset(1, seed=7)[0][0]
    got = comp.forward(model, _query_ids(x)[None])[0, -1]
    check_close("last logits", got, _full_prompt_logits(model, x), _full_prompt_logits(float64_twin(model), x))


def _word_tokenizer_with_bos():
    from tokenizers import processors

    tokenizer = word_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]"))]
    )
    return tokenizer


def _tail_ids(tokenizer, demos, x: str) -> torch.Tensor:
    """The test tokens of ``x`` as evaluate_compression takes them: the full prompt's tokens after the
    demonstrations' (checked to be a clean split)."""
    demos_text = "".join(TEMPLATE.format(x=d, y=LABEL_WORDS[c]) for d, c in demos)
    prefix = tokenizer.encode(demos_text).ids
    full = tokenizer.encode(demos_text + TEMPLATE.split("{y}")[0].format(x=x).rstrip()).ids
    assert full[: len(prefix)] == prefix
    return torch.tensor(full[len(prefix) :], dtype=torch.long)


@pytest.mark.parametrize("keep_special_tokens", [True, False])
def test_bos_sink_kept_and_exact(models, keep_special_tokens):
    """A tokenizer that adds BOS: the sink is kept by default (dropped on request), the test tokens get no BOS of
    their own, and the forward is still the masked full-context one."""
    model = models("llama")
    tokenizer = _word_tokenizer_with_bos()
    comp = compress_demonstrations(
        model, tokenizer, DEMOS, TEMPLATE, LABEL_WORDS, keep_special_tokens=keep_special_tokens
    )
    plain = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    assert comp.num_tokens == 41 and int(comp.input_ids[0]) == tokenizer.token_to_id("[BOS]")
    expected = ([0] if keep_special_tokens else []) + (plain.positions + 1).tolist()  # shifted by the BOS
    assert comp.positions.tolist() == expected
    no_bos = compress_demonstrations(model, tokenizer, DEMOS, TEMPLATE, LABEL_WORDS, add_special_tokens=False)
    assert no_bos.num_tokens == 40 and torch.equal(no_bos.positions, plain.positions)
    rows = [_tail_ids(tokenizer, DEMOS, x) for x, _ in dataset(2, seed=7)]
    assert torch.equal(rows[0], _query_ids(dataset(2, seed=7)[0][0]))  # no BOS in the test tokens
    ids, mask = left_pad(rows, extra=[0, 2])
    for share in (True, False):
        got = comp.forward(model, ids, mask, share_prefix=share)
        want, high = _references(model, comp, rows, got)
        _assert_rows_close(got, want, high, mask, f"bos keep={keep_special_tokens} shared={share}")
    full = evaluate_compression(
        model, tokenizer, DEMOS, dataset(4, seed=2), TEMPLATE, LABEL_WORDS, methods=["full"], progress=False
    )["full"]
    assert (full.label_loyalty, full.word_loyalty, full.kept) == (1.0, 1.0, 41)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_byte_level_bpe(family):
    """A GPT-2-style byte-level BPE (label words with a leading space, multi-token reviews): hidden_anchor and
    hidden_random are exact, hidden_random is seeded, and full ICL is reproduced by ``"full"``."""
    tokenizer = byte_bpe_tokenizer()
    size = (
        dict(vocab_size=300, n_positions=128) if family == "gpt2" else dict(vocab_size=300, max_position_embeddings=128)
    )
    model = _model(family, **size) if family == "gpt2" else _llama(**size)
    demos = DEMOS[:2]
    anchor = compress_demonstrations(model, tokenizer, demos, TEMPLATE, LABEL_WORDS)
    random0 = compress_demonstrations(model, tokenizer, demos, TEMPLATE, LABEL_WORDS, method="hidden_random")
    random1 = compress_demonstrations(model, tokenizer, demos, TEMPLATE, LABEL_WORDS, method="hidden_random", seed=1)
    again = compress_demonstrations(model, tokenizer, demos, TEMPLATE, LABEL_WORDS, method="hidden_random")
    assert torch.equal(random0.positions, again.positions) and not torch.equal(random0.positions, random1.positions)
    assert random0.num_kept == anchor.num_kept < anchor.num_tokens
    # the formatting stays, each demonstration's label word is replaced by one of its text tokens; same offset
    pieces = {p: tokenizer.decode([int(anchor.input_ids[p])]).strip() for p in anchor.positions.tolist()}
    labels = {p for p, piece in pieces.items() if piece in LABEL_WORDS}
    assert len(labels) == len(demos)
    assert set(anchor.positions.tolist()) - labels <= set(random0.positions.tolist())
    assert not set(random0.positions.tolist()) & labels
    assert random0.position_offset == anchor.position_offset
    kept = [tokenizer.decode([int(anchor.input_ids[p])]) for p in anchor.positions]
    assert kept.count(" positive") == kept.count(" negative") == 1 and kept.count("Review") == 2
    rows = [_tail_ids(tokenizer, demos, x) for x, _ in dataset(2, seed=7)]
    ids, mask = left_pad(rows)
    for comp in (anchor, random0):
        got = comp.forward(model, ids, mask)
        want, high = _references(model, comp, rows, got)
        _assert_rows_close(got, want, high, mask, f"bpe {family} {comp.method}")
    results = evaluate_compression(
        model,
        tokenizer,
        demos,
        dataset(3, seed=2),
        TEMPLATE,
        LABEL_WORDS,
        methods=["full", "text_anchor"],
        progress=False,
    )
    assert results["full"].label_loyalty == results["full"].word_loyalty == 1.0
    assert results["text_anchor"].kept < results["full"].kept


# -- 2. batched serving: shared prefix vs the expanded cache vs one row at a time ----------------------------


@pytest.fixture
def prefix_calls(monkeypatch):
    """Per call of the shared-prefix kernel from the seam: (query batch, prefix key batch, prefix length)."""
    calls = []
    original = seam.shared_prefix_attention

    def recording(q, prefix_k, prefix_v, k, v, **kwargs):
        calls.append((q.shape[0], prefix_k.shape[0], prefix_k.shape[2]))
        return original(q, prefix_k, prefix_v, k, v, **kwargs)

    monkeypatch.setattr(seam, "shared_prefix_attention", recording)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_equals_expanded_cache_and_single_rows(models, family, prefix_calls):
    model = models(family)
    L = model.config.num_hidden_layers
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    rows = _test_rows(4, trim=(0, 1, 3, 2))
    ids, mask = left_pad(rows, extra=[0, 2, 1, 0])
    assert len({int(m.sum()) for m in mask}) == 4 and not bool(mask[:, 0].all())  # 4 different paddings
    shared = comp.forward(model, ids, mask, share_prefix=True)
    # every layer read the ONE prefix copy (batch 1) for the batch of 4
    assert prefix_calls == [(4, 1, comp.num_kept)] * L
    expanded = comp.forward(model, ids, mask, share_prefix=False)
    assert len(prefix_calls) == L  # the expanded path never reaches the shared-prefix kernel
    default = comp.forward(model, ids, mask)  # B > 1: shared
    _, high = _references(model, comp, rows, shared)
    # the shared-prefix kernel at most 2x as far from the float64 oracle as the expanded cache
    _assert_rows_close(shared, expanded, high, mask, f"{family} shared vs expanded")
    assert torch.equal(default, shared)  # bit-exact: B > 1 takes the shared path by default
    for b, r in enumerate(rows):
        alone = comp.forward(model, r[None])[0]
        check_close(f"row {b} alone", shared[b, mask[b].bool()], alone, high[b, mask[b].bool()])

    del prefix_calls[:]
    gen_shared = comp.generate(model, ids, mask, max_new_tokens=4, share_prefix=True)
    assert prefix_calls == [(4, 1, comp.num_kept)] * (4 * L)  # shared while decoding too: prefill + 3 steps
    gen_expanded = comp.generate(model, ids, mask, max_new_tokens=4, share_prefix=False)
    assert gen_shared.shape == (4, 4) and gen_shared.dtype == torch.long
    assert torch.equal(gen_shared, gen_expanded)
    assert torch.equal(comp.generate(model, ids, mask, max_new_tokens=4), gen_shared)
    for b, r in enumerate(rows):
        assert torch.equal(comp.generate(model, r[None], max_new_tokens=4)[0], gen_shared[b]), f"row {b}"
        assert torch.equal(comp.generate(model, r[None], max_new_tokens=4, share_prefix=True)[0], gen_shared[b])
    assert model.config._attn_implementation == "eager"


def test_generate_continues_the_forward(models):
    """Greedy decoding = argmax of the forward on the prompt extended by the tokens decoded so far."""
    model = models("llama")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    rows = _test_rows(2, trim=(0, 2))
    ids, mask = left_pad(rows)
    new = comp.generate(model, ids, mask, max_new_tokens=3)
    for b, r in enumerate(rows):
        seq = r
        for step in range(3):
            token = comp.forward(model, seq[None])[0, -1].argmax()
            assert int(token) == int(new[b, step])
            seq = torch.cat([seq, token[None]])


def test_shared_prefix_on_the_triton_backend():
    model = _model("llama", layers=1)
    comp = CompressedDemonstrations.from_ids(model, torch.arange(3, 13), [0, 4, 9])
    ids = torch.tensor([[PAD_ID, 20, 21, 22], [30, 31, 32, 33]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    expanded = comp.forward(model, ids, mask, share_prefix=False)
    with fastattn_icl.use_backend("triton"):
        shared = comp.forward(model, ids, mask, share_prefix=True)
    _, high = _references(model, comp, [row[m.bool()] for row, m in zip(ids, mask)], shared)
    # the Triton shared-prefix kernel at most 2x as far from the float64 oracle as the expanded cache
    _assert_rows_close(shared, expanded, high, mask, "triton shared vs expanded")


# -- 3. save / load ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["hidden_anchor", "text_anchor"])
def test_save_load_roundtrip(models, tmp_path, method):
    model = models("qwen2")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS, method=method, position_offset=5)
    path = tmp_path / "demos.safetensors"
    comp.save(path)
    loaded = CompressedDemonstrations.load(path)
    for name in ("keys", "values", "positions", "input_ids"):
        a, b = getattr(comp, name), getattr(loaded, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    assert loaded.keys.device.type == "cpu"
    assert (loaded.num_tokens, loaded.position_offset, loaded.geometry, loaded.method, loaded.num_kept) == (
        comp.num_tokens,
        5,
        comp.geometry,
        method,
        comp.num_kept,
    )
    loaded_on = CompressedDemonstrations.load(str(path), device="cpu")
    assert torch.equal(loaded_on.keys, comp.keys)
    ids, mask = left_pad(_test_rows(3, trim=(0, 1, 0)))
    for share in (True, False):  # bit-exact: the loaded cache holds the same values and runs the same path
        assert torch.equal(
            loaded.forward(model, ids, mask, share_prefix=share), comp.forward(model, ids, mask, share_prefix=share)
        )


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"keys": torch.zeros(1, 1, 1, 1, 1)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a fastattn_icl compressed-demonstrations file"):
        CompressedDemonstrations.load(path)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # no metadata at all
    with pytest.raises(ValueError, match="not a fastattn_icl"):
        CompressedDemonstrations.load(tmp_path / "plain.safetensors")
    meta = {"format": "fastattn_icl.CompressedDemonstrations", "version": "999"}
    save_file({"keys": torch.zeros(1, 1, 1, 1, 1)}, str(tmp_path / "future.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="format version 999, expected 1"):
        CompressedDemonstrations.load(tmp_path / "future.safetensors")
    tensors = {"keys": torch.zeros(1, 1, 1, 2, 4), "values": torch.zeros(1, 1, 1, 2, 4), "positions": torch.arange(3)}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "version": "1"})
    with pytest.raises(ValueError, match="inconsistent shapes"):
        CompressedDemonstrations.load(tmp_path / "bad.safetensors")
    partial = tmp_path / "partial.safetensors"
    save_file({"keys": torch.zeros(1, 1, 1, 2, 4)}, str(partial), metadata={**meta, "version": "1"})
    with pytest.raises(ValueError, match=r"lacks the tensors \['positions', 'values'\]"):
        CompressedDemonstrations.load(partial)
    tensors["positions"] = torch.arange(2)
    save_file(tensors, str(tmp_path / "nometa.safetensors"), metadata={**meta, "version": "1"})
    with pytest.raises(ValueError, match="lacks the metadata"):
        CompressedDemonstrations.load(tmp_path / "nometa.safetensors")


# -- 4. bad input --------------------------------------------------------------------------------------------


def test_demonstrations_longer_than_the_context():
    short_gpt2 = _model("gpt2", layers=1, n_positions=32)
    with pytest.raises(ValueError, match=r"demonstrations are 40 tokens, longer than the model's context of 32"):
        compress_demonstrations(short_gpt2, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    short_llama = _llama(layers=1, max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"context of 16 positions"):
        CompressedDemonstrations.from_ids(short_llama, torch.arange(3, 20), [0])


def test_test_positions_past_the_context():
    model = _model("gpt2", layers=1, n_positions=48)
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)  # offset 40
    ids = torch.arange(3, 13)[None]  # positions 40..49
    with pytest.raises(ValueError, match=r"position 49 is past the model's context of 48 positions"):
        comp.forward(model, ids)
    assert comp.forward(model, ids[:, :8]).shape == (1, 8, 100)  # positions 40..47 fit
    with pytest.raises(ValueError, match="past the model's context"):  # the decoded tokens too
        comp.generate(model, ids[:, :8], max_new_tokens=2)
    restarted = CompressedDemonstrations.from_ids(model, comp.input_ids, comp.positions, position_offset=0)
    assert restarted.forward(model, ids).shape == (1, 10, 100)


def test_sliding_window_shorter_than_the_demonstrations():
    """Mistral with ``sliding_window`` < T: transformers' ``DynamicSlidingWindowLayer`` keeps only the last
    ``window - 1`` keys, so ``from_ids`` must refuse, never gather the wrong tokens; a window that holds the
    demonstrations compresses."""
    small = _model("mistral", layers=1, sliding_window=16)
    ids = torch.arange(3, 43)  # T = 40
    with pytest.raises(ValueError, match="sliding_window=16"):
        CompressedDemonstrations.from_ids(small, ids, [0, 1, 2])
    big = _model("mistral", layers=1, sliding_window=128)
    assert CompressedDemonstrations.from_ids(big, ids, [0, 1, 2]).num_kept == 3


def test_fractional_keep_positions_raise(models):
    with pytest.raises(TypeError, match="integer positions"):
        CompressedDemonstrations.from_ids(models("gpt2"), torch.arange(3, 13), [0.7, 2.2])


def test_bad_keep_sets(models):
    model = models("gpt2")
    ids = torch.arange(3, 13)
    with pytest.raises(ValueError, match="keep set is empty"):
        CompressedDemonstrations.from_ids(model, ids, [])
    with pytest.raises(ValueError, match="keep set is empty"):
        CompressedDemonstrations.from_ids(model, ids, torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, T=10\)"):
        CompressedDemonstrations.from_ids(model, ids, [0, 10])
    with pytest.raises(ValueError, match=r"must lie in \[0, T=10\)"):
        CompressedDemonstrations.from_ids(model, ids, [-1, 3])
    with pytest.raises(ValueError, match="must not repeat"):
        CompressedDemonstrations.from_ids(model, ids, [2, 5, 2])
    with pytest.raises(ValueError, match="position_offset must be an int >= 0"):
        CompressedDemonstrations.from_ids(model, ids, [2], position_offset=-1)
    with pytest.raises(ValueError, match="demonstrations are empty"):
        CompressedDemonstrations.from_ids(model, ids[:0], [0])
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor \[T\]"):
        CompressedDemonstrations.from_ids(model, ids[None], [0])
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor \[T\]"):
        CompressedDemonstrations.from_ids(model, ids.float(), [0])
    comp = CompressedDemonstrations.from_ids(model, ids, [7, 2])  # unsorted: sorted
    assert comp.positions.tolist() == [2, 7] and comp.position_offset == 8


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (dict(layers=3), r"num_layers 2 vs 3"),
        (dict(num_key_value_heads=4), r"num_kv_heads 2 vs 4"),
        (dict(hidden_size=128), r"head_dim 16 vs 32"),
        (dict(head_dim=8), r"head_dim 16 vs 8"),
    ],
)
def test_cache_of_another_model(models, other, named):
    comp = CompressedDemonstrations.from_ids(models("llama"), torch.arange(3, 13), [0, 4])
    model = _llama(**other)
    ids = torch.tensor([[20, 21]])
    with pytest.raises(ValueError, match=f"made by a llama model and does not fit llama model: {named}"):
        comp.check_model(model)
    with pytest.raises(ValueError, match=named):
        comp.forward(model, ids)
    with pytest.raises(ValueError, match=named):
        comp.generate(model, ids, max_new_tokens=1)


def test_cache_of_another_family_names_every_difference(models):
    comp = CompressedDemonstrations.from_ids(models("llama"), torch.arange(3, 13), [0, 4])
    with pytest.raises(ValueError, match=r"made by a llama model and does not fit gpt2 model: num_kv_heads 2 vs 4"):
        comp.forward(models("gpt2"), torch.tensor([[20, 21]]))
    comp.check_model(models("qwen2"))  # same geometry: accepted


def test_bad_batches(models):
    model = models("llama")
    comp = CompressedDemonstrations.from_ids(model, torch.arange(3, 13), [0, 4])
    ids = torch.tensor([[20, 21, 22], [30, 31, 32]])
    right = torch.tensor([[1, 1, 1], [1, 1, 0]])
    for share in (None, True, False):
        with pytest.raises(ValueError, match=r"left-padded.*rows \[1\].*right padding"):
            comp.forward(model, ids, right, share_prefix=share)
    with pytest.raises(ValueError, match="left-padded"):
        comp.generate(model, ids, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):  # padding in the middle
        comp.forward(model, ids, torch.tensor([[1, 0, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"rows \[0\] of the test inputs are all padding"):
        comp.forward(model, ids, torch.tensor([[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a \[B=2, S=3\] tensor"):
        comp.forward(model, ids, torch.ones(2, 4))
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor \[B, S\]"):
        comp.forward(model, ids[0])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            comp.generate(model, ids, max_new_tokens=bad)


def test_bad_methods_and_templates(models):
    model = models("gpt2")
    with pytest.raises(ValueError, match=r"method must be one of .*'hidden_anchor'.*got 'anchor'"):
        compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS, method="anchor")
    with pytest.raises(ValueError, match=r"label field \{y\} exactly once"):
        compress_demonstrations(model, TOKENIZER, DEMOS, "Review: {x}\nSentiment:\n", LABEL_WORDS)
    with pytest.raises(ValueError, match=r"class must be in \[0, 2\), got 3"):
        compress_demonstrations(model, TOKENIZER, [("the film", 3)], TEMPLATE, LABEL_WORDS)
    # no demonstration (zero-shot): the template is named and the reason given
    with pytest.raises(ValueError, match=r"no demonstration of the template 'Review: \{x\}\\nSentiment: \{y\}"):
        compress_demonstrations(model, TOKENIZER, [], TEMPLATE, LABEL_WORDS)
    # a label word the tokenizer splits: keep_sets names the word (raised before the model runs)
    bpe = byte_bpe_tokenizer()
    with pytest.raises(ValueError, match=r"label word 'xylophonic' is not a single token"):
        compress_demonstrations(model, bpe, DEMOS, TEMPLATE, ["negative", "xylophonic"])
    # a template literal that merges with the free field ("Re" + "view" is one token): named, with the demonstration
    with pytest.raises(ValueError, match=r"template literal 'Re' gives no token of its own in demonstration 1"):
        compress_demonstrations(model, bpe, [(" great", 1), ("view is fun", 0)], "Re{x}\nSentiment: {y}\n", LABEL_WORDS)


# -- 5. the metrics workflow ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_compression(models, family):
    model = models(family)
    tests = dataset(5, seed=11)
    kwargs = dict(methods=METHODS, progress=False)
    results = evaluate_compression(model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, batch_size=3, **kwargs)
    assert list(results) == list(METHODS)
    for m, r in results.items():
        assert isinstance(r, CompressionEvaluation) and r.method == m and r.num_examples == 5
        for value in (r.accuracy, r.icl_accuracy, r.label_loyalty, r.word_loyalty):
            assert 0.0 <= value <= 1.0
        assert r.to_dict()["method"] == m
    assert len({r.icl_accuracy for r in results.values()}) == 1
    full = results["full"]
    assert full.label_loyalty == 1.0 and full.word_loyalty == 1.0 and full.accuracy == full.icl_accuracy
    assert full.kept == full.demonstration_tokens == 40
    assert results["hidden_anchor"].kept == results["hidden_random"].kept == 20
    one = evaluate_compression(model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, batch_size=1, **kwargs)
    assert one == results


def test_evaluate_compression_loyalty_by_hand(models):
    model = models("llama")
    tests = dataset(6, seed=3)
    result = evaluate_compression(
        model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, methods=["hidden_anchor"], k=5, progress=False
    )["hidden_anchor"]
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    label_ids = [TOKENIZER.token_to_id(w) for w in LABEL_WORDS]
    got = torch.stack([comp.forward(model, _query_ids(x)[None])[0, -1] for x, _ in tests])
    ref = torch.stack([_full_prompt_logits(model, x) for x, _ in tests])
    pred, ref_pred = label_predictions(got, label_ids), label_predictions(ref, label_ids)
    labels = torch.tensor([y for _, y in tests])
    assert result.label_loyalty == pytest.approx(label_loyalty(pred, ref_pred))
    assert result.word_loyalty == pytest.approx(word_loyalty(got, ref, 5))
    assert result.accuracy == pytest.approx((pred == labels).float().mean().item())
    assert result.icl_accuracy == pytest.approx((ref_pred == labels).float().mean().item())
    assert result.word_loyalty < 1.0  # dropping the review text changes the prediction: a non-trivial check


def test_evaluate_compression_progress_and_errors(models, capsys):
    model = models("gpt2")
    tests = dataset(2, seed=4)
    out = evaluate_compression(model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, progress=True)
    assert set(out) == {"hidden_anchor", "text_anchor", "hidden_random"}
    capsys.readouterr()
    with pytest.raises(ValueError, match="at least one test input"):
        evaluate_compression(model, TOKENIZER, DEMOS, [], TEMPLATE, LABEL_WORDS, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate_compression(model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate_compression(model, TOKENIZER, DEMOS, tests, TEMPLATE, LABEL_WORDS, methods=["x"], progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_zero_shot_has_nothing_to_compress(models, method):
    """Every method keeps (a part of) the demonstrations: with none, a ValueError says so before the model runs."""
    model = models("gpt2")
    with pytest.raises(ValueError, match=r"no demonstration of the template .* a zero-shot prompt has none"):
        compress_demonstrations(model, TOKENIZER, [], TEMPLATE, LABEL_WORDS, method=method)
    with pytest.raises(ValueError, match="a zero-shot prompt has none"):
        evaluate_compression(model, TOKENIZER, [], dataset(2, seed=4), TEMPLATE, LABEL_WORDS, methods=[method],
                             progress=False)


# -- 6. one gather per compression ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_one_gather_kv_per_compression(models, monkeypatch, method):
    calls = []
    original = compression.gather_kv

    def counting(keys, values, index, *args, **kwargs):
        calls.append((len(keys), index.clone()))
        return original(keys, values, index, *args, **kwargs)

    monkeypatch.setattr(compression, "gather_kv", counting)
    model = models("gpt2")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS, method=method)
    assert len(calls) == 1
    layers, index = calls[0]
    assert layers == model.config.num_hidden_layers and torch.equal(index.cpu(), comp.positions)
    comp.forward(model, _query_ids("the film was great fun")[None])
    assert len(calls) == 1  # serving gathers nothing


def test_dtype_mismatch_raises_and_to_casts(models):
    model = models("gpt2")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    ids = torch.randint(5, 50, (2, 6))
    half = comp.to(dtype=torch.float64)
    assert half.keys.dtype == torch.float64 and comp.keys.dtype == torch.float32  # a copy
    with pytest.raises(TypeError, match=r"cache is torch.float64 but the model runs torch.float32"):
        half.forward(model, ids)
    # bit-exact: float32 -> float64 -> float32 gives back the same cache, which runs the same path
    assert torch.equal(half.to(dtype=torch.float32).forward(model, ids), comp.forward(model, ids))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_serving_runs_in_eval_mode_and_restores_the_mode(share_prefix):
    model = _model("gpt2", attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    ids = torch.randint(5, 50, (2, 6))
    want = comp.forward(model, ids, share_prefix=share_prefix)
    model.train()
    got = comp.forward(model, ids, share_prefix=share_prefix)  # no dropout: the same logits
    assert model.training
    assert torch.equal(got, want)  # bit-exact: serving switches to eval, the same forward as want's
    assert torch.equal(comp.generate(model, ids, max_new_tokens=2, share_prefix=share_prefix),
                       comp.generate(model.eval(), ids, max_new_tokens=2, share_prefix=share_prefix))


def test_generate_binds_the_shared_prefix_once(models, monkeypatch):
    from fastattn_icl.integrations.prefix_cache import SharedPrefixCache

    model = models("llama")
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    calls = []
    bound = SharedPrefixCache.bound

    def spy(self, *args, **kwargs):
        calls.append(1)
        return bound(self, *args, **kwargs)

    monkeypatch.setattr(SharedPrefixCache, "bound", spy)
    comp.generate(model, torch.randint(5, 50, (3, 5)), max_new_tokens=4)
    assert len(calls) == 1


def test_tokenizer_that_appends_eos():
    """A ``[BOS] $A [EOS]`` tokenizer: the demonstrations' EOS is not part of the prefix (the test input continues
    the demonstrations), and full ICL predicts after the query's last token, not after an EOS."""
    from tokenizers import processors

    tokenizer = word_tokenizer()
    bos, eos = tokenizer.token_to_id("[BOS]"), tokenizer.token_to_id("[PAD]")  # [PAD] stands in for an EOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [PAD]", special_tokens=[("[BOS]", bos), ("[PAD]", eos)]
    )
    model = _model("llama", layers=1)
    plain = compress_demonstrations(model, word_tokenizer(), DEMOS, TEMPLATE, LABEL_WORDS, method="full")
    for method in ("hidden_anchor", "full", "text_anchor"):
        comp = compress_demonstrations(model, tokenizer, DEMOS, TEMPLATE, LABEL_WORDS, method=method)
        assert comp.input_ids[0] == bos and eos not in comp.input_ids.tolist(), method
    full = compress_demonstrations(model, tokenizer, DEMOS, TEMPLATE, LABEL_WORDS, method="full")
    assert full.num_tokens == plain.num_tokens + 1  # BOS only
    results = evaluate_compression(model, tokenizer, DEMOS, dataset(3, seed=9), TEMPLATE, LABEL_WORDS,
                                   methods=("full",), progress=False)
    assert results["full"].label_loyalty == 1.0 and results["full"].word_loyalty == 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prepare_inputs_for_the_callers_own_model_call(models, family):
    # the kwargs of a plain model call (any attention implementation) give the same logits as comp.forward
    model = models(family)
    comp = compress_demonstrations(model, TOKENIZER, DEMOS, TEMPLATE, LABEL_WORDS)
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    inputs = comp.prepare_inputs(ids, mask, model=model)
    assert inputs["attention_mask"].shape == (3, comp.num_kept + 6)
    assert inputs["position_ids"][0].tolist() == list(range(comp.position_offset, comp.position_offset + 6))
    assert inputs["position_ids"][1, 2:].tolist() == list(range(comp.position_offset, comp.position_offset + 4))
    assert inputs[cache_keyword()].get_seq_length() == comp.num_kept
    with torch.no_grad():
        got = model(**inputs).logits
    want = comp.forward(model, ids, mask, share_prefix=False)
    assert torch.equal(got[mask.bool()], want[mask.bool()])  # bit-exact: forward runs these very inputs
    with pytest.raises(ValueError, match="left-padded"):
        comp.prepare_inputs(ids, mask.flip(1))
