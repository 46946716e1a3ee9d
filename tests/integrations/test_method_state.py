"""Method state through the seam: anchor re-weighting (``anchors`` + ``beta``) and isolation (``isolation``).

The oracle is an attention function registered with transformers under another name that runs the
reference implementations (``fastattn_icl.reference``) on the same q/k/v with the same controller state,
so a whole model is compared end to end (logits and dβ), on full passes where query rows are absolute
positions. Cached decoding is then checked against the full pass: the absolute-position ``reweight_from``
and isolation rows must give the same logits chunk by chunk. Comparisons use the tolerance rule of
``fastattn_icl.testing``: the oracle in float32 is the same-dtype reference, the oracle on the model's float64
twin (``float64_twin``) the float64 one.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import fastattn_icl
from fastattn_icl.integrations import ATTN_IMPLEMENTATION, AnchorState, IsolationState, get_controller
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.integrations.transformers import fastattn_icl_mask
from fastattn_icl.testing import GRAD_FACTOR, check_close
from tests.models import BACKENDS, DEVICES, float64_twin, make_inputs, oracle_attention, positions, tiny_model

ORACLE = "fastattn_icl_test_oracle"
T = 12


@pytest.fixture(scope="module", autouse=True)
def _register_oracle():
    AttentionInterface.register(ORACLE, oracle_attention)
    AttentionMaskInterface.register(ORACLE, fastattn_icl_mask)
    yield


def _state(B: int, L: int, H: int, seed: int = 0, reweight_from=None):
    gen = torch.Generator().manual_seed(seed)
    beta = torch.randn(L, H, 3, generator=gen)
    anchors = AnchorState(
        positions=torch.tensor([[4, 6, 9, -1], [5, 7, -1, 8]])[:B],
        classes=torch.tensor([[0, 1, 2, 0], [2, 0, 0, 1]])[:B],
        reweight_from=reweight_from,
    )
    return beta, anchors


def _logits(model, ids, mask, **kw):
    return model(ids, attention_mask=mask, position_ids=positions(mask), use_cache=False, **kw).logits


def _float64_oracle(model):
    """The float64 twin of ``model`` on the oracle attention (the reference implementations with the method
    state, in float64), and the twin's own controller: the float64 oracle of the tolerance rule."""
    twin = float64_twin(model)
    twin.set_attn_implementation(ORACLE)
    return twin, get_controller(twin)


