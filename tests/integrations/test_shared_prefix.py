"""The ``shared_prefix`` controller state and :class:`SharedPrefixCache` through the Hugging Face seam.

A prefix of ``M`` tokens is run once (batch 1); its per-layer keys/values ``[L, 1, Hkv, M, D]`` are then shared
by a left-padded batch. The oracle is the naive way: an eager model over a ``DynamicCache`` holding the prefix
expanded to every row. The shared way runs the same inputs over a ``SharedPrefixCache`` inside
``cache.bound(model, K, V)`` (the seam reads the one prefix copy in place). Logits must agree at every real
token, for the prefill of the batch and for greedy decode steps after it, on GPT-2 (absolute positions) and
on the RoPE families alike. Tolerance as in ``test_models.py``: ``max |shared - naive| <= 1e-4 max |naive| + 1e-6``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import fastattn_icl
from fastattn_icl.integrations import ATTN_IMPLEMENTATION, IsolationState, get_controller
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.integrations.prefix_cache import SharedPrefixCache
from fastattn_icl.testing import check_close
from tests.models import DEVICES, FAMILIES, LAYERS, VOCAB, float64_twin, tiny_model

M, S, B = 7, 6, 3  # prefix length, tokens per row after it, batch
STEPS = 3  # greedy decode steps after the batch's prefill


def _prefix(model, device="cpu", seed=0):
    """Per-layer keys/values ``[L, 1, Hkv, M, D]`` of a random prefix of ``M`` tokens (post-RoPE, as cached)."""
    ids = torch.randint(3, VOCAB, (1, M), generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True))
    keys = torch.stack([layer.keys for layer in cache.layers])
    values = torch.stack([layer.values for layer in cache.layers])
    assert keys.shape[:2] == (len(cache.layers), 1) and keys.shape[3] == M
    return keys, values


def _batch(device="cpu", seed=1):
    """``S`` tokens per row: row 0 unpadded, row 1 left-padded by 2, row 2 by 4."""
    ids = torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids[mask == 0] = 2
    return ids.to(device), mask.to(device)


def _full_mask(mask):
    """The attention mask over ``[prefix, own tokens]``: the prefix is visible to every row."""
    return torch.cat([torch.ones_like(mask[:, :1]).expand(-1, M), mask], dim=1)


def _positions(mask):
    """Positions continue the prefix: the first real token of each row is at ``M``."""
    return (M + mask.cumsum(-1) - 1).clamp(min=0)


def _naive_cache(keys, values):
    return DynamicCache(
        ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in zip(keys, values)]
    )


def _run(model, ids, mask, cache, tokens=None):
    """Prefill ``ids`` after the prefix, then one decode step per column of ``tokens`` (greedy from this run's
    logits if ``tokens`` is None). Returns each step's logits at real tokens and the tokens fed."""
    full = _full_mask(mask)
    out = model(ids, attention_mask=full, position_ids=_positions(full[:, M:]), **cache_kwargs(cache), use_cache=True)
    steps = [out.logits[mask.bool()]]
    fed = []
    for step in range(STEPS):
        token = out.logits[:, -1].argmax(-1, keepdim=True) if tokens is None else tokens[:, step : step + 1]
        fed.append(token)
        full = torch.cat([full, torch.ones_like(full[:, :1])], dim=1)
        out = model(
            token,
            attention_mask=full,
            position_ids=_positions(full[:, M:])[:, -1:],
            **cache_kwargs(output_cache(out)),
            use_cache=True,
        )
        steps.append(out.logits[:, -1])
    return steps, torch.cat(fed, dim=1)


def _compare(model, backend, device, spy=None):
    keys, values = _prefix(model, device)
    ids, mask = _batch(device)
    L = keys.shape[0]
    with torch.no_grad():
        ref_steps, tokens = _run(model, ids, mask, _naive_cache(keys, values))
        high_steps, _ = _run(float64_twin(model), ids, mask, _naive_cache(keys.double(), values.double()), tokens)
        assert ref_steps[0].abs().max() > 0.5, "random weights too small for a meaningful comparison"
        cache = SharedPrefixCache(M, L)
        with fastattn_icl.use_backend(backend), cache.bound(model, keys, values):
            steps, _ = _run(model, ids, mask, cache, tokens)
    for i, (got, ref, high) in enumerate(zip(steps, ref_steps, high_steps)):
        check_close(f"logits of step {i}", got, ref, high)
    # the cache held only each row's own keys, and counted the prefix in its length
    assert cache.get_seq_length() == M + S + STEPS
    for layer in cache.layers:
        assert layer.keys.shape[0] == B and layer.keys.shape[2] == S + STEPS
    return keys


