"""``fastattn_icl.methods.deep_thinking`` (docs/methods.md §7) on tiny random-weight models of every family (GPT-2,
Llama, Qwen2, Mistral, GPT-J): the fused workflow (the state of every layer in one buffer, the re-run writing into it,
one update call per step) against an eager per-tensor reference loop written here, the re-run's attention against
an explicit mask, held-out step selection, answer scoring against by-hand log-probabilities, save/load and errors.

The reference loop is the obvious implementation of docs/methods.md §7: step 1 is the model's own ``use_cache=True``
cache of the demonstrations; each later step re-runs the demonstration tokens over a ``DynamicCache`` holding the
current state, with position ids ``N .. 2N - 1`` on GPT-2 (learned absolute positions, the authors' code) and
``0 .. N - 1`` on the rotary families (the positions of the stored keys, ``rerun_positions="auto"``), and applies
:func:`fastattn_icl.reference.deep_thinking.deep_thinking_update` to each layer's K and V (``2 L`` calls). The
workflow does the same arithmetic in the same order, so on the torch backend (the autouse fixture of
``tests/methods/conftest.py``) and under the Triton interpreter the states agree bit for bit.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from transformers import DynamicCache

import fastattn_icl
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.methods import CompressedDemonstrations
from fastattn_icl.methods.deep_thinking import (
    DeepThinkingCache,
    DeepThinkingResult,
    deep_thinking,
    rerun_position_mode,
    score_choices,
    uses_rotary_positions,
)
from fastattn_icl.reference import deep_thinking as ref
from fastattn_icl.testing import check_close
from tests.models import float64_twin, tiny_gptj, tiny_model

# the module (``fastattn_icl.methods.deep_thinking`` as an attribute is the function of that name)
dt_module = importlib.import_module("fastattn_icl.methods.deep_thinking")
FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "gptj"]
# the re-run's positions under rerun_positions="auto", written out here (not asked of the code under test)
AUTO_POSITIONS = {"gpt2": "appended", "llama": "stored", "qwen2": "stored", "mistral": "stored", "gptj": "stored"}
N = 12  # demonstration tokens: the re-run reaches position 2N - 1 = 23 (the tiny models have 64)


def _model(family: str, layers: int = 2, **overrides):
    if family == "gptj":
        return tiny_gptj(layers=layers, **overrides)
    if family == "mistral":
        overrides = {"sliding_window": 128, **overrides}  # a window that never binds here
    return tiny_model(family, "eager", layers=layers, **overrides)


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(family: str) -> torch.nn.Module:
    """A shared 2-layer model per family (the tests that change a model's mode build their own)."""
    if family not in _MODELS:
        _MODELS[family] = _model(family)
    return _MODELS[family]


def _ids(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 100, (n,), generator=torch.Generator().manual_seed(seed))


def _lists(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    """``count`` token lists of lengths ``low .. high``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]


def _run(model, ids, **kw) -> DeepThinkingResult:
    return deep_thinking(model, ids, progress=False, **kw)


def _state_kv(state: CompressedDemonstrations) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The state as per-layer ``[1, Hkv, N, d]`` keys and values."""
    return [(state.keys[layer], state.values[layer]) for layer in range(state.keys.shape[0])]


# ------------------------------------------------------------------------------------------------
# The eager reference loop
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_states(model, ids: torch.Tensor, steps: int, eta: float, beta: float, update=None, positions=None):
    """The per-layer ``(K̂, V̂)`` after each of ``steps`` steps, one tensor at a time. ``update(x_hat, x_new, m)`` returns
    ``(x_hat, m)``; default: the oracle's momentum update. ``positions``: the re-run's ``"stored"`` / ``"appended"``
    position ids (default: the family's under ``"auto"``, :data:`AUTO_POSITIONS`)."""
    if positions is None:
        positions = AUTO_POSITIONS[model.config.model_type]
    if update is None:

        def update(x_hat, x_new, m):
            return ref.deep_thinking_update(x_hat, x_new, m, eta=eta, beta=beta)

    n = ids.shape[0]
    cache = output_cache(model(input_ids=ids[None], use_cache=True))
    state = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    momenta = [(None, None)] * len(state)
    out = [[(k.clone(), v.clone()) for k, v in state]]
    for _ in range(2, steps + 1):
        past = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in state])
        position_ids = ref.deep_thinking_position_ids(n, rerun_positions=positions)
        model(input_ids=ids[None], position_ids=position_ids, **cache_kwargs(past), use_cache=True)
        new_state, new_momenta = [], []
        for layer, ((k, v), (mk, mv)) in enumerate(zip(state, momenta)):
            k_new, v_new = past.layers[layer].keys[:, :, n:], past.layers[layer].values[:, :, n:]
            assert k_new.shape == k.shape
            k, mk = update(k, k_new, mk)
            v, mv = update(v, v_new, mv)
            new_state.append((k, v))
            new_momenta.append((mk, mv))
        state, momenta = new_state, new_momenta
        out.append([(k.clone(), v.clone()) for k, v in state])
    return out


