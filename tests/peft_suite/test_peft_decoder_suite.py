"""PEFT's own generic decoder tests (``PeftCommonTester``) run against HPR, as peft runs them for LoRA & co.

``TestHPRDecoderModels`` mirrors the generic, config-parametrised tests of peft's
``tests/test_decoder_models.py`` (plus the generic checks of ``testing_common.py`` that other peft test
files use) on tiny Llama, GPT-2 and OPT models and two HPR configs. peft's ``testing_common.py`` is taken
from the source distribution of the installed peft at test time (:mod:`support.peft_suite`).

Skipped, each with its reason in :data:`BY_DESIGN`: what HPR cannot do by design. Before skipping, each of
those tests checks that HPR refuses with its own explanation (never a silent wrong result). Skips that
peft's own code makes for every method outside its list (prompt learning, per-row LoRA adapters,
``bias=``) are peft's and keep peft's reason.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from hpr_peft import HPRConfig
from hpr_peft.tuner.model import WEIGHTED_ADAPTER_ERROR
from support.peft_suite import peft_testing_common, saved_tiny_models

PeftCommonTester = peft_testing_common().PeftCommonTester

MODELS = saved_tiny_models(["llama", "gpt2", "opt"])
MODEL_IDS = [pytest.param(path, id=arch) for arch, path in MODELS.items()]
CONFIGS = [
    pytest.param(HPRConfig, {"task_type": "CAUSAL_LM"}, id="hpr-default"),
    pytest.param(
        HPRConfig,
        {"task_type": "CAUSAL_LM", "target_layers": [1, 2], "angle_hidden_sizes": [8], "threshold": 0.6},
        id="hpr-two-layers",
    ),
]

BY_DESIGN = {
    "merge": "HPR cannot be merged into the base weights: whether and how far a token turns depends on "
    "the token (the probe and the angle net read the hidden state), so there is no weight delta.",
    "weighted": "HPR adapters cannot be combined into a weighted adapter: a weighted sum of probes is a "
    "different hyperplane, not a blend of two edits (activate several adapters instead).",
    "lora_conversion": "An HPR edit is not a weight delta, so there is no LoRA that approximates it.",
}


def parametrized(test):
    """Each test runs on every tiny model and every HPR config, like peft's ``test_decoder_models``."""
    test = pytest.mark.parametrize("config_cls,config_kwargs", CONFIGS)(test)
    return pytest.mark.parametrize("model_id", MODEL_IDS)(test)


def _peft_model(model_id: str, config_cls, config_kwargs: dict):
    base = AutoModelForCausalLM.from_pretrained(model_id)
    return get_peft_model(base, config_cls(base_model_name_or_path=model_id, **config_kwargs))


def _init_weights_false(config_kwargs: dict) -> dict:
    """peft's ``set_init_weights_false``: editors that edit (HPR's ``init_weights`` like most methods)."""
    return {**config_kwargs, "init_weights": False}


@pytest.fixture(autouse=True)
def _seeded():
    """peft's tests draw random editors from the global generator: seed it so every run is the same."""
    torch.manual_seed(0)


