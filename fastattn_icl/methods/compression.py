"""Anchor compression (docs/methods.md §5, Hidden_anchor): run the demonstrations once, keep a few positions of every
layer's KV cache, and serve any number of test inputs with that compressed cache as their prefix.

    comp = compress_demonstrations(model, tokenizer, demonstrations, "Review: {x}\\nSentiment: {y}\\n",
                                   ["negative", "positive"])
    logits = comp.forward(model, input_ids, attention_mask)     # test inputs only, left-padded
    comp.save("sst2.safetensors"); comp = CompressedDemonstrations.load("sst2.safetensors")

Kept positions (``method``): ``"hidden_anchor"`` the label word and the template's formatting tokens of every
demonstration (plus the tokenizer's BOS); ``"hidden_random"`` the same with each label word replaced by a
random non-anchor token of its demonstration (the paper's control; same test positions as Hidden_anchor);
``"text_anchor"`` the formatting and label text alone, re-encoded (every position kept);
``"full"`` every position of the demonstrations (plain prefix caching, the uncompressed reference).
The gather of every layer's kept positions is one :func:`fastattn_icl.ops.gather.gather_kv` call.

Positions: cached keys keep their original (already rotated) positions; the test tokens continue at
``position_offset`` (default: the last kept position + 1); ``position_offset=0`` is the original GPT2-XL
code's restart at 0. Exactness: the forward with the compressed cache equals a full-context forward whose
test tokens attend only to the kept positions and to themselves, with the same position ids.

Batches: test inputs are left-padded (the last column is where every row predicts). With more than one row
the prefix is shared: the rows' own keys live in a :class:`~fastattn_icl.integrations.prefix_cache.SharedPrefixCache`
and the ``"fastattn_icl"`` seam reads the one prefix copy in place (batch stride 0), so a batch of ``B`` test
inputs never holds ``B`` copies of it, also while decoding.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.integrations.cache_keyword import cache_keyword, cache_kwargs, output_cache
from fastattn_icl.methods._model import model_device
from fastattn_icl.methods.anchors import PromptBuilder, encode_prefix, tokenizer_name
from fastattn_icl.methods.keep_sets import hidden_anchor_keep, hidden_random_positions, text_anchor_text
from fastattn_icl.methods.metrics import label_loyalty, label_predictions, word_loyalty
from fastattn_icl.ops.gather import gather_kv

__all__ = [
    "METHODS",
    "CompressedDemonstrations",
    "CompressionEvaluation",
    "compress_demonstrations",
    "evaluate_compression",
]

METHODS = ("hidden_anchor", "hidden_random", "text_anchor", "full")
_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class ModelGeometry:
    """What a compressed cache must match: decoder layers, kv heads, head dim (and, for messages, the family)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "unknown"

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelGeometry:
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"model must be a transformers PreTrainedModel with a .config, got {type(model).__name__}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, kv_heads, head_dim, getattr(config, "model_type", None) or "unknown")

    def differences(self, other: ModelGeometry) -> list[str]:
        names = ("num_layers", "num_kv_heads", "head_dim")
        return [f"{n} {getattr(self, n)} vs {getattr(other, n)}" for n in names
                if getattr(self, n) != getattr(other, n)]


