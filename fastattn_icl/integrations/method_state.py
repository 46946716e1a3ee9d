"""Method state of one layer, typed and validated once: when a context manager sets it on the controller.

:class:`~fastattn_icl.integrations.controller.ICLController` stores the named values a user sets (``anchors`` with
``beta``, ``isolation``, ``saliency``, ``shared_prefix``, ``momentum``, ``attention_row``) and turns the values
that apply to each layer into one frozen :class:`LayerMethods` right away, with :func:`layer_methods`. Every check
that does not depend on the shapes of an attention call happens there, once, reading the state's values on the
host; the seam then reads fields and checks only shapes, so its per-layer path never waits for the device. A bad
value raises when the block is entered, with the typed error that names it.

State is captured when it is set: the index tensors (anchor positions and classes, ``reweight_from``, isolation
rows, ``attention_row`` positions) are copied then, so changing the caller's tensors in place afterwards changes
nothing (set the state again instead); their copies on another device are made on first use there, once per
device. ``beta`` is read live, in every layer (its gradient reaches it and a workflow trains it in place): keep it
on the model's device, as :class:`~fastattn_icl.methods.AnchorReweighting` does, or each layer copies ``beta[l]``.
An incomplete combination (``anchors`` without ``beta`` or the reverse, e.g. while they are set in two steps) is
accepted when set, each value checked, and raises in a forward that reaches a layer where it is still incomplete.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from fastattn_icl.ops.momentum import check_eta
from fastattn_icl.ops.saliency import Saliency

# the state names the seam implements; any other name is refused when it is set
STATE_NAMES: frozenset[str] = frozenset(
    {"anchors", "attention_row", "beta", "isolation", "momentum", "saliency", "shared_prefix"}
)


@dataclass(frozen=True)
class AnchorState:
    """Controller state ``anchors`` (docs/methods.md §2): where the label words are and which rows are re-weighted.

    Used together with the state ``beta``: a floating tensor indexed by layer first, ``[L, H, C]`` (or
    ``[L, B, H, C]``); layer ``l`` uses ``beta[l]``.

    Attributes:
        positions: integer ``[B, A]`` absolute key positions of the label words (with left padding or a
            KV cache: the index into the layer's key sequence), ``-1`` = unused slot. ``B = 1`` is
            broadcast over the batch. Positions not yet in the key sequence (a chunk before them) are
            ignored for that chunk.
        classes: integer ``[B, A]`` class of each anchor, in ``[0, C)``.
        reweight_from: which query rows are re-weighted. ``None``: the last query row of every attention
            call (the paper's setting for a prompt; in cached decoding, each new single-token step).
            An int or an integer tensor ``[B]``: an absolute position; every query at that position or
            later is re-weighted, so a chunk whose queries all come before it is not re-weighted and a
            chunk that starts after it is re-weighted from its first row.
    """

    positions: torch.Tensor
    classes: torch.Tensor
    reweight_from: int | torch.Tensor | None = None


@dataclass(frozen=True)
class IsolationState:
    """Controller state ``isolation`` (docs/methods.md §3): cut the information flow into some positions.

    Attributes:
        rows: integer ``[B, R]`` absolute key positions ``p`` (``-1`` = unused; ``B = 1`` broadcasts):
            queries at positions ``p .. p + window`` get their logits towards keys ``0 .. p - 1``
            overwritten with ``-1e4``.
        window: int >= 0.
    """

    rows: torch.Tensor
    window: int = 0


@dataclass(frozen=True)
class SharedPrefixState:
    """Controller state ``shared_prefix`` (docs/methods.md §5 serving): every layer's keys start with a prefix that the
    whole batch shares, held once and read in place by the kernel (never copied per row).

    Used with :class:`~fastattn_icl.integrations.prefix_cache.SharedPrefixCache`, whose layers hold only each
    row's own keys (the test inputs and the tokens decoded after them) and report the prefix in their length,
    so the key-padding mask and the query positions count it.

    Attributes:
        keys, values: ``[L, 1, Hkv, M, D]`` (or ``[L, B, Hkv, M, D]``): layer ``l`` reads ``keys[l]``; post-RoPE
            keys, in the model's dtype and on its device.
        check_mask: the seam checks once per forward that the attention mask keeps every prefix column (one
            device-to-host sync, in the first layer: every layer gets the same mask object); a caller that builds
            the mask itself as ``[ones(M), own mask]`` (the compression workflow) passes ``False``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    check_mask: bool = True

    @property
    def length(self) -> int:
        return self.keys.shape[3]


@dataclass
class AttentionRowProbe:
    """Controller state ``attention_row``: record the post-softmax attention of each prompt's last query row
    (the target position) on a few key positions, in every layer it applies to.

    The row is formed from the fused forward's log-sum-exp: ``P[q, p] = exp(scale · q · k_p − lse_q)`` for the
    asked positions only, so no ``[T, T]`` map (nor a full row) is ever stored. Plain attention only: the seam
    refuses it together with other method state.

    Attributes:
        positions: integer ``[B, A]`` absolute key positions (``-1`` = unused; ``B = 1`` broadcasts).
        results: filled by the forward, ``{layer_idx: float32 [B, H, A]}`` (0 at unused slots), detached.
    """

    positions: torch.Tensor
    results: dict[int, torch.Tensor] = field(default_factory=dict)


def _integer_rows(name: str, t: Any) -> torch.Tensor:
    """A copy of ``t`` as int64 ``[B or 1, N]`` (the state is captured when set)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"fastattn_icl: method state {name} must be an integer tensor [B, N], got {t!r:.80}")
    return t.detach().long().clone()


class DeviceCopies:
    """Copies of a frozen state's tensors on the devices that read them, made on first use: one host-to-device
    copy per tensor and device (a blocking copy waits for the device), then none."""

    def __init__(self):
        self._copies: dict[tuple[int, torch.device], torch.Tensor] = {}

    def on(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``t`` (held by the state, never changed) on ``device``."""
        if t.device == device:
            return t
        key = (id(t), device)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = t.to(device)
        return copy


class MaskChecks:
    """Remembers the last key-padding mask a per-forward check passed on: transformers hands one mask object to
    every layer of a forward, so such a check reads the device once per forward, not once per layer."""

    def __init__(self):
        self._last: weakref.ref | None = None

    def seen(self, mask: torch.Tensor) -> bool:
        return self._last is not None and self._last() is mask

    def passed(self, mask: torch.Tensor) -> None:
        self._last = weakref.ref(mask)


@dataclass(frozen=True)
class Anchors:
    """Validated ``anchors`` (without ``beta``), captured when set: ``positions``/``classes`` int64 ``[B or 1, A]``
    (positions ``>= -1`` and none twice in a row, classes ``>= 0`` where used), ``reweight_from`` ``None`` or int64
    ``[B or 1]`` absolute positions, the largest used class (``-1``: none) and the batch sizes they imply."""

    positions: torch.Tensor
    classes: torch.Tensor
    reweight_from: torch.Tensor | None
    max_class: int
    batch: frozenset[int]
    source: AnchorState = field(repr=False, compare=False)
    copies: DeviceCopies = field(default_factory=DeviceCopies, repr=False, compare=False)


@dataclass(frozen=True)
class Reweighting:
    """Validated ``anchors`` + ``beta``: ``beta`` ``[L, H, C]`` or ``[L, B, H, C]`` (the user's tensor, read live,
    so its gradient reaches it), ``positions``/``classes`` int64 ``[B or 1, A]`` (classes in ``[0, C)``, positions
    ``>= -1`` and none twice in a row), ``reweight_from`` ``None`` or int64 ``[B or 1]`` absolute positions;
    ``copies`` holds the index tensors' copies on other devices (shared by every layer that uses the same anchors)."""

    beta: torch.Tensor
    positions: torch.Tensor
    classes: torch.Tensor
    reweight_from: torch.Tensor | None
    copies: DeviceCopies = field(default_factory=DeviceCopies, repr=False, compare=False)


@dataclass(frozen=True)
class Isolation:
    """Validated ``isolation``: ``rows`` int64 ``[B or 1, R]`` (``>= -1``), ``window >= 0`` and the used positions,
    sorted, on the host (a call checks on the host that no window runs past its last key)."""

    rows: torch.Tensor
    window: int
    used_positions: tuple[int, ...]
    copies: DeviceCopies = field(default_factory=DeviceCopies, repr=False, compare=False)

    def window_past_end(self, Tk: int) -> bool:
        """Whether a position ``p < Tk`` has ``p + window > Tk - 1`` (its window is not inside this call's keys)."""
        i = bisect.bisect_left(self.used_positions, Tk - self.window)
        return i < len(self.used_positions) and self.used_positions[i] < Tk


@dataclass(frozen=True)
class AttentionRow:
    """Validated ``attention_row``: the probe, its positions as int64 ``[B or 1, A]`` (``>= -1``) and the largest."""

    probe: AttentionRowProbe
    positions: torch.Tensor
    max_position: int
    copies: DeviceCopies = field(default_factory=DeviceCopies, repr=False, compare=False)

    def record(self, layer_idx: int | None, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
               scale: float) -> None:
        """Record layer ``layer_idx`` into ``probe.results`` from ``query [B, H, Tq, D]``, ``key [B, Hkv, Tk, D]``
        and the fused forward's ``lse [B, H, Tq]``."""
        if layer_idx is None:
            raise ValueError("attention_row needs attention modules with a layer_idx")
        B, H, _, D = query.shape
        Hkv, Tk = key.shape[1], key.shape[2]
        if self.positions.shape[0] not in (1, B):
            raise ValueError(f"attention_row positions must be [B={B} or 1, A], got {tuple(self.positions.shape)}")
        if self.max_position >= Tk:
            raise ValueError(
                f"attention_row positions must be key positions in [0, {Tk}) or -1, got {self.positions.tolist()}"
            )
        pos = self.copies.on(self.positions, query.device).expand(B, -1)
        with torch.no_grad():
            idx = pos.clamp(min=0)[:, None, :, None].expand(B, Hkv, pos.shape[1], D)
            keys = key.detach().gather(2, idx).float()  # [B, Hkv, A, D]
            q = query.detach()[:, :, -1].float().reshape(B, Hkv, H // Hkv, D)
            logits = torch.einsum("bgrd,bgad->bgra", q, keys).reshape(B, H, -1) * scale
            p = torch.exp(logits - lse.detach()[:, :, -1, None].float())
            self.probe.results[layer_idx] = torch.where(pos[:, None, :] >= 0, p, torch.zeros_like(p))


@dataclass(frozen=True)
class SharedPrefix:
    """Validated ``shared_prefix``, with the memory of the masks already checked to keep the prefix."""

    state: SharedPrefixState
    mask_checks: MaskChecks = field(default_factory=MaskChecks, compare=False)


@dataclass(frozen=True)
class LayerMethods:
    """What the seam computes in one layer; all fields ``None``: plain attention. ``missing`` names the half of
    anchor re-weighting that is not set (``"anchors"`` or ``"beta"``): a forward reaching this layer raises
    :meth:`check_complete`'s error."""

    reweighting: Reweighting | None = None
    isolation: Isolation | None = None
    saliency: Saliency | None = None
    momentum: float | None = None
    shared_prefix: SharedPrefix | None = None
    attention_row: AttentionRow | None = None
    missing: str | None = None

    @property
    def is_plain(self) -> bool:
        return self == PLAIN

    def check_complete(self) -> None:
        """Raise when anchor re-weighting is half set here (a host-side check of a field: no sync)."""
        if self.missing is not None:
            raise ValueError(
                f"fastattn_icl: anchor re-weighting needs both 'anchors' and 'beta' state; '{self.missing}' is not set"
            )


PLAIN = LayerMethods()


def _where(layer_idx: int | None) -> str:
    return "every layer" if layer_idx is None else f"layer {layer_idx}"


def _check_beta(beta: Any, layer_idx: int | None, num_layers: int | None) -> None:
    if not isinstance(beta, torch.Tensor) or not beta.is_floating_point() or beta.dim() not in (3, 4):
        raise TypeError(
            f"fastattn_icl: method state 'beta' must be a floating tensor [L, H, C] or [L, B, H, C] (layer l uses "
            f"beta[l]), got {beta!r:.80}"
        )
    needed = num_layers if layer_idx is None else layer_idx + 1
    if needed is not None and beta.shape[0] < needed:
        missing = f"layer {needed - 1}" if layer_idx is not None else f"all {needed} layers"
        raise ValueError(f"fastattn_icl: beta has {beta.shape[0]} layers, no entry for {missing}")


def _anchors(anchors: Any) -> Anchors:
    """Check ``anchors`` alone (one read of its values) and capture its index tensors."""
    if not isinstance(anchors, AnchorState):
        raise TypeError(f"fastattn_icl: method state 'anchors' must be an AnchorState, got {type(anchors).__name__}")
    positions = _integer_rows("anchors.positions", anchors.positions)
    classes = _integer_rows("anchors.classes", anchors.classes)
    if classes.shape != positions.shape:
        raise ValueError(
            f"fastattn_icl: anchors.positions and anchors.classes must have one shape [B, A], got "
            f"{tuple(positions.shape)} and {tuple(classes.shape)}"
        )
    batch = {positions.shape[0]} - {1}
    start = anchors.reweight_from
    if start is not None:
        if isinstance(start, bool) or not isinstance(start, (int, torch.Tensor)):
            raise TypeError(
                f"fastattn_icl: anchors.reweight_from must be None, an int or an integer tensor [B], got {start!r}"
            )
        if isinstance(start, torch.Tensor) and (start.is_floating_point() or start.dtype == torch.bool):
            raise TypeError(f"fastattn_icl: anchors.reweight_from must be an integer tensor [B], got {start.dtype}")
        start = torch.as_tensor(start).detach().long().reshape(-1).clone()
        if start.numel() != 1:
            batch.add(start.numel())
    if len(batch) > 1:
        raise ValueError(
            f"fastattn_icl: anchors.positions {tuple(positions.shape)} and anchors.reweight_from "
            f"{anchors.reweight_from!r} disagree on the batch size"
        )
    used = positions >= 0
    srt = positions.sort(dim=1).values
    no_class = torch.full((), -1, dtype=torch.long, device=classes.device)
    checks = torch.stack([
        (positions < -1).any().long(),
        (used & (classes < 0)).any().long(),
        ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any().long(),
        torch.where(used, classes, no_class).amax() if classes.numel() else no_class,
    ]).tolist()  # one read of the state's values, when it is set
    if checks[0]:
        bad = positions[positions < -1][0].item()
        raise ValueError(f"fastattn_icl: anchors.positions must be key positions >= 0 or -1 (unused), got {bad}")
    if checks[1]:
        raise ValueError("fastattn_icl: anchors.classes must be in [0, C) (C = beta.shape[-1]) for every used anchor")
    if checks[2]:
        raise ValueError("fastattn_icl: anchors.positions must not repeat a position within a batch row")
    return Anchors(positions, classes, start, checks[3], frozenset(batch), anchors)


def _reweighting(anchors: Anchors, beta: Any, layer_idx: int | None, num_layers: int | None) -> Reweighting:
    """Combine validated ``anchors`` with ``beta`` (host-side checks only)."""
    _check_beta(beta, layer_idx, num_layers)
    C = beta.shape[-1]
    if anchors.max_class >= C:
        raise ValueError(f"fastattn_icl: anchors.classes must be in [0, C={C}) (C = beta.shape[-1]) for every used "
                         "anchor")
    batch = anchors.batch | ({beta.shape[1]} - {1} if beta.dim() == 4 else set())
    if len(batch) > 1:
        raise ValueError(
            f"fastattn_icl: anchors.positions {tuple(anchors.positions.shape)}, beta {tuple(beta.shape)} and "
            f"anchors.reweight_from {anchors.source.reweight_from!r} disagree on the batch size"
        )
    return Reweighting(beta, anchors.positions, anchors.classes, anchors.reweight_from, anchors.copies)


def _isolation(state: Any) -> Isolation:
    if not isinstance(state, IsolationState):
        raise TypeError(f"fastattn_icl: method state 'isolation' must be an IsolationState, got {type(state).__name__}")
    window = state.window
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"fastattn_icl: isolation.window must be an int >= 0, got {window!r}")
    if window < 0:
        raise ValueError(f"fastattn_icl: isolation.window must be an int >= 0, got {window!r}")
    rows = _integer_rows("isolation.rows", state.rows)
    host = rows.tolist()  # one read of the state's values, when it is set
    if any(p < -1 for row in host for p in row):
        raise ValueError(f"fastattn_icl: isolation.rows must be positions >= 0 or -1 (unused), got {host}")
    return Isolation(rows, window, tuple(sorted({p for row in host for p in row if p >= 0})))


def _attention_row(probe: Any) -> AttentionRow:
    if not isinstance(probe, AttentionRowProbe):
        raise TypeError(
            f"fastattn_icl: method state 'attention_row' must be an AttentionRowProbe, got {type(probe).__name__}"
        )
    positions = _integer_rows("attention_row.positions", probe.positions)
    low, high = torch.stack([positions.min(), positions.max()]).tolist() if positions.numel() else (-1, -1)
    if low < -1:
        raise ValueError(f"attention_row positions must be key positions or -1, got {positions.tolist()}")
    return AttentionRow(probe, positions, high)


def _shared_prefix(prefix: Any) -> SharedPrefix:
    if not isinstance(prefix, SharedPrefixState):
        raise TypeError(f"fastattn_icl: method state 'shared_prefix' must be a SharedPrefixState, got {prefix!r:.80}")
    keys, values = prefix.keys, prefix.values
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)) or keys.dim() != 5 or (
        keys.shape != values.shape
    ):
        raise ValueError(
            "fastattn_icl: shared_prefix keys and values must be tensors of one shape [L, 1 or B, Hkv, M, D], got "
            f"{getattr(keys, 'shape', keys)!r:.60} and {getattr(values, 'shape', values)!r:.60}"
        )
    return SharedPrefix(prefix)


