"""The per-model controller: attached once, outside ``state_dict``, state restored on exit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import fastattn_icl
from fastattn_icl.integrations import AnchorState, ICLController, IsolationState, get_controller
from fastattn_icl.integrations.controller import CONTROLLER_ATTR, find_controller
from fastattn_icl.ops import Saliency


def _gpt2():
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_get_controller_attaches_one_controller_outside_the_state_dict():
    model = _gpt2()
    keys = set(model.state_dict())
    controller = get_controller(model)
    assert isinstance(controller, ICLController) and controller.num_layers == 2
    assert get_controller(model) is controller
    assert set(model.state_dict()) == keys
    assert controller not in list(model.modules())
    attention_modules = [m for m in model.modules() if type(m).__name__ == "GPT2Attention"]
    assert len(attention_modules) == 2
    assert all(find_controller(m) is controller for m in attention_modules)
    assert find_controller(torch.nn.Linear(2, 2)) is None
    assert getattr(model, CONTROLLER_ATTR) is controller


def test_override_restores_previous_state_also_on_exceptions():
    controller = ICLController(num_layers=4)
    iso, other = IsolationState(torch.tensor([[3]])), IsolationState(torch.tensor([[5]]))
    request = Saliency(torch.tensor([[1]]), 2)
    controller.set(isolation=iso)
    with controller.override(isolation=other, saliency=request):
        assert controller.get("isolation") is other and controller.get("saliency") is request
        with controller.override(isolation=None):
            assert controller.get("isolation") is None and controller.methods(0).isolation is None
        assert controller.get("isolation") is other
        assert controller.methods(0).isolation.used_positions == (5,) and controller.methods(0).saliency is request
    assert controller.layer_state(0) == {"isolation": iso}
    with pytest.raises(KeyError):
        with controller.override(layers=[1], saliency=request):
            assert controller.get("saliency", layer_idx=1) is request and controller.methods(1).saliency is request
            raise KeyError("inside")
    assert controller.layer_state(1) == {"isolation": iso} and controller.methods(1).saliency is None
    controller.clear()
    assert controller.is_empty() and controller.methods(0).is_plain


def test_per_layer_lookup():
    controller = ICLController(num_layers=3)
    with controller.override(momentum=0.1), controller.override(layers=[2], momentum=0.7):
        assert controller.layer_state(0) == {"momentum": 0.1}
        assert controller.layer_state(2) == {"momentum": 0.7}
        assert controller.layer_state(None) == {"momentum": 0.1}
        assert [controller.methods(i).momentum for i in (0, 1, 2, None)] == [0.1, 0.1, 0.7, 0.1]
        assert controller.get("saliency", layer_idx=0) is None
        assert not controller.is_neutral(0)
    assert controller.is_empty() and controller.is_neutral(2)
    with controller.override(layers=(1,), momentum=0.3):
        assert controller.is_neutral(0) and not controller.is_neutral(1)


@pytest.mark.parametrize(
    "state, error, message",
    [
        ({"momentum": 1.5}, ValueError, r"eta must be in \[0, 1\)"),
        ({"anchors": AnchorState(torch.tensor([[1, 1]]), torch.tensor([[0, 0]]))}, ValueError, "must not repeat"),
        ({"anchors": AnchorState(torch.tensor([[1]]), torch.tensor([[-1]]))}, ValueError, r"classes must be in \[0,"),
        ({"beta": torch.zeros(3, 2)}, TypeError, r"\[L, H, C\]"),
        ({"isolation": IsolationState(torch.tensor([[3]]), window=-1)}, ValueError, "window must be an int >= 0"),
        ({"isolation": IsolationState(torch.tensor([[3]]), window=1.0)}, TypeError, "window must be an int >= 0"),
        ({"isolation": IsolationState(torch.tensor([[-2]]))}, ValueError, r"positions >= 0 or -1 .* \[\[-2\]\]"),
        ({"saliency": "labels"}, TypeError, "saliency must be a fastattn_icl.ops.Saliency"),
    ],
)
def test_bad_state_raises_when_it_is_set_and_leaves_the_previous_state(state, error, message):
    controller = ICLController(num_layers=3)
    controller.set(layers=[1], isolation=IsolationState(torch.tensor([[4]])))
    before = controller.layer_state(1), controller.methods(1)
    with pytest.raises(error, match=message):
        controller.set(**state)
    with pytest.raises(error, match=message):
        with controller.override(**state):
            pytest.fail("a bad state was accepted")
    assert (controller.layer_state(1), controller.methods(1)) == before and controller.layer_state(0) == {}


@pytest.mark.parametrize(
    "layers, error",
    [([3], ValueError), ([-1], ValueError), (["0"], TypeError), ("01", TypeError), (1, TypeError), ([True], TypeError)],
)
def test_bad_layer_indices_raise(layers, error):
    controller = ICLController(num_layers=3)
    with pytest.raises(error):
        with controller.override(layers=layers, momentum=0.1):
            pass
    assert controller.is_empty()


def test_state_the_seam_does_not_implement_is_refused_not_ignored():
    model = _gpt2()
    ids = torch.randint(0, 100, (1, 5))
    with fastattn_icl.integrations.enabled(model) as controller, torch.no_grad():
        assert controller is get_controller(model)
        model(ids)
        with pytest.raises(NotImplementedError, match=r"\['not_a_method'\] is set for layer 1"):
            with controller.override(layers=[1], not_a_method=1.0):
                pytest.fail("state the seam does not implement was accepted")
        assert controller.is_empty()
        model(ids)


def test_anchors_and_beta_can_be_set_in_two_steps_or_nested():
    """An incomplete combination is accepted when set (each value checked); a forward raises while it lasts."""
    controller = ICLController(num_layers=2)
    anchors, beta = AnchorState(torch.tensor([[2]]), torch.tensor([[1]])), torch.zeros(2, 4, 2)
    controller.set(anchors=anchors)
    assert controller.methods(0).missing == "beta" and controller.methods(0).reweighting is None
    controller.set(beta=beta)
    assert controller.methods(0).missing is None and controller.methods(1).reweighting.beta is beta
    controller.clear()
    with controller.override(beta=beta):
        assert controller.methods(0).missing == "anchors"
        with controller.override(anchors=anchors):
            assert controller.methods(1).reweighting is not None
        assert controller.methods(1).missing == "anchors"
    with controller.override(anchors=anchors), pytest.raises(ValueError, match=r"classes must be in \[0, C=1\)"):
        controller.set(beta=torch.zeros(2, 4, 1))  # checked against the anchors when the pair is complete
    assert controller.is_empty()


def test_a_value_is_checked_once_per_set_not_once_per_layer(monkeypatch):
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    controller = ICLController(num_layers=4)
    anchors = AnchorState(torch.tensor([[2, 3]]), torch.tensor([[0, 1]]))
    controller.set(anchors=anchors, beta=torch.zeros(4, 2, 2))
    controller.set(layers=[0, 1, 2, 3], beta=torch.ones(4, 2, 2))
    assert len(reads) == 1, "the anchors were read again for each layer or set"
    iso = IsolationState(torch.tensor([[1]]))
    controller.set(layers=[1, 2], isolation=iso)
    assert len(reads) == 2
    assert controller.methods(1).isolation is controller.methods(2).isolation
    assert controller.methods(0).reweighting.copies is controller.methods(3).reweighting.copies
    controller.set(anchors=anchors)  # passed again: captured again
    assert len(reads) == 3
