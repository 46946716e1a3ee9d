"""Information flow per layer (docs/methods.md §4): how much the label words gather from the text (``S_wp``), how much
the target reads from the label words (``S_pq``), and everything else (``S_ww``).

For each prompt the loss is the cross-entropy of the label-word logits at the final (target) position
against the gold label; the weights stay frozen. One backward through the ``"fastattn_icl"`` seam yields
every layer's saliency sums from the fused kernels (no ``[H, T, T]`` map is stored), so prompts run at the
lengths the forward runs at.

    flow = information_flow(model, examples, label_token_ids)
    flow.normalised_mean      # [L, 3]: (S_wp, S_pq, S_ww) per layer, summing to 1
    flow.normalised_std       # [L, 3]: spread over prompts of each prompt's normalised scores
    flow.plot("flow.png")     # the paper's figure: three lines across layers

The paper's finding on real models: ``S_wp`` dominates shallow layers and ``S_pq`` deep ones.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.integrations import get_controller, routed
from fastattn_icl.methods._model import frozen_weights, model_device
from fastattn_icl.methods.anchors import ICLExample, checked_examples, collate
from fastattn_icl.ops.saliency import Saliency, ratio

__all__ = ["InformationFlow", "information_flow"]

SCORES = ("S_wp", "S_pq", "S_ww")


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale the last dimension (the three scores) to sum to 1; all-zero stays zero."""
    return ratio(x, x.sum(dim=-1, keepdim=True))


