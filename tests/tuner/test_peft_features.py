"""PEFT features that do not apply to HPR answer with HPR's own reason; HPR on a LoRA fine-tune works."""

from __future__ import annotations

import pytest
import torch
from peft import LoHaConfig, LoraConfig, PeftMixedModel, PeftModel, get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.tuner.model import WEIGHTED_ADAPTER_ERROR
from hpr_peft.tuner.registration import MIXED_MODEL_ERROR, register_hpr
from support.hpr import random_hpr_model, token_ids
from support.models import make_tiny_causal_lm


def test_add_weighted_adapter_says_why_and_what_to_do_instead():
    model = random_hpr_model("llama", target_layers=[1, 2])
    model.add_adapter("other", HPRConfig(target_layers=[1, 2], init_weights=False))
    with pytest.raises(NotImplementedError) as refusal:
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "combined")
    assert str(refusal.value) == WEIGHTED_ADAPTER_ERROR
    assert "set_adapter" in WEIGHTED_ADAPTER_ERROR and "combined" not in model.peft_config


def test_several_hpr_adapters_can_be_active_at_once_as_the_error_suggests():
    model = random_hpr_model("llama", target_layers=[1])
    torch.manual_seed(1)
    model.add_adapter("other", HPRConfig(target_layers=[2], init_weights=False))
    ids = token_ids()
    with torch.no_grad():
        first = model(ids).logits
        model.base_model.set_adapter(["default", "other"])
        both = model(ids).logits
        model.base_model.set_adapter("other")
        second = model(ids).logits
    assert not torch.allclose(both, first, atol=1e-4) and not torch.allclose(both, second, atol=1e-4)


def test_a_mixed_model_refuses_hpr_with_hpr_s_reason():
    with pytest.raises(ValueError) as refusal:
        get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(), mixed=True)
    assert str(refusal.value) == MIXED_MODEL_ERROR
    mixed = get_peft_model(make_tiny_causal_lm("llama"), LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="merge_and_unload"):
        mixed.add_adapter("hpr", HPRConfig())
    assert "hpr" not in mixed.peft_config


def test_mixed_models_of_peft_s_own_tuners_still_work():
    register_hpr()  # idempotent: wrapping peft's check twice would still leave other types alone
    mixed = get_peft_model(make_tiny_causal_lm("llama"), LoraConfig(target_modules=["q_proj"]), mixed=True)
    mixed.add_adapter("loha", LoHaConfig(target_modules=["v_proj"]))
    mixed.set_adapter(["default", "loha"])
    assert isinstance(mixed, PeftMixedModel)
    with torch.no_grad():
        assert mixed(token_ids()).logits.shape == (2, 12, 128)


def test_hpr_edits_a_merged_lora_fine_tune(tmp_path):
    torch.manual_seed(0)
    lora = get_peft_model(
        make_tiny_causal_lm("llama"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "lora")
    ids = token_ids()
    fine_tuned = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path / "lora").merge_and_unload()
    with torch.no_grad():
        lora_logits = fine_tuned(ids).logits
        assert not torch.allclose(lora_logits, make_tiny_causal_lm("llama")(ids).logits, atol=1e-3)

    model = get_peft_model(fine_tuned, HPRConfig(target_layers=[1, 2]))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, lora_logits)  # identity on top of the fine-tune
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    torch.manual_seed(0)
    edited = get_peft_model(
        PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path / "lora").merge_and_unload(),
        HPRConfig(target_layers=[1, 2], init_weights=False),
    ).eval()
    with torch.no_grad():
        hpr_logits = edited(ids).logits
        with edited.disable_adapter():
            assert torch.equal(edited(ids).logits, lora_logits)  # off: exactly the LoRA fine-tune
    assert not torch.allclose(hpr_logits, lora_logits, atol=1e-3)