@pytest.mark.parametrize("reweight_from", [None, 7], ids=["last-row", "from-7"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_reweighting_and_isolation_match_the_oracle_end_to_end(family, reweight_from):
    model = tiny_model(family)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, L, H, reweight_from=reweight_from)
    isolation = IsolationState(torch.tensor([[5, 8], [6, -1]]), window=1)
    controller = get_controller(model)
    results = {}
    for impl in (ORACLE, ATTN_IMPLEMENTATION):
        model.set_attn_implementation(impl)
        b = beta.clone().requires_grad_(True)
        with controller.override(anchors=anchors, beta=b), controller.override(layers=[1], isolation=isolation):
            logits = _logits(model, ids, mask)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
        (logits * weights)[mask.bool()].sum().backward()
        results[impl] = logits.detach(), b.grad
    twin, controller64 = _float64_oracle(model)
    b64 = beta.double().requires_grad_(True)
    with controller64.override(anchors=anchors, beta=b64), controller64.override(layers=[1], isolation=isolation):
        logits64 = _logits(twin, ids, mask)
    weights = torch.randn(logits64.shape, generator=torch.Generator().manual_seed(3)).double()
    (logits64 * weights)[mask.bool()].sum().backward()
    keep = mask.bool()
    (ref, ref_grad), (out, grad) = results[ORACLE], results[ATTN_IMPLEMENTATION]
    check_close("logits with re-weighting and isolation", out[keep], ref[keep], logits64.detach()[keep])
    assert ref_grad.abs().max() > 0
    check_close("d beta", grad, ref_grad, b64.grad, factor=GRAD_FACTOR)
    assert controller.is_empty()
    with torch.no_grad():
        plain = _logits(model, ids, mask)
    assert (plain[keep] - out[keep]).abs().max() > 1e-3, "the method state changed nothing"


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_reweighting_in_one_layer_matches_the_oracle(family):
    """Re-weighting set for layer 0 only (β still the model-level [L, H, C] tensor): layer 1 is plain."""
    model = tiny_model(family)
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, 2, 4, reweight_from=6)
    controller = get_controller(model)
    logits = {}
    for impl in (ORACLE, ATTN_IMPLEMENTATION):
        model.set_attn_implementation(impl)
        with torch.no_grad(), controller.override(layers=[0], anchors=anchors, beta=beta):
            assert controller.layer_state(1) == {}
            logits[impl] = _logits(model, ids, mask)
    twin, controller64 = _float64_oracle(model)
    with torch.no_grad(), controller64.override(layers=[0], anchors=anchors, beta=beta.double()):
        logits64 = _logits(twin, ids, mask)
    keep = mask.bool()
    check_close("logits, layer 0 re-weighted", logits[ATTN_IMPLEMENTATION][keep], logits[ORACLE][keep], logits64[keep])
    with torch.no_grad():
        plain = _logits(model, ids, mask)
    # bit-exact: one torch-backend path; rows before reweight_from have weights exactly 1, so p * 1 leaves p as is
    assert torch.equal(plain[:, :6], logits[ATTN_IMPLEMENTATION][:, :6])
    assert (plain[keep] - logits[ATTN_IMPLEMENTATION][keep]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beta_zero_is_bitwise_plain_attention(family):
    model = tiny_model(family, attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, model.config.num_hidden_layers, model.config.num_attention_heads)
    with torch.no_grad():
        plain = _logits(model, ids, mask)
        with get_controller(model).override(anchors=anchors, beta=torch.zeros_like(beta)):
            zero = _logits(model, ids, mask)
    # bit-exact: one torch-backend path, and β = 0 gives weights exp(0) = 1 exactly (a neutral knob, DESIGN.md)
    assert torch.equal(plain, zero)


def _decode(model, ids, mask, prefill: int):
    """Logits of every real position: a prefill of ``prefill`` tokens, then one cached step per token."""
    out = model(ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions(mask[:, :prefill]),
                use_cache=True)
    steps, past = [out.logits], output_cache(out)
    for t in range(prefill, ids.shape[1]):
        seen = mask[:, : t + 1]
        out = model(ids[:, t : t + 1], attention_mask=seen, position_ids=positions(seen)[:, -1:], **cache_kwargs(past),
                    use_cache=True)
        steps.append(out.logits)
        past = output_cache(out)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize(
    "reweight_from", [3, 9, torch.tensor([5, 10])], ids=["in-prefill", "in-decode", "per-row"]
)
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_cached_decode_matches_the_full_pass(family, reweight_from):
    """``reweight_from`` is an absolute position: rows of a chunk before it are not re-weighted, rows at or
    after it are, whether they come in the prefill or in a decode step."""
    model = tiny_model(family, attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, model.config.num_hidden_layers, model.config.num_attention_heads,
                           reweight_from=reweight_from)
    isolation = IsolationState(torch.tensor([[5, 7], [6, -1]]), window=0)
    controller = get_controller(model)
    keep = mask.bool()
    with torch.no_grad(), controller.override(anchors=anchors, beta=beta, isolation=isolation):
        full = _logits(model, ids, mask)
        decoded = _decode(model, ids, mask, prefill=7)
    twin, controller64 = _float64_oracle(model)
    with torch.no_grad(), controller64.override(anchors=anchors, beta=beta.double(), isolation=isolation):
        oracle64 = _logits(twin, ids, mask)
    model.set_attn_implementation(ORACLE)
    with torch.no_grad(), controller.override(anchors=anchors, beta=beta, isolation=isolation):
        oracle = _logits(model, ids, mask)
    # the oracle runs full passes only: decoding and the full pass both answer to its full pass
    check_close("cached decode", decoded[keep], oracle[keep], oracle64[keep])
    check_close("full pass", full[keep], oracle[keep], oracle64[keep])


def test_reweight_from_none_reweights_only_the_last_row_of_each_call():
    model = tiny_model("gpt2", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=False)
    beta, anchors = _state(2, 2, 4)
    controller = get_controller(model)
    with torch.no_grad():
        plain = _logits(model, ids, mask)
        with controller.override(anchors=anchors, beta=beta):
            full = _logits(model, ids, mask)
    # bit-exact: one torch-backend path; rows before the call's last have weights exactly 1
    assert torch.equal(full[:, :-1], plain[:, :-1])
    assert (full[:, -1] - plain[:, -1]).abs().max() > 1e-3


def _layer_outputs(monkeypatch):
    seam = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]
    outputs = {}

    def spy(module, *args, **kwargs):
        out = seam(module, *args, **kwargs)
        outputs[module.layer_idx] = out[0].detach().clone()
        return out

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, spy)
    return outputs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_isolation_acts_only_in_the_chosen_layers(family, monkeypatch):
    model = tiny_model(family, attn_implementation=ATTN_IMPLEMENTATION, layers=3)
    outputs = _layer_outputs(monkeypatch)
    ids, mask = make_inputs(2, T, padded=True)
    controller = get_controller(model)
    with torch.no_grad():
        _logits(model, ids, mask)
        plain = dict(outputs)
        with controller.override(layers=[1], isolation=IsolationState(torch.tensor([[6, 9]]))):
            _logits(model, ids, mask)
        isolated = dict(outputs)
        _logits(model, ids, mask)
    # bit-exact: one torch-backend path; without state (layer 0, after the block) or in rows before 6 it is a no-op
    assert torch.equal(isolated[0], plain[0]), "a layer before the isolated one changed"
    assert (isolated[1] - plain[1]).abs().max() > 1e-4, "the isolated layer did not change"
    assert torch.equal(outputs[2], plain[2]), "state leaked out of the context manager"
    # only the isolated rows (6 and 9) of layer 1 change; rows before 6 are untouched
    assert torch.equal(isolated[1][:, :6], plain[1][:, :6])


