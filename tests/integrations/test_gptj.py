"""GPT-J through the attention seam (:func:`fastattn_icl.integrations.gptj.patch_gptj`) against the
unpatched eager model: logits and parameter gradients for a prefill and for a prefill followed by cached
decode steps, with and without left padding; the revert; the errors.

The installed transformers decides which path runs (``ROUTED``, detected on ``GPTJAttention``): routed
GPT-J (5.24+) switches the attention implementation, eager-core GPT-J (e.g. 5.17) gets the instance
patch of ``_attn``. The comparisons with eager run on both; tests of one path's mechanics are marked
``instance_patch_only`` / ``routed_only``. CI runs both paths (two environments in ``.ci/run``).

Tolerance, as in ``test_models.py``: the rule of ``fastattn_icl.testing``, the float32 eager model the
same-dtype reference and its float64 twin the oracle (factor 2 for logits and weights, 3 for gradients). Only
non-padded positions are compared: eager spreads a fully masked (left-pad) query row uniformly over the keys, the
seam returns 0 there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.models.gptj.modeling_gptj import GPTJAttention

import fastattn_icl
from fastattn_icl.integrations import get_controller
from fastattn_icl.integrations import transformers as seam
from fastattn_icl.integrations.controller import find_controller
from fastattn_icl.integrations.gptj import (
    GPTJPatch,
    _fastattn_icl_attn,
    is_patched,
    patch_gptj,
)
from fastattn_icl.testing import check_close
from tests import models
from tests.models import (
    PAD,
    ROUTED,
    VOCAB,
    check_grads,
    float64_twin,
    make_inputs,
    positions,
    swap_seam,
    tiny_gptj,
)

PREFILL, DECODE_STEPS = 10, 4
instance_patch_only = pytest.mark.skipif(ROUTED, reason="this transformers routes GPT-J: there is no _attn to patch")
routed_only = pytest.mark.skipif(not ROUTED, reason="this transformers' GPT-J has its own eager core (_attn)")


def run_prefill(model, ids, mask):
    logits, grads = models.run_prefill(model, ids, mask)
    return [logits], grads


def run_decode(model, ids, mask, tokens=None):
    if tokens is None:
        tokens = torch.randint(3, VOCAB, (ids.shape[0], DECODE_STEPS), generator=torch.Generator().manual_seed(3))
    return models.run_decode(model, ids, mask, tokens)


RUNS = {"prefill": run_prefill, "decode": run_decode}


@pytest.fixture
def seam_calls(monkeypatch):
    """Per call of the seam from a patched GPT-J: (layer_idx, controller, mask, scaling, query dtype)."""
    calls = []
    original = seam.fastattn_icl_attention_forward

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        calls.append((module.layer_idx, find_controller(module), attention_mask, scaling, query.dtype))
        return original(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    swap_seam(monkeypatch, recording)
    return calls


def check_against_eager(model, run, padded: bool, seam_calls, backend: str = "torch", length: int = PREFILL):
    ids, mask = make_inputs(2, length, padded)
    ref_steps, ref_grads = run(model, ids, mask)
    high_steps, high_grads = run(float64_twin(model), ids, mask)
    assert ref_steps[0].abs().max() > 0.5, "random weights too small for a meaningful comparison"
    with patch_gptj(model), fastattn_icl.use_backend(backend):
        steps, grads = run(model, ids, mask)
    layers = model.config.n_layer
    assert [c[0] for c in seam_calls] == list(range(layers)) * len(steps)
    head_dim = model.config.n_embd // model.config.n_head
    for _, _, attention_mask, scaling, dtype in seam_calls:
        assert scaling == pytest.approx(head_dim**-0.5, rel=1e-15)
        assert dtype == torch.float32
        if padded:  # compact key padding [B, Tk], never a 4D mask
            assert attention_mask.dtype == torch.bool and attention_mask.dim() == 2
            assert not attention_mask[1, :PAD].any() and attention_mask[:, PAD:].all()
        else:
            assert attention_mask is None
    for i, (logits, ref, high) in enumerate(zip(steps, ref_steps, high_steps)):
        check_close(f"logits of step {i}", logits, ref, high)
    check_grads(grads, ref_grads, high_grads)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("mode", list(RUNS))
def test_matches_eager(mode, padded, seam_calls):
    check_against_eager(tiny_gptj(), RUNS[mode], padded, seam_calls)


def test_head_dim_256_matches_eager(seam_calls):
    """GPT-J-6B's head dimension (256) with its partial rotary (64 of 256 features)."""
    model = tiny_gptj(layers=1, n_embd=512, n_head=2, rotary_dim=64)
    check_against_eager(model, run_prefill, True, seam_calls, length=9)