@pytest.fixture
def prefix_calls(monkeypatch):
    """The prefix tensors handed to ``shared_prefix_attention`` by the seam, one entry per call."""
    from fastattn_icl.integrations import transformers as seam

    calls = []
    op = seam.shared_prefix_attention

    def spy(q, pk, pv, k, v, **kwargs):
        calls.append((pk, pv, k.shape[2]))
        return op(q, pk, pv, k, v, **kwargs)

    monkeypatch.setattr(seam, "shared_prefix_attention", spy)
    return calls


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matches_naive_prefix_cache(family, prefix_calls):
    model = tiny_model(family)
    keys = _compare(model, "torch", "cpu")
    L = keys.shape[0]
    assert len(prefix_calls) == L * (1 + STEPS)
    for i, (pk, pv, tk) in enumerate(prefix_calls):
        layer, step = i % L, i // L
        assert tk == (S if step == 0 else S + step), "the seam got the row's own keys, not the prefix with them"
        # the layer's one prefix copy, in place: batch 1, never expanded to B rows
        assert pk.shape[0] == 1 and pk.data_ptr() == keys[layer].data_ptr()
        assert pv.shape == pk.shape
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_naive_prefix_cache_triton(family):
    """The Triton kernel (interpreter on CPU: one layer) in the same comparison."""
    device = DEVICES["triton"]
    model = tiny_model(family, layers=LAYERS["triton"]).to(device)
    _compare(model, "triton", device)


def test_model_loaded_with_the_seam_stays_on_it():
    model = tiny_model("qwen2", attn_implementation=ATTN_IMPLEMENTATION)
    _compare(model, "torch", "cpu")
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_row_prefix_without_mask(family):
    """A prefix per row (``[L, B, Hkv, M, D]``) and no attention mask (default positions ``M ..``)."""
    model = tiny_model(family)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        prefix = output_cache(model(torch.randint(3, VOCAB, (B, M), generator=gen), use_cache=True))
        keys = torch.stack([layer.keys for layer in prefix.layers])
        values = torch.stack([layer.values for layer in prefix.layers])
        ids = torch.randint(3, VOCAB, (B, S), generator=gen)
        ref = model(ids, **cache_kwargs(DynamicCache(ddp_cache_data=list(zip(keys, values))))).logits
        high_cache = DynamicCache(ddp_cache_data=list(zip(keys.double(), values.double())))
        high = float64_twin(model)(ids, **cache_kwargs(high_cache)).logits
        cache = SharedPrefixCache(M, keys.shape[0])
        with fastattn_icl.use_backend("torch"), cache.bound(model, keys, values):
            out = model(ids, **cache_kwargs(cache)).logits
    check_close("logits", out, ref, high)


def test_grad_mode_raises():
    """The shared prefix is an inference path: a forward that autograd would record is refused."""
    model = tiny_model("llama")
    keys, values = _prefix(model)
    ids, mask = _batch()
    cache = SharedPrefixCache(M, keys.shape[0])
    with cache.bound(model, keys, values), pytest.raises(RuntimeError, match="forward-only"):
        model(ids, attention_mask=_full_mask(mask), position_ids=_positions(mask), **cache_kwargs(cache))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_attentions(family):
    """Weights ``[B, H, S, M + S]`` over ``[prefix, own keys]``, as eager's over the naive cache."""
    model = tiny_model(family)
    keys, values = _prefix(model)
    ids, mask = _batch()
    full = _full_mask(mask)
    kwargs = dict(attention_mask=full, position_ids=_positions(mask), use_cache=True, output_attentions=True)
    with torch.no_grad():
        ref = model(ids, **cache_kwargs(_naive_cache(keys, values)), **kwargs)
        high = float64_twin(model)(ids, **cache_kwargs(_naive_cache(keys.double(), values.double())), **kwargs)
        cache = SharedPrefixCache(M, keys.shape[0])
        with fastattn_icl.use_backend("torch"), cache.bound(model, keys, values):
            out = model(ids, **cache_kwargs(cache), **kwargs)
    keep = mask.bool()
    check_close("logits", out.logits[keep], ref.logits[keep], high.logits[keep])
    assert out.attentions is not None and len(out.attentions) == len(ref.attentions) == keys.shape[0]
    H = model.config.num_attention_heads
    for weights, ref_weights, high_weights in zip(out.attentions, ref.attentions, high.attentions):
        assert weights.shape == ref_weights.shape == (B, H, S, M + S)
        rows = weights.transpose(1, 2)[keep]  # [real tokens, H, M + S]
        ref_rows, high_rows = ref_weights.transpose(1, 2)[keep], high_weights.transpose(1, 2)[keep]
        check_close("row sums", rows.sum(-1), ref_rows.sum(-1), torch.ones_like(high_rows[..., 0]))
        check_close("attention weights", rows, ref_rows, high_rows)
        assert torch.all(weights[1, :, :, M : M + 2] == 0), "left-pad keys get no weight"


