"""Anchor re-weighting (docs/methods.md §2): one trainable ``β[L, H, C]`` on top of a frozen model.

At every layer ``l`` and head ``h``, the post-softmax attention of the re-weighted query rows towards the
label-word positions of class ``c`` is multiplied by ``exp(β[l, h, c])`` (not renormalised). ``β = 0`` is
exactly the unmodified model. Training follows the paper by default: Adam (lr 0.01), 10 epochs, batch 1,
cross-entropy over the label-word logits at the final position, model frozen.

Typical use::

    builder = PromptBuilder(tokenizer, "Review: {x}\\nSentiment: {y}\\n", ["negative", "positive"], demos)
    rw = AnchorReweighting(model, builder.num_classes, builder.label_token_ids)
    rw.fit([builder.example(x, y) for x, y in extra_examples])
    print(rw.evaluate([builder.example(x, y) for x, y in test]))
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastattn_icl.integrations import routed
from fastattn_icl.integrations.controller import AnchorState, ICLController, get_controller
from fastattn_icl.methods._model import frozen_weights, model_device
from fastattn_icl.methods.anchors import ICLExample, collate

__all__ = ["AnchorReweighting", "ReweightingEvaluation"]


@dataclass(frozen=True)
class ReweightingEvaluation:
    """Accuracy of the same prompts without and with re-weighting.

    Attributes:
        accuracy_vanilla, accuracy_reweighted: fraction of correct label predictions.
        num_examples: how many examples were scored.
        predictions_vanilla, predictions_reweighted: int64 ``[N]`` predicted classes.
    """

    accuracy_vanilla: float
    accuracy_reweighted: float
    num_examples: int
    predictions_vanilla: torch.Tensor
    predictions_reweighted: torch.Tensor


class AnchorReweighting:
    """Trainable anchor re-weighting of a Hugging Face decoder model.

    Args:
        model: a model whose attention runs through the ``"fastattn_icl"`` seam (it is switched to it
            while re-weighting is applied, if it is not already).
        num_classes: ``C``.
        label_token_ids: integer ``[C]`` token id of each class's label word (as predicted after a query;
            see :func:`fastattn_icl.methods.anchors.label_token_ids`).
        pad_token_id: token used for left padding of batches (its value does not matter: it is masked).

    Attributes:
        beta: ``nn.Parameter [L, H, C]`` float32 on the model's device, zeros (exactly vanilla attention).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        num_classes: int,
        label_token_ids: Sequence[int] | torch.Tensor,
        *,
        pad_token_id: int = 0,
    ):
        config = getattr(model, "config", None)
        layers = getattr(config, "num_hidden_layers", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(layers, int) or not isinstance(heads, int):
            raise TypeError("model must have a config with num_hidden_layers and num_attention_heads")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        ids = torch.as_tensor(label_token_ids, dtype=torch.long).reshape(-1)
        if ids.numel() != num_classes:
            raise ValueError(f"label_token_ids must have one token per class ({num_classes}), got {ids.tolist()}")
        self.model = model
        self.num_classes = num_classes
        self.pad_token_id = pad_token_id
        device = model_device(model)
        self.label_token_ids = ids.to(device)
        self.beta = torch.nn.Parameter(torch.zeros(layers, heads, num_classes, device=device))

    def __repr__(self) -> str:
        L, H, C = self.beta.shape
        return f"AnchorReweighting(layers={L}, heads={H}, classes={C})"

    @contextlib.contextmanager
    def applied(
        self,
        anchor_positions: torch.Tensor,
        anchor_classes: torch.Tensor,
        *,
        reweight_from: int | torch.Tensor | None = None,
        layers: Iterable[int] | None = None,
    ) -> Iterator[ICLController]:
        """Re-weight the model's attention inside the block; the previous controller state (and attention
        implementation) is restored on exit, also when the block raises.

        Args:
            anchor_positions: integer ``[B, A]`` (or ``[A]``) absolute key positions of the label words,
                ``-1`` = unused.
            anchor_classes: integer, same shape, class of each anchor.
            reweight_from: ``None`` = the last query row of every forward (the paper's setting); an int or
                ``[B]`` absolute position from which every query is re-weighted (use it for generation).
            layers: re-weight only these layers (default: all).
        """
        positions = torch.as_tensor(anchor_positions)
        classes = torch.as_tensor(anchor_classes)
        if positions.dim() == 1:
            positions, classes = positions[None], classes[None]
        state = AnchorState(positions.to(self.beta.device), classes.to(self.beta.device), reweight_from)
        controller = get_controller(self.model)
        with routed(self.model), controller.override(layers=layers, anchors=state, beta=self.beta):
            yield controller

    def _forward(self, batch: dict[str, torch.Tensor], reweight: bool) -> torch.Tensor:
        """``[B, C]`` label-word logits at the final position."""
        device = self.beta.device
        kwargs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
            "position_ids": batch["position_ids"].to(device),
            "use_cache": False,
            "logits_to_keep": 1,
        }
        if reweight:
            with self.applied(batch["anchor_positions"], batch["anchor_classes"]):
                logits = self.model(**kwargs).logits
        else:
            with routed(self.model):
                logits = self.model(**kwargs).logits
        return logits[:, -1, self.label_token_ids].float()

    def label_logits(self, examples: Sequence[ICLExample], *, reweight: bool = True) -> torch.Tensor:
        """``[N, C]`` label-word logits at each prompt's final position (one batch, left-padded)."""
        return self._forward(collate(examples, self.pad_token_id), reweight)

    def loss(self, examples: Sequence[ICLExample], *, reweight: bool = True) -> torch.Tensor:
        """Mean cross-entropy over the label-word logits against the examples' labels."""
        batch = collate(examples, self.pad_token_id)
        if bool((batch["labels"] < 0).any()):
            raise ValueError("every example needs a label for the loss")
        logits = self._forward(batch, reweight)
        return torch.nn.functional.cross_entropy(logits, batch["labels"].to(logits.device))

    def fit(
        self,
        train_examples: Sequence[ICLExample],
        *,
        epochs: int = 10,
        lr: float = 0.01,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        progress: bool = True,
    ) -> list[float]:
        """Train ``beta`` only (docs/methods.md §2 defaults: Adam lr 0.01, 10 epochs, batch 1; the paper uses 4 extra
        examples per class, built with the same demonstrations as the test prompts).

        Returns:
            the mean training loss of each epoch.

        Raises:
            ValueError: no examples, an example without a label or without label words (a zero-shot prompt).
        """
        examples = list(train_examples)
        if not examples:
            raise ValueError("fit needs at least one training example")
        if any(e.label is None for e in examples):
            raise ValueError("every training example needs a label")
        empty = [i for i, e in enumerate(examples) if len(e.anchor_positions) == 0]
        if empty:
            raise ValueError(
                f"train_examples {empty} have no label words (zero-shot prompts?): anchor re-weighting trains beta on "
                "the attention to the demonstrations' label words, so every training prompt needs demonstrations"
            )
        if batch_size < 1 or epochs < 0:
            raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size}, {epochs}")
        optimizer = torch.optim.Adam([self.beta], lr=lr)
        generator = torch.Generator().manual_seed(seed)
        steps = math.ceil(len(examples) / batch_size)
        history = []
        bar = tqdm(total=epochs * steps, desc="anchor re-weighting", disable=not progress)
        with frozen_weights(self.model), bar:
            for _ in range(epochs):
                order = torch.randperm(len(examples), generator=generator) if shuffle else torch.arange(len(examples))
                total = 0.0
                for start in range(0, len(examples), batch_size):
                    batch = [examples[i] for i in order[start : start + batch_size].tolist()]
                    loss = self.loss(batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(batch)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                history.append(total / len(examples))
        return history

    @torch.no_grad()
    def predict(self, examples: Sequence[ICLExample], *, reweight: bool = True, batch_size: int = 8) -> torch.Tensor:
        """int64 ``[N]`` predicted class (argmax over the label-word logits) of each example."""
        out = []
        for start in range(0, len(examples), batch_size):
            out.append(self.label_logits(examples[start : start + batch_size], reweight=reweight).argmax(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def evaluate(self, examples: Sequence[ICLExample], *, batch_size: int = 8) -> ReweightingEvaluation:
        """Accuracy without and with re-weighting, side by side."""
        examples = list(examples)
        if not examples or any(e.label is None for e in examples):
            raise ValueError("evaluate needs at least one example, each with a label")
        labels = torch.tensor([e.label for e in examples])
        vanilla = self.predict(examples, reweight=False, batch_size=batch_size)
        reweighted = self.predict(examples, reweight=True, batch_size=batch_size)
        return ReweightingEvaluation(
            accuracy_vanilla=(vanilla == labels).float().mean().item(),
            accuracy_reweighted=(reweighted == labels).float().mean().item(),
            num_examples=len(examples),
            predictions_vanilla=vanilla,
            predictions_reweighted=reweighted,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write ``beta`` and the label token ids to a safetensors file."""
        from safetensors.torch import save_file

        L, H, C = self.beta.shape
        save_file(
            {"beta": self.beta.detach().cpu().contiguous(), "label_token_ids": self.label_token_ids.cpu().contiguous()},
            os.fspath(path),
            metadata={"format": "fastattn_icl.anchor_reweighting", "shape": f"{L},{H},{C}"},
        )

    def load(self, path: str | os.PathLike) -> AnchorReweighting:
        """Load ``beta`` saved by :meth:`save` (shapes must match this model and class count); returns self."""
        from safetensors.torch import load_file

        tensors = load_file(os.fspath(path))
        if "beta" not in tensors:
            raise ValueError(f"{os.fspath(path)} holds no 'beta' tensor (not saved by AnchorReweighting.save)")
        beta = tensors["beta"]
        if tuple(beta.shape) != tuple(self.beta.shape):
            raise ValueError(
                f"saved beta has shape {tuple(beta.shape)}, this model needs [L, H, C] = {tuple(self.beta.shape)}"
            )
        ids = tensors.get("label_token_ids")
        if ids is not None and not torch.equal(ids, self.label_token_ids.cpu()):
            raise ValueError(f"saved label token ids {ids.tolist()} differ from {self.label_token_ids.tolist()}")
        with torch.no_grad():
            self.beta.copy_(beta.to(self.beta.device, self.beta.dtype))
        return self