def test_triton_backend_matches_eager(seam_calls):
    """The fused kernel (the Triton interpreter without a GPU) in a cached decode with left padding."""
    model = tiny_gptj(layers=1)
    check_against_eager(model, run_decode, True, seam_calls, backend="triton", length=8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_logits_beyond_the_float16_range(backend, monkeypatch):
    """GPT-J upcasts q and k to float32 because q kᵀ can overflow in half precision; the seam gets them in
    float16 and accumulates in float32. With q·k up to ~1e5 (> 65504) both match a float64 model equally
    (``fastattn_icl.testing`` rule: at most 2x the eager float16 error + eps)."""
    ref64 = tiny_gptj(layers=1).double()
    attn = ref64.transformer.h[0].attn
    with torch.no_grad():
        attn.q_proj.weight.mul_(100)
        attn.k_proj.weight.mul_(100)
    model16 = copy.deepcopy(ref64).half()
    ids, mask = make_inputs(2, 10, padded=True)
    pos, keep = positions(mask), mask.bool()
    seen = []
    original = seam.fastattn_icl_attention_forward

    def recording(module, query, key, *args, **kwargs):
        seen.append((query.dtype, key.dtype, torch.isinf(query @ key.transpose(-1, -2)).any().item()))
        return original(module, query, key, *args, **kwargs)

    swap_seam(monkeypatch, recording)
    with torch.no_grad():
        ref = ref64(ids, attention_mask=mask, position_ids=pos).logits[keep]
        eager = model16(ids, attention_mask=mask, position_ids=pos).logits[keep]
        with patch_gptj(model16), fastattn_icl.use_backend(backend):
            out = model16(ids, attention_mask=mask, position_ids=pos).logits[keep]
    assert seen == [(torch.float16, torch.float16, True)], "a float16 q kᵀ overflows on these inputs"
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    check_close("float16 logits", out, eager, ref)


def test_gradient_checkpointing_matches_eager(seam_calls):
    model = tiny_gptj()
    ids, mask = make_inputs(2, PREFILL, padded=True)
    ref_steps, ref_grads = run_prefill(model, ids, mask)
    high_steps, high_grads = run_prefill(float64_twin(model), ids, mask)
    # activation_checkpointing_enable is new after transformers 5.17, which the GPU machines carry
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    with patch_gptj(model):
        steps, grads = run_prefill(model, ids, mask)
    assert [c[0] for c in seam_calls] == [0, 1, 1, 0], "forward, then the recomputation in the backward"
    check_close("logits", steps[0], ref_steps[0], high_steps[0])
    check_grads(grads, ref_grads, high_grads)


def test_generate_matches_eager():
    model = tiny_gptj()
    ids, mask = make_inputs(2, 7, padded=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        with patch_gptj(model):
            out = model.generate(ids, **kwargs)
    assert torch.equal(out, ref)


def test_output_attentions_returns_weights():
    model = tiny_gptj()
    ids, mask = make_inputs(2, 10, padded=True)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
        twin = float64_twin(model)
        high = twin(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
        with patch_gptj(model):
            out = model(ids, attention_mask=mask, position_ids=positions(mask), output_attentions=True).attentions
            if not ROUTED:  # without the flag the patched core returns no weights
                assert model.transformer.h[0].attn._attn(*[torch.randn(1, 4, 3, 16)] * 3)[1] is None
    assert len(out) == len(ref) == 2
    keep = mask.bool()
    for weights, ref_weights, high_weights in zip(out, ref, high):
        assert weights.shape == ref_weights.shape == (2, 4, 10, 10)
        rows = lambda w: w.transpose(1, 2)[keep]  # noqa: E731
        check_close("attention weights", rows(weights), rows(ref_weights), rows(high_weights))
    assert torch.all(out[0][1, :, :PAD] == 0), "rows of left-pad queries see no key: all-zero weights"


def _snapshot(module: torch.nn.Module) -> dict:
    """Every instance attribute by identity, plus the contents of the hook registries."""
    hooks = {
        name: list(getattr(module, name).items() if isinstance(getattr(module, name), dict) else getattr(module, name))
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
        )
    }
    return {"dict": dict(module.__dict__), "hooks": hooks}


def _assert_same(module: torch.nn.Module, before: dict) -> None:
    now = _snapshot(module)
    assert now["dict"].keys() == before["dict"].keys()
    for name, value in before["dict"].items():
        assert now["dict"][name] is value, f"{type(module).__name__}.{name} changed"
    assert now["hooks"] == before["hooks"]


@instance_patch_only
def test_revert_restores_modules_exactly():
    model = tiny_gptj()
    other = tiny_gptj(seed=1)
    ids, mask = make_inputs(2, 10, padded=True)
    watched = [m for m in model.modules() if isinstance(m, GPTJAttention)] + [model.transformer]
    before = {m: _snapshot(m) for m in watched}
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        high = float64_twin(model)(ids, attention_mask=mask).logits
        handle = patch_gptj(model)
        assert isinstance(handle, GPTJPatch) and handle.active
        assert len(handle.modules) == 2
        for module in handle.modules:
            assert module._attn.__func__ is _fastattn_icl_attn and module._attn.__self__ is module
        assert GPTJAttention.__dict__["_attn"] is not _fastattn_icl_attn
        assert "_attn" not in other.transformer.h[0].attn.__dict__, "another model was touched"
        patched = model(ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "eager", "the mask switch is scoped to the forward"
        handle.revert()
        assert not handle.active
        for module in watched:
            _assert_same(module, before[module])
            assert not isinstance(module, GPTJAttention) or module._attn.__func__ is GPTJAttention._attn
        assert torch.equal(model(ids, attention_mask=mask).logits, eager)
        handle.revert()  # idempotent
        for module in watched:
            _assert_same(module, before[module])
    keep = mask.bool()
    check_close("logits", patched[keep], eager[keep], high[keep])


def test_context_manager_reverts_on_exception():
    model = tiny_gptj()
    before = {m: _snapshot(m) for m in model.modules() if isinstance(m, GPTJAttention)}
    with pytest.raises(RuntimeError, match="boom"):
        with patch_gptj(model) as handle:
            assert handle.active
            raise RuntimeError("boom")
    assert not handle.active
    for module, snapshot in before.items():
        _assert_same(module, snapshot)
    assert model.config._attn_implementation == "eager"


@routed_only
def test_routed_patch_switches_the_implementation_and_back(seam_calls):
    """On a routed GPT-J the handle is a switch of ``attn_implementation``; the modules are not touched,
    the recomputation of gradient checkpointing and ``generate`` see the seam, ``revert`` restores the
    previous implementation (whichever it was), and ``enable`` needs no patch at all."""
    model = tiny_gptj()
    before = {m: _snapshot(m) for m in model.modules() if isinstance(m, GPTJAttention)}
    ids, mask = make_inputs(2, 6, padded=True)
    for previous in ("eager", "sdpa"):
        model.set_attn_implementation(previous)
        with patch_gptj(model) as handle:
            assert handle.routed and handle.active and len(handle.modules) == 2
            assert model.config._attn_implementation == seam.ATTN_IMPLEMENTATION
            assert "routed" in repr(handle)
            with torch.no_grad():
                model(ids, attention_mask=mask)
        assert model.config._attn_implementation == previous and not handle.active
        handle.revert()  # idempotent
        assert model.config._attn_implementation == previous
    assert [c[0] for c in seam_calls] == [0, 1, 0, 1]
    for module, snapshot in before.items():
        _assert_same(module, snapshot)
    model.set_attn_implementation("eager")
    fastattn_icl.integrations.enable(model)
    assert model.config._attn_implementation == seam.ATTN_IMPLEMENTATION
    assert not any(is_patched(m) for m in model.modules())
    assert "_fastattn_icl_gptj_patch" not in model.__dict__, "a routed GPT-J needs no patch handle"


@instance_patch_only
def test_forward_error_restores_config_and_rejects_4d_masks():
    model = tiny_gptj()
    ids, _ = make_inputs(2, 6, padded=False)
    with patch_gptj(model):
        with pytest.raises(NotImplementedError, match="4D attention mask"):
            model(ids, attention_mask=torch.zeros(2, 1, 6, 6))
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            model(ids)  # still patched and working after the error


@instance_patch_only
def test_layer_idx_filled_in_and_restored(seam_calls):
    model = tiny_gptj()
    attns = [block.attn for block in model.transformer.h]
    for attn in attns:
        attn.layer_idx = None
    ids, _ = make_inputs(1, 5, padded=False)
    with patch_gptj(model), torch.no_grad():
        assert [attn.layer_idx for attn in attns] == [0, 1]
        model(ids, use_cache=False)
    assert [c[0] for c in seam_calls] == [0, 1]
    assert [attn.layer_idx for attn in attns] == [None, None]


def test_controller_reaches_the_seam(seam_calls):
    model = tiny_gptj()
    controller = get_controller(model)
    ids, _ = make_inputs(1, 5, padded=False)
    with patch_gptj(model), torch.no_grad():
        model(ids)
    assert [(c[0], c[1]) for c in seam_calls] == [(0, controller), (1, controller)]


def test_patching_twice_raises():
    model = tiny_gptj()
    with patch_gptj(model):
        with pytest.raises(RuntimeError, match="already patched"):
            patch_gptj(model)
        if ROUTED:  # the implementation is the whole model's: a block cannot be switched on its own
            with pytest.raises(TypeError, match="not a transformers model"):
                patch_gptj(model.transformer.h[1])
        else:
            with pytest.raises(RuntimeError, match="already patched"):
                patch_gptj(model.transformer.h[1])
    with patch_gptj(model) as handle:  # fine again after the revert
        assert handle.active


def test_rejects_what_it_cannot_patch():
    with pytest.raises(TypeError, match="no GPT-J attention"):
        patch_gptj(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        patch_gptj("model")
    with pytest.raises(ValueError, match="head_dim"):
        patch_gptj(tiny_gptj(layers=1, n_embd=48, n_head=4, rotary_dim=4))  # head dim 12
    config = tiny_gptj(layers=1).config
    if ROUTED:
        with pytest.raises(TypeError, match="not a transformers model"):
            patch_gptj(torch.nn.ModuleList([GPTJAttention(config, layer_idx=0)]))
        model = tiny_gptj(layers=1)
        model.set_attn_implementation(seam.ATTN_IMPLEMENTATION)
        with pytest.raises(RuntimeError, match="already patched"):
            patch_gptj(model)
        return

    class OwnForward(GPTJAttention):  # e.g. transformers' flash-attention subclass: never calls _attn
        def forward(self, *args, **kwargs):
            raise AssertionError("not reached")

    with pytest.raises(NotImplementedError, match="eager"):
        patch_gptj(torch.nn.ModuleList([OwnForward(config, layer_idx=0)]))
    model = tiny_gptj(layers=1)
    model.transformer.h[0].attn._attn = lambda *args: None
    with pytest.raises(NotImplementedError, match="instance-level _attn"):
        patch_gptj(model)


def test_attention_dropout_in_training_raises():
    model = tiny_gptj(attn_pdrop=0.1).train()
    ids, _ = make_inputs(2, 6, padded=False)
    with patch_gptj(model), pytest.raises(NotImplementedError, match="dropout"):
        model(ids)
    assert model.config._attn_implementation == "eager"
