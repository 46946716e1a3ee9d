"""The mask half of the seam: what transformers' mask builders hand to ``fastattn_icl_mask`` and what
it returns (never an O(T²) mask), and the patterns it must refuse."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig
from transformers import masking_utils as mu
from transformers.cache_utils import DynamicCache

from fastattn_icl.integrations import ATTN_IMPLEMENTATION
from fastattn_icl.integrations.transformers import fastattn_icl_attention_forward, fastattn_icl_mask
from fastattn_icl.testing import check_against_oracle


def _config(cls=LlamaConfig, **kwargs):
    config = cls(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, vocab_size=100, **kwargs
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def test_registered_with_both_interfaces():
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping[ATTN_IMPLEMENTATION] is fastattn_icl_attention_forward
    assert mu.AttentionMaskInterface._global_mapping[ATTN_IMPLEMENTATION] is fastattn_icl_mask


def test_causal_without_padding_is_none():
    assert fastattn_icl_mask(2, 5, 5, mask_function=mu.causal_mask_function) is None
    all_ones = torch.ones(2, 5, dtype=torch.bool)
    assert fastattn_icl_mask(2, 5, 5, mask_function=mu.causal_mask_function, attention_mask=all_ones) is None


def test_padding_mask_is_sliced_to_the_keys():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    out = fastattn_icl_mask(
        2, 1, 6, q_offset=5, kv_offset=0, mask_function=mu.causal_mask_function, attention_mask=mask
    )
    assert out.dtype == torch.bool and torch.equal(out, mask)
    # a sliding-window cache that already dropped its first 2 keys: keys start at position 2
    out = fastattn_icl_mask(
        2, 1, 4, q_offset=5, kv_offset=2, mask_function=mu.sliding_window_causal_mask_function(4), attention_mask=mask
    )
    assert out is None  # positions 2..5 are all kept
    mask[1, 2] = False
    out = fastattn_icl_mask(
        2, 1, 4, q_offset=5, kv_offset=2, mask_function=mu.sliding_window_causal_mask_function(4), attention_mask=mask
    )
    assert torch.equal(out, mask[:, 2:6])


def test_static_cache_slots_after_the_queries_are_cut():
    """A static cache reports ``kv_length = max_cache_len``; keys after the last query are unwritten."""
    out = fastattn_icl_mask(2, 3, 10, q_offset=4, kv_offset=0, mask_function=mu.causal_mask_function)
    assert out.shape == (2, 7) and bool(out.all())
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 0] = False
    out = fastattn_icl_mask(
        2, 3, 10, q_offset=torch.tensor(4), kv_offset=0, mask_function=mu.causal_mask_function, attention_mask=mask
    )
    assert torch.equal(out, mask)
    # a 2D mask shorter than the queries' end is padded with False, as transformers does
    out = fastattn_icl_mask(
        2, 3, 10, q_offset=4, kv_offset=0, mask_function=mu.causal_mask_function, attention_mask=mask[:, :6]
    )
    assert out.shape == (2, 7) and not bool(out[:, 6].any())


def test_sliding_window_that_cannot_bind_is_causal():
    window = mu.sliding_window_causal_mask_function(8)
    assert fastattn_icl_mask(1, 8, 8, mask_function=window) is None
    assert fastattn_icl_mask(1, 1, 8, q_offset=7, mask_function=window) is None


@pytest.mark.parametrize("q_offset, q_length", [(0, 9), (8, 1)])
def test_binding_sliding_window_raises(q_offset, q_length):
    window = mu.sliding_window_causal_mask_function(8)
    with pytest.raises(NotImplementedError, match=r"sliding-window attention binds here \(window 8"):
        fastattn_icl_mask(1, q_length, q_offset + q_length, q_offset=q_offset, mask_function=window)


@pytest.mark.parametrize(
    "mask_function, feature",
    [
        (mu.bidirectional_mask_function, "bidirectional"),
        (mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), "chunked attention"),
        (
            mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(1, 4))),
            "packed sequences",
        ),
        (mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0), "custom mask function"),
        (
            mu.and_masks(mu.sliding_window_causal_mask_function(64), lambda b, h, q, kv: kv >= 0),
            "sliding-window attention combined",
        ),
    ],
    ids=["bidirectional", "chunked", "packed", "or_mask", "sliding-and-custom"],
)
def test_other_mask_patterns_raise(mask_function, feature):
    with pytest.raises(NotImplementedError, match=feature):
        fastattn_icl_mask(1, 4, 4, mask_function=mask_function)


def test_create_causal_mask_end_to_end():
    config = _config()
    embeds = torch.zeros(2, 5, 64)
    assert mu.create_causal_mask(config, embeds, None, None) is None
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    out = mu.create_causal_mask(config, embeds, padding, None)
    assert out.dtype == torch.bool and torch.equal(out, padding.bool())
    with pytest.raises(NotImplementedError, match="custom mask function"):
        mu.create_causal_mask(config, embeds, padding, None, or_mask_function=lambda b, h, q, kv: kv == 0)
    # a 4D mask is returned as-is by transformers, and refused by the attention function
    mask_4d = torch.zeros(2, 1, 5, 5)
    assert mu.create_causal_mask(config, embeds, mask_4d, None) is mask_4d


def test_create_sliding_window_mask_reads_the_window_from_the_mask_function():
    config = _config(MistralConfig, sliding_window=4)
    cache = DynamicCache(config=config)
    assert mu.create_sliding_window_causal_mask(config, torch.zeros(1, 4, 64), None, cache) is None
    with pytest.raises(NotImplementedError, match="window 4"):
        mu.create_sliding_window_causal_mask(config, torch.zeros(1, 5, 64), None, DynamicCache(config=config))


class _Attention(torch.nn.Module):
    is_causal = True
    layer_idx = 0


def test_attention_function_contract():
    module = _Attention().eval()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=gen).transpose(1, 2)  # [B, H, Tq, D] as models make it
    k = torch.randn(2, 2, 7, 16, generator=gen)
    v = torch.randn(2, 2, 7, 16, generator=gen)
    out, weights = fastattn_icl_attention_forward(module, q, k, v, None, scaling=0.3)
    assert out.shape == (2, 5, 4, 16) and out.is_contiguous() and weights is None

    def probs(q, k, causal=True):
        """reference: GQA by repetition, bottom-right causal, the given scale"""
        scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.3
        if causal:
            scores = scores.masked_fill(torch.ones(5, 7, dtype=torch.bool).triu(3), float("-inf"))
        return scores.softmax(-1)

    def manual(q, k, v, causal=True):
        return (probs(q, k, causal) @ v.repeat_interleave(2, dim=1)).transpose(1, 2)

    seam = lambda *a, **kw: fastattn_icl_attention_forward(module, *a, None, scaling=0.3, **kw)  # noqa: E731
    check_against_oracle("out", lambda *a: seam(*a)[0], manual, q, k, v)
    check_against_oracle(
        "weights", lambda *a: seam(*a, output_attentions=True)[1], lambda q, k, v: probs(q, k), q, k, v
    )

    # a key-padding mask shorter than the keys drops the trailing (unwritten static-cache) keys
    short = torch.ones(2, 6, dtype=torch.bool)
    out_short, _ = fastattn_icl_attention_forward(module, q[:, :, :4], k, v, short, scaling=0.3)
    ref_short, _ = fastattn_icl_attention_forward(module, q[:, :, :4], k[:, :, :6], v[:, :, :6], None, scaling=0.3)
    # bit-exact on purpose: the seam slices the keys to the mask's length and runs the same path
    assert torch.equal(out_short, ref_short)

    # is_causal=False in the call wins over the module attribute
    check_against_oracle(
        "out, is_causal=False", lambda *a: seam(*a, is_causal=False)[0], lambda *a: manual(*a, causal=False), q, k, v
    )


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"attention_mask": torch.zeros(2, 1, 5, 7)}, NotImplementedError, "4D"),
        ({"attention_mask": torch.ones(2, 7)}, TypeError, "bool key-padding mask"),
        ({"attention_mask": torch.ones(2, 8, dtype=torch.bool)}, ValueError, "covers 8 keys"),
        ({"softcap": 30.0}, NotImplementedError, "soft-capping"),
        ({"s_aux": torch.zeros(4)}, NotImplementedError, "sinks"),
        ({"position_bias": torch.zeros(1, 4, 5, 7)}, NotImplementedError, "position bias"),
        ({"cu_seq_lens_q": torch.tensor([0, 5])}, NotImplementedError, "variable-length"),
        ({"sliding_window": 4}, NotImplementedError, "sliding-window attention binds"),
    ],
    ids=["4d-mask", "float-2d-mask", "long-mask", "softcap", "sinks", "position-bias", "varlen", "window"],
)
def test_attention_function_refuses(kwargs, error, match):
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    attention_mask = kwargs.pop("attention_mask", None)
    with pytest.raises(error, match=match):
        fastattn_icl_attention_forward(_Attention().eval(), q, k, v, attention_mask, **kwargs)


def test_attention_dropout_only_refused_in_training():
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)
    module = _Attention().eval()
    fastattn_icl_attention_forward(module, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        fastattn_icl_attention_forward(module.train(), q, k, v, None, dropout=0.1)