def assert_state(state: CompressedDemonstrations, expected, what: str, high=None):
    """Bit-exact (the same operations in the same order), or with ``high``, the float64 oracle's ``(K̂, V̂)`` per
    layer, the tolerance rule with ``expected`` as the same-dtype reference."""
    got = _state_kv(state)
    assert len(got) == len(expected)
    for layer, ((k, v), (k_exp, v_exp)) in enumerate(zip(got, expected)):
        for name, a, b in (("K", k, k_exp), ("V", v, v_exp)):
            assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: layer {layer} {name} {a.shape} vs {b.shape}"
            if high is None:
                assert torch.equal(a, b), f"{what}: layer {layer} {name} max diff {(a - b).abs().max():.3e}"
            else:
                check_close(f"{what}: layer {layer} {name}", a, b, high[layer][name == "V"])


# ------------------------------------------------------------------------------------------------
# (a) step 1 is plain prefix caching; (b) the fused workflow is the reference loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_step_one_is_the_prefix_cache(family):
    model, ids = model_of(family), _ids()
    result = _run(model, ids, steps=1)
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids[None], use_cache=True))
    assert_state(result.state, [(layer.keys, layer.values) for layer in cache.layers], "step 1")
    state = result.state
    assert result.step == 1 and result.history == [{"step": 1, "score": None}]
    assert torch.equal(state.positions, torch.arange(N)) and state.num_tokens == N and state.position_offset == N
    assert state.method == "deep_thinking" and torch.equal(state.input_ids, ids)
    assert state.num_kept == N


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_workflow_equals_the_reference_loop(family):
    model, ids = model_of(family), _ids(seed=1)
    eta, beta, steps = 0.2, 0.9, 4
    expected = reference_states(model, ids, steps, eta, beta)
    for s in (2, steps):
        result = _run(model, ids, steps=s, eta=eta, beta=beta)
        assert result.step == s and [h["step"] for h in result.history] == list(range(1, s + 1))
        assert_state(result.state, expected[s - 1], f"{family} step {s}")
    # the state moved (so the comparison above is not of two prefix caches); layer 0's K/V depend only on the token
    # and its position, so with the stored positions of rotary models they are a fixed point: check the last layer
    assert (expected[-1][-1][0] - expected[0][-1][0]).abs().max() > 1e-3


def test_default_coefficients_equal_the_reference_loop():
    model, ids = model_of("llama"), _ids(seed=2)
    result = _run(model, ids, steps=3)  # η = 0.01, β = 0.9
    assert_state(result.state, reference_states(model, ids, 3, 0.01, 0.9)[-1], "defaults")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beta_zero_is_the_gate_form_loop(family):
    model, ids = model_of(family), _ids(seed=3)
    eta, steps = 0.3, 3
    result = _run(model, ids, steps=steps, eta=eta, beta=0.0)

    def gate(x_hat, x_new, m):
        return ref.gate_update(x_hat, x_new, eta), None

    # another formula for the same value: float32 rounding apart, carried through the re-runs
    same = reference_states(model, ids, steps, eta, 0.0, update=gate)[-1]
    high = reference_states(float64_twin(model), ids, steps, eta, 0.0, update=gate)[-1]
    assert_state(result.state, same, "gate form", high=high)
    assert_state(result.state, reference_states(model, ids, steps, eta, 0.0)[-1], "β = 0")


def test_eta_zero_keeps_the_prefix_cache():
    model, ids = model_of("qwen2"), _ids(seed=4)
    assert_state(_run(model, ids, steps=3, eta=0.0).state, _state_kv(_run(model, ids, steps=1).state), "η = 0")


# ------------------------------------------------------------------------------------------------
# (d) the re-run's attention against an explicit mask
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch):
    """Every update call of the workflow: ``(state X̂, new X_new)`` as ``[2, L, Hkv, N, d]`` (K then V)."""
    calls = []
    real = dt_module.deep_thinking_update_

    def spy(work, m, **kw):
        calls.append((work[:, 0].clone(), work[:, 1].clone(), kw))
        return real(work, m, **kw)

    monkeypatch.setattr(dt_module, "deep_thinking_update_", spy)
    return calls


