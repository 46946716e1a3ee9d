"""``fastattn_icl.methods.momentum``: momentum attention (docs/methods.md §6) in every layer of a Hugging Face model
through the seam: the layer output against the oracle, prefill + cached decoding (and ``generate``) against one full
pass, the neutral η, per-layer selection, errors and state restore."""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl import reference
from fastattn_icl.integrations import get_controller
from fastattn_icl.integrations import transformers as seam
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.integrations.controller import find_controller
from fastattn_icl.methods import isolate, momentum
from fastattn_icl.reference.momentum import momentum_attention as momentum_ref
from fastattn_icl.testing import check_close
from tests.models import float64_twin, swap_seam, tiny_gptj, tiny_model

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gpt_neox", "opt", "gptj"]


def _model(family: str, layers: int = 2):
    if family == "gptj":
        return tiny_gptj(layers=layers).eval()
    kw = {"sliding_window": 128} if family == "mistral" else {}  # a window that never binds here
    return tiny_model(family, "eager", layers=layers, **kw)


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The reference of each layer's state: momentum attention with the controller's η, else plain attention."""
    controller = find_controller(module)
    eta = controller.layer_state(module.layer_idx).get("momentum") if controller is not None else None
    common = dict(causal=True, scale=scaling, key_padding_mask=attention_mask)
    if eta is None:
        out = reference.attention(query, key, value, **common)
    else:
        out = momentum_ref(query, key, value, eta, **common)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def float64_oracle(monkeypatch):
    """``float64_oracle(model, fn)``: ``fn`` on the float64 twin of ``model``, whose seam runs the reference
    (``_oracle_attention``); the oracle of the tolerance rule. Asserts the reference ran."""

    def run(model, fn):
        twin, calls = float64_twin(model), []

        def counting(module, *args, **kwargs):
            calls.append(module.layer_idx)
            return _oracle_attention(module, *args, **kwargs)

        with monkeypatch.context() as m:
            swap_seam(m, counting)
            with torch.no_grad():
                result = fn(twin)
        assert calls, "the oracle did not run"
        return result

    return run


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return ids, mask


def _full_with_momentum(model, ids, mask, eta, **kw):
    with momentum(model, eta):
        return model(ids, attention_mask=mask, **kw).logits


def _prefill_then_decode(model, ids, mask, prefill: int):
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], use_cache=True)
    cache, steps = output_cache(out), [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache), use_cache=True)
        cache = output_cache(out)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_equal_one_full_pass(family, float64_oracle):
    model = _model(family)
    ids, mask = _batch()
    real = mask.bool()
    with fastattn_icl.use_backend("torch"), torch.no_grad():
        plain = model(ids, attention_mask=mask).logits
        with momentum(model, 0.5):
            full = model(ids, attention_mask=mask).logits
            chunked = _prefill_then_decode(model, ids, mask, prefill=7)
    high = float64_oracle(model, lambda twin: _full_with_momentum(twin, ids, mask, 0.5))
    # prefill then decode at most 2x as far from the float64 oracle as the full pass
    check_close("prefill and decode", chunked[real], full[real], high[real])
    assert (full - plain)[real].abs().max() > 1e-2  # the term is there
    assert model.config._attn_implementation == "eager"  # switched back


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_keeps_the_momentum(family, float64_oracle):
    # generate's logits at every step equal one full pass over the generated sequence (teacher forcing on its own
    # tokens; comparing logits, not argmax tokens, so near-ties of a random model cannot flip the test)
    model = _model(family)
    ids, mask = _batch(1)
    with fastattn_icl.use_backend("torch"), torch.no_grad(), momentum(model, 0.9):
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        seq = gen.sequences
        seq_mask = torch.cat([mask, torch.ones(2, 4, dtype=mask.dtype)], 1)
        positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
        full = model(seq, attention_mask=seq_mask, position_ids=positions).logits
    stepwise = torch.stack(gen.logits, dim=1)  # [B, 4, V]
    high = float64_oracle(model, lambda twin: _full_with_momentum(twin, seq, seq_mask, 0.9, position_ids=positions))
    rows = slice(ids.shape[1] - 1, -1)
    check_close("generated logits", stepwise, full[:, rows], high[:, rows])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_layer_output_is_the_oracle_on_the_layer_inputs(family, monkeypatch):
    model = _model(family)
    ids, mask = _batch(2)
    calls = []
    real = seam.momentum_attention

    def spy(q, k, v, eta, **kw):
        out = real(q, k, v, eta, **kw)
        calls.append((q, k, v, eta, kw, out))
        return out

    monkeypatch.setattr(seam, "momentum_attention", spy)
    with fastattn_icl.use_backend("torch"), torch.no_grad(), momentum(model, 0.9):
        model(ids, attention_mask=mask)
    assert len(calls) == 2  # one per layer
    for q, k, v, eta, kw, out in calls:
        ref_kw = dict(causal=kw["causal"], scale=kw["scale"], key_padding_mask=kw["key_padding_mask"])
        want = momentum_ref(q.double(), k.double(), v.double(), eta, **ref_kw)
        check_close("layer output", out, momentum_ref(q, k, v, eta, **ref_kw), want)


def test_neutral_eta_is_plain_attention_and_layers_select():
    model = _model("llama")
    ids, mask = _batch(3)
    real = mask.bool()
    with fastattn_icl.use_backend("torch"), torch.no_grad():
        with fastattn_icl.integrations.enabled(model):
            plain = model(ids, attention_mask=mask).logits
        with momentum(model, 0.0):
            neutral = model(ids, attention_mask=mask).logits
        with momentum(model, 0.5, layers=[1]):
            last_only = model(ids, attention_mask=mask).logits
        with momentum(model, 0.5):
            both = model(ids, attention_mask=mask).logits
    assert torch.equal(neutral[real], plain[real])
    assert (last_only - plain)[real].abs().max() > 1e-3 and (last_only - both)[real].abs().max() > 1e-3


def test_gradients_flow_through_the_seam():
    model = _model("gpt2")
    ids, mask = _batch(4)
    with fastattn_icl.use_backend("torch"), momentum(model, 0.5):
        model(ids, attention_mask=mask).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_errors_and_state_restore():
    model = _model("llama")
    ids, mask = _batch(5)
    for eta in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\)"), momentum(model, eta):
            pass
    with pytest.raises(TypeError, match="eta must be a float"), momentum(model, "0.5"):
        pass
    with pytest.raises(ValueError, match="layer index"), momentum(model, 0.5, layers=[7]):
        pass
    positions = torch.tensor([[4]])  # a real token in both rows (row 1's first 3 are padding, which isolate refuses)
    with pytest.raises(NotImplementedError, match="momentum attention cannot be combined"):
        with momentum(model, 0.5), isolate(model, positions, layers=[0]), torch.no_grad():
            model(ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="boom"), momentum(model, 0.5):
        raise RuntimeError("boom")
    assert get_controller(model).is_empty() and model.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_momentum_cache_carries_the_state_and_equals_the_full_pass(family, monkeypatch, float64_oracle):
    from fastattn_icl.integrations.momentum_cache import MomentumCache

    calls = {"carried": 0, "rescan": 0}
    real = seam.momentum_attention_with_state

    def spy(q, k, v, eta, state=None, **kw):
        calls["carried" if state is not None else "rescan"] += 1
        if state is not None:  # a carried state: the step must not need the earlier values
            assert k.shape[2] - q.shape[2] > 0
        return real(q, k, v, eta, state, **kw)

    monkeypatch.setattr(seam, "momentum_attention_with_state", spy)
    model = _model(family)
    ids, mask = _batch(6)
    real_rows = mask.bool()
    with fastattn_icl.use_backend("torch"), torch.no_grad(), momentum(model, 0.5):
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :7], attention_mask=mask[:, :7], **cache_kwargs(MomentumCache()), use_cache=True)
        cache, steps = output_cache(out), [out.logits]
        for t in range(7, 12):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **cache_kwargs(cache), use_cache=True)
            cache = output_cache(out)
            steps.append(out.logits)
        with_state = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, **cache_kwargs(MomentumCache()))
        rescan = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    layers = len(cache.layers)
    assert calls["carried"] == (5 + 2) * layers and calls["rescan"] == 2 * layers  # prefills rescan, steps carry
    high = float64_oracle(model, lambda twin: _full_with_momentum(twin, ids, mask, 0.5))
    # carried-state steps at most 2x as far from the float64 oracle as the full pass
    check_close("steps with a carried state", torch.cat(steps, 1)[real_rows], full[real_rows], high[real_rows])
    assert torch.equal(with_state.sequences, rescan.sequences)
    seq_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded row
    high = float64_oracle(
        model, lambda twin: _full_with_momentum(twin, rescan.sequences, seq_mask, 0.5, position_ids=positions)
    )[:, ids.shape[1] - 1 : -1]
    # generation with the carried state at most 2x as far from the oracle as generation that rescans
    check_close("generated logits", torch.stack(with_state.logits, 1), torch.stack(rescan.logits, 1), high)
    assert all(layer.state is not None and layer.state_position == 12 for layer in cache.layers)


def test_momentum_cache_state_is_not_reused_for_another_eta_or_after_crop(monkeypatch):
    from fastattn_icl.integrations.momentum_cache import MomentumCache

    states = []
    real = seam.momentum_attention_with_state

    def spy(q, k, v, eta, state=None, **kw):
        states.append((eta, state is not None))
        return real(q, k, v, eta, state, **kw)

    monkeypatch.setattr(seam, "momentum_attention_with_state", spy)
    model = _model("llama")
    ids, mask = _batch(7)
    with fastattn_icl.use_backend("torch"), torch.no_grad():
        cache = MomentumCache()
        with momentum(model, 0.5):
            model(ids[:, :8], attention_mask=mask[:, :8], **cache_kwargs(cache), use_cache=True)
        with momentum(model, 0.9):  # the carried state is for η = 0.5: rescanned, not reused
            model(ids[:, 8:9], attention_mask=mask[:, :9], **cache_kwargs(cache), use_cache=True)
        cache.crop(-2)
        assert all(layer.state is None for layer in cache.layers)
        with momentum(model, 0.9):  # after a crop the state is gone: rescanned again
            model(ids[:, 7:8], attention_mask=mask[:, :8], **cache_kwargs(cache), use_cache=True)
    assert states == [(0.5, False)] * 2 + [(0.9, False)] * 2 + [(0.9, False)] * 2


def test_a_left_over_record_never_reaches_another_cache(float64_oracle):
    # a MomentumCache layer updated outside the momentum layers (layers=[1]) must not hand its record, or receive a
    # state, in a later forward over another cache: resuming it still equals the plain-cache run
    from transformers import DynamicCache

    from fastattn_icl.integrations.momentum_cache import MomentumCache

    model = _model("llama")
    ids, mask = _batch(8)
    other = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(9))
    def resume(m, cache):
        with momentum(m, 0.5, layers=[1]):
            m(ids[:, :8], attention_mask=mask[:, :8], **cache_kwargs(cache), use_cache=True)
        with momentum(m, 0.5):
            m(other[:, :8], attention_mask=mask[:, :8])  # another sequence of the same length, no cache
            return m(ids[:, 8:9], attention_mask=mask[:, :9], **cache_kwargs(cache), use_cache=True).logits

    with fastattn_icl.use_backend("torch"), torch.no_grad():
        runs = [resume(model, cache) for cache in (MomentumCache(), DynamicCache())]
    high = float64_oracle(model, lambda twin: resume(twin, DynamicCache()))
    # the MomentumCache run at most 2x as far from the float64 oracle as the plain-cache run
    check_close("resumed logits", runs[0], runs[1], high)
