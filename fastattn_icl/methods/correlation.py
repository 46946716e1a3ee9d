"""Deep-layer correlation (the anchors paper, §2.3): do the target's attention weights on the label words in
layer ``l`` predict which label the model outputs?

For each prompt and layer, ``A_l(q, p_c)`` is the post-softmax attention of the target position ``q`` (the last
token) on class ``c``'s label word(s), summed over heads (and over the class's demonstrations). As the paper's
analysis code does, per layer: keep the classes the model predicts at least once; with two, the AUC-ROC of the
attention on the second one's label word against "predicted as that class"; with more, each prompt's attention
turned into shares over the classes and the one-vs-one macro-averaged AUC.
``R_l = Σ_{i≤l}(AUC_i − 0.5) / Σ_{i≤L}(AUC_i − 0.5)`` is the cumulative share. The paper finds AUC near 0.5 in
shallow layers, rising to 0.8–0.9 in deep ones, with ``R_l`` reaching 0.5 only around the middle-to-late layers.

The attention row comes from the fused forward (its log-sum-exp and the keys of the label words: one row, no
``[T, T]`` map); the same forward gives the predictions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.integrations import AttentionRowProbe, get_controller, routed
from fastattn_icl.methods._model import model_device
from fastattn_icl.methods.anchors import ICLExample, checked_examples, collate

__all__ = ["LabelAttentionCorrelation", "auc_roc", "deep_layer_correlation"]


def auc_roc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores [N]`` for the boolean ``positive [N]`` (ties count one half;
    the Mann-Whitney statistic). ``nan`` when one of the two groups is empty."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    positive = torch.as_tensor(positive, dtype=torch.bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(f"scores and positive must have one shape, got {tuple(scores.shape)}, {tuple(positive.shape)}")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(wins / (n_pos * n_neg))


@dataclass
class LabelAttentionCorrelation:
    """The outcome of :func:`deep_layer_correlation` over ``N`` prompts, ``L`` layers and ``C`` classes.

    Attributes:
        attention: float64 ``[N, L, C]`` the target's attention on each class's label words, heads summed.
        predictions: int64 ``[N]`` predicted class (argmax over the label-word logits); labels: ``[N]`` gold
            class (``-1`` where unknown).
        auc: ``[L]`` AUC-ROC per layer (see the module docstring); ``R``: ``[L]`` its cumulative share.
    """

    attention: torch.Tensor
    predictions: torch.Tensor
    labels: torch.Tensor
    auc: torch.Tensor
    R: torch.Tensor

    @property
    def accuracy(self) -> float:
        known = self.labels >= 0
        return float((self.predictions[known] == self.labels[known]).double().mean()) if bool(known.any()) else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc.tolist(), "R": self.R.tolist(), "accuracy": self.accuracy,
                "num_examples": int(self.predictions.numel())}

    def plot(self, path: str | os.PathLike | None = None, *, ax: Any = None, title: str | None = None) -> None:
        """The paper's figure: AUC-ROC per layer and the cumulative ``R_l`` (layers numbered from 1), into the PNG
        ``path`` or onto the matplotlib axes ``ax``."""
        import matplotlib

        if ax is None:
            if path is None:
                raise ValueError("give a path to write the PNG to, or an ax to draw on")
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(5.5, 3.4))
        layers = range(1, len(self.auc) + 1)
        ax.plot(layers, self.auc.numpy(), marker="o", ms=3, label="AUC-ROC$_l$", color="tab:blue")
        ax.plot(layers, self.R.numpy(), marker="s", ms=3, label="$R_l$ (cumulative)", color="tab:orange")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("layer")
        values = torch.nan_to_num(torch.cat([self.R, self.auc]), nan=0.5)
        ax.set_ylim(min(0.0, float(values.min())) - 0.02, max(1.0, float(values.max())) + 0.02)
        ax.set_title(title or "target's attention on label words vs prediction")
        ax.legend(loc="lower right", fontsize=8)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=130)
            plt.close(fig)


def _layer_auc(attention: torch.Tensor, predictions: torch.Tensor, classes: list[int]) -> float:
    """AUC-ROC of one layer's label-word attention ``[N, K]`` (over the predicted ``classes``) against the
    predictions, as the paper's analysis: two classes, the AUC of the raw attention on the second class's label
    word; more, the attention turned into shares over the classes and the one-vs-one macro average (for each pair,
    the mean of both directions' AUC on the prompts predicted as either)."""
    if len(classes) == 2:
        return auc_roc(attention[:, 1], predictions == classes[1])
    shares = attention / attention.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    values = []
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            rows = (predictions == classes[a]) | (predictions == classes[b])
            values.append(0.5 * (auc_roc(shares[rows, a], predictions[rows] == classes[a])
                                 + auc_roc(shares[rows, b], predictions[rows] == classes[b])))
    return sum(values) / len(values)


def _correlation(attention: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(AUC [L], R [L])`` as the paper's analysis computes them: only classes the model predicts at least once
    count (:func:`_layer_auc`). ``nan`` everywhere when fewer than two classes are predicted."""
    N, L, C = attention.shape
    classes = [c for c in range(C) if bool((predictions == c).any())]
    auc = torch.full((L,), math.nan, dtype=torch.float64)
    if len(classes) >= 2:
        for layer in range(L):
            auc[layer] = _layer_auc(attention[:, layer, classes].double(), predictions, classes)
    excess = auc - 0.5
    total = excess.sum()
    R = excess.cumsum(0) / total if bool(total != 0) else torch.full_like(auc, math.nan)
    return auc, R


@torch.no_grad()
def deep_layer_correlation(
    model: torch.nn.Module,
    examples: Sequence[ICLExample],
    label_token_ids: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 8,
    pad_token_id: int = 0,
    progress: bool = True,
) -> LabelAttentionCorrelation:
    """The target's attention on the label words in every layer, and its AUC-ROC against the predictions.

    Args:
        model: a decoder model routed through the ``"fastattn_icl"`` seam (switched to it for the call).
        examples: prompts with label-word positions (from :class:`~fastattn_icl.methods.PromptBuilder`);
            every class should have a label word in every prompt (a class without one scores 0 there).
        label_token_ids: ``[C]`` token id of each class's label word (the predictions are their argmax).
        batch_size: prompts per forward (left-padded; the result does not depend on it).

    Raises:
        ValueError: no examples, a prompt without label words, a bad batch size.
    """
    examples = checked_examples("deep_layer_correlation", examples, batch_size=batch_size,
                                label_words_needed="a zero-shot prompt has no label words to attend")
    device = model_device(model)
    ids = torch.as_tensor(label_token_ids, dtype=torch.long).reshape(-1)
    C, L = ids.numel(), model.config.num_hidden_layers
    attention, predictions = [], []
    training = model.training
    model.eval()
    try:
        with routed(model), tqdm(total=len(examples), desc="label attention", disable=not progress) as bar:
            controller = get_controller(model)
            for start in range(0, len(examples), batch_size):
                chunk = examples[start : start + batch_size]
                batch = collate(chunk, pad_token_id)
                probe = AttentionRowProbe(batch["anchor_positions"].to(device))
                with controller.override(attention_row=probe):
                    logits = model(input_ids=batch["input_ids"].to(device),
                                   attention_mask=batch["attention_mask"].to(device),
                                   position_ids=batch["position_ids"].to(device),
                                   use_cache=False, logits_to_keep=1).logits[:, -1]
                missing = sorted(set(range(L)) - set(probe.results))
                if missing:
                    raise RuntimeError(f"deep_layer_correlation: layers {missing} did not run through the "
                                       "'fastattn_icl' seam")
                classes = batch["anchor_classes"]
                used = batch["anchor_positions"] >= 0
                onehot = torch.nn.functional.one_hot(classes, C).double() * used[..., None]  # [B, A, C]
                rows = torch.stack([probe.results[layer].sum(1).double().cpu() for layer in range(L)], 1)  # [B, L, A]
                attention.append(torch.einsum("bla,bac->blc", rows, onehot))
                predictions.append(logits.float().cpu()[:, ids].argmax(-1))
                bar.update(len(chunk))
    finally:
        model.train(training)
    attention_t, predictions_t = torch.cat(attention), torch.cat(predictions)
    labels = torch.tensor([-1 if e.label is None else e.label for e in examples], dtype=torch.long)
    auc, R = _correlation(attention_t, predictions_t)
    return LabelAttentionCorrelation(attention_t, predictions_t, labels, auc, R)