def test_cache_without_bound_raises():
    model = tiny_model("llama")
    ids, mask = _batch()
    full = _full_mask(mask)
    cache = SharedPrefixCache(M, 2)
    assert not cache.is_bound
    with torch.no_grad(), pytest.raises(RuntimeError, match="bound"):
        model(ids, attention_mask=full, position_ids=_positions(mask), **cache_kwargs(cache))
    fastattn_icl.integrations.enable(model)  # the seam without the state: still refused
    with torch.no_grad(), pytest.raises(RuntimeError, match="bound"):
        model(ids, attention_mask=full, position_ids=_positions(mask), **cache_kwargs(SharedPrefixCache(M, 2)))


def test_mask_hiding_a_prefix_column_raises():
    model = tiny_model("llama")
    keys, values = _prefix(model)
    ids, mask = _batch()
    full = _full_mask(mask).clone()
    full[1, 3] = 0
    cache = SharedPrefixCache(M, keys.shape[0])
    with torch.no_grad(), cache.bound(model, keys, values), pytest.raises(ValueError, match="shared prefix"):
        model(ids, attention_mask=full, position_ids=_positions(mask), **cache_kwargs(cache))



def test_check_mask_false_skips_the_per_layer_prefix_check(monkeypatch):
    # a caller that builds the mask itself turns the check (a host sync per layer) off: the seam then never
    # reads the prefix columns, and a correct mask gives the same logits as with the check
    model = tiny_model("llama")
    keys, values = _prefix(model)
    ids, mask = _batch()
    full = _full_mask(mask)

    def run(check_mask):
        cache = SharedPrefixCache(M, keys.shape[0])
        with torch.no_grad(), cache.bound(model, keys, values, check_mask=check_mask):
            return model(ids, attention_mask=full, position_ids=_positions(mask), **cache_kwargs(cache)).logits

    checked = run(True)
    hidden = full.clone()
    hidden[1, 3] = 0
    cache = SharedPrefixCache(M, keys.shape[0])
    with torch.no_grad(), cache.bound(model, keys, values, check_mask=False):  # no error: the check is off
        model(ids, attention_mask=hidden, position_ids=_positions(mask), **cache_kwargs(cache))
    assert torch.equal(run(False), checked)  # bit-exact: the check only reads the mask, the math is the same


@pytest.mark.parametrize("layers", [None, [1]], ids=["all-layers", "layer-1"])
def test_other_method_state_raises(layers):
    model = tiny_model("llama")
    keys, values = _prefix(model)
    ids, mask = _batch()
    cache = SharedPrefixCache(M, keys.shape[0])
    isolation = IsolationState(torch.tensor([[M + 1]]))
    with torch.no_grad(), cache.bound(model, keys, values):
        with pytest.raises(NotImplementedError, match="shared prefix"):  # refused when the block is entered
            with get_controller(model).override(layers=layers, isolation=isolation):
                model(ids, attention_mask=_full_mask(mask), position_ids=_positions(mask), **cache_kwargs(cache))


def test_bound_restores_implementation_and_state():
    model = tiny_model("gpt2")
    keys, values = _prefix(model)
    ids, mask = _batch()
    controller = get_controller(model)
    cache = SharedPrefixCache(M, keys.shape[0])
    with cache.bound(model, keys, values):
        assert cache.is_bound
        assert model.config._attn_implementation == ATTN_IMPLEMENTATION
        state = controller.get("shared_prefix", 0)
        assert state is not None and state.length == M and state.keys is keys
    assert not cache.is_bound
    assert model.config._attn_implementation == "eager"
    assert controller.get("shared_prefix") is None and controller.is_empty()

    with pytest.raises(RuntimeError, match="boom"):
        with cache.bound(model, keys, values):
            raise RuntimeError("boom")
    assert not cache.is_bound and model.config._attn_implementation == "eager" and controller.is_empty()

    # also when the model itself raises inside the block, and the eager model still runs the same afterwards
    full = _full_mask(mask).clone()
    full[0, 0] = 0
    with torch.no_grad():
        before = model(ids[:, :2]).logits
        with pytest.raises(ValueError), cache.bound(model, keys, values):
            model(ids, attention_mask=full, position_ids=_positions(mask), **cache_kwargs(cache))
        assert not cache.is_bound and model.config._attn_implementation == "eager" and controller.is_empty()
        assert torch.equal(model(ids[:, :2]).logits, before)


def test_bad_arguments():
    keys = torch.randn(2, 1, 2, M, 16)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="prefix_length"):
            SharedPrefixCache(bad, 2)
        with pytest.raises(ValueError, match="num_layers"):
            SharedPrefixCache(M, bad)
    model = tiny_model("llama")
    for wrong in (keys[0], keys[:1], keys[..., :-1, :]):
        with pytest.raises(ValueError, match="prefix keys"):
            with SharedPrefixCache(M, 2).bound(model, wrong, wrong):
                pass
    assert model.config._attn_implementation == "eager" and get_controller(model).is_empty()
