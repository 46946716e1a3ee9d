"""The package on a real pretrained model, SmolLM2-135M-Instruct (Llama with GQA 9/3, RoPE; see conftest.py).

Equivalences compare the fused path with the eager path under the tolerance rule (``fastattn_icl.testing``): the
float64 copy of the model with eager attention is the oracle, the float32 eager run the same-dtype reference.
Behaviour tests (crossover, compression, Deep-Thinking) assert what a real model shows; each says why its threshold
is what it is. Sample sizes are the smallest that keep the margins wide under a change of seed.
"""

import copy
import random

import pytest
import torch

from fastattn_icl.integrations import AttentionRowProbe, get_controller
from fastattn_icl.lab import TASKS, TaskDataError, load_task
from fastattn_icl.lab.eager import eager_information_flow, eager_study
from fastattn_icl.methods import (
    PromptBuilder,
    collate,
    compress_demonstrations,
    deep_thinking,
    first_layers,
    information_flow,
    isolate,
    last_layers,
    random_non_label_positions,
)
from fastattn_icl.methods.compression import CompressedDemonstrations
from fastattn_icl.testing import check_close

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def model64(smollm2):
    m = copy.deepcopy(smollm2.model).double()
    m.set_attn_implementation("eager")
    return m


def _examples(lm, task_name, n, seed=0, demos_per_class=1):
    """``n`` prompts of a shipped task, each with its own demonstrations (1 per class) from the train split."""
    task = load_task(task_name)
    out = []
    for i, e in enumerate(task.split("test")[:n]):
        demos = task.per_class("train", demos_per_class, seed=seed * 1000 + i)
        builder = PromptBuilder(lm.tokenizer, task.template, list(task.label_words), demos)
        out.append(builder.example(e.text, e.label))
    return task, builder.label_token_ids, out


def _forward(model, batch, implementation=None, **extra):
    previous = model.config._attn_implementation
    if implementation:
        model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False, **extra).logits
    finally:
        model.set_attn_implementation(previous)


def test_shipped_label_words_are_single_tokens(smollm2):
    for name in TASKS:
        ids = load_task(name).check_tokenizer(smollm2.tokenizer)
        assert len(ids) == len(set(ids)) == len(TASKS[name][2])
    task = load_task("trec")
    object.__setattr__(task, "label_words", ("abbreviation", "zqxjvw"))  # not a word: several tokens
    with pytest.raises(TaskDataError, match=r"label word 'zqxjvw' is not a single token.*split into"):
        task.check_tokenizer(smollm2.tokenizer)


def test_seam_logits_equal_eager_and_sdpa(smollm2, model64):
    """A left-padded batch of 4 prompts (lengths differ): every real position's logits."""
    _, _, examples = _examples(smollm2, "agnews", 4)
    batch = collate(examples, smollm2.tokenizer.pad_token_id)
    real = batch["attention_mask"].bool()
    assert (~real).any(), "the batch must contain padding"
    oracle = _forward(model64, batch)[real]
    fused = _forward(smollm2.model, batch, "fastattn_icl")[real]
    for other in ("eager", "sdpa"):
        check_close(f"fastattn_icl vs {other}", fused, _forward(smollm2.model, batch, other)[real], oracle)


def test_fused_flow_scores_equal_the_eager_probe(smollm2, model64):
    """The issue's bar (relative error <= 1e-4 against the paper's probe method on each layer's weights) and the
    tolerance rule per score, with the float64 model's probe as the oracle."""
    _, label_ids, examples = _examples(smollm2, "sst2", 3)
    fused = information_flow(smollm2.model, examples, label_ids, batch_size=3, progress=False).per_sample
    eager = eager_information_flow(smollm2.model, examples, label_ids)
    oracle = eager_information_flow(model64, examples, label_ids)
    assert fused.shape == eager.shape == (3, 30, 3)
    assert float((fused - eager).abs().max() / eager.abs().max()) <= 1e-4
    for j, name in enumerate(("S_wp", "S_pq", "S_ww")):
        check_close(name, fused[..., j], eager[..., j], oracle[..., j])


