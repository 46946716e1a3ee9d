"""The per-model controller: attached once, outside ``state_dict``, state restored on exit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import fastattn_icl
from fastattn_icl.integrations import ICLController, get_controller
from fastattn_icl.integrations.controller import CONTROLLER_ATTR, find_controller


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
    controller.set(eta=0.5)
    with controller.override(eta=0.9, beta=torch.zeros(3)):
        assert controller.get("eta") == 0.9 and controller.get("beta") is not None
        with controller.override(eta=None):
            assert controller.get("eta") is None
        assert controller.get("eta") == 0.9
    assert controller.layer_state(0) == {"eta": 0.5}
    with pytest.raises(KeyError):
        with controller.override(layers=[1], anchors=[3, 5]):
            assert controller.get("anchors", layer_idx=1) == [3, 5]
            raise KeyError("inside")
    assert controller.layer_state(1) == {"eta": 0.5}
    controller.clear()
    assert controller.is_empty()


def test_per_layer_lookup():
    controller = ICLController(num_layers=3)
    with controller.override(eta=0.1), controller.override(layers=[2], eta=0.7, isolate=True):
        assert controller.layer_state(0) == {"eta": 0.1}
        assert controller.layer_state(2) == {"eta": 0.7, "isolate": True}
        assert controller.layer_state(None) == {"eta": 0.1}
        assert controller.get("isolate", layer_idx=0) is None
        assert not controller.is_neutral(0)
    assert controller.is_empty() and controller.is_neutral(2)
    with controller.override(layers=(1,), eta=0.3):
        assert controller.is_neutral(0) and not controller.is_neutral(1)


@pytest.mark.parametrize(
    "layers, error",
    [([3], ValueError), ([-1], ValueError), (["0"], TypeError), ("01", TypeError), (1, TypeError), ([True], TypeError)],
)
def test_bad_layer_indices_raise(layers, error):
    controller = ICLController(num_layers=3)
    with pytest.raises(error):
        with controller.override(layers=layers, eta=0.1):
            pass
    assert controller.is_empty()


def test_state_the_seam_does_not_implement_is_refused_not_ignored():
    model = _gpt2()
    ids = torch.randint(0, 100, (1, 5))
    with fastattn_icl.integrations.enabled(model) as controller, torch.no_grad():
        assert controller is get_controller(model)
        model(ids)
        with controller.override(layers=[1], not_a_method=1.0):
            with pytest.raises(NotImplementedError, match=r"\['not_a_method'\] is set for layer 1"):
                model(ids)
        model(ids)
