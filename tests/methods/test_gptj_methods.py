"""The ICL method workflows on GPT-J. Where transformers does not route GPT-J through
``AttentionInterface`` (up to 5.23), ``enable`` / ``enabled`` / ``routed`` patch it with
:func:`~fastattn_icl.integrations.gptj.patch_gptj` (and revert exactly); where it does (5.24+), they
switch its attention implementation as for every routed family. ``AnchorReweighting`` and ``isolate``
work on it unchanged either way.

The reference is the oracle attention of ``tests/integrations/test_method_state.py`` (the reference
implementations on the same q/k/v with the same controller state), put in the seam's place for the whole
model (:func:`tests.models.swap_seam`, which covers both paths).
"""

from __future__ import annotations

import pytest
import torch

from fastattn_icl.integrations import ATTN_IMPLEMENTATION, disable, enable, enabled, get_controller, routed
from fastattn_icl.integrations import transformers as seam
from fastattn_icl.integrations.controller import CONTROLLER_ATTR
from fastattn_icl.integrations.gptj import is_patched, patch_gptj
from fastattn_icl.methods import AnchorReweighting, collate, isolate
from fastattn_icl.testing import GRAD_FACTOR, check_close
from tests.data.icl_sentiment import dataset
from tests.models import ROUTED, float64_twin, oracle_attention, swap_seam, tiny_gptj


@pytest.fixture
def oracle(monkeypatch):
    """Inside ``with oracle():`` the patched GPT-J runs the reference attention instead of the seam."""
    import contextlib

    @contextlib.contextmanager
    def swap():
        layers = []

        def counting(module, *args, **kwargs):
            layers.append(module.layer_idx)
            return oracle_attention(module, *args, **kwargs)

        with monkeypatch.context() as m:
            swap_seam(m, counting)
            yield
        assert layers == [0, 1], "the oracle did not replace the seam in every layer"

    return swap