class TestHPRDecoderModels(PeftCommonTester):
    transformers_class = AutoModelForCausalLM

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------ construction, names, dtypes

    @parametrized
    def test_attributes_parametrized(self, model_id, config_cls, config_kwargs):
        self._test_model_attr(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_adapter_name(self, model_id, config_cls, config_kwargs):
        self._test_adapter_name(model_id, config_cls, config_kwargs.copy())

    @parametrized
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_add_adapter_no_autocast_adapter_dtype(self, model_id, config_cls, config_kwargs, dtype):
        self._test_add_adapter_no_autocast_adapter_dtype(
            model_id, config_cls, config_kwargs.copy(), dtype=dtype
        )

    @parametrized
    def test_prepare_for_training_parametrized(self, model_id, config_cls, config_kwargs):
        self._test_prepare_for_training(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_get_base_model_state_dict(self, model_id, config_cls, config_kwargs):
        self._test_get_base_model_state_dict(model_id, config_cls, config_kwargs.copy())

    # ------------------------------------------------------------ save / load

    @parametrized
    def test_save_pretrained(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained(model_id, config_cls, _init_weights_false(config_kwargs))

    @parametrized
    def test_save_pretrained_pickle(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained(
            model_id, config_cls, _init_weights_false(config_kwargs), safe_serialization=False
        )

    @parametrized
    def test_save_pretrained_selected_adapters(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained_selected_adapters(model_id, config_cls, _init_weights_false(config_kwargs))

    @parametrized
    def test_save_pretrained_selected_adapters_pickle(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained_selected_adapters(
            model_id, config_cls, _init_weights_false(config_kwargs), safe_serialization=False
        )

    @parametrized
    def test_save_pretrained_adapter_name_substring(self, model_id, config_cls, config_kwargs):
        self._test_save_pretrained_adapter_name_substring(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_from_pretrained_config_construction(self, model_id, config_cls, config_kwargs):
        self._test_from_pretrained_config_construction(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_load_multiple_adapters(self, model_id, config_cls, config_kwargs):
        self._test_load_multiple_adapters(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_load_model_low_cpu_mem_usage(self, model_id, config_cls, config_kwargs):
        self._test_load_model_low_cpu_mem_usage(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_inference_safetensors(self, model_id, config_cls, config_kwargs):
        self._test_inference_safetensors(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_peft_model_device_map(self, model_id, config_cls, config_kwargs):
        self._test_peft_model_device_map(model_id, config_cls, config_kwargs.copy())

    # ------------------------------------------------------------ generation

    @parametrized
    def test_generate(self, model_id, config_cls, config_kwargs):
        self._test_generate(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_generate_pos_args(self, model_id, config_cls, config_kwargs):
        self._test_generate_pos_args(model_id, config_cls, config_kwargs.copy(), raises_err=False)

    @parametrized
    def test_generate_half_prec(self, model_id, config_cls, config_kwargs):
        self._test_generate_half_prec(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_passing_input_embeds_works(self, model_id, config_cls, config_kwargs):
        self._test_passing_input_embeds_works("", model_id, config_cls, config_kwargs.copy())

    # ------------------------------------------------------------ training

    @parametrized
    def test_training_decoders(self, model_id, config_cls, config_kwargs):
        self._test_training(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_training_decoders_layer_indexing(self, model_id, config_cls, config_kwargs):
        kwargs = {k: v for k, v in config_kwargs.items() if k != "target_layers"}  # layers_to_transform=[0]
        self._test_training_layer_indexing(model_id, config_cls, kwargs)

    @parametrized
    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_decoders_gradient_checkpointing(
        self, model_id, config_cls, config_kwargs, use_reentrant
    ):
        self._test_training_gradient_checkpointing(
            model_id, config_cls, config_kwargs.copy(), use_reentrant=use_reentrant
        )

    # ------------------------------------------------------------ several adapters, on and off

    @parametrized
    def test_delete_adapter(self, model_id, config_cls, config_kwargs):
        self._test_delete_adapter(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_delete_inactive_adapter(self, model_id, config_cls, config_kwargs):
        self._test_delete_inactive_adapter(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_delete_unknown_adapter_raises(self, model_id, config_cls, config_kwargs):
        self._test_delete_unknown_adapter_raises(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_adding_multiple_adapters_with_bias_raises(self, model_id, config_cls, config_kwargs):
        self._test_adding_multiple_adapters_with_bias_raises(model_id, config_cls, config_kwargs.copy())

    @parametrized
    def test_unload_adapter(self, model_id, config_cls, config_kwargs):
        self._test_unload_adapter(model_id, config_cls, _init_weights_false(config_kwargs))

    @parametrized
    def test_disable_adapter(self, model_id, config_cls, config_kwargs):
        self._test_disable_adapter(model_id, config_cls, _init_weights_false(config_kwargs))

    @parametrized
    def test_mixed_adapter_batches(self, model_id, config_cls, config_kwargs):
        pytest.skip("peft runs this for LoRA only: per-row adapters (adapter_names=...) are LoRA's feature")

    # ------------------------------------------------------------ not possible by design

    @parametrized
    @pytest.mark.parametrize(
        "merge_test",
        ["merge_layers", "merge_layers_multi", "merge_layers_nan", "merge_layers_fp16", "safe_merge"],
    )
    def test_merge_layers(self, model_id, config_cls, config_kwargs, merge_test):
        model = _peft_model(model_id, config_cls, _init_weights_false(config_kwargs))
        for merge in (
            model.merge_and_unload,
            model.merge_adapter,
            lambda: model.merge_and_unload(safe_merge=True),
        ):
            with pytest.raises(NotImplementedError, match="cannot be merged"):
                merge()
        pytest.skip(BY_DESIGN["merge"])

    @parametrized
    def test_weighted_combination_of_adapters(self, model_id, config_cls, config_kwargs):
        model = _peft_model(model_id, config_cls, _init_weights_false(config_kwargs))
        model.add_adapter("other", config_cls(**_init_weights_false(config_kwargs)))
        with pytest.raises(NotImplementedError) as refusal:
            model.add_weighted_adapter(["default", "other"], [0.5, 1.5], "combined")
        assert str(refusal.value) == WEIGHTED_ADAPTER_ERROR
        pytest.skip(BY_DESIGN["weighted"])

    @parametrized
    def test_lora_conversion(self, model_id, config_cls, config_kwargs):
        model = _peft_model(model_id, config_cls, _init_weights_false(config_kwargs))
        assert not model.supports_lora_conversion()
        pytest.skip(BY_DESIGN["lora_conversion"])