def test_anchors_without_beta_and_attentions_with_state_raise():
    model = tiny_model("gpt2", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=False)
    beta, anchors = _state(2, 2, 4)
    controller = get_controller(model)
    bad = AnchorState(anchors.positions, anchors.classes, reweight_from=torch.tensor([1, 2, 3]))
    cases = [
        (dict(anchors=anchors, beta=beta[0]), TypeError, r"\[L, H, C\]"),
        (dict(isolation=torch.tensor([[3]])), TypeError, "IsolationState"),
        (dict(anchors=bad, beta=beta), ValueError, "reweight_from"),
        (dict(anchors=anchors, beta=beta[:1]), ValueError, "beta has 1 layers, no entry for all 2 layers"),
    ]
    for state, error, message in cases:  # refused when the block is entered, before any forward
        with pytest.raises(error, match=message):
            with controller.override(**state):
                pytest.fail(f"bad state {state} was accepted")
    with torch.no_grad(), controller.override(layers=[0], anchors=anchors, beta=beta[:1]):
        _logits(model, ids, mask)  # beta needs an entry for layer 0 only
    for state, missing in ((dict(anchors=anchors), "beta"), (dict(beta=beta), "anchors")):
        with torch.no_grad(), controller.override(**state):  # accepted: the other half may follow
            with pytest.raises(ValueError, match=f"'{missing}' is not set"):
                _logits(model, ids, mask)
    with torch.no_grad(), controller.override(anchors=anchors), controller.override(layers=[0], beta=beta):
        with pytest.raises(ValueError, match="'beta' is not set"):  # layer 1 has anchors only
            _logits(model, ids, mask)
    assert controller.is_empty()


def test_state_set_in_two_steps_or_nested_equals_state_set_at_once():
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, model.config.num_hidden_layers, model.config.num_attention_heads, reweight_from=7)
    controller = get_controller(model)
    with torch.no_grad():
        with controller.override(anchors=anchors, beta=beta):
            once = _logits(model, ids, mask)
        with controller.override(beta=beta), controller.override(anchors=anchors):
            nested = _logits(model, ids, mask)
        controller.set(anchors=anchors)
        controller.set(beta=beta)
        two_steps = _logits(model, ids, mask)
        controller.clear()
    assert torch.equal(nested, once) and torch.equal(two_steps, once)


def test_state_is_captured_when_set():
    """Changing the state's tensors in place after entry changes nothing: the checks and the kernel both see the
    values the block was entered with (a duplicate anchor or a window past the end never reach the kernel)."""
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(1, 10, padded=False)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    controller = get_controller(model)
    beta = torch.randn(L, H, 2, generator=torch.Generator().manual_seed(1))
    pos, rows, start = torch.tensor([[2, 4]]), torch.tensor([[3]]), torch.tensor([9])
    with torch.no_grad():
        with controller.override(anchors=AnchorState(pos, torch.tensor([[0, 1]]), start), beta=beta):
            expected = _logits(model, ids, mask)
            pos[0, 1], start[0] = 2, 0  # a duplicate position, and every row re-weighted
            assert torch.equal(_logits(model, ids, mask), expected)
        with controller.override(isolation=IsolationState(rows, window=1)):
            isolated = _logits(model, ids, mask)
            rows[0, 0] = 9  # its window would run past the last key (9)
            assert torch.equal(_logits(model, ids, mask), isolated)


