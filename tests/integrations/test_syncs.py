"""No device-to-host sync in the seam's per-layer path once method state was validated at entry.

On a GPU every ``Tensor.item`` / ``tolist`` / ``bool(tensor)`` in an attention call stalls the stream in every layer
(``torch.cuda.set_sync_debug_mode("error")`` turns such a stall into an error there). On CPU the same reads are
counted by patching the ``Tensor`` methods that copy a value to the host, around each call of the seam only: the
forward's one mask check (``fastattn_icl_mask``) and the checks made when a context manager is entered are outside.
Checks of the attention mask itself (that padding hides no label word, no prefix column) read it once per forward,
in the first layer: every layer gets the same mask object.

A host-to-device copy is a sync too on a GPU (a blocking copy of pageable memory waits for the device): state whose
tensors live on the CPU while the model runs on the GPU is copied there once, on first use, never per layer. On CPU
the copies are counted with the ``meta`` device standing for the GPU; on a GPU the ``gpu`` test runs each state
under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from fastattn_icl.integrations import (
    ATTN_IMPLEMENTATION,
    AnchorState,
    AttentionRowProbe,
    ICLController,
    IsolationState,
    get_controller,
)
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.integrations.controller import CONTROLLER_ATTR
from fastattn_icl.integrations.momentum_cache import MomentumCache
from fastattn_icl.integrations.prefix_cache import SharedPrefixCache
from fastattn_icl.integrations.transformers import fastattn_icl_attention_forward, fastattn_icl_mask
from fastattn_icl.ops import Saliency, _torch_backend, backend
from tests.integrations.test_models import make_inputs, positions, tiny_model

COUNTING = "fastattn_icl_sync_count"
T = 10
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


class _SyncCounter:
    """Counts host reads of tensor values made inside the seam, per call (one call = one layer)."""

    def __init__(self):
        self.per_call: list[int] = []
        self._active = False

    def seam(self, *args, **kwargs):
        self.per_call.append(0)
        self._active = True
        try:
            return fastattn_icl_attention_forward(*args, **kwargs)
        finally:
            self._active = False

    def wrap(self, name):
        original = getattr(torch.Tensor, name)

        def counted(tensor, *args, **kwargs):
            if self._active:
                self.per_call[-1] += 1
            return original(tensor, *args, **kwargs)

        return original, counted


    def uncounted(self, fn):
        """``fn`` with counting paused: a CPU kernel of the plain-PyTorch backend reads host memory, which is no sync
        (on a GPU the Triton kernels run instead, and the ``gpu`` test below holds them to the same rule)."""

        def call(*args, **kwargs):
            active, self._active = self._active, False
            try:
                return fn(*args, **kwargs)
            finally:
                self._active = active

        return call


@pytest.fixture
def sync_counter(monkeypatch):
    counter = _SyncCounter()
    AttentionInterface.register(COUNTING, counter.seam)
    AttentionMaskInterface.register(COUNTING, fastattn_icl_mask)
    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counter.wrap(name)[1])
    for name in (*backend._TRITON_MODULE, *backend._TORCH_ONLY):  # what ops.backend.kernel() hands out, at each call
        monkeypatch.setattr(_torch_backend, name, counter.uncounted(getattr(_torch_backend, name)))
    return counter


def _anchors(L, H):
    anchors = AnchorState(torch.tensor([[2, 4, -1]]), torch.tensor([[0, 1, 0]]), reweight_from=5)
    return {"anchors": anchors, "beta": torch.randn(L, H, 2, generator=torch.Generator().manual_seed(0))}


STATES = {
    "anchors": _anchors,
    "isolation": lambda L, H: {"isolation": IsolationState(torch.tensor([[3, -1]]), window=1)},
    "momentum": lambda L, H: {"momentum": 0.5},
    "attention_row": lambda L, H: {"attention_row": AttentionRowProbe(torch.tensor([[2, 4]]))},
    "saliency": lambda L, H: {"saliency": Saliency(torch.tensor([[4, 6]]), T - 1)},
}


@pytest.mark.parametrize("name", sorted(STATES))
def test_no_host_sync_per_layer_for_state_validated_at_entry(name, sync_counter):
    model = tiny_model("llama")
    model.set_attn_implementation(COUNTING)
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    ids, mask = make_inputs(2, T, padded=True)
    pos = positions(mask)
    with get_controller(model).override(**STATES[name](L, H)):
        if name == "saliency":
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        else:
            with torch.no_grad():
                cache = MomentumCache() if name == "momentum" else None
                out = model(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1], use_cache=True,
                            **cache_kwargs(cache))
                model(ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:], use_cache=True,
                      **cache_kwargs(output_cache(out)))
    calls = sync_counter.per_call
    if name == "saliency":  # the first layer checks the positions against T, once, and the padding mask
        assert len(calls) == L and calls[0] == 2 and calls[1:] == [0] * (L - 1), f"host syncs per layer call: {calls}"
    else:
        assert calls == [0] * (2 * L), f"host syncs per layer call: {calls}"


def test_no_host_sync_per_layer_with_a_shared_prefix(sync_counter):
    model = tiny_model("llama")
    L, M = model.config.num_hidden_layers, 4
    ids = torch.randint(3, 100, (2, M + 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefix = output_cache(model(ids[:1, :M], use_cache=True))
        keys = torch.stack([layer.keys for layer in prefix.layers])
        values = torch.stack([layer.values for layer in prefix.layers])
        cache = SharedPrefixCache(M, L)
        mask = torch.ones(2, M + 3, dtype=torch.long)
        mask[1, M] = 0  # a padded row: the seam gets a key-padding mask and checks the prefix columns
        with cache.bound(model, keys, values, check_mask=True):
            model.set_attn_implementation(COUNTING)
            model(ids[:, M:], attention_mask=mask, position_ids=torch.arange(M, M + 3).expand(2, -1),
                  use_cache=True, **cache_kwargs(cache))
    assert sync_counter.per_call == [1] + [0] * (L - 1), f"host syncs per layer call: {sync_counter.per_call}"


class _HostToDevice(_SyncCounter):
    """Counts host-to-device copies made inside the seam, per call: ``Tensor.to`` / ``copy_`` / ``cuda`` from a CPU
    tensor to another device, and ``torch.tensor`` / ``torch.as_tensor`` onto another device. On a GPU such a copy
    of pageable memory waits for the device."""

    def __init__(self, monkeypatch):
        self.per_call: list[int] = []
        self._active = False
        to, copy_, cuda = torch.Tensor.to, torch.Tensor.copy_, torch.Tensor.cuda
        tensor, as_tensor = torch.tensor, torch.as_tensor

        def count(copied: bool) -> None:
            if self._active and copied:
                self.per_call[-1] += 1

        def counted_to(t, *args, **kwargs):
            out = to(t, *args, **kwargs)
            count(t.device.type == "cpu" and out.device.type != "cpu")
            return out

        def counted_copy(dst, src, *args, **kwargs):
            count(isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type != "cpu")
            return copy_(dst, src, *args, **kwargs)

        def counted_cuda(t, *args, **kwargs):
            count(t.device.type == "cpu")
            return cuda(t, *args, **kwargs)

        def factory(make):
            def counted(data, *args, **kwargs):
                out = make(data, *args, **kwargs)
                count(out.device.type != "cpu" and not (isinstance(data, torch.Tensor) and data.device == out.device))
                return out

            return counted

        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
        monkeypatch.setattr(torch.Tensor, "cuda", counted_cuda)
        monkeypatch.setattr(torch, "tensor", factory(tensor))
        monkeypatch.setattr(torch, "as_tensor", factory(as_tensor))


def _layers(controller, L):
    modules = []
    for i in range(L):
        module = torch.nn.Module()
        module.layer_idx = i
        object.__setattr__(module, CONTROLLER_ATTR, controller)
        modules.append(module)
    return modules


@pytest.mark.parametrize("name", sorted(set(STATES) - {"saliency"}))
def test_state_on_the_host_is_copied_to_the_device_once(name, monkeypatch):
    """State whose index tensors (or an int ``reweight_from``) live on the CPU while the model runs elsewhere: the
    seam copies them to the model's device on first use there, then never again (a copy per layer would wait for
    the device in every layer). The ``meta`` device stands for a GPU: the seam's per-layer path runs on it without
    reading values. ``beta`` is read live (it is trained in place) and lives on the model's device, as in
    ``AnchorReweighting``. The saliency request builds its per-device tables once, with checks that read values,
    so it is counted on a real GPU only (below)."""
    L, B, H, D = 3, 2, 4, 8
    controller = ICLController(num_layers=L)
    state = STATES[name](L, H)
    if "beta" in state:
        state["beta"] = state["beta"].to("meta")
    counter = _HostToDevice(monkeypatch)
    modules = _layers(controller, L)
    with controller.override(**state), controller.override(layers=[1], **state):
        for Tq in (T - 1, 1):  # a prefill, then a decode step
            for module in modules:
                q = torch.empty(B, H, Tq, D, device="meta")
                k = torch.empty(B, H, T, D, device="meta")
                mask = torch.ones(B, T, dtype=torch.bool, device="meta")
                counter.seam(module, q, k, k, mask, scaling=None)
    calls = counter.per_call
    assert calls[1:] == [0] * (2 * L - 1) and calls[0] <= 3, f"host-to-device copies per layer call: {calls}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(STATES))
def test_no_sync_per_layer_on_a_gpu(name):
    """Each state, its index tensors on the CPU (``beta`` on the GPU), through a model on CUDA: after a first
    forward (the device copies, the kernels' compilation and tuning, the saliency checks), a second identical one
    runs every layer's seam under ``torch.cuda.set_sync_debug_mode("error")``, so any sync there raises."""
    model = tiny_model("llama").cuda()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    state = STATES[name](L, H)
    if "beta" in state:
        state["beta"] = state["beta"].cuda()
    ids = make_inputs(2, T, padded=False)[0].cuda()

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fastattn_icl_attention_forward(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def forward():
        if name == "saliency":
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, use_cache=False)
            return
        with torch.no_grad():
            cache = MomentumCache() if name == "momentum" else None
            out = model(ids[:, :-1], use_cache=True, **cache_kwargs(cache))
            model(ids[:, -1:], use_cache=True, **cache_kwargs(output_cache(out)))

    with get_controller(model).override(**state):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        forward()
        AttentionInterface.register(COUNTING, strict)
        AttentionMaskInterface.register(COUNTING, fastattn_icl_mask)
        model.set_attn_implementation(COUNTING)
        forward()