def context_length(model: torch.nn.Module) -> int | None:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_ids(name: str, ids: torch.Tensor, dims: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() != dims:
        shape = "[T]" if dims == 1 else "[B, S]"
        raise TypeError(f"{name} must be an integer tensor {shape}, got {ids!r:.80}")
    return ids.long()


def _left_padded_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The bool ``[B, S]`` mask of a left-padded batch of test inputs; raises on any other padding."""
    B, S = input_ids.shape
    if attention_mask is None:
        return torch.ones(B, S, dtype=torch.bool, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, S):
        raise ValueError(f"attention_mask must be a [B={B}, S={S}] tensor of 0/1, got {attention_mask!r:.80}")
    mask = attention_mask.to(input_ids.device).bool()
    # left padding: once a row's tokens start they run to the end (the mask never falls from 1 to 0)
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        rows = sorted({int(r) for r in (mask[:, :-1] & ~mask[:, 1:]).nonzero()[:, 0]})
        raise ValueError(
            f"the test inputs must be left-padded (padding before the tokens, every row ending at the last column), "
            f"but rows {rows} have padding after a token (right padding?): tokenize with padding_side='left'"
        )
    if not bool(mask[:, -1].all()):
        rows = [int(r) for r in (~mask[:, -1]).nonzero()[:, 0]]
        raise ValueError(f"rows {rows} of the test inputs are all padding")
    return mask


def _expanded_cache(keys: torch.Tensor, values: torch.Tensor, B: int) -> Any:
    """The standard Hugging Face form: a ``DynamicCache`` whose every row holds its own copy of the prefix."""
    from transformers import DynamicCache

    return DynamicCache(
        ddp_cache_data=[(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in zip(keys, values)]
    )


@dataclass
class _Session:
    """The cache and masks of one batch being served (prefill, then decoding steps)."""

    cache: Any
    mask: torch.Tensor  # bool [B, own tokens run so far]
    next_position: torch.Tensor  # int64 [B]


@dataclass
class CompressedDemonstrations:
    """The kept positions of every layer's KV cache of a set of demonstrations, reusable for any test input.

    Attributes:
        keys, values: ``[L, 1, Hkv, M, D]`` the kept keys (post-RoPE) and values, model dtype and device.
        positions: int64 ``[M]`` original positions of the kept tokens in the demonstrations (sorted).
        num_tokens: ``T``, the demonstrations' length in tokens.
        position_offset: the position id of the first test token (default ``positions[-1] + 1``).
        geometry: the model's decoder layers, kv heads and head dim; a model that differs is refused.
        method: ``"hidden_anchor"``, ``"hidden_random"``, ``"text_anchor"``, ``"full"`` or ``"custom"``.
        input_ids: int64 ``[T]`` the demonstrations' tokens (for inspection).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    num_tokens: int
    position_offset: int
    geometry: ModelGeometry
    method: str = "custom"
    input_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_kept(self) -> int:
        """``M``, the kept positions."""
        return self.keys.shape[3]

    # -- building ------------------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def from_ids(
        cls,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        keep_positions: torch.Tensor | Sequence[int],
        *,
        position_offset: int | None = None,
        method: str = "custom",
    ) -> CompressedDemonstrations:
        """Run the demonstrations ``input_ids [T]`` once and keep ``keep_positions`` of every layer's cache.

        Raises:
            ValueError: ``T`` exceeds the model's context, an empty keep set, positions out of ``[0, T)`` or
                repeated, or a negative ``position_offset``.
        """
        ids = check_ids("input_ids", input_ids, 1)
        T = ids.shape[0]
        limit = context_length(model)
        if T == 0:
            raise ValueError("the demonstrations are empty (0 tokens)")
        if limit is not None and T > limit:
            raise ValueError(
                f"the demonstrations are {T} tokens, longer than the model's context of {limit} positions "
                f"({ModelGeometry.of(model).model_type}): use fewer or shorter demonstrations"
            )
        keep = torch.as_tensor(keep_positions).reshape(-1).cpu()
        if keep.numel() == 0:
            raise ValueError("the keep set is empty: at least one position of the demonstrations must be kept")
        if keep.is_floating_point() or keep.is_complex() or keep.dtype == torch.bool:
            raise TypeError(f"keep_positions must be integer positions, got dtype {keep.dtype}")
        keep = keep.long()
        if bool(((keep < 0) | (keep >= T)).any()):
            raise ValueError(f"keep positions must lie in [0, T={T}), got {keep.tolist()}")
        if keep.unique().numel() != keep.numel():
            raise ValueError(f"keep positions must not repeat, got {keep.tolist()}")
        keep = keep.sort().values
        geometry = ModelGeometry.of(model)
        device = model_device(model)
        training = model.training
        model.eval()
        try:
            cache = output_cache(model(input_ids=ids[None].to(device), use_cache=True, logits_to_keep=1))
        finally:
            model.train(training)
        layers = list(cache.layers)
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        short = [i for i, k in enumerate(keys) if k.shape[2] != T]
        if short:
            window = getattr(model.config, "sliding_window", None)
            raise ValueError(
                f"layers {short} cached {keys[short[0]].shape[2]} of the {T} demonstration tokens (a sliding-window "
                f"cache, sliding_window={window}): the demonstrations must fit in the window to be compressed"
            )
        found = ModelGeometry(len(layers), keys[0].shape[1], keys[0].shape[3], geometry.model_type)
        if found.differences(geometry):
            raise NotImplementedError(
                f"the model's cache ({found}) does not match its config ({geometry}); this family is not supported"
            )
        K, V = gather_kv(keys, values, keep.to(keys[0].device))  # one op for every layer: [L, 1, Hkv, M, D]
        offset = int(keep[-1]) + 1 if position_offset is None else position_offset
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"position_offset must be an int >= 0 or None, got {position_offset!r}")
        return cls(K, V, keep, T, offset, geometry, method, ids.cpu())

    # -- checks --------------------------------------------------------------------------------------------

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` when ``model`` differs from the compressing model in layers, kv heads or head dim."""
        diffs = self.geometry.differences(ModelGeometry.of(model))
        if diffs:
            raise ValueError(
                f"this compressed cache was made by a {self.geometry.model_type} model and does not fit "
                f"{ModelGeometry.of(model).model_type} model: {', '.join(diffs)} (cache vs model)"
            )

    # -- serving -------------------------------------------------------------------------------------------

    def _prefix_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix on ``device``; a copy is kept per device so repeated calls do not move it again (the
        object's own ``keys``/``values`` stay where they are)."""
        if self.keys.device == device:
            return self.keys, self.values
        moved = self.__dict__.setdefault("_on_device", {})
        if device not in moved:
            moved[device] = (self.keys.to(device), self.values.to(device))
        return moved[device]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CompressedDemonstrations:
        """A copy with the prefix on ``device`` and/or in ``dtype`` (e.g. to serve a model cast after compressing)."""
        keys = self.keys.to(device=device, dtype=dtype, copy=True)  # a copy even when nothing changes
        values = self.values.to(device=device, dtype=dtype, copy=True)
        return replace(self, keys=keys, values=values)

    @contextlib.contextmanager
    def _serving(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask, share_prefix):
        """Check the batch and open a session for the block: ``(ids [B, S], mask [B, S] bool, session)``. The model
        is in eval mode inside (restored after) and, for a shared prefix, bound to it once for every step."""
        from fastattn_icl.integrations.prefix_cache import SharedPrefixCache

        self.check_model(model)
        ids = check_ids("input_ids", input_ids, 2)
        device = model_device(model)
        ids = ids.to(device)
        mask = _left_padded_mask(ids, attention_mask)
        B = ids.shape[0]
        shared = B > 1 if share_prefix is None else bool(share_prefix)
        dtype = model.get_input_embeddings().weight.dtype
        if self.keys.dtype != dtype:
            raise TypeError(
                f"this compressed cache is {self.keys.dtype} but the model runs {dtype}: compress with the model in "
                f"{dtype}, or serve comp.to(dtype={dtype})"
            )
        keys, values = self._prefix_on(device)
        if shared:
            cache = SharedPrefixCache(self.num_kept, self.geometry.num_layers)
        else:
            cache = _expanded_cache(keys, values, B)
        start = torch.full((B,), self.position_offset, dtype=torch.long, device=device)
        training = model.training
        model.eval()
        try:
            # the mask is built here as [ones(M), own mask]: no per-layer check (and sync) of the prefix columns
            bind = cache.bound(model, keys, values, check_mask=False) if shared else contextlib.nullcontext()
            with bind:
                yield ids, mask, _Session(cache, mask[:, :0], start)
        finally:
            model.train(training)

    def _positions(self, next_position: torch.Tensor, new_mask: torch.Tensor, limit: int | None) -> torch.Tensor:
        """Position ids ``[B, n]`` of new tokens (own-token mask ``new_mask``) after ``next_position [B]``; padding
        gets ``next_position`` (it is masked)."""
        positions = next_position[:, None] + new_mask.long().cumsum(dim=1) - 1
        positions = torch.where(new_mask, positions, next_position[:, None]).clamp(min=0)
        last = int(positions.max())
        if limit is not None and last >= limit:
            raise ValueError(
                f"position {last} is past the model's context of {limit} positions (position_offset "
                f"{self.position_offset} plus the test tokens); pass a smaller position_offset"
            )
        return positions

    def _full_mask(self, own_mask: torch.Tensor) -> torch.Tensor:
        """The model's attention mask ``[B, M + n]``: every row sees the whole prefix, then its own tokens."""
        return torch.cat([own_mask.new_ones(own_mask.shape[0], self.num_kept), own_mask], dim=1).long()

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        model: torch.nn.Module | None = None,
    ) -> dict[str, Any]:
        """The keyword arguments of one model call on a batch of test inputs, for callers that run the model
        themselves: ``model(**comp.prepare_inputs(ids, mask, model=model))``.

        Returns ``input_ids [B, S]``, the cache (a ``DynamicCache`` holding the prefix once per row: the
        standard Hugging Face form, for any attention implementation; use :meth:`forward` to share one copy),
        ``attention_mask [B, M + S]`` and ``position_ids [B, S]`` (from ``position_offset``), on the device of
        ``model`` (checked against the cache's geometry) or else of ``input_ids``. The cache's key is the
        keyword the model takes (``cache`` on transformers 5.24+, ``past_key_values`` before). Decoding further
        needs the positions to continue from there: use :meth:`generate`, not Hugging Face ``generate``.
        """
        if model is not None:
            self.check_model(model)
        ids = check_ids("input_ids", input_ids, 2)
        device = model_device(model) if model is not None else ids.device
        ids = ids.to(device)
        mask = _left_padded_mask(ids, attention_mask)
        B = ids.shape[0]
        cache = _expanded_cache(*self._prefix_on(device), B)
        start = torch.full((B,), self.position_offset, dtype=torch.long, device=device)
        positions = self._positions(start, mask, None if model is None else context_length(model))
        return {"input_ids": ids, cache_keyword(model): cache, "attention_mask": self._full_mask(mask),
                "position_ids": positions}

    def _step(self, model: torch.nn.Module, session: _Session, ids: torch.Tensor, new_mask: torch.Tensor,
              logits_to_keep: int) -> torch.Tensor:
        """Run ``ids [B, n]`` (own-token mask ``new_mask``) through the model over the session's cache."""
        positions = self._positions(session.next_position, new_mask, context_length(model))
        session.mask = torch.cat([session.mask, new_mask], dim=1)
        logits = model(input_ids=ids, attention_mask=self._full_mask(session.mask), position_ids=positions,
                       use_cache=True, logits_to_keep=logits_to_keep, **cache_kwargs(session.cache, model)).logits
        session.next_position = positions[:, -1] + 1
        return logits

    @torch.no_grad()
    def forward(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        share_prefix: bool | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits of a batch of test inputs with the compressed cache as their prefix.

        Args:
            model: the model that made the cache (same layers, kv heads and head dim).
            input_ids: int64 ``[B, S]`` test tokens only (no demonstrations, no BOS: the prefix has it),
                left-padded.
            attention_mask: ``[B, S]`` 1 = token, 0 = left padding; ``None`` = no padding.
            share_prefix: serve the batch from one prefix copy through the ``"fastattn_icl"`` seam (the model is
                switched to it for the call). ``None``: when ``B > 1``. ``False``: the standard Hugging Face
                way, a ``DynamicCache`` holding the prefix once per row, with the model's own attention.
            logits_to_keep: as transformers' argument (``0``: every position; ``1``: the last).

        Returns:
            ``[B, S or logits_to_keep, V]`` logits.

        Raises:
            ValueError: right padding, a row of padding only, a model of another geometry, positions past the
                model's context.
            TypeError: the cache's dtype is not the model's (see :meth:`to`).
        """
        with self._serving(model, input_ids, attention_mask, share_prefix) as (ids, mask, session):
            return self._step(model, session, ids, mask, logits_to_keep)

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int,
        share_prefix: bool | None = None,
    ) -> torch.Tensor:
        """Greedy decoding after a batch of test inputs: int64 ``[B, max_new_tokens]`` new tokens.

        The prefix stays shared through every step when ``share_prefix`` (default for ``B > 1``).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        out = []
        with self._serving(model, input_ids, attention_mask, share_prefix) as (ids, mask, session):
            logits = self._step(model, session, ids, mask, 1)
            for step in range(max_new_tokens):
                token = logits[:, -1].argmax(dim=-1, keepdim=True)
                out.append(token)
                if step + 1 < max_new_tokens:
                    logits = self._step(model, session, token, torch.ones_like(token, dtype=torch.bool), 1)
        return torch.cat(out, dim=1)

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to a safetensors file (tensors plus the positions, offset, geometry and method)."""
        from safetensors.torch import save_file

        tensors = {"keys": self.keys.contiguous(), "values": self.values.contiguous(),
                   "positions": self.positions.contiguous()}
        if self.input_ids is not None:
            tensors["input_ids"] = self.input_ids.contiguous()
        meta = {
            "format": "fastattn_icl.CompressedDemonstrations",
            "version": _FORMAT_VERSION,
            "num_tokens": str(self.num_tokens),
            "position_offset": str(self.position_offset),
            "method": self.method,
            "geometry": json.dumps(self.geometry.__dict__),
        }
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> CompressedDemonstrations:
        """Read a file written by :meth:`save` (onto ``device``, default CPU)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "fastattn_icl.CompressedDemonstrations":
                raise ValueError(f"{os.fspath(path)} is not a fastattn_icl compressed-demonstrations file")
            if meta.get("version") != _FORMAT_VERSION:
                raise ValueError(
                    f"{os.fspath(path)} has format version {meta.get('version')}, expected {_FORMAT_VERSION}"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        missing = sorted({"keys", "values", "positions"} - set(tensors))
        if missing:
            raise ValueError(f"{os.fspath(path)} lacks the tensors {missing}")
        keys, values = tensors["keys"], tensors["values"]
        if keys.dim() != 5 or keys.shape != values.shape or keys.shape[3] != tensors["positions"].numel():
            raise ValueError(f"{os.fspath(path)} holds inconsistent shapes: keys {tuple(keys.shape)}, values "
                             f"{tuple(values.shape)}, positions {tuple(tensors['positions'].shape)}")
        absent = sorted({"num_tokens", "position_offset", "method", "geometry"} - set(meta))
        if absent:
            raise ValueError(f"{os.fspath(path)} lacks the metadata {absent}")
        if device is not None:
            keys, values = keys.to(device), values.to(device)
        return cls(keys, values, tensors["positions"], int(meta["num_tokens"]), int(meta["position_offset"]),
                   ModelGeometry(**json.loads(meta["geometry"])), meta["method"], tensors.get("input_ids"))


def _check_demonstrations(demonstrations: Sequence[tuple[str, int]], template: str) -> None:
    if len(demonstrations) == 0:
        raise ValueError(
            f"no demonstration of the template {template!r} to compress: anchor compression keeps the "
            "demonstrations' label words and formatting tokens, and a zero-shot prompt has none (run the test "
            "inputs without a prefix instead)"
        )


def compress_demonstrations(
    model: torch.nn.Module,
    tokenizer: Any,
    demonstrations: Sequence[tuple[str, int]],
    template: str,
    label_words: Sequence[str],
    *,
    method: str = "hidden_anchor",
    position_offset: int | None = None,
    seed: int = 0,
    add_special_tokens: bool = True,
    keep_special_tokens: bool = True,
) -> CompressedDemonstrations:
    """Compress the demonstrations' KV cache to the kept positions of ``method`` (see the module docstring).

    Args:
        model: a Hugging Face decoder model (any attention implementation runs the demonstrations).
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
        demonstrations: ``(x, class)`` pairs, rendered in order with ``template``.
        template: e.g. ``"Review: {x}\\nSentiment: {y}\\n"`` (free field ``{x}``, label ``{y}``).
        label_words: one per class.
        method: ``"hidden_anchor"`` (default), ``"hidden_random"``, ``"text_anchor"`` or ``"full"``.
        position_offset: position id of the first test token; default the last kept position + 1 (``0``: the
            original GPT2-XL code's restart).
        seed: the random positions of ``"hidden_random"``.
        add_special_tokens: as the tokenizer's flag, for the demonstrations (BOS goes into the prefix).
        keep_special_tokens: keep the tokenizer's special tokens (BOS) in the anchor sets.

    Raises:
        ValueError: an unknown method, no demonstrations (zero-shot), a template field or label word not found
            in the tokenised demonstrations, demonstrations longer than the model's context.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_demonstrations(demonstrations, template)
    builder = PromptBuilder(tokenizer, template, label_words, demonstrations, add_special_tokens=add_special_tokens)
    if method == "text_anchor":
        text = text_anchor_text(template, builder.label_words, demonstrations)
        ids, _ = encode_prefix(tokenizer, text, add_special_tokens)
        ids = torch.tensor(ids, dtype=torch.long)
        keep = torch.arange(ids.numel())
    elif method == "full":
        ids, _ = encode_prefix(tokenizer, builder.demonstrations_text(), add_special_tokens)
        ids = torch.tensor(ids, dtype=torch.long)
        keep = torch.arange(ids.numel())
    else:
        anchors = hidden_anchor_keep(tokenizer, builder.demonstrations_text(), template, builder.label_words,
                                     add_special_tokens=add_special_tokens, keep_special_tokens=keep_special_tokens)
        ids = anchors.input_ids
        keep = anchors.positions
        if method == "hidden_random":
            keep = hidden_random_positions(anchors, seed=seed, keep_special_tokens=keep_special_tokens)
            if position_offset is None:  # as Hidden_anchor: the baseline changes which tokens are kept, nothing else
                position_offset = int(anchors.positions[-1]) + 1
    return CompressedDemonstrations.from_ids(model, ids, keep, position_offset=position_offset, method=method)


@dataclass(frozen=True)
class CompressionEvaluation:
    """One compression method against full ICL over a test set.

    Attributes:
        method: the kept-position rule.
        accuracy: the compressed model's accuracy (argmax over the label words).
        icl_accuracy: full ICL's accuracy on the same inputs.
        label_loyalty: fraction of inputs with the same predicted label as full ICL.
        word_loyalty: mean top-``k`` vocabulary Jaccard overlap with full ICL (``k = 5``, the paper's).
        num_examples: test inputs.
        kept: kept positions ``M``; demonstration_tokens: ``T``.
    """

    method: str
    accuracy: float
    icl_accuracy: float
    label_loyalty: float
    word_loyalty: float
    num_examples: int
    kept: int
    demonstration_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _query_ids(tokenizer: Any, builder: PromptBuilder, x: str) -> tuple[list[int], list[int]]:
    """The full prompt's tokens and the test input's tail of them (the tokens after the demonstrations)."""
    full, _ = encode_prefix(tokenizer, builder.prompt(x), builder.add_special_tokens)  # no EOS after the query
    demos, _ = encode_prefix(tokenizer, builder.demonstrations_text(), builder.add_special_tokens)
    if full[: len(demos)] != demos:
        raise ValueError(
            f"{tokenizer_name(tokenizer)} merges the end of the demonstrations with the start of the query for "
            f"the template {builder.template!r}, so the test input has no tokens of its own; end the template "
            "with a separator such as a newline"
        )
    return full, full[len(demos):]


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(len(r) for r in rows)
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, S - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, S - len(r):] = 1
    return ids, mask


@torch.no_grad()
def evaluate_compression(
    model: torch.nn.Module,
    tokenizer: Any,
    demonstrations: Sequence[tuple[str, int]],
    test_set: Sequence[tuple[str, int]],
    template: str,
    label_words: Sequence[str],
    *,
    methods: Sequence[str] = ("hidden_anchor", "text_anchor", "hidden_random"),
    batch_size: int = 16,
    k: int = 5,
    seed: int = 0,
    position_offset: int | None = None,
    pad_token_id: int = 0,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> dict[str, CompressionEvaluation]:
    """Accuracy, label loyalty and word loyalty (top-``k`` Jaccard) of compressed caches vs full ICL.

    Full ICL runs every test input with the demonstrations in its prompt; each method runs the same test
    tokens (the prompt's tokens after the demonstrations) with its compressed cache as prefix.

    Returns:
        ``{method: CompressionEvaluation}``.
    """
    test_set = list(test_set)
    if not test_set:
        raise ValueError("evaluate_compression needs at least one test input")
    _check_demonstrations(demonstrations, template)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    builder = PromptBuilder(tokenizer, template, label_words, demonstrations, add_special_tokens=add_special_tokens)
    labels = torch.tensor([y for _, y in test_set], dtype=torch.long)
    prompts = [_query_ids(tokenizer, builder, x) for x, _ in test_set]
    device = model_device(model)
    label_ids = builder.label_token_ids.to(device)
    comps = {m: compress_demonstrations(model, tokenizer, demonstrations, template, label_words, method=m,
                                        position_offset=position_offset, seed=seed,
                                        add_special_tokens=add_special_tokens) for m in methods}
    logits: dict[str | None, list[torch.Tensor]] = {m: [] for m in [None, *methods]}
    training = model.training
    model.eval()
    bar = tqdm(total=len(test_set) * (1 + len(comps)), desc="compression eval", disable=not progress)
    try:
        with bar:
            for start in range(0, len(test_set), batch_size):
                chunk = prompts[start : start + batch_size]
                ids, mask = left_pad([full for full, _ in chunk], pad_token_id)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), logits_to_keep=1, use_cache=False).logits[:, -1]
                logits[None].append(out.float().cpu())
                bar.update(len(chunk))
                ids, mask = left_pad([own for _, own in chunk], pad_token_id)
                for m, comp in comps.items():
                    logits[m].append(comp.forward(model, ids, mask, logits_to_keep=1)[:, -1].float().cpu())
                    bar.update(len(chunk))
    finally:
        model.train(training)
    reference = torch.cat(logits[None])
    ref_pred = label_predictions(reference, label_ids.cpu())
    icl_accuracy = (ref_pred == labels).float().mean().item()
    results = {}
    for m, comp in comps.items():
        got = torch.cat(logits[m])
        pred = label_predictions(got, label_ids.cpu())
        results[m] = CompressionEvaluation(
            method=m,
            accuracy=(pred == labels).float().mean().item(),
            icl_accuracy=icl_accuracy,
            label_loyalty=label_loyalty(pred, ref_pred),
            word_loyalty=word_loyalty(got, reference, k),
            num_examples=len(test_set),
            kept=comp.num_kept,
            demonstration_tokens=comp.num_tokens,
        )
    return results
