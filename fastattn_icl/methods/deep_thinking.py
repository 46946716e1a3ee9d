"""Deep-Thinking, iterative forward tuning (docs/methods.md §7): the demonstrations' K/V of every layer are refined by
re-running the demonstrations over the current state, with a momentum update of all layers at once.

    result = deep_thinking(model, demo_ids, steps=15, eta=0.01, beta=0.9, select_on=(val_ids, choices, labels))
    scores = score_choices(model, result.state, test_ids, choices)        # [n, C] summed log-probabilities
    result.state.save("dt.safetensors")                                   # a CompressedDemonstrations

Step 1 is the ordinary prefix cache of the ``N`` demonstration tokens. Step ``t >= 2`` re-runs them with the state
``X̂`` as past (each new token seeing all ``N`` old keys and the new ones causally: a bottom-right causal mask over
``2N`` keys) and updates every element of every layer's K and V: ``g = X_new - X̂``, ``m = g`` (first update) else
``g + β m``, ``X̂ <- X̂ + η m``.

Position ids of the re-run (``rerun_positions``): ``"appended"`` numbers the new tokens ``N .. 2N - 1``, the
authors' code on GPT-2's learned absolute positions (docs/methods.md §7 as written); ``"stored"`` numbers them
``0 .. N - 1``, the positions of the state's own keys. On a rotary model a key carries its position as a rotation, so
appended re-run keys are rotated ``N`` positions away from the stored keys they are blended into, and the momentum
update mixes keys of two rotations (on SmolLM2-135M it took a sentiment task to chance accuracy); stored positions keep
every blended key at its own rotation. ``"auto"`` (the default) picks ``"stored"`` for rotary models
(:func:`uses_rotary_positions`) and ``"appended"`` otherwise; ``docs/methods.md`` has the measurements.

The state of all layers lives in one buffer next to the re-run's new K/V (:class:`DeepThinkingCache` hands the
model views of it), so the re-run writes ``X_new`` in place and the update is one call,
:func:`fastattn_icl.ops.deep_thinking.deep_thinking_update_` (one Triton launch on CUDA).

Inference: test inputs alone, with the state as prefix at positions ``0 .. N - 1`` and the test tokens from ``N``
(a :class:`~fastattn_icl.methods.compression.CompressedDemonstrations` keeping every position). The step count is
chosen on held-out data (``select_on``), never on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fastattn_icl.integrations.cache_keyword import cache_kwargs
from fastattn_icl.methods._model import model_device
from fastattn_icl.methods.compression import (
    CompressedDemonstrations,
    ModelGeometry,
    check_ids,
    context_length,
    left_pad,
)
from fastattn_icl.ops.deep_thinking import check_coef, deep_thinking_update_

__all__ = [
    "RERUN_POSITIONS",
    "DeepThinkingCache",
    "DeepThinkingResult",
    "deep_thinking",
    "rerun_position_mode",
    "score_choices",
    "uses_rotary_positions",
]

RERUN_POSITIONS = ("auto", "stored", "appended")
# families whose attention rotates queries and keys by position (a fallback for configs that name no rope field)
_ROTARY_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "gptj", "codegen", "gpt_neox", "gpt_neox_japanese", "stablelm", "cohere", "starcoder2",
    "granite", "internlm2", "deepseek_v3", "smollm3",
})


def uses_rotary_positions(model: torch.nn.Module) -> bool:
    """Whether ``model`` encodes positions as rotations of its queries and keys (RoPE) rather than as learned
    absolute embeddings added to the input (GPT-2, OPT).

    Detected, in order, from: a submodule whose class name contains ``Rotary`` (``LlamaRotaryEmbedding``,
    ``GPTJRotaryEmbedding``, ...); the text config's RoPE fields (``rope_parameters``, ``rope_scaling``,
    ``rope_theta``, ``rotary_dim``, ``rotary_pct``, ``partial_rotary_factor``, ``position_embedding_type`` of
    ``"rotary"``/``"rope"``); the config's ``model_type`` among known rotary families. A config with ``alibi=True``
    (Falcon, Bloom) is not rotary.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if text is not None and getattr(text, "alibi", False) is True:
        return False
    if isinstance(model, torch.nn.Module) and any("rotary" in type(m).__name__.lower() for m in model.modules()):
        return True
    if text is None:
        return False
    for name in ("rope_parameters", "rope_scaling"):
        if isinstance(getattr(text, name, None), dict) and getattr(text, name):
            return True
    for name in ("rope_theta", "rotary_dim", "rotary_pct", "rotary_emb_base", "partial_rotary_factor"):
        value = getattr(text, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return True
    if str(getattr(text, "position_embedding_type", "")).lower() in ("rotary", "rope"):
        return True
    return bool({getattr(text, "model_type", None), getattr(config, "model_type", None)} & _ROTARY_MODEL_TYPES)


def rerun_position_mode(model: torch.nn.Module, rerun_positions: str = "auto") -> str:
    """``"stored"`` or ``"appended"``: the position ids :func:`deep_thinking` gives the re-run on ``model``.

    Args:
        rerun_positions: ``"auto"`` (``"stored"`` when :func:`uses_rotary_positions`, else ``"appended"``),
            ``"stored"`` (positions ``0 .. N - 1``, those of the state's keys) or ``"appended"`` (``N .. 2N - 1``).

    Raises:
        ValueError: any other value.
    """
    if not isinstance(rerun_positions, str) or rerun_positions not in RERUN_POSITIONS:
        raise ValueError(f"rerun_positions must be one of {RERUN_POSITIONS}, got {rerun_positions!r}")
    if rerun_positions == "auto":
        return "stored" if uses_rotary_positions(model) else "appended"
    return rerun_positions


def _cache_classes():
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    return Cache, DynamicCache, DynamicLayer


def DeepThinkingCache(work: torch.Tensor):  # noqa: N802 - a factory standing in for a class (lazy transformers import)
    """A ``DynamicCache`` for the re-run over the state: layer ``l`` holds ``work[kv, l]`` (``[Hkv, 2, N, d]``: the
    state's ``N`` positions, then room for the ``N`` new ones) as its ``[1, Hkv, 2N, d]`` keys and values. ``update``
    writes the new tokens' K/V into the second half (a copy the standard cache's ``torch.cat`` makes as well) and
    returns the whole view; the cache reports ``N`` past positions."""
    Cache, DynamicCache, DynamicLayer = _cache_classes()
    _, L, Hkv, _, N, d = work.shape

    class _StateLayer(DynamicLayer):
        def __init__(self, layer: int):
            super().__init__()
            self.layer = layer
            self.filled = False

        def update(self, key_states, value_states, *args, **kwargs):
            if self.filled or key_states.shape[-2] != N:
                raise RuntimeError(
                    f"the Deep-Thinking re-run feeds the {N} demonstration tokens once; got {key_states.shape[-2]} "
                    f"new positions{' again' if self.filled else ''}"
                )
            work[0, self.layer, :, 1].copy_(key_states[0])
            work[1, self.layer, :, 1].copy_(value_states[0])
            self.filled = True
            return work[0, self.layer].reshape(1, Hkv, 2 * N, d), work[1, self.layer].reshape(1, Hkv, 2 * N, d)

        def get_seq_length(self) -> int:
            return 2 * N if self.filled else N

    class _DeepThinkingCache(DynamicCache):
        def __init__(self):
            Cache.__init__(self, layers=[_StateLayer(layer) for layer in range(L)])

    return _DeepThinkingCache()


@dataclass
class DeepThinkingResult:
    """The outcome of :func:`deep_thinking`.

    Attributes:
        state: the chosen step's ``X̂`` as a prefix (every position kept, test tokens from position ``N``).
        step: the chosen step (1 = plain prefix caching).
        history: per step, ``{"step", "score"}`` on the held-out data (``score`` is ``None`` without it).
        rerun_positions: the position ids the re-runs used, ``"stored"`` (``0 .. N - 1``) or ``"appended"``
            (``N .. 2N - 1``); ``"auto"`` resolved.
    """

    state: CompressedDemonstrations
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    rerun_positions: str = "appended"


def _state_view(work: torch.Tensor, geometry: ModelGeometry, ids: torch.Tensor) -> CompressedDemonstrations:
    N = work.shape[4]
    keys = work[0, :, :, 0].unsqueeze(1)  # [L, 1, Hkv, N, d] views of the state
    values = work[1, :, :, 0].unsqueeze(1)
    return CompressedDemonstrations(keys, values, torch.arange(N), N, N, geometry, "deep_thinking", ids.cpu())


@torch.no_grad()
def deep_thinking(
    model: torch.nn.Module,
    demo_ids: torch.Tensor,
    *,
    steps: int = 15,
    eta: float = 0.01,
    beta: float = 0.9,
    select_on: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]], Sequence[int]] | None = None,
    normalise: bool = False,
    batch_size: int = 16,
    rerun_positions: str = "auto",
    progress: bool = True,
) -> DeepThinkingResult:
    """Run Deep-Thinking for ``steps`` steps on the demonstrations ``demo_ids [N]`` (docs/methods.md §7).

    Args:
        model: a Hugging Face decoder model (any attention implementation; GPT-J included).
        demo_ids: int64 ``[N]`` the demonstrations' tokens (with the tokenizer's BOS if it adds one).
        steps: total steps, ``>= 1`` (step 1 is the prefix cache); the authors' default 15.
        eta, beta: the update's step size and momentum (defaults of the authors' code: 0.01, 0.9; ``beta = 0`` is
            the gate form).
        select_on: held-out ``(input_ids, choices, labels)``: test-input token lists, the answer choices' token
            lists and each input's gold choice; the step with the best held-out accuracy (by
            :func:`score_choices`) is returned (ties: the earliest). ``None``: the last step.
        normalise: score choices by length-normalised log-probability when selecting.
        batch_size: rows per forward when scoring the held-out data.
        rerun_positions: position ids of the re-run tokens: ``"stored"`` ``0 .. N - 1`` (the positions of the
            state's keys: right for rotary models, whose keys carry their position as a rotation), ``"appended"``
            ``N .. 2N - 1`` (the authors' code, on GPT-2's learned absolute positions), or ``"auto"`` (default:
            ``"stored"`` for rotary models, see :func:`uses_rotary_positions`, else ``"appended"``). Either way each
            re-run token sees all ``N`` old keys and the new ones causally; inference is unchanged (the test
            tokens start at position ``N``).
        progress: a progress bar over the steps.

    Returns:
        :class:`DeepThinkingResult` (the chosen state is a copy, independent of later steps).

    Raises:
        ValueError: ``steps < 1``, η or β negative or not finite, an unknown ``rerun_positions``, demonstrations
            empty or longer than the model's context (with ``"appended"`` positions: longer than half of it, the
            re-run uses positions up to ``2N - 1``).
    """
    ids = check_ids("demo_ids", demo_ids, 1)
    N = ids.shape[0]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    eta, beta = check_coef("eta", eta), check_coef("beta", beta)
    mode = rerun_position_mode(model, rerun_positions)
    limit = context_length(model)
    if N == 0:
        raise ValueError("the demonstrations are empty (0 tokens)")
    if mode == "appended" and limit is not None and 2 * N > limit:
        raise ValueError(
            f"the re-run places the {N} demonstration tokens at positions {N} .. {2 * N - 1}, past the model's "
            f"context of {limit} (rerun_positions='appended'): use at most {limit // 2} demonstration tokens"
        )
    if select_on is not None:
        if not isinstance(select_on, (tuple, list)) or len(select_on) != 3:
            raise TypeError("select_on must be a tuple (input_ids, choices, labels) of held-out data")
        n_inputs, n_labels = len(select_on[0]), len(select_on[2])
        if n_inputs == 0 or n_inputs != n_labels:
            raise ValueError(f"select_on needs one label per held-out input, got {n_inputs} inputs, {n_labels} labels")
        if any(not 0 <= int(y) < len(select_on[1]) for y in select_on[2]):
            raise ValueError(f"select_on labels must index the {len(select_on[1])} choices, got {list(select_on[2])}")
    device = model_device(model)
    ids = ids.to(device)
    first = CompressedDemonstrations.from_ids(model, ids, torch.arange(N), method="deep_thinking")
    geometry = first.geometry
    L, _, Hkv, _, d = first.keys.shape
    work = first.keys.new_empty(2, L, Hkv, 2, N, d)
    work[0, :, :, 0] = first.keys[:, 0]
    work[1, :, :, 0] = first.values[:, 0]
    m = torch.empty(2 * L * Hkv, N * d, dtype=torch.float32, device=device)
    start = 0 if mode == "stored" else N
    positions = torch.arange(start, start + N, device=device)[None]
    history: list[dict[str, Any]] = []
    best: tuple[float, int, CompressedDemonstrations] | None = None

    def evaluate(step: int) -> None:
        nonlocal best
        state = _state_view(work, geometry, ids)
        score = None
        if select_on is not None:
            inputs, choices, labels = select_on
            pred = score_choices(model, state, inputs, choices, normalise=normalise, batch_size=batch_size).argmax(-1)
            score = (pred == torch.as_tensor(list(labels))).float().mean().item()
        history.append({"step": step, "score": score})
        if best is None or (score is not None and score > best[0]) or select_on is None:
            best = (score if score is not None else 0.0, step, state.to())  # a copy: later steps overwrite the views

    training = model.training
    model.eval()
    try:
        with tqdm(total=steps, desc="deep thinking", disable=not progress) as bar:
            evaluate(1)
            bar.update(1)
            for step in range(2, steps + 1):
                model(input_ids=ids[None], position_ids=positions, use_cache=True, logits_to_keep=1,
                      **cache_kwargs(DeepThinkingCache(work), model))
                deep_thinking_update_(work.view(2 * L * Hkv, 2, N * d), m, eta=eta, beta=beta, first=step == 2)
                evaluate(step)
                bar.update(1)
    finally:
        model.train(training)
    _, step, state = best
    return DeepThinkingResult(state, step, history, mode)