def _additive(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rerun_attention_matches_an_explicit_mask(family, captured):
    model, ids = model_of(family), _ids(seed=5)
    L = model.config.num_hidden_layers
    _run(model, ids, steps=3, eta=0.3, beta=0.9)
    assert len(captured) == 2 and [kw["first"] for *_, kw in captured] == [True, False]
    assert all(kw["eta"] == 0.3 and kw["beta"] == 0.9 for *_, kw in captured)

    def unflat(x):  # [2 L Hkv, N d] -> [2, L, Hkv, N, d]
        return x.view(2, L, -1, N, x.shape[-1] // N)

    # step 2: the state is the prefix cache, so the re-run is the second half of `ids ++ ids`, whose mask is causal on
    # the first half and the re-run's mask (all N old keys, new ones causally) below; the second half sits at
    # positions N .. 2N - 1 on GPT-2 and at the stored keys' 0 .. N - 1 on Llama (rerun_positions="auto")
    mask = torch.zeros(2 * N, 2 * N, dtype=torch.bool)
    mask[:N] = torch.ones(N, N, dtype=torch.bool).tril().repeat(1, 2) & (torch.arange(2 * N) < N)
    mask[N:] = ref.deep_thinking_mask(N)[0, 0]
    second = torch.arange(N, 2 * N) if family == "gpt2" else torch.arange(N)
    twin = float64_twin(model)

    def masked_run(m):
        with torch.no_grad():
            return m(
                input_ids=torch.cat([ids, ids])[None],
                attention_mask=_additive(mask)[None, None],
                position_ids=torch.cat([torch.arange(N), second])[None],
                use_cache=True,
            ).past_key_values

    cache, cache64 = masked_run(model), masked_run(twin)
    new = unflat(captured[0][1])
    for layer in range(L):
        same, high = cache.layers[layer], cache64.layers[layer]
        check_close(f"step 2 K {layer}", new[0, layer][None], same.keys[:, :, N:], high.keys[:, :, N:])
        check_close(f"step 2 V {layer}", new[1, layer][None], same.values[:, :, N:], high.values[:, :, N:])

    # step 3: past = the state after step 2, the N new tokens under deep_thinking_mask at the same positions
    state, new = unflat(captured[1][0]), unflat(captured[1][1])
    rerun_ids = second[None]
    past = DynamicCache(ddp_cache_data=[(state[0, layer][None], state[1, layer][None]) for layer in range(L)])
    past64 = DynamicCache(
        ddp_cache_data=[(state[0, layer][None].double(), state[1, layer][None].double()) for layer in range(L)]
    )
    with torch.no_grad():
        for m, p in ((model, past), (twin, past64)):
            m(
                input_ids=ids[None],
                attention_mask=_additive(ref.deep_thinking_mask(N)),
                position_ids=rerun_ids,
                **cache_kwargs(p),
                use_cache=True,
            )
    for layer in range(L):
        same, high = past.layers[layer], past64.layers[layer]
        check_close(f"step 3 K {layer}", new[0, layer][None], same.keys[:, :, N:], high.keys[:, :, N:])
        check_close(f"step 3 V {layer}", new[1, layer][None], same.values[:, :, N:], high.values[:, :, N:])
    # a mask that hides the old keys gives other K/V: the check above sees the mask
    hide_old = ref.deep_thinking_mask(N).clone()
    hide_old[..., :N] = False
    past = DynamicCache(ddp_cache_data=[(state[0, layer][None], state[1, layer][None]) for layer in range(L)])
    with torch.no_grad():
        model(
            input_ids=ids[None],
            attention_mask=_additive(hide_old),
            position_ids=rerun_ids,
            **cache_kwargs(past),
            use_cache=True,
        )
    assert (new[1, L - 1][None] - past.layers[L - 1].values[:, :, N:]).abs().max() > 1e-4


def test_deep_thinking_cache():
    """The cache the re-run uses: ``N`` past positions, the new K/V written into the buffer's second half, once."""
    model, ids = model_of("llama"), _ids(seed=6)
    L, Hkv, d = 2, model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    expected = reference_states(model, ids, 1, 0.0, 0.0)[0]
    work = torch.full((2, L, Hkv, 2, N, d), float("nan"))
    for layer, (k, v) in enumerate(expected):
        work[0, layer, :, 0], work[1, layer, :, 0] = k[0], v[0]
    cache = DeepThinkingCache(work)
    assert cache.get_seq_length() == N
    with torch.no_grad():
        model(
            input_ids=ids[None], position_ids=ref.deep_thinking_position_ids(N), **cache_kwargs(cache), use_cache=True
        )
    assert cache.get_seq_length() == 2 * N
    past = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in expected])
    with torch.no_grad():
        model(input_ids=ids[None], position_ids=ref.deep_thinking_position_ids(N), **cache_kwargs(past), use_cache=True)
    for layer in range(L):
        assert torch.equal(work[0, layer, :, 1][None], past.layers[layer].keys[:, :, N:])
        assert torch.equal(work[1, layer, :, 1][None], past.layers[layer].values[:, :, N:])
        assert torch.equal(work[0, layer, :, 0][None], expected[layer][0])  # the state is only read
    with pytest.raises(RuntimeError, match="once"), torch.no_grad():  # a second re-run over the same cache
        model(
            input_ids=ids[None], position_ids=ref.deep_thinking_position_ids(N), **cache_kwargs(cache), use_cache=True
        )
    with pytest.raises(RuntimeError, match="demonstration tokens"), torch.no_grad():  # not N tokens
        model(
            input_ids=ids[None, :5],
            position_ids=ref.deep_thinking_position_ids(N)[:, :5],
            **cache_kwargs(DeepThinkingCache(work)),
            use_cache=True,
        )