@pytest.fixture
def seam_outputs(monkeypatch):
    """Per seam call of a patched GPT-J: (layer_idx, output ``[B, Tq, H, D]``)."""
    calls = []
    original = seam.fastattn_icl_attention_forward

    def recording(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        calls.append((module.layer_idx, out[0].detach().clone()))
        return out

    swap_seam(monkeypatch, recording)
    return calls


def _examples(builder, n, seed):
    return [builder.example(x, y) for x, y in dataset(n, seed=seed)]


def _random_beta(rw, seed=0):
    with torch.no_grad():
        rw.beta.copy_(torch.randn(rw.beta.shape, generator=torch.Generator().manual_seed(seed)))


def _logits(model, batch):
    return model(
        batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False
    ).logits


def _snapshot(model):
    """Everything the patch touches, per module: instance attributes (the controller excluded), hooks,
    ``layer_idx``; and the config's implementation."""
    modules = []
    for module in model.modules():
        keys = frozenset(k for k in module.__dict__ if k != CONTROLLER_ATTR)
        hooks = tuple(
            len(getattr(module, name))
            for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called")
        )
        modules.append((keys, hooks, getattr(module, "layer_idx", None)))
    return modules, model.config._attn_implementation


def _patched(model):
    """Per block: does it run through the seam (routed GPT-J: the model's implementation is switched;
    eager-core GPT-J: its attention module is patched)."""
    if ROUTED:
        return [model.config._attn_implementation == ATTN_IMPLEMENTATION for _ in model.transformer.h]
    return [is_patched(block.attn) for block in model.transformer.h]


def test_enable_disable_patch_gptj_and_revert_exactly():
    model = tiny_gptj()
    get_controller(model)
    before = _snapshot(model)
    previous = enable(model)
    assert previous == "eager" and _patched(model) == [True, True]
    assert all(block.attn.__dict__[CONTROLLER_ATTR] is get_controller(model) for block in model.transformer.h)
    assert enable(model) == ATTN_IMPLEMENTATION  # already routed: left as it is
    disable(model, ATTN_IMPLEMENTATION)
    assert _patched(model) == [True, True]
    disable(model, previous)
    assert _patched(model) == [False, False] and _snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with enabled(model) as controller:
            assert controller is get_controller(model) and _patched(model) == [True, True]
            raise RuntimeError("boom")
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with routed(model):
            assert _patched(model) == [True, True]
            raise RuntimeError("boom")
    assert _snapshot(model) == before


def test_routed_leaves_a_patch_of_the_caller_alone():
    model = tiny_gptj()
    with patch_gptj(model) as handle:
        with routed(model), enabled(model):
            assert _patched(model) == [True, True]
        assert handle.active and _patched(model) == [True, True]
        if not ROUTED:  # a routed handle is a switch of the implementation, which disable() may switch back
            with pytest.raises(RuntimeError, match="patch_gptj"):
                disable(model, "eager")  # not enable()'s patch: refused, not reverted behind the handle's back
            assert _patched(model) == [True, True]
    assert _patched(model) == [False, False]


def test_codegen_is_routed_or_refused_naming_it():
    """CodeGen: routed by transformers 5.24+ (then ``enable`` switches it, and tests/integrations/
    test_models.py compares it with eager); before, neither routed nor patched: a clear error."""
    from transformers import AutoModelForCausalLM, CodeGenConfig
    from transformers.models.codegen.modeling_codegen import CodeGenAttention

    from fastattn_icl.integrations.gptj import routes_attention_class

    config = CodeGenConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, vocab_size=100, bos_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if routes_attention_class(CodeGenAttention):
        assert enable(model) == "eager" and model.config._attn_implementation == ATTN_IMPLEMENTATION
        with torch.no_grad():
            model(torch.randint(3, 100, (1, 5)))
        disable(model, "eager")
        assert model.config._attn_implementation == "eager"
        return
    with pytest.raises(RuntimeError, match=r"CodeGenForCausalLM \(model_type 'codegen'\).*gptj"):
        enable(model)
    with pytest.raises(RuntimeError, match="codegen"):
        with routed(model):
            pass
    assert model.config._attn_implementation == "eager"


def test_beta_zero_is_the_unpatched_eager_model(builder):
    model = tiny_gptj()
    rw = AnchorReweighting(model, builder.num_classes, builder.label_token_ids)
    examples = _examples(builder, 4, seed=3)
    batch = collate(examples)
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        eager = _logits(model, batch)
        high = _logits(float64_twin(model), batch)
        assert eager.abs().max() > 0.5
        with rw.applied(batch["anchor_positions"], batch["anchor_classes"]):
            assert _patched(model) == [True, True]
            zero = _logits(model, batch)
        vanilla, reweighted = rw.label_logits(examples, reweight=False), rw.label_logits(examples)
    assert _patched(model) == [False, False]
    check_close("logits with beta = 0 vs the unpatched eager GPT-J", zero[keep], eager[keep], high[keep])
    assert torch.equal(reweighted, vanilla)
    labels = lambda logits: logits[:, -1, rw.label_token_ids]  # noqa: E731
    check_close("label logits vs eager", vanilla, labels(eager), labels(high))


def test_reweighting_one_layer_matches_the_reference(builder, oracle):
    model = tiny_gptj()
    rw = AnchorReweighting(model, builder.num_classes, builder.label_token_ids)
    _random_beta(rw)
    batch = collate(_examples(builder, 3, seed=5))  # left-padded
    keep = batch["attention_mask"].bool()
    twin = float64_twin(model)
    rw64 = AnchorReweighting(twin, builder.num_classes, builder.label_token_ids)
    with torch.no_grad():
        plain = _logits(model, batch)
        plain64 = _logits(twin, batch)
        rw64.beta.copy_(rw.beta)
    results = {}
    for name, method in (("oracle", rw), ("seam", rw), ("float64 oracle", rw64)):
        method.beta.grad = None
        with method.applied(batch["anchor_positions"], batch["anchor_classes"], layers=[1]) as controller:
            assert controller.layer_state(0) == {} and controller.get("beta", 1) is method.beta
            if name == "seam":
                logits = _logits(method.model, batch)
            else:
                with oracle():
                    logits = _logits(method.model, batch)
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3)).to(logits.dtype)
        (logits * weights)[keep].sum().backward()
        results[name] = logits.detach(), method.beta.grad.clone()
    (ref, ref_grad), (out, grad), (high, high_grad) = results["oracle"], results["seam"], results["float64 oracle"]
    check_close("logits, layer 1 re-weighted", out[keep], ref[keep], high[keep])
    assert ref_grad[1].abs().max() > 0 and not ref_grad[0].any() and not grad[0].any()
    check_close("d beta", grad, ref_grad, high_grad, factor=GRAD_FACTOR)
    # only the last query row is re-weighted (reweight_from=None) in the last layer: nothing else changes
    check_close("rows before the last", out[:, :-1], plain[:, :-1], plain64[:, :-1])
    assert (out[:, -1] - plain[:, -1]).abs().max() > 1e-3
    assert get_controller(model).is_empty() and _patched(model) == [False, False]


