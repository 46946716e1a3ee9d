"""information_flow: per-layer S_wp / S_pq / S_ww from the fused backward equal the paper's method (grad of the
loss w.r.t. every layer's eager attention weights) on each routed family and GPT-J; batching with left padding
changes nothing; the plot is written; bad input raises."""

from __future__ import annotations

import pytest
import torch

import fastattn_icl
from fastattn_icl.integrations import routed
from fastattn_icl.methods import InformationFlow, information_flow
from fastattn_icl.reference.saliency import flow_scores, saliency_map
from fastattn_icl.testing import EPS, check_close
from tests.data.icl_sentiment import dataset
from tests.models import float64_twin, tiny_gptj, tiny_model

# the scores are float64 copies of a float32 computation: the rule's float32 epsilon applies (default_eps sees only
# the dtype, and would hold them to the float64 one)
FP32 = {"eps": EPS}

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gptj"]


def _examples(builder, n, seed):
    return [builder.example(x, y) for x, y in dataset(n, seed=seed)]


def _model(family, **kw):
    if family == "gptj":  # eager GPT-J returns its attention weights too; information_flow patches it
        return tiny_gptj(**kw).eval()
    if family == "mistral":
        kw.setdefault("sliding_window", 128)  # a window that never binds on these prompts
    return tiny_model(family, attn_implementation="eager", **kw)


def _exact(name, got, expected):
    """A float64 computation against its exact value: the tolerance rule, whose same-dtype error is then 0."""
    check_close(name, got, expected, expected)


def _oracle(model, example, label_token_ids, per_head=False):
    """``[L, 3]`` float64 scores of one prompt by the paper's method: eager attention weights ``P`` of every
    layer, ``∂L/∂P`` by autograd, ``I = |Σ_h P ⊙ ∂L/∂P|``, then :func:`flow_scores` (``[L, H, 3]`` per head, ``I``
    without the sum over heads). The model's dtype is the precision of everything before ``I``."""
    ids = example.input_ids[None]
    with torch.enable_grad():
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
        logits = out.logits[:, -1, torch.as_tensor(label_token_ids)]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([example.label]))
        grads = torch.autograd.grad(loss, out.attentions)
    rows = []
    for P, dP in zip(out.attentions, grads):
        I = saliency_map(P.double(), dP.double(), per_head=per_head)[0]  # noqa: E741
        heads = I if per_head else I[None]
        scores = [torch.stack(flow_scores(h, example.anchor_positions, ids.shape[1] - 1)) for h in heads]
        rows.append(torch.stack(scores) if per_head else scores[0])
    return torch.stack(rows)


def _oracles(model, examples, label_token_ids, per_head=False):
    """The scores of every prompt by the paper's method on the model and on its float64 twin."""
    twin = float64_twin(model)
    same = torch.stack([_oracle(model, e, label_token_ids, per_head) for e in examples])
    return same, torch.stack([_oracle(twin, e, label_token_ids, per_head) for e in examples])


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_the_probe_method(builder, family):
    model = _model(family, layers=3)
    examples = _examples(builder, 3, seed=5)
    flow = information_flow(model, examples, builder.label_token_ids, progress=False)
    assert isinstance(flow, InformationFlow) and flow.per_sample.shape == (3, 3, 3)
    check_close("per-sample scores", flow.per_sample, *_oracles(model, examples, builder.label_token_ids), **FP32)
    assert model.config._attn_implementation == "eager"  # switched for the call only
    assert not any(p.grad is not None for p in model.parameters())  # weights frozen: no parameter gradients
    assert all(p.requires_grad for p in model.parameters())  # and restored


