"""``attn_implementation="fastattn_icl"`` against ``"eager"`` on tiny random-weight models of each
routed family (GPT-J and CodeGen included where the installed transformers routes them, 5.24+): logits
and parameter gradients, with and without left padding, for a prefill and for
a prefill followed by cached decode steps, on the PyTorch and the Triton backend.

Tolerance: the rule of ``fastattn_icl.testing`` with the eager model as the same-dtype reference and its
float64 twin as the oracle (factor 2 for logits and attention weights, 3 for parameter gradients; the eps term
covers gradients that are zero in exact arithmetic, such as key-projection biases). Only non-padded positions
are compared: eager spreads a fully masked (left-pad) query row uniformly over the keys, the seam returns 0 there.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastattn_icl
from fastattn_icl.integrations import ATTN_IMPLEMENTATION
from fastattn_icl.testing import check_close
from tests.models import (
    BACKENDS,
    DEVICES,
    FAMILIES,
    LAYERS,
    PAD,
    VOCAB,
    check_grads,
    float64_twin,
    make_inputs,
    positions,
    run_decode,
    run_prefill,
    tiny_model,
)

PREFILL, DECODE_STEPS = 8, 8  # at most 16 positions: the Triton interpreter is slow


@pytest.fixture
def seam_calls(monkeypatch):
    """Layer indices of every call of the registered attention function (proves the seam ran)."""
    from transformers import AttentionInterface

    seam = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return seam(module, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_matches_eager(family, padded, backend, seam_calls):
    device = DEVICES[backend]
    model = tiny_model(family, layers=LAYERS[backend]).to(device)
    ids, mask = (t.to(device) for t in make_inputs(2, PREFILL + DECODE_STEPS, padded))
    ref_logits, ref_grads = run_prefill(model, ids, mask)
    high_logits, high_grads = run_prefill(float64_twin(model), ids, mask)
    assert ref_logits.abs().max() > 0.5, "random weights too small for a meaningful comparison"
    fastattn_icl.integrations.enable(model)
    with fastattn_icl.use_backend(backend):
        logits, grads = run_prefill(model, ids, mask)
    assert seam_calls == list(range(LAYERS[backend]))
    check_close("logits", logits, ref_logits, high_logits)
    check_grads(grads, ref_grads, high_grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_matches_eager(family, padded, backend, seam_calls):
    device = DEVICES[backend]
    model = tiny_model(family, layers=LAYERS[backend]).to(device)
    ids, mask = (t.to(device) for t in make_inputs(2, PREFILL, padded))
    tokens = torch.randint(3, VOCAB, (2, DECODE_STEPS), generator=torch.Generator().manual_seed(3)).to(device)
    ref_steps, ref_grads = run_decode(model, ids, mask, tokens)
    high_steps, high_grads = run_decode(float64_twin(model), ids, mask, tokens)
    fastattn_icl.integrations.enable(model)
    with fastattn_icl.use_backend(backend):
        steps, grads = run_decode(model, ids, mask, tokens)
    assert seam_calls == list(range(LAYERS[backend])) * (DECODE_STEPS + 1)
    for i, (logits, ref, high) in enumerate(zip(steps, ref_steps, high_steps)):
        check_close(f"logits of step {i}", logits, ref, high)
    check_grads(grads, ref_grads, high_grads)


def test_from_config_and_set_attn_implementation_route_through_the_seam(seam_calls):
    ids, mask = make_inputs(2, 6, padded=True)
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    model(ids, attention_mask=mask)
    assert seam_calls == [0, 1]
    model.set_attn_implementation("eager")
    model(ids, attention_mask=mask)
    assert seam_calls == [0, 1]
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model(ids, attention_mask=mask)
    assert seam_calls == [0, 1, 0, 1]


def test_revert_to_eager_restores_eager_behaviour():
    model = tiny_model("gpt2")
    ids, mask = make_inputs(2, 10, padded=True)
    with torch.no_grad():
        high = float64_twin(model)(ids, attention_mask=mask).logits
        before = model(ids, attention_mask=mask).logits
        with fastattn_icl.integrations.enabled(model):
            assert model.config._attn_implementation == ATTN_IMPLEMENTATION
            during = model(ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "eager"
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    keep = mask.bool()
    check_close("logits", during[keep], before[keep], high[keep])

    previous = fastattn_icl.integrations.enable(model)
    assert previous == "eager"
    fastattn_icl.integrations.disable(model, previous)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)


def test_enabled_restores_on_exception():
    model = tiny_model("llama", attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="boom"):
        with fastattn_icl.integrations.enabled(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_save_and_load_with_the_seam(tmp_path):
    model = tiny_model("qwen2")
    ids, mask = make_inputs(2, 10, padded=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        high = float64_twin(model)(ids, attention_mask=mask).logits
    fastattn_icl.integrations.get_controller(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTN_IMPLEMENTATION).eval()
    assert loaded.config._attn_implementation == ATTN_IMPLEMENTATION
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        out = loaded(ids, attention_mask=mask).logits
    keep = mask.bool()
    check_close("logits after from_pretrained", out[keep], ref[keep], high[keep])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_output_attentions_returns_weights(family):
    """GPT-2 pops ``output_attentions`` before its attention call, Llama passes it on: both get weights."""
    model = tiny_model(family)
    ids, mask = make_inputs(2, 10, padded=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True).attentions
        high = float64_twin(model)(ids, attention_mask=mask, output_attentions=True).attentions
        fastattn_icl.integrations.enable(model)
        out = model(ids, attention_mask=mask, output_attentions=True).attentions
        plain = model(ids, attention_mask=mask)
    assert plain.attentions is None
    assert len(out) == len(ref) == 2
    keep = mask.bool()
    for weights, ref_weights, high_weights in zip(out, ref, high):
        assert weights.shape == ref_weights.shape == (2, 4, 10, 10)
        rows = lambda w: w.transpose(1, 2)[keep]  # noqa: E731
        check_close("attention weights", rows(weights), rows(ref_weights), rows(high_weights))
    assert torch.all(out[0][1, :, :PAD] == 0), "rows of left-pad queries see no key: all-zero weights"


def test_4d_custom_mask_raises():
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, _ = make_inputs(2, 6, padded=False)
    mask_4d = torch.zeros(2, 1, 6, 6)
    with pytest.raises(NotImplementedError, match="4D"):
        model(ids, attention_mask=mask_4d)


def test_sliding_window_binds_raises_and_boundary_matches_eager():
    ids, mask = make_inputs(2, 9, padded=False)
    eager = tiny_model("mistral", sliding_window=8)
    seam = tiny_model("mistral", attn_implementation=ATTN_IMPLEMENTATION, sliding_window=8)
    with torch.no_grad():
        # 8 positions under a window of 8: every distance (<= 7) is inside the window, plain causal
        high = float64_twin(eager)(ids[:, :8]).logits
        check_close("logits at the window boundary", seam(ids[:, :8]).logits, eager(ids[:, :8]).logits, high)
        # 9 positions: the first key leaves the window of the last query, eager differs from causal
        with pytest.raises(NotImplementedError, match="sliding-window attention binds"):
            seam(ids)


def test_sliding_window_decode_within_window_matches_eager():
    model = tiny_model("mistral", sliding_window=PREFILL + DECODE_STEPS)
    ids, mask = make_inputs(2, PREFILL, padded=True)
    tokens = torch.randint(3, VOCAB, (2, DECODE_STEPS), generator=torch.Generator().manual_seed(3))
    ref_steps, ref_grads = run_decode(model, ids, mask, tokens)
    high_steps, high_grads = run_decode(float64_twin(model), ids, mask, tokens)
    fastattn_icl.integrations.enable(model)
    steps, grads = run_decode(model, ids, mask, tokens)
    for i, (logits, ref, high) in enumerate(zip(steps, ref_steps, high_steps)):
        check_close(f"logits of step {i}", logits, ref, high)
    check_grads(grads, ref_grads, high_grads)


def test_packed_sequences_raise():
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, _ = make_inputs(1, 6, padded=False)
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=packed_positions, use_cache=False)


def test_attention_dropout_in_training_raises():
    model = tiny_model("gpt2", attn_implementation=ATTN_IMPLEMENTATION, attn_pdrop=0.1)
    ids, mask = make_inputs(2, 6, padded=False)
    model(ids, attention_mask=mask)  # eval: no dropout, fine
    model.train()
    with pytest.raises(NotImplementedError, match="attention dropout"):
        model(ids, attention_mask=mask)
    no_dropout = tiny_model("gpt2", attn_implementation=ATTN_IMPLEMENTATION).train()
    no_dropout(ids, attention_mask=mask).logits.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_cache_generate_matches_eager(backend, monkeypatch):
    """A static cache hands the attention all ``max_cache_len`` slots: the unwritten ones are dropped."""
    device = DEVICES[backend]
    model = tiny_model("llama", layers=LAYERS[backend]).to(device)
    ids, mask = (t.to(device) for t in make_inputs(2, 6, padded=True))
    kwargs = dict(
        max_new_tokens=4,
        do_sample=False,
        cache_implementation="static",
        pad_token_id=2,
        output_scores=True,
        return_dict_in_generate=True,
    )
    ref = model.generate(ids, attention_mask=mask, **kwargs)
    # the float64 oracle teacher-forced over the generated tokens with explicit positions (generate itself gives
    # NaN scores for the left-padded row in float64 eager: its pad rows overflow the additive mask)
    full_mask = torch.cat([mask, torch.ones_like(ref.sequences[:, ids.shape[1] :])], dim=1)
    with torch.no_grad():
        twin = float64_twin(model)
        logits64 = twin(ref.sequences, attention_mask=full_mask, position_ids=positions(full_mask)).logits
    high = logits64[:, ids.shape[1] - 1 : -1].unbind(1)

    from transformers import AttentionInterface

    seam = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]
    shapes = []

    def spy(module, query, key, value, attention_mask, **kw):
        shapes.append((None if attention_mask is None else attention_mask.shape[1], key.shape[2]))
        return seam(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, spy)
    fastattn_icl.integrations.enable(model)
    with fastattn_icl.use_backend(backend):
        out = model.generate(ids, attention_mask=mask, **kwargs)
    assert any(n is not None and n < tk for n, tk in shapes), "the static cache's unwritten slots were not cut"
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(high) == 4
    for score, ref_score, high_score in zip(out.scores, ref.scores, high):
        check_close("generation scores", score, ref_score, high_score)