# ------------------------------------------------------------------------------------------------
# (d') the re-run's position ids: the stored keys' on rotary models, N .. 2N - 1 on GPT-2
# ------------------------------------------------------------------------------------------------


def _record_position_ids(model, family: str):
    """Hook what turns position ids into positions: Llama's rotary embedding (the rotation of every layer's q and k),
    GPT-2's learned position embedding. Returns ``(seen, handle)``: ``seen`` gets ``[T]`` per forward."""
    seen: list[torch.Tensor] = []
    if family == "llama":

        def rotary(module, args, kwargs):
            ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
            seen.append(ids.reshape(-1).clone())

        return seen, model.model.rotary_emb.register_forward_pre_hook(rotary, with_kwargs=True)
    return seen, model.transformer.wpe.register_forward_pre_hook(lambda module, args: seen.append(args[0].reshape(-1)))


@pytest.mark.parametrize(
    "family, rerun_positions, start",
    [("llama", "auto", 0), ("llama", "stored", 0), ("llama", "appended", N),
     ("gpt2", "auto", N), ("gpt2", "appended", N), ("gpt2", "stored", 0)],
)
def test_rerun_position_ids_the_model_sees(family, rerun_positions, start):
    model, ids = model_of(family), _ids(seed=40)
    seen, handle = _record_position_ids(model, family)
    try:
        result = _run(model, ids, steps=3, eta=0.3, rerun_positions=rerun_positions)
    finally:
        handle.remove()
    mode = "stored" if start == 0 else "appended"
    assert result.rerun_positions == mode
    assert len(seen) == 3  # the prefix cache, then two re-runs
    assert torch.equal(seen[0], torch.arange(N))
    for got in seen[1:]:
        assert torch.equal(got, torch.arange(start, start + N)), f"{family} {rerun_positions}: re-run at {got.tolist()}"
    assert_state(result.state, reference_states(model, ids, 3, 0.3, 0.9, positions=mode)[-1], f"{family} {mode}")


def test_stored_positions_keep_layer_zero_fixed_on_rotary_models():
    """Layer 0's K/V depend only on each token and its position. Re-run at the stored keys' positions they equal the
    stored ones, so layer 0 stays the prefix cache exactly (no blend of two rotations); re-run at N .. 2N - 1 the
    keys come back rotated N positions away and the update drifts them (the values carry no rotation)."""
    model, ids = model_of("llama"), _ids(seed=41)
    plain = _run(model, ids, steps=1).state
    stored = _run(model, ids, steps=4, eta=0.3).state
    appended = _run(model, ids, steps=4, eta=0.3, rerun_positions="appended").state
    assert torch.equal(stored.keys[0], plain.keys[0]) and torch.equal(stored.values[0], plain.values[0])
    assert (stored.keys[-1] - plain.keys[-1]).abs().max() > 1e-3  # deeper layers still move
    assert (appended.keys[0] - plain.keys[0]).abs().max() > 1e-3
    assert torch.equal(appended.values[0], plain.values[0])


@pytest.mark.parametrize("value", ["both", "", "Stored", "absolute", None, 0, True])
def test_bad_rerun_positions(value):
    with pytest.raises(ValueError, match="rerun_positions must be one of"):
        deep_thinking(model_of("llama"), _ids(), steps=2, rerun_positions=value, progress=False)
    with pytest.raises(ValueError, match="rerun_positions must be one of"):
        rerun_position_mode(model_of("gpt2"), value)


