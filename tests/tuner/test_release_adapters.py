"""Adapters saved by release 0.1 (tests/fixtures/adapters) load with the logits they gave then."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import hpr_peft
from support.models import make_tiny_causal_lm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "adapters"
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 23, 64]])
# The stored logits were computed on another machine: CPU kernels may round the last bit differently.
ACROSS_MACHINES = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "expected_logits.safetensors")


def _base_logits() -> torch.Tensor:
    with torch.no_grad():
        return make_tiny_causal_lm("llama")(INPUT_IDS).logits[0]


@pytest.mark.parametrize("name", ["identity", "random", "fitted"])
@pytest.mark.parametrize("loader", ["peft", "hpr_peft"])
def test_a_release_adapter_loads_with_the_logits_it_gave(name, loader, expected):
    base = make_tiny_causal_lm("llama")
    if loader == "peft":
        model = PeftModel.from_pretrained(base, FIXTURES / name)
    else:
        model = hpr_peft.load_adapter(base, str(FIXTURES / name))
    with torch.no_grad():
        logits = model.eval()(INPUT_IDS).logits[0]
    torch.testing.assert_close(logits, expected[name], **ACROSS_MACHINES)
    if name == "identity":
        assert torch.equal(logits, _base_logits())
    else:  # the fixture really edits, so matching it means something
        assert (logits - _base_logits()).abs().amax() > 0.04


def test_a_release_adapter_has_no_gain_and_loads_with_full_gain_without_warnings():
    from safetensors.torch import load_file as load_tensors

    saved = load_tensors(FIXTURES / "fitted" / "adapter_model.safetensors")
    assert saved and not any("hpr_gain" in key for key in saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys"
        model = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), FIXTURES / "fitted")
    layers = model.base_model.hpr_layers()
    assert sorted(layers) == [1, 2, 3]
    assert all(float(layer.hpr_gain["default"].weight) == 1.0 for layer in layers.values())