_VALIDATORS = {"anchors": _anchors, "isolation": _isolation, "attention_row": _attention_row,
               "shared_prefix": _shared_prefix}


def layer_methods(state: dict[str, Any], layer_idx: int | None, num_layers: int | None,
                  checked: dict[tuple[str, int], tuple[Any, Any]] | None = None) -> LayerMethods:
    """Validate the named ``state`` that applies to layer ``layer_idx`` (``None``: the all-layer state of a
    model of ``num_layers`` layers, ``None`` if unknown) and return it typed.

    ``checked`` maps ``(name, id(value))`` to ``(value, validated)``: a value found there is not checked (nor
    captured) again, and one checked here is added, so the layers of one model share one validated object (and
    its device copies)."""
    if not state:
        return PLAIN
    checked = {} if checked is None else checked

    def part(name: str) -> Any:
        value = state[name]
        entry = checked.get((name, id(value)))
        if entry is None or entry[0] is not value:
            entry = checked[(name, id(value))] = (value, _VALIDATORS[name](value))
        return entry[1]

    names = sorted(state)
    unknown = sorted(set(state) - STATE_NAMES)
    if unknown:
        raise NotImplementedError(
            f"fastattn_icl: method state {unknown} is set for {_where(layer_idx)} but the attention seam does not "
            "implement it"
        )
    if "shared_prefix" in state:
        others = sorted(set(state) - {"shared_prefix"})
        if others:
            raise NotImplementedError(
                f"fastattn_icl: method state {others} cannot be combined with a shared prefix ({_where(layer_idx)})"
            )
        return LayerMethods(shared_prefix=part("shared_prefix"))
    if "attention_row" in state:
        if len(state) > 1:
            raise NotImplementedError(
                f"fastattn_icl: attention_row cannot be combined with other method state yet ({_where(layer_idx)}: "
                f"{names})"
            )
        return LayerMethods(attention_row=part("attention_row"))
    if "momentum" in state:
        if len(state) > 1:
            raise NotImplementedError(
                f"fastattn_icl: momentum attention cannot be combined with other method state yet "
                f"({_where(layer_idx)}: {names})"
            )
        return LayerMethods(momentum=check_eta(state["momentum"]))
    saliency = state.get("saliency")
    if saliency is not None and not isinstance(saliency, Saliency):
        raise TypeError(f"saliency must be a fastattn_icl.ops.Saliency, got {type(saliency).__name__}")
    anchors = part("anchors") if "anchors" in state else None
    missing = reweighting = None
    if "beta" not in state:
        missing = None if anchors is None else "beta"
    elif anchors is None:  # checked now, combined when the anchors are set
        _check_beta(state["beta"], layer_idx, num_layers)
        missing = "anchors"
    else:
        reweighting = _reweighting(anchors, state["beta"], layer_idx, num_layers)
    return LayerMethods(
        reweighting=reweighting,
        isolation=None if "isolation" not in state else part("isolation"),
        saliency=saliency,
        missing=missing,
    )