def test_isolation_through_the_seam_equals_eager_isolation(smollm2, model64):
    _, _, examples = _examples(smollm2, "emoc", 4)
    batch = collate(examples, smollm2.tokenizer.pad_token_id)
    label_rows = batch["anchor_positions"]
    random_rows = random_non_label_positions(label_rows, batch["attention_mask"], seed=3)
    for rows, layers in ((label_rows, first_layers(smollm2.model, 5)), (random_rows, last_layers(smollm2.model, 5))):
        with isolate(smollm2.model, rows, layers):
            fused = _forward(smollm2.model, batch, logits_to_keep=1)[:, -1]
        with eager_study(smollm2.model, isolation=rows, isolation_layers=layers):
            eager = _forward(smollm2.model, batch, logits_to_keep=1)[:, -1]
        with eager_study(model64, isolation=rows, isolation_layers=layers):
            oracle = _forward(model64, batch, logits_to_keep=1)[:, -1]
        check_close("isolation", fused, eager, oracle)
        plain = _forward(smollm2.model, batch, logits_to_keep=1)[:, -1]
        assert float((plain - fused).abs().max()) > 1e-2  # the isolation did change something


def test_attention_row_probe_equals_eager_weights(smollm2, model64):
    _, _, examples = _examples(smollm2, "trec", 3)
    batch = collate(examples, smollm2.tokenizer.pad_token_id)
    pos = batch["anchor_positions"]
    probe = AttentionRowProbe(pos)
    with get_controller(smollm2.model).override(attention_row=probe):
        _forward(smollm2.model, batch, "fastattn_icl", logits_to_keep=1)
    smollm2.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out32 = smollm2.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], output_attentions=True, use_cache=False)
    finally:
        smollm2.model.set_attn_implementation("fastattn_icl")
    with torch.no_grad():
        out64 = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"], output_attentions=True, use_cache=False)
    H = smollm2.model.config.num_attention_heads
    for layer in (0, 15, 29):
        index = pos[:, None, :].expand(-1, H, -1)
        ref32 = out32.attentions[layer][:, :, -1].gather(2, index)
        ref64 = out64.attentions[layer][:, :, -1].gather(2, index)
        check_close(f"attention row, layer {layer}", probe.results[layer], ref32, ref64)


def test_information_flow_crosses_over_on_the_shipped_sentiment_data(smollm2):
    """The paper's Fig. 2 on SST-2-like data: S_wp leads in the first third of the layers, S_pq in the last third.
    Measured on these 12 prompts for demonstration seeds 0 / 5 / 9: first third S_wp 0.62 vs S_pq 0.10-0.11, last
    third S_pq 0.93-0.95 vs S_wp 0.04-0.06; a gap this wide does not close under a change of demonstrations."""
    _, label_ids, examples = _examples(smollm2, "sst2", 12, seed=5)
    flow = information_flow(smollm2.model, examples, label_ids, batch_size=6, progress=False).normalised_mean
    third = flow.shape[0] // 3
    assert flow[:third, 0].mean() > flow[:third, 1].mean()
    assert flow[-third:, 1].mean() > flow[-third:, 0].mean()