@dataclass
class InformationFlow:
    """Flow scores of ``N`` prompts over ``L`` layers (float64, on the CPU).

    Attributes:
        per_sample: ``[N, L, 3]`` raw ``(S_wp, S_pq, S_ww)`` of each prompt and layer.
        per_head: ``[N, L, H, 3]`` the same from the per-head maps ``|P_h ⊙ ∂L/∂P_h|``, or ``None``.
    """

    per_sample: torch.Tensor
    per_head: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.per_sample.shape[1]

    @property
    def mean(self) -> torch.Tensor:
        """``[L, 3]`` raw scores averaged over the prompts."""
        return self.per_sample.mean(dim=0)

    @property
    def std(self) -> torch.Tensor:
        """``[L, 3]`` their standard deviation over the prompts (0 for a single prompt)."""
        n = self.per_sample.shape[0]
        return self.per_sample.std(dim=0) if n > 1 else torch.zeros_like(self.mean)

    @property
    def normalised_mean(self) -> torch.Tensor:
        """``[L, 3]``: the averaged scores normalised per layer to sum to 1 (the paper's figure)."""
        return _normalise(self.mean)

    @property
    def per_sample_normalised(self) -> torch.Tensor:
        """``[N, L, 3]``: each prompt's scores normalised per layer to sum to 1 (an all-zero layer stays zero)."""
        return _normalise(self.per_sample)

    @property
    def normalised_std(self) -> torch.Tensor:
        """``[L, 3]``: the standard deviation over prompts of :attr:`per_sample_normalised` (0 for a single
        prompt), the spread on the scale of :attr:`normalised_mean`; each normalised score lies in ``[0, 1]``."""
        n = self.per_sample.shape[0]
        return self.per_sample_normalised.std(dim=0) if n > 1 else torch.zeros_like(self.mean)

    def band(self, *, normalised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``, each ``[L, 3]``: the shaded band of :meth:`plot`, mean ± one standard deviation over
        prompts, clipped to the scores' range (``[0, 1]`` normalised, ``>= 0`` raw).

        ``normalised=True``: :attr:`normalised_mean` ± :attr:`normalised_std` (the spread of the per-prompt
        normalised scores); ``False``: :attr:`mean` ± :attr:`std` of the raw scores.
        """
        if normalised:
            mean, std = self.normalised_mean, self.normalised_std
            return (mean - std).clamp(0.0, 1.0), (mean + std).clamp(0.0, 1.0)
        return (self.mean - self.std).clamp(min=0.0), self.mean + self.std

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON: per score name its per-layer mean, std and normalised mean/std (the std of the
        per-prompt normalised scores)."""
        out: dict[str, Any] = {"num_samples": self.per_sample.shape[0], "num_layers": self.num_layers}
        for i, name in enumerate(SCORES):
            out[name] = {
                "mean": self.mean[:, i].tolist(),
                "std": self.std[:, i].tolist(),
                "normalised_mean": self.normalised_mean[:, i].tolist(),
                "normalised_std": self.normalised_std[:, i].tolist(),
            }
        return out

    def plot(self, path: str | os.PathLike | None = None, *, ax: Any = None, normalised: bool = True,
             title: str | None = None) -> None:
        """Draw the three scores across layers (numbered from 1, as the paper) to the PNG ``path`` or onto the
        matplotlib axes ``ax``, shaded by :meth:`band` (± one standard deviation over prompts; with ``normalised``
        the spread of the per-prompt normalised scores)."""
        if ax is None and path is None:
            raise ValueError("give a path to write the PNG to, or an ax to draw on")
        try:
            import matplotlib

            if ax is None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # the plot extra
            raise ImportError("plotting needs matplotlib: pip install 'fastattn_icl[plot]'") from e
        mean = (self.normalised_mean if normalised else self.mean).numpy()
        low, high = (t.numpy() for t in self.band(normalised=normalised))
        layers = range(1, self.num_layers + 1)
        fig = None
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
        for i, (name, color) in enumerate(zip(SCORES, ("tab:blue", "tab:orange", "tab:green"))):
            label = {
                "S_wp": "$S_{wp}$ (text → label words)",
                "S_pq": "$S_{pq}$ (label words → target)",
                "S_ww": "$S_{ww}$ (the rest)",
            }[name]
            ax.plot(layers, mean[:, i], color=color, label=label, marker="o", markersize=3)
            ax.fill_between(layers, low[:, i], high[:, i], color=color, alpha=0.2)
        ax.set_xlabel("layer")
        ax.set_ylabel("normalised score" if normalised else "score")
        n = self.per_sample.shape[0]
        ax.set_title(title or f"information flow ({n} prompt{'s' if n != 1 else ''})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(os.fspath(path))
            plt.close(fig)


def information_flow(
    model: torch.nn.Module,
    examples: Sequence[ICLExample],
    label_token_ids: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = 1,
    per_head: bool = False,
    pad_token_id: int = 0,
    progress: bool = True,
) -> InformationFlow:
    """Per-layer information-flow scores (docs/methods.md §4) of a Hugging Face decoder model.

    Args:
        model: a decoder model routed through the ``"fastattn_icl"`` seam (switched to it for the call if
            needed; GPT-J is patched for the call).
        examples: prompts with their label-word positions and gold labels (see
            :class:`fastattn_icl.methods.PromptBuilder`); the target is each prompt's last token.
        label_token_ids: ``[C]`` token id of each class's label word; the loss is the cross-entropy of
            these logits at the target against the gold label.
        batch_size: prompts per forward/backward (left-padded; the scores do not depend on it).
        per_head: also keep the scores of the per-head maps (``InformationFlow.per_head``).
        pad_token_id: the token used for left padding (masked, its value does not matter).
        progress: show a progress bar over the prompts.

    Raises:
        RuntimeError: gradients are disabled (the scores come from a backward pass).
        ValueError: an example without a label or without label positions (a zero-shot prompt), or a label
            position at or after the target.
    """
    if not torch.is_grad_enabled():
        raise RuntimeError(
            "information_flow runs a backward pass, but gradients are disabled (torch.no_grad / inference_mode)"
        )
    examples = checked_examples(
        "information_flow", examples, need_label=True, batch_size=batch_size,
        label_words_needed="the flow scores S_wp and S_pq measure the flow into and out of the demonstrations' "
        "label words, so every prompt needs demonstrations")
    device = model_device(model)
    ids = torch.as_tensor(label_token_ids, dtype=torch.long, device=device).reshape(-1)
    layers = model.config.num_hidden_layers
    per_sample, per_head_scores = [], []
    bar = tqdm(total=len(examples), desc="information flow", disable=not progress)
    with routed(model), frozen_weights(model), bar:
        controller = get_controller(model)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_token_id)
            mask = batch["attention_mask"].to(device)
            T = mask.shape[1]
            request = Saliency(
                batch["anchor_positions"].to(device), T - 1, per_head=per_head, start=(1 - mask).sum(dim=1)
            )
            embeds = model.get_input_embeddings()(batch["input_ids"].to(device)).detach().requires_grad_(True)
            with controller.override(saliency=request):
                logits = model(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    position_ids=batch["position_ids"].to(device),
                    use_cache=False,
                    logits_to_keep=1,
                ).logits[:, -1, ids]
            # summed over the batch: each prompt's gradient is its own loss's (prompts do not interact)
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"].to(device), reduction="sum")
            torch.autograd.grad(loss, embeds)
            missing = sorted(set(range(layers)) - set(request.results))
            if missing:
                raise RuntimeError(
                    f"information_flow: layers {missing} recorded no saliency: their attention does not run through "
                    "the 'fastattn_icl' seam"
                )
            results = [request.results[layer] for layer in range(layers)]
            per_sample.append(torch.stack([torch.stack(r.scores(), dim=-1) for r in results], dim=1).double().cpu())
            if per_head:
                heads = [torch.stack(r.scores(per_head=True), dim=-1) for r in results]
                per_head_scores.append(torch.stack(heads, dim=1).double().cpu())
            bar.update(len(chunk))
    return InformationFlow(per_sample=torch.cat(per_sample), per_head=torch.cat(per_head_scores) if per_head else None)