@pytest.mark.parametrize(
    "family, rotary",
    [("gpt2", False), ("opt", False), ("llama", True), ("qwen2", True), ("mistral", True), ("gpt_neox", True),
     ("gptj", True)],
)
def test_rotary_detection_on_models(family, rotary):
    model = tiny_gptj(layers=1) if family == "gptj" else tiny_model(family, layers=1)
    assert uses_rotary_positions(model) is rotary
    assert rerun_position_mode(model) == ("stored" if rotary else "appended")
    assert rerun_position_mode(model, "appended") == "appended" and rerun_position_mode(model, "stored") == "stored"


def test_rotary_detection_from_the_config_alone():
    """A model without a rotary submodule (GPT-J before transformers 5.24 rotates inside its attention) is still
    detected from its config; ALiBi models are not rotary."""
    from transformers import FalconConfig, GPT2Config, GPTJConfig, LlamaConfig, OPTConfig

    class Bare(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

    assert uses_rotary_positions(Bare(GPTJConfig(n_layer=1, rotary_dim=8)))
    assert uses_rotary_positions(Bare(LlamaConfig(num_hidden_layers=1)))
    assert uses_rotary_positions(Bare(FalconConfig(num_hidden_layers=1, alibi=False)))
    assert not uses_rotary_positions(Bare(FalconConfig(num_hidden_layers=1, alibi=True)))
    assert not uses_rotary_positions(Bare(GPT2Config(n_layer=1)))
    assert not uses_rotary_positions(Bare(OPTConfig(num_hidden_layers=1)))


def test_stored_positions_need_only_the_context():
    """With stored positions the re-run stays at 0 .. N - 1: 9 tokens fit a 16-position Llama, appended ones do not."""
    model = _model("llama")
    model.config.max_position_embeddings = 16  # RoPE has no table: only the config's stated context changes
    ids = _ids(n=9)
    with pytest.raises(ValueError, match="context of 16"):
        deep_thinking(model, ids, steps=2, rerun_positions="appended", progress=False)
    result = deep_thinking(model, ids, steps=2, eta=0.3, progress=False)
    assert result.rerun_positions == "stored"
    assert_state(result.state, reference_states(model, ids, 2, 0.3, 0.9)[-1], "N = 9 of 16, stored")


# ------------------------------------------------------------------------------------------------
# (e) step selection on held-out data
# ------------------------------------------------------------------------------------------------

HELD_OUT_LABELS = [0, 1, 1, 0]


def _fake_scores(accuracies):
    """A stand-in for ``score_choices`` whose ``k``-th call predicts with accuracy ``accuracies[k]`` on
    ``HELD_OUT_LABELS``; records each call's state (cloned) and keyword arguments."""
    calls = []

    def fake(model, state, inputs, choices, **kw):
        acc = accuracies[len(calls)]
        calls.append((state.keys.clone(), state.values.clone(), kw))
        right = round(acc * len(HELD_OUT_LABELS))
        pred = [y if i < right else 1 - y for i, y in enumerate(HELD_OUT_LABELS)]
        return torch.nn.functional.one_hot(torch.tensor(pred), len(choices)).float()

    return fake, calls


def test_selection_picks_the_best_held_out_step_earliest_on_ties(monkeypatch):
    model, ids = model_of("gpt2"), _ids(seed=7)
    accuracies = [0.5, 0.75, 0.25, 0.75, 0.5]  # best 0.75 at steps 2 and 4: step 2
    fake, calls = _fake_scores(accuracies)
    monkeypatch.setattr(dt_module, "score_choices", fake)
    held_out = (_lists(4, 1, 3, seed=8), [[5], [6, 7]], HELD_OUT_LABELS)
    result = _run(model, ids, steps=5, eta=0.3, select_on=held_out, normalise=True, batch_size=3)
    assert result.history == [{"step": s + 1, "score": a} for s, a in enumerate(accuracies)]
    assert result.step == 2
    assert all(kw.get("normalise") is True and kw.get("batch_size") == 3 for *_, kw in calls)
    # each step was scored on that step's state
    expected = reference_states(model, ids, 5, 0.3, 0.9)
    for s, (keys, values, _) in enumerate(calls):
        assert torch.equal(keys, torch.stack([k for k, _ in expected[s]]))
        assert torch.equal(values, torch.stack([v for _, v in expected[s]]))
    # the returned state is step 2's, untouched by steps 3 .. 5, and equal to a run that stops at step 2
    assert_state(result.state, expected[1], "chosen state vs the reference loop at step 2")
    assert_state(result.state, _state_kv(_run(model, ids, steps=2, eta=0.3).state), "chosen vs steps=2")


def test_selection_first_step_and_all_ties(monkeypatch):
    model, ids = model_of("llama"), _ids(seed=9)
    held_out = (_lists(4, 1, 3, seed=10), [[5], [6]], HELD_OUT_LABELS)
    for accuracies, chosen in (([1.0, 0.5, 0.75], 1), ([0.5, 0.5, 0.5], 1), ([0.0, 0.25, 0.5], 3)):
        fake, _ = _fake_scores(accuracies)
        monkeypatch.setattr(dt_module, "score_choices", fake)
        result = _run(model, ids, steps=3, eta=0.3, select_on=held_out)
        assert result.step == chosen and [h["score"] for h in result.history] == accuracies
        assert_state(result.state, _state_kv(_run(model, ids, steps=chosen, eta=0.3).state), f"step {chosen}")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_selection_with_real_scores(family):
    """No stand-in: each history score is the held-out accuracy of that step's state (by ``score_choices`` on a run
    stopped there) and the returned state is the best step's."""
    model, ids = model_of(family), _ids(seed=11)
    inputs, choices = _lists(6, 1, 3, seed=12), [[5], [6, 7], [8]]
    labels = [0, 1, 2, 1, 0, 2]
    steps, eta = 4, 0.5
    result = _run(model, ids, steps=steps, eta=eta, beta=0.9, select_on=(inputs, choices, labels), batch_size=7)
    assert [h["step"] for h in result.history] == list(range(1, steps + 1))
    accuracy = []
    for s in range(1, steps + 1):
        state = _run(model, ids, steps=s, eta=eta).state
        pred = score_choices(model, state, inputs, choices, batch_size=7).argmax(-1)
        accuracy.append((pred == torch.tensor(labels)).float().mean().item())
    assert [h["score"] for h in result.history] == accuracy
    best = accuracy.index(max(accuracy)) + 1
    assert result.step == best
    assert_state(result.state, _state_kv(_run(model, ids, steps=best, eta=eta).state), "chosen state")


def test_without_selection_the_last_step():
    model, ids = model_of("gpt2"), _ids(seed=13)
    result = _run(model, ids, steps=3, eta=0.3)
    assert result.step == 3 and result.history == [{"step": s, "score": None} for s in (1, 2, 3)]
    assert_state(result.state, reference_states(model, ids, 3, 0.3, 0.9)[-1], "last step")


def test_returned_state_is_independent():
    """Two runs on the same model do not share memory, and the state survives later runs."""
    model, ids = model_of("gpt2"), _ids(seed=14)
    first = _run(model, ids, steps=2, eta=0.3).state
    keys = first.keys.clone()
    _run(model, _ids(seed=15), steps=3, eta=0.3)
    assert torch.equal(first.keys, keys)


# ------------------------------------------------------------------------------------------------
# (f) score_choices against by-hand log-probabilities
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def by_hand_pair(model, state, demo_ids, inputs, choices, full_context: bool):
    """:func:`by_hand_scores` on the model and on its float64 twin (with the state in float64)."""
    args = (demo_ids, inputs, choices, full_context)
    same = by_hand_scores(model, state, *args)
    return same, by_hand_scores(float64_twin(model), state.to(dtype=torch.float64), *args)


def by_hand_scores(model, state, demo_ids, inputs, choices, full_context: bool) -> torch.Tensor:
    """Summed log-probabilities, one (input, choice) at a time: ``full_context`` from the full prompt
    ``demonstrations ++ input ++ choice`` at positions ``0 ..`` with no cache; else from ``input ++ choice`` at
    positions ``N ..`` over a ``DynamicCache`` of the state."""
    out = torch.empty(len(inputs), len(choices), dtype=torch.promote_types(model.dtype, torch.float32))
    n = demo_ids.shape[0]
    for i, x in enumerate(inputs):
        for c, choice in enumerate(choices):
            seq = torch.tensor(list(x) + list(choice))
            if full_context:
                logits = model(input_ids=torch.cat([demo_ids, seq])[None]).logits[0, n:]
            else:
                past = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in _state_kv(state)])
                positions = torch.arange(n, n + len(seq))[None]
                logits = model(input_ids=seq[None], position_ids=positions, **cache_kwargs(past)).logits[0]
            logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
            k = len(choice)
            targets = seq[-k:]
            out[i, c] = logp[len(seq) - k - 1 : len(seq) - 1].gather(-1, targets[:, None]).sum()
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama", "gptj"])
def test_scores_of_the_prefix_cache_are_full_context_log_probs(family):
    model, ids = model_of(family), _ids(seed=16)
    state = _run(model, ids, steps=1).state
    inputs, choices = _lists(3, 1, 4, seed=17), [[5], [6, 7], [8, 9, 10]]  # multi-token choices
    expected, high = by_hand_pair(model, state, ids, inputs, choices, full_context=True)
    for batch_size in (1, 5):
        got = score_choices(model, state, inputs, choices, batch_size=batch_size)
        assert got.shape == (3, 3) and got.dtype == torch.float32
        check_close(f"batch_size {batch_size}", got, expected, high)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_token_choices_are_read_off_one_forward_per_input(family):
    """Label-word choices take the fast path (one forward per input, not per choice): same scores as by hand."""
    model, ids = model_of(family), _ids(seed=20)
    state = _run(model, ids, steps=3, eta=0.3).state
    inputs, choices = _lists(5, 1, 4, seed=21), [[5], [7], [9]]
    expected, high = by_hand_pair(model, state, ids, inputs, choices, full_context=False)
    for batch_size in (1, 2, 100):
        got = score_choices(model, state, inputs, choices, batch_size=batch_size, normalise=batch_size == 2)
        check_close(f"batch_size {batch_size}", got, expected, high)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scores_of_a_tuned_state(family):
    model, ids = model_of(family), _ids(seed=18)
    state = _run(model, ids, steps=3, eta=0.3).state
    inputs, choices = _lists(4, 1, 3, seed=19), [[5, 6], [7], [8, 9, 10]]
    expected, high = by_hand_pair(model, state, ids, inputs, choices, full_context=False)
    summed = {b: score_choices(model, state, inputs, choices, batch_size=b) for b in (1, 5, 100)}
    for b, got in summed.items():
        check_close(f"batch_size {b}", got, expected, high)
    # batching invariance: batched and padded rows at most 2x as far from the float64 oracle as one at a time
    check_close("batch_size 5 vs 1", summed[5], summed[1], high)
    check_close("batch_size 100 vs 5", summed[100], summed[5], high)
    # the tuned state scores differently from the prefix cache
    plain = score_choices(model, _run(model, ids, steps=1).state, inputs, choices, batch_size=5)
    assert (plain - summed[5]).abs().max() > 1e-3
    # normalise: each choice's sum over its length, the same rows batched the same way
    lengths = torch.tensor([len(c) for c in choices], dtype=torch.float32)
    for b in (1, 5):
        normalised = score_choices(model, state, inputs, choices, batch_size=b, normalise=True)
        assert torch.equal(normalised, summed[b] / lengths)
    # the pad token is masked
    other_pad = score_choices(model, state, inputs, choices, batch_size=5, pad_token_id=57)
    check_close("pad token 57", other_pad, summed[5], high)