def test_fit_lowers_the_loss_and_evaluate_compares(builder):
    model = tiny_gptj()
    rw = AnchorReweighting(model, builder.num_classes, builder.label_token_ids)
    before_state = _snapshot(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = _examples(builder, 4, seed=4)
    with torch.no_grad():
        before = rw.loss(train).item()
    history = rw.fit(train, epochs=3, progress=False)
    with torch.no_grad():
        after = rw.loss(train).item()
    assert len(history) == 3 and after < before - 1e-3, (before, after, history)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters()), "the model was trained"
    assert all(p.requires_grad for p in model.parameters())
    assert get_controller(model).is_empty() and _snapshot(model) == before_state
    test = _examples(builder, 4, seed=6)
    with torch.no_grad():
        rw.beta.zero_()
    result = rw.evaluate(test)
    assert result.num_examples == 4 and torch.equal(result.predictions_vanilla, result.predictions_reweighted)
    shifted = []
    for c in range(builder.num_classes):  # a large weight on one class's anchors in every layer
        with torch.no_grad():
            rw.beta.zero_()
            rw.beta[:, :, c] = 8.0
        evaluation = rw.evaluate(test)
        assert torch.equal(evaluation.predictions_vanilla, result.predictions_vanilla)
        shifted.append(evaluation.predictions_reweighted)
    assert not torch.equal(shifted[0], shifted[1]), "re-weighting changed no prediction"
    assert _snapshot(model) == before_state


def test_isolation_changes_only_the_chosen_layers(builder, seam_outputs, oracle):
    model = tiny_gptj()
    batch = collate(_examples(builder, 3, seed=2))
    keep = batch["attention_mask"].bool()
    labels = batch["anchor_positions"]
    twin = float64_twin(model)
    with torch.no_grad():
        eager = _logits(model, batch)
        high = _logits(twin, batch)
        with routed(model):
            plain = _logits(model, batch)
        plain_out = dict(seam_outputs)
        seam_outputs.clear()
        with isolate(model, labels, layers=[1]) as controller:
            assert controller.layer_state(0) == {} and set(controller.layer_state(1)) == {"isolation"}
            isolated = _logits(model, batch)
            with oracle():
                ref = _logits(model, batch)
        isolated_out = dict(seam_outputs)
        with isolate(twin, labels, layers=[1]), oracle():
            ref64 = _logits(twin, batch)
    assert get_controller(model).is_empty() and _patched(model) == [False, False]
    check_close("plain patched vs eager", plain[keep], eager[keep], high[keep])
    assert torch.equal(isolated_out[0], plain_out[0]), "layer 0 is not isolated"
    rows = keep[:, :, None, None]
    assert ((isolated_out[1] - plain_out[1]) * rows).abs().max() > 1e-3, "layer 1 is isolated"
    check_close("logits with layer 1 isolated vs the reference", isolated[keep], ref[keep], ref64[keep])
    # in the last layer only the isolated rows change: rows before the first label word are untouched
    first = int(labels[labels >= 0].min())
    # bit-exact: the same seam call, and isolation rewrites only the logits of rows from the first label on
    assert torch.equal(isolated[:, :first], plain[:, :first])
    assert (isolated[keep] - plain[keep]).abs().max() > 1e-3
    with torch.no_grad(), isolate(model, labels, layers=[0]):
        shallow = _logits(model, batch)
    assert (shallow[keep] - isolated[keep]).abs().max() > 1e-3


def test_state_and_module_restored_on_exceptions(builder):
    model = tiny_gptj()
    rw = AnchorReweighting(model, builder.num_classes, builder.label_token_ids)
    controller = get_controller(model)
    before = _snapshot(model)
    batch = collate([builder.example("fun", 1)])
    with pytest.raises(RuntimeError, match="boom"):
        with rw.applied(batch["anchor_positions"], batch["anchor_classes"], layers=[0]):
            assert _patched(model) == [True, True] and not controller.is_empty()
            raise RuntimeError("boom")
    assert controller.is_empty() and _snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with isolate(model, batch["anchor_positions"], layers=[1]):
            raise RuntimeError("boom")
    assert controller.is_empty() and _snapshot(model) == before
    ids = batch["input_ids"]
    with pytest.raises(NotImplementedError, match="4D"), isolate(model, batch["anchor_positions"]):
        model(ids, attention_mask=torch.ones(1, 1, ids.shape[1], ids.shape[1]), use_cache=False)  # fails in forward
    assert controller.is_empty() and _snapshot(model) == before
    with pytest.raises(ValueError, match="label"):
        rw.fit([builder.example("fun")], progress=False)
    assert controller.is_empty() and _snapshot(model) == before
    # a model that already runs through the seam stays patched after the workflows
    previous = enable(model)
    with rw.applied(batch["anchor_positions"], batch["anchor_classes"]), isolate(model, batch["anchor_positions"]):
        pass
    assert _patched(model) == [True, True] and controller.is_empty()
    disable(model, previous)
    assert _snapshot(model) == before
