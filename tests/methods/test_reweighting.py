"""AnchorReweighting: β = 0 is vanilla, training lowers the loss, batches with left padding equal batch 1,
state and attention implementation restored, safetensors round trip, side-by-side evaluation, families."""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.integrations import ATTN_IMPLEMENTATION, get_controller
from fastattn_icl.methods import AnchorReweighting, collate
from fastattn_icl.testing import GRAD_FACTOR, check_close
from tests.data.icl_sentiment import dataset
from tests.models import float64_twin, oracle_attention, swap_seam, tiny_model


def _examples(builder, n, seed):
    return [builder.example(x, y) for x, y in dataset(n, seed=seed)]


def _reweighting(builder, family="gpt2", **kw):
    if family == "mistral":
        kw.setdefault("sliding_window", 128)  # a window that never binds on these prompts
    model = tiny_model(family, **kw)
    return AnchorReweighting(model, builder.num_classes, builder.label_token_ids)


@pytest.fixture
def float64_oracle(monkeypatch):
    """``float64_oracle(rw, fn)``: ``fn`` applied to ``rw``'s β (as float64) on the float64 twin of its model, whose
    seam runs the reference attention with the method state (``oracle_attention``); asserts the oracle ran."""

    def run(rw, fn):
        rw64 = AnchorReweighting(float64_twin(rw.model), rw.beta.shape[-1], rw.label_token_ids)
        rw64.beta = torch.nn.Parameter(rw.beta.detach().double())
        calls = []

        def counting(module, *args, **kwargs):
            calls.append(module.layer_idx)
            return oracle_attention(module, *args, **kwargs)

        with monkeypatch.context() as m:
            swap_seam(m, counting)
            result = fn(rw64)
        assert calls, "the oracle did not run"
        return result

    return run


def _random_beta(rw, seed=0):
    with torch.no_grad():
        rw.beta.copy_(torch.randn(rw.beta.shape, generator=torch.Generator().manual_seed(seed)))


def test_beta_starts_at_zero_and_is_exactly_vanilla(builder):
    rw = _reweighting(builder)
    assert rw.beta.shape == (2, 4, 2) and not rw.beta.any() and rw.beta.requires_grad
    examples = _examples(builder, 4, seed=3)
    assert torch.equal(rw.label_logits(examples, reweight=True), rw.label_logits(examples, reweight=False))
    _random_beta(rw)
    assert not torch.allclose(rw.label_logits(examples, reweight=True), rw.label_logits(examples, reweight=False))


def test_fit_lowers_the_training_loss_and_trains_only_beta(builder):
    rw = _reweighting(builder)
    train = _examples(builder, 8, seed=4)  # 4 extra examples per class, as in the paper
    weights = {n: p.detach().clone() for n, p in rw.model.named_parameters()}
    with torch.no_grad():
        before = rw.loss(train).item()
    # the paper's lr 0.01 and batch 1 (docs/methods.md §2); 3 of its 10 epochs for speed
    history = rw.fit(train, epochs=3, progress=False)
    with torch.no_grad():
        after = rw.loss(train).item()
    assert len(history) == 3
    assert after < before - 1e-3, (before, after, history)
    assert rw.beta.abs().max() > 0
    assert all(torch.equal(p, weights[n]) for n, p in rw.model.named_parameters()), "the model was trained"
    assert all(p.requires_grad for p in rw.model.parameters()), "requires_grad not restored"
    assert get_controller(rw.model).is_empty() and rw.model.config._attn_implementation == "eager"


def test_fit_defaults_are_the_papers():
    import inspect

    params = inspect.signature(AnchorReweighting.fit).parameters
    assert (params["epochs"].default, params["lr"].default, params["batch_size"].default) == (10, 0.01, 1)


def test_batches_with_left_padding_equal_batch_one(builder, float64_oracle):
    rw = _reweighting(builder)
    _random_beta(rw)
    examples = [builder.example(x, y) for x, y in [("fun", 1), ("the plot was really dull and boring", 0),
                                                   ("a charming story", 1)]]
    assert len({len(e.input_ids) for e in examples}) == 3
    batched = rw.label_logits(examples)
    single = torch.cat([rw.label_logits([e]) for e in examples])
    # batched and left-padded at most 2x as far from the float64 oracle as one example at a time
    high = float64_oracle(rw, lambda rw64: torch.cat([rw64.label_logits([e]) for e in examples]))
    check_close("label logits", batched, single, high)

    def loss_grad(method, batches):
        method.beta.grad = None
        sum(method.loss(b) * len(b) for b in batches).backward()
        return method.beta.grad.clone()

    grads = [loss_grad(rw, batches) for batches in ([examples], [[e] for e in examples])]
    high_grad = float64_oracle(rw, lambda rw64: loss_grad(rw64, [[e] for e in examples]))
    check_close("d beta", grads[0], grads[1], high_grad, factor=GRAD_FACTOR)
    history = rw.fit(_examples(builder, 6, seed=5), epochs=2, batch_size=4, progress=False)
    assert len(history) == 2