def score_choices(
    model: torch.nn.Module,
    state: CompressedDemonstrations,
    input_ids: Sequence[Sequence[int]],
    choices: Sequence[Sequence[int]],
    *,
    normalise: bool = False,
    batch_size: int = 16,
    pad_token_id: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Log-probability of every answer choice after every test input, with ``state`` as the prefix.

    Args:
        model: the model of the state.
        state: a prefix (Deep-Thinking's state, or any :class:`CompressedDemonstrations`).
        input_ids: ``n`` token lists, the test inputs alone (no BOS: the prefix has it).
        choices: ``C`` token lists, the answer choices (e.g. each label word with its leading space).
        normalise: divide each choice's summed log-probability by its length.
        batch_size: (input, choice) rows per forward (inputs per forward when every choice is one token: then one
            forward scores all choices); pad_token_id: left padding (masked).
        progress: a progress bar over the rows.

    Returns:
        float32 ``[n, C]`` scores (summed, or length-normalised, log-probabilities).
    """
    rows = [(i, c, list(x) + list(choice), len(choice)) for i, x in enumerate(input_ids)
            for c, choice in enumerate(choices)]
    if not rows or any(n == 0 for *_, n in rows):
        raise ValueError("score_choices needs at least one test input and non-empty answer choices")
    if any(len(x) == 0 for x in input_ids):
        raise ValueError("score_choices needs non-empty test inputs (the first choice token is predicted from the "
                         "input's last token)")
    scores = torch.empty(len(input_ids), len(choices), dtype=torch.float32)
    if all(len(choice) == 1 for choice in choices):
        # one-token choices (label words): every choice is read off one forward of the input alone
        first = torch.tensor([choice[0] for choice in choices], dtype=torch.long)
        for start in tqdm(range(0, len(input_ids), batch_size), desc="scoring", disable=not progress):
            chunk = [list(x) for x in input_ids[start : start + batch_size]]
            ids, mask = left_pad(chunk, pad_token_id)
            logp = state.forward(model, ids, mask, logits_to_keep=1)[:, -1].float().log_softmax(-1).cpu()
            scores[start : start + len(chunk)] = logp[:, first]
        return scores
    keep = max(n for *_, n in rows) + 1  # the logits that predict any choice's tokens
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring", disable=not progress):
        chunk = rows[start : start + batch_size]
        ids, mask = left_pad([seq for _, _, seq, _ in chunk], pad_token_id)
        S = ids.shape[1]
        K = min(keep, S)
        logp = state.forward(model, ids, mask, logits_to_keep=K).float().log_softmax(-1).cpu()  # [b, K, V]
        for b, (i, c, _, n) in enumerate(chunk):
            targets = ids[b, S - n :]  # the choice's tokens, predicted from the position before each
            total = logp[b, K - n - 1 : K - 1].gather(-1, targets[:, None]).sum()
            scores[i, c] = total / n if normalise else total
    return scores