def test_hidden_anchor_keeps_the_first_generated_token(smollm2):
    """Compression (docs/methods.md §5): the first greedy token with the Hidden_anchor cache as prefix equals full
    ICL's on most shipped sentiment test prompts, and with the Hidden_random cache (label words swapped for random text
    tokens) on few. Measured on this balanced sample of 32 (16 per class) for demonstration seeds 0 / 1 / 2:
    Hidden_anchor 0.94 / 0.84 / 0.88, Hidden_random 0.00 / 0.00 / 0.00. The bars (>= 0.75, <= 0.25) sit well inside
    both."""
    lm, task = smollm2, load_task("sst2")
    test = task.split("test")[:]
    random.Random(0).shuffle(test)
    test = test[:32]
    assert sum(e.label for e in test) == 16
    demos = task.per_class("train", 1, seed=0)
    builder = PromptBuilder(lm.tokenizer, task.template, list(task.label_words), demos)
    caches = {m: compress_demonstrations(lm.model, lm.tokenizer, demos, task.template, list(task.label_words),
                                         method=m) for m in ("hidden_anchor", "hidden_random")}
    demo_ids = lm.tokenizer(builder.demonstrations_text())["input_ids"]
    agree = dict.fromkeys(caches, 0)
    with torch.no_grad():
        for e in test:
            full = lm.tokenizer(builder.prompt(e.text))["input_ids"]
            first = lm.model(input_ids=torch.tensor([full]), logits_to_keep=1).logits[0, -1].argmax()
            own = torch.tensor([full[len(demo_ids):]])
            for m, cache in caches.items():
                agree[m] += int(cache.forward(lm.model, own, logits_to_keep=1)[0, -1].argmax() == first)
    assert agree["hidden_anchor"] / len(test) >= 0.75, agree
    assert agree["hidden_random"] / len(test) <= 0.25, agree


def test_deep_thinking_reruns_at_the_stored_positions_on_a_rotary_model(smollm2):
    """docs/methods.md §7 re-runs the demonstrations at positions N..2N-1 (GPT-2's learned positions); on a RoPE model
    those keys are rotated N positions away from the stored ones they are blended into. Re-run at 0..N-1 ("stored", what
    "auto" picks here) the new keys stay close to the stored keys (measured 0.19 vs 0.71 relative change) and accuracy
    holds up instead of falling to chance: at the authors' 15 steps, on 32 shipped test reviews with 2 demonstrations
    per class, measured 0.88 / 0.81 (stored) vs 0.41 / 0.31 (appended) for demonstration seeds 0 / 1, from 0.88 / 0.75
    at step 1. The bar, stored ahead by 0.25, is half the measured gap."""
    from fastattn_icl.methods import score_choices
    from fastattn_icl.methods.deep_thinking import rerun_position_mode

    lm, task = smollm2, load_task("sst2")
    assert rerun_position_mode(lm.model) == "stored"
    demos = task.per_class("train", 2, seed=0)
    builder = PromptBuilder(lm.tokenizer, task.template, list(task.label_words), demos)
    demo_ids = torch.tensor(lm.tokenizer(builder.demonstrations_text())["input_ids"])
    N = len(demo_ids)
    plain = CompressedDemonstrations.from_ids(lm.model, demo_ids, torch.arange(N), method="deep_thinking")
    change = {}
    for mode in ("stored", "appended"):  # eta = 1, beta = 0: the state becomes the re-run's keys
        state = deep_thinking(lm.model, demo_ids, steps=2, eta=1.0, beta=0.0, rerun_positions=mode,
                              progress=False).state
        change[mode] = float((state.keys - plain.keys).norm() / plain.keys.norm())
    assert change["stored"] < 0.5 * change["appended"], change

    inputs, labels = [], []
    for e in task.split("test")[:32]:
        full = lm.tokenizer(builder.prompt(e.text))["input_ids"]
        inputs.append(full[N:])
        labels.append(e.label)
    choices = [[int(i)] for i in builder.label_token_ids]
    accuracy = {}
    for mode in ("stored", "appended"):
        state = deep_thinking(lm.model, demo_ids, steps=15, rerun_positions=mode, progress=False).state
        pred = score_choices(lm.model, state, inputs, choices).argmax(-1)
        accuracy[mode] = float((pred == torch.tensor(labels)).double().mean())
    assert accuracy["stored"] >= accuracy["appended"] + 0.25, accuracy