def test_applied_restores_state_and_implementation_also_on_exception(builder):
    rw = _reweighting(builder)
    batch = collate([builder.example("fun", 1)])
    controller = get_controller(rw.model)
    with rw.applied(batch["anchor_positions"], batch["anchor_classes"], layers=[1]) as inside:
        assert inside is controller and rw.model.config._attn_implementation == ATTN_IMPLEMENTATION
        assert controller.get("beta", layer_idx=1) is rw.beta and controller.get("beta", layer_idx=0) is None
    assert controller.is_empty() and rw.model.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with rw.applied(batch["anchor_positions"], batch["anchor_classes"]):
            raise RuntimeError("boom")
    assert controller.is_empty() and rw.model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="label"):
        rw.fit([builder.example("fun")], progress=False)
    assert controller.is_empty() and all(p.requires_grad for p in rw.model.parameters())


def test_generation_keeps_the_reweighting(builder, float64_oracle):
    """With ``reweight_from`` = the last prompt position, every generated token is re-weighted: greedy
    scores equal full passes with the same state."""
    rw = _reweighting(builder, family="llama", attn_implementation=ATTN_IMPLEMENTATION)
    _random_beta(rw)
    example = builder.example("a charming story", 1)
    ids = example.input_ids[None]
    start = ids.shape[1] - 1
    with rw.applied(example.anchor_positions, example.anchor_classes, reweight_from=start), torch.no_grad():
        out = rw.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        full = rw.model(out.sequences[:, :-1]).logits[0, start:]

    def full_pass(rw64):
        with rw64.applied(example.anchor_positions, example.anchor_classes, reweight_from=start), torch.no_grad():
            return rw64.model(out.sequences[:, :-1]).logits[0, start:]

    check_close("greedy scores", torch.stack([s[0] for s in out.scores]), full, float64_oracle(rw, full_pass))


def test_save_and_load_round_trip(builder, tmp_path):
    rw = _reweighting(builder)
    _random_beta(rw)
    rw.save(tmp_path / "beta.safetensors")
    other = _reweighting(builder)
    assert other.load(tmp_path / "beta.safetensors") is other
    assert torch.equal(other.beta, rw.beta)
    wrong = AnchorReweighting(tiny_model("gpt2", layers=1), 2, builder.label_token_ids)
    with pytest.raises(ValueError, match="shape"):
        wrong.load(tmp_path / "beta.safetensors")


def test_evaluate_reports_both_accuracies(builder):
    rw = _reweighting(builder)
    test = _examples(builder, 6, seed=6)
    result = rw.evaluate(test, batch_size=4)
    assert result.num_examples == 6 and result.accuracy_vanilla == result.accuracy_reweighted
    assert torch.equal(result.predictions_vanilla, result.predictions_reweighted)
    labels = torch.tensor([e.label for e in test])
    assert result.accuracy_vanilla == (result.predictions_vanilla == labels).float().mean().item()
    other = 1 - int(result.predictions_vanilla.mode().values)
    with torch.no_grad():
        rw.beta[:, :, other] = 8.0  # a large weight on the other class's anchors in every layer flips predictions
    shifted = rw.evaluate(test)
    assert shifted.accuracy_vanilla == result.accuracy_vanilla
    assert not torch.equal(shifted.predictions_reweighted, shifted.predictions_vanilla)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_families(builder, family):
    rw = _reweighting(builder, family=family)
    examples = _examples(builder, 2, seed=7)
    vanilla = rw.label_logits(examples, reweight=False)
    _random_beta(rw)
    loss = rw.loss(examples)
    loss.backward()
    assert rw.beta.grad.abs().sum() > 0
    assert not torch.allclose(rw.label_logits(examples).detach(), vanilla)
    assert rw.model.config._attn_implementation == "eager"


def test_triton_backend_on_a_one_layer_model(builder, float64_oracle):
    rw = _reweighting(builder, family="gpt2", layers=1)
    _random_beta(rw)
    examples = _examples(builder, 2, seed=8)
    reference = rw.loss(examples)
    reference.backward()
    expected = rw.beta.grad.clone()
    rw.beta.grad = None
    with fastattn_icl.use_backend("triton"):
        loss = rw.loss(examples)
        loss.backward()

    def loss_and_grad(rw64):
        loss64 = rw64.loss(examples)
        loss64.backward()
        return loss64.detach(), rw64.beta.grad

    # the Triton kernels at most 2x (3x for d beta) as far from the float64 oracle as the torch backend
    high_loss, high_grad = float64_oracle(rw, loss_and_grad)
    check_close("loss", loss, reference, high_loss)
    check_close("d beta", rw.beta.grad, expected, high_grad, factor=GRAD_FACTOR)


def test_zero_shot_examples(builder):
    """Zero-shot prompts have no anchors: predicting and evaluating them is vanilla ICL (nothing to re-weight), and
    training on them is refused with the reason (before, autograd failed deep inside: no gradient reaches beta)."""
    from fastattn_icl.methods import PromptBuilder

    zero_shot = PromptBuilder(builder.tokenizer, builder.template, builder.label_words, [])
    examples = [zero_shot.example(x, y) for x, y in dataset(4, seed=3)]
    rw = _reweighting(builder)
    _random_beta(rw)
    assert torch.equal(rw.predict(examples), rw.predict(examples, reweight=False))
    result = rw.evaluate(examples)
    assert result.accuracy_vanilla == result.accuracy_reweighted and result.num_examples == 4
    mixed = [*_examples(builder, 2, seed=4), examples[1]]
    with pytest.raises(ValueError, match=r"train_examples \[2\] have no label words \(zero-shot prompts\?\)"):
        rw.fit(mixed, progress=False)