def test_scores_progress_bar(capsys):
    model, ids = model_of("gpt2"), _ids(seed=20)
    state = _run(model, ids, steps=1).state
    quiet = score_choices(model, state, [[4, 5]], [[6], [7]], progress=False)
    loud = score_choices(model, state, [[4, 5]], [[6], [7]], progress=True)
    assert torch.equal(quiet, loud)
    assert "scoring" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# (g) save / load
# ------------------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
    model, ids = model_of("llama"), _ids(seed=21)
    state = _run(model, ids, steps=3, eta=0.3).state
    path = tmp_path / "dt.safetensors"
    state.save(path)
    loaded = CompressedDemonstrations.load(path)
    assert torch.equal(loaded.keys, state.keys) and torch.equal(loaded.values, state.values)
    assert loaded.method == "deep_thinking" and loaded.position_offset == N and loaded.num_tokens == N
    assert torch.equal(loaded.positions, state.positions) and torch.equal(loaded.input_ids, ids)
    assert loaded.geometry == state.geometry
    inputs, choices = _lists(3, 1, 3, seed=22), [[5], [6, 7]]
    for b in (1, 4):
        assert torch.equal(
            score_choices(model, loaded, inputs, choices, batch_size=b),
            score_choices(model, state, inputs, choices, batch_size=b),
        )