def test_beta_without_classes_is_plain_attention():
    """``C = 0`` (every anchor slot unused, as it must be) is plain attention, as it was before the state was
    typed."""
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(2, T, padded=True)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    controller = get_controller(model)
    with torch.no_grad():
        plain = _logits(model, ids, mask)
        with controller.override(anchors=AnchorState(torch.tensor([[-1]]), torch.tensor([[0]]), 3),
                                 beta=torch.zeros(L, H, 0)):
            assert torch.equal(_logits(model, ids, mask), plain)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_output_attentions_show_the_methods(family):
    """The returned weights are the re-weighted, isolated ``P̂`` the kernel used (rows of ``P̂`` do not sum to
    1 where ``β ≠ 0``)."""
    model = tiny_model(family)
    ids, mask = make_inputs(2, T, padded=True)
    beta, anchors = _state(2, 2, 4, reweight_from=8)
    isolation = IsolationState(torch.tensor([[5, 9], [6, -1]]), window=1)
    controller = get_controller(model)
    weights = {}
    for impl in (ORACLE, ATTN_IMPLEMENTATION):
        model.set_attn_implementation(impl)
        with torch.no_grad(), controller.override(anchors=anchors, beta=beta, isolation=isolation):
            weights[impl] = model(ids, attention_mask=mask, output_attentions=True).attentions
    twin, controller64 = _float64_oracle(model)
    with torch.no_grad(), controller64.override(anchors=anchors, beta=beta.double(), isolation=isolation):
        high = twin(ids, attention_mask=mask, output_attentions=True).attentions
    keep = mask.bool()
    rows = lambda w: w.transpose(1, 2)[keep]  # noqa: E731
    assert len(weights[ATTN_IMPLEMENTATION]) == len(weights[ORACLE]) == len(high) == 2
    for out, ref, ref64 in zip(weights[ATTN_IMPLEMENTATION], weights[ORACLE], high):
        check_close("attention weights", rows(out), rows(ref), rows(ref64))
    row_sums = weights[ATTN_IMPLEMENTATION][0].sum(-1)[0]  # [H, Tq] of the unpadded batch row
    assert (row_sums[:, :8] - 1).abs().max() < 1e-5 and (row_sums[:, 8:] - 1).abs().max() > 1e-3


def test_isolation_window_running_past_a_decode_chunk_raises():
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION)
    ids, mask = make_inputs(1, T, padded=False)
    controller = get_controller(model)
    with torch.no_grad(), controller.override(isolation=IsolationState(torch.tensor([[5]]), window=3)):
        _logits(model, ids, mask)  # the whole window is inside the pass
        with pytest.raises(NotImplementedError, match="runs past the last key"):
            _logits(model, ids[:, :7], mask[:, :7])
        with pytest.raises(NotImplementedError, match="runs past the last key"):
            _decode(model, ids, torch.ones_like(ids), prefill=6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_a_one_layer_model(backend):
    """The Triton kernels (interpreter on CPU) run the same state as the PyTorch backend."""
    device = DEVICES[backend]
    model = tiny_model("llama", attn_implementation=ATTN_IMPLEMENTATION, layers=1).to(device)
    ids, mask = (t.to(device) for t in make_inputs(2, 10, padded=True))
    beta, anchors = _state(2, 1, 4, reweight_from=6)
    anchors = AnchorState(anchors.positions.to(device), anchors.classes.to(device), anchors.reweight_from)
    isolation = IsolationState(torch.tensor([[5, 7]], device=device))
    controller = get_controller(model)
    keep = mask.bool()
    logits = {}
    for name in ("torch", backend):
        b = beta.to(device, copy=True).requires_grad_(True)  # a leaf per backend: on CPU .to() alone aliases beta
        with fastattn_icl.use_backend(name), controller.override(anchors=anchors, beta=b, isolation=isolation):
            out = _logits(model, ids, mask)
        out[keep].pow(2).sum().backward()
        logits[name] = out.detach(), b.grad
    twin, controller64 = _float64_oracle(model)
    b64 = beta.to(device, torch.float64).requires_grad_(True)
    with controller64.override(anchors=anchors, beta=b64, isolation=isolation):
        out64 = _logits(twin, ids, mask)
    out64[keep].pow(2).sum().backward()
    # the backend at most 2x (3x for d beta) as far from the float64 oracle as the torch backend
    check_close(f"{backend} logits", logits[backend][0][keep], logits["torch"][0][keep], out64.detach()[keep])
    check_close(f"{backend} d beta", logits[backend][1], logits["torch"][1], b64.grad, factor=GRAD_FACTOR)