def test_batched_with_left_padding_equals_one_at_a_time(builder):
    model = _model("llama", layers=2)
    queries = [(x, y) for x, y in dataset(4, seed=7)]
    queries[1] = ("good", 1)  # shorter prompts: the batch is left-padded
    queries[2] = (queries[2][0] + " fine", queries[2][1])
    examples = [builder.example(x, y) for x, y in queries]
    assert len({len(e.input_ids) for e in examples}) == 3
    one = information_flow(model, examples, builder.label_token_ids, progress=False)
    batched = information_flow(model, examples, builder.label_token_ids, batch_size=3, per_head=True, progress=False)
    _, high = _oracles(model, examples, builder.label_token_ids)
    # batched and left-padded at most 2x as far from the float64 oracle as one prompt at a time
    check_close("batched per-sample scores", batched.per_sample, one.per_sample, high, **FP32)
    assert batched.per_head.shape == (4, 2, 4, 3) and bool((batched.per_head >= 0).all())


def test_summary_statistics_by_hand():
    # two prompts, two layers; layer 1 is all zero (normalises to zero, not NaN)
    per_sample = torch.tensor(
        [[[1.0, 2.0, 1.0], [0.0, 0.0, 0.0]], [[3.0, 2.0, 3.0], [0.0, 0.0, 0.0]]], dtype=torch.float64
    )
    flow = InformationFlow(per_sample)
    _exact("mean", flow.mean, torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    s = 2**0.5  # sample std of (1, 3)
    _exact("std", flow.std, torch.tensor([[s, 0.0, s], [0.0, 0.0, 0.0]], dtype=torch.float64))
    third = 1 / 3
    expected = torch.tensor([[third, third, third], [0.0, 0.0, 0.0]], dtype=torch.float64)
    _exact("normalised mean", flow.normalised_mean, expected)
    # the spread of each prompt's normalised scores: layer 0 is (1, 2, 1) / 4 and (3, 2, 3) / 8, sample std
    # |a - b| / sqrt(2); the all-zero layer normalises to zero for both prompts
    r = 1 / 8 / s  # |0.25 - 0.375| / sqrt(2) (S_wp, S_ww) and twice that for S_pq (|0.5 - 0.25|)
    _exact("normalised std", flow.normalised_std, torch.tensor([[r, 2 * r, r], [0.0, 0.0, 0.0]], dtype=torch.float64))
    data = flow.to_dict()
    assert data["num_samples"] == 2 and data["S_wp"]["normalised_mean"] == pytest.approx([third, 0.0])
    assert InformationFlow(per_sample[:1]).std.abs().sum() == 0  # one prompt: no spread


def test_normalised_band_is_the_spread_of_per_prompt_normalised_scores(monkeypatch, tmp_path):
    """Prompts whose raw scores differ in scale (as on a real model) put raw ± std far outside [0, 1] once divided by
    the mean's sum (the band reached -0.5 and 2.4); the normalised band is the spread of each prompt's normalised
    scores, computed independently here, and what the plot shades."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([100.0, 1.0, 0.01, 10.0, 0.1])[:, None, None]
    per_sample = torch.rand(5, 4, 3, generator=g, dtype=torch.float64) * scale
    per_sample[1, 2] = 0.0  # one all-zero layer of one prompt: zero, not NaN
    flow = InformationFlow(per_sample)
    normalised = torch.stack([
        torch.stack([row / row.sum() if row.sum() > 0 else torch.zeros(3, dtype=torch.float64) for row in prompt])
        for prompt in per_sample
    ])  # [N, L, 3]
    mean = normalised.mean(0, keepdim=True)
    std = ((normalised - mean) ** 2).sum(0).div(len(per_sample) - 1).sqrt()
    _exact("per-prompt normalised", flow.per_sample_normalised, normalised)
    _exact("normalised std", flow.normalised_std, std)
    n = len(per_sample)
    assert bool((flow.normalised_std <= (n / (4 * (n - 1))) ** 0.5).all())  # the most n values in [0, 1] can spread
    low, high = flow.band()
    centre = per_sample.mean(0) / per_sample.mean(0).sum(-1, keepdim=True)  # the mean's scores, normalised
    _exact("band low", low, (centre - std).clamp(0, 1))
    _exact("band high", high, (centre + std).clamp(0, 1))
    assert bool((low >= 0).all() and (high <= 1).all() and (low <= flow.normalised_mean).all())
    raw_low, raw_high = flow.band(normalised=False)
    raw_std = per_sample.std(0)  # the sample std, independently of InformationFlow
    _exact("raw band high", raw_high, per_sample.mean(0) + raw_std)
    _exact("raw band low", raw_low, (per_sample.mean(0) - raw_std).clamp(min=0))
    assert flow.to_dict()["S_pq"]["normalised_std"] == pytest.approx(std[:, 1].tolist())

    import matplotlib.axes

    shaded = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, y1, y2, **kw: (shaded.append((y1, y2)), real(self, x, y1, y2, **kw))[1])
    flow.plot(tmp_path / "flow.png")
    assert len(shaded) == 3
    for i, (y1, y2) in enumerate(shaded):
        # bit-exact: the plot hands the band's own values to fill_between
        assert torch.equal(torch.as_tensor(y1), low[:, i]) and torch.equal(torch.as_tensor(y2), high[:, i])


def test_plot(builder, tmp_path):
    model = _model("gpt2", layers=3)
    flow = information_flow(model, _examples(builder, 3, seed=2), builder.label_token_ids, progress=False)
    _exact("normalised sums", flow.normalised_mean.sum(-1), torch.ones(3, dtype=torch.float64))
    path = tmp_path / "flow.png"
    flow.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input(builder):
    model = _model("gpt2")
    examples = _examples(builder, 2, seed=1)
    ids = builder.label_token_ids
    with torch.no_grad(), pytest.raises(RuntimeError, match="gradients are disabled"):
        information_flow(model, examples, ids, progress=False)
    unlabeled = builder.example(dataset(1, seed=3)[0][0])
    with pytest.raises(ValueError, match="no gold label"):
        information_flow(model, [unlabeled], ids, progress=False)
    no_labels = type(examples[0])(
        examples[0].input_ids, examples[0].anchor_positions[:0], examples[0].anchor_classes[:0], 0
    )
    with pytest.raises(ValueError, match="no label-word positions"):
        information_flow(model, [no_labels], ids, progress=False)
    from fastattn_icl.methods import PromptBuilder

    zero_shot = PromptBuilder(builder.tokenizer, builder.template, builder.label_words, []).example("fun", 1)
    with pytest.raises(ValueError, match=r"examples\[1\] has no label-word positions \(a zero-shot prompt\?\)"):
        information_flow(model, [examples[0], zero_shot], ids, progress=False)
    e = examples[0]
    late = type(e)(e.input_ids, torch.tensor([len(e.input_ids) - 1]), torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="before the target"):
        information_flow(model, [late], ids, progress=False)
    with pytest.raises(ValueError, match="at least one example"):
        information_flow(model, [], ids, progress=False)
    with routed(model) as controller:
        with pytest.raises(TypeError, match="saliency must be a fastattn_icl.ops.Saliency"):
            with controller.override(saliency="labels"):  # refused when entered
                model(examples[0].input_ids[None])


def test_triton_kernels_give_the_same_scores(builder):
    """The Triton saliency kernel (interpreter on CPU) against the torch backend, through a whole model."""
    model = _model("qwen2", layers=2)
    examples = _examples(builder, 2, seed=4)
    torch_flow = information_flow(model, examples, builder.label_token_ids, batch_size=2, per_head=True, progress=False)
    with fastattn_icl.use_backend("triton"):
        triton_flow = information_flow(
            model, examples, builder.label_token_ids, batch_size=2, per_head=True, progress=False
        )
    # the Triton kernel at most 2x as far from the float64 oracle as the torch backend
    _, high = _oracles(model, examples, builder.label_token_ids)
    check_close("per-sample scores", triton_flow.per_sample, torch_flow.per_sample, high, **FP32)
    _, high_per_head = _oracles(model, examples, builder.label_token_ids, per_head=True)
    check_close("per-head scores", triton_flow.per_head, torch_flow.per_head, high_per_head, **FP32)