# ------------------------------------------------------------------------------------------------
# The Triton update under the interpreter (GPU: the real kernel)
# ------------------------------------------------------------------------------------------------


def test_triton_update_in_the_workflow(monkeypatch):
    """One layer, short N: the workflow with the Triton update kernel equals the torch backend's (bit-exact under the
    interpreter; on CUDA the kernel may fuse a multiply-add, so float32-tight), and the kernel did run."""
    from fastattn_icl._triton import deep_thinking as kernel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ids = _model("llama", layers=1).to(device), _ids(n=6, seed=23).to(device)
    calls = []
    real = kernel.deep_thinking_update_
    monkeypatch.setattr(kernel, "deep_thinking_update_", lambda *a: (calls.append(1), real(*a))[1])
    with fastattn_icl.use_backend("torch"):
        expected = _run(model, ids, steps=3, eta=0.3)
    assert not calls
    with fastattn_icl.use_backend("triton"):
        got = _run(model, ids, steps=3, eta=0.3)
    assert len(calls) == 2
    high = None if device == "cpu" else reference_states(float64_twin(model), ids, 3, 0.3, 0.9)[-1]
    assert_state(got.state, _state_kv(expected.state), "triton vs torch", high=high)


# ------------------------------------------------------------------------------------------------
# (h) errors, progress, training mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, True, 2.0, "3", None])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        deep_thinking(model_of("gpt2"), _ids(), steps=steps, progress=False)


@pytest.mark.parametrize("name", ["eta", "beta"])
@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_bad_coefficients(name, value):
    with pytest.raises(ValueError, match=name):
        deep_thinking(model_of("gpt2"), _ids(), steps=2, progress=False, **{name: value})


@pytest.mark.parametrize("name", ["eta", "beta"])
def test_coefficient_types(name):
    with pytest.raises(TypeError, match=name):
        deep_thinking(model_of("gpt2"), _ids(), steps=2, progress=False, **{name: "0.1"})


def test_bad_demonstrations():
    model = model_of("gpt2")
    with pytest.raises(ValueError, match="empty"):
        deep_thinking(model, torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="demo_ids"):
        deep_thinking(model, _ids()[None], progress=False)
    with pytest.raises(TypeError, match="demo_ids"):
        deep_thinking(model, _ids().float(), progress=False)
    with pytest.raises(TypeError, match="demo_ids"):
        deep_thinking(model, _ids().tolist(), progress=False)


def test_demonstrations_past_half_the_context():
    """The re-run places the N tokens at N .. 2N - 1: with 16 positions, 8 tokens fit and 9 do not."""
    model = _model("gpt2", n_positions=16)
    with pytest.raises(ValueError, match="context of 16"):
        deep_thinking(model, _ids(n=9), steps=2, progress=False)
    result = deep_thinking(model, _ids(n=8), steps=2, eta=0.3, progress=False)
    assert_state(result.state, reference_states(model, _ids(n=8), 2, 0.3, 0.9)[-1], "N = 8 of 16")


def test_score_choices_errors():
    model, ids = model_of("gpt2"), _ids(seed=24)
    state = _run(model, ids, steps=1).state
    for inputs, choices in (([[4]], []), ([[4]], [[5], []]), ([], [[5]]), ([[4]], [[]])):
        with pytest.raises(ValueError, match="non-empty|at least"):
            score_choices(model, state, inputs, choices)
    other = _run(model_of("llama"), ids, steps=1).state  # another geometry (kv heads)
    with pytest.raises(ValueError, match="does not fit"):
        score_choices(model, other, [[4]], [[5]])


def test_progress_bar(capsys):
    model, ids = model_of("gpt2"), _ids(seed=25)
    loud = deep_thinking(model, ids, steps=2, eta=0.3, progress=True)
    assert "deep thinking" in capsys.readouterr().err
    assert_state(loud.state, _state_kv(_run(model, ids, steps=2, eta=0.3).state), "progress=True")


def test_training_mode_is_restored(monkeypatch):
    """A model in training mode with dropout: the run is in eval mode (deterministic, equal to an eval-mode run)
    and the mode is restored afterwards, also when the run raises."""
    model = _model("gpt2", attn_pdrop=0.5, resid_pdrop=0.5, embd_pdrop=0.5)
    ids = _ids(seed=26)
    expected = _run(model.eval(), ids, steps=3, eta=0.3)
    model.train()
    got = _run(model, ids, steps=3, eta=0.3)
    assert model.training and all(m.training for m in model.modules())
    assert_state(got.state, _state_kv(expected.state), "train-mode model")
    _run(model, ids, steps=2, select_on=(_lists(2, 1, 2, seed=27), [[5], [6]], [0, 1]))  # scoring inside as well
    assert model.training and all(m.training for m in model.modules())
    model.train()

    def broken(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(dt_module, "score_choices", broken)
    with pytest.raises(RuntimeError, match="scoring failed"):
        _run(model, ids, steps=3, select_on=([[4]], [[5], [6]], [0]))
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    _run(model, ids, steps=2)
    assert not model.training


def test_select_on_is_checked_before_any_step():
    from fastattn_icl.methods import deep_thinking as run
    from tests.models import tiny_model

    model = tiny_model("gpt2", "eager", layers=1)
    ids = torch.arange(3, 13)
    with pytest.raises(ValueError, match="one label per held-out input"):
        run(model, ids, steps=2, select_on=([[5], [6]], [[7], [8]], [0]), progress=False)
    with pytest.raises(ValueError, match="must index the 2 choices"):
        run(model, ids, steps=2, select_on=([[5]], [[7], [8]], [2]), progress=False)
    with pytest.raises(TypeError, match="select_on must be a tuple"):
        run(model, ids, steps=2, select_on=[[5]], progress=False)
