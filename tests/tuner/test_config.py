"""HPRConfig validation, JSON round trip, and registration of the HPR PEFT type."""

from __future__ import annotations

import json
import math

import pytest
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, TaskType

from hpr_peft import HPRConfig, HPRModel
from hpr_peft.tuner.registration import register_hpr


def test_defaults():
    config = HPRConfig()
    assert config.peft_type == PeftType.HPR == "HPR"
    assert config.target_layers == "all"
    assert (config.alpha, config.threshold, config.edit_positions) == (1.0, 0.5, "all")
    assert config.skip_sequence_start is True and config.init_weights is True
    assert config.angle_hidden_sizes is None and config.selected_layers is None
    assert config.task_type == TaskType.CAUSAL_LM
    assert config.resolved_target_layers(3) == [0, 1, 2]


def test_target_layers_are_sorted_and_resolved():
    config = HPRConfig(target_layers=(3, 1), selected_layers=[3])
    assert config.target_layers == [1, 3]
    assert config.resolved_selected_layers(4) == [3]
    with pytest.raises(ValueError, match=r"target_layers \[3\] out of range.*3 decoder blocks"):
        config.resolved_target_layers(3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": math.inf}, "alpha must be a finite number"),
        ({"alpha": math.nan}, "alpha must be a finite number"),
        ({"alpha": "1"}, "alpha must be a finite number"),
        ({"alpha": True}, "alpha must be a finite number"),
        ({"threshold": 0.0}, "threshold must be a probability strictly between 0 and 1"),
        ({"threshold": 1.0}, "threshold must be a probability strictly between 0 and 1"),
        ({"threshold": -0.2}, "threshold must be a probability"),
        ({"target_layers": []}, "target_layers must not be empty"),
        ({"target_layers": [1, -1]}, "non-negative integer block indices"),
        ({"target_layers": [1.0]}, "non-negative integer block indices"),
        ({"target_layers": [True]}, "non-negative integer block indices"),
        ({"target_layers": [2, 2]}, "more than once"),
        ({"target_layers": 3}, r"pass target_layers=\[3\]"),
        ({"target_layers": "all-linear"}, "'all-linear' is not supported.*whole decoder blocks"),
        ({"target_layers": "model.layers.3"}, "not by module name"),
        ({"target_layers": ["model.layers.3"]}, "non-negative integer block indices"),
        ({"edit_positions": "first"}, "edit_positions must be one of"),
        ({"angle_hidden_sizes": [16, 0]}, "angle_hidden_sizes must contain only positive ints"),
        ({"angle_hidden_sizes": [2.5]}, "angle_hidden_sizes must contain only positive ints"),
        (
            {"target_layers": [1, 2], "selected_layers": [0, 1]},
            r"selected_layers \[0\] are not in target_layers",
        ),
        ({"selected_layers": []}, "selected_layers must not be empty"),
        ({"fit_results": {"x": object()}}, "fit_results must be JSON-serialisable"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HPRConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"angle_hidden_sizes": 16}, "angle_hidden_sizes must be a list"),
        ({"skip_sequence_start": "yes"}, "skip_sequence_start must be True or False"),
        ({"init_weights": 1}, "init_weights must be True or False"),
        ({"target_layers": {1: 2}}, "target_layers must be a list"),
        ({"fit_results": [1]}, "fit_results must be a JSON-able dict"),
    ],
)
def test_bad_types_raise_type_error(kwargs, message):
    with pytest.raises(TypeError, match=message):
        HPRConfig(**kwargs)


def test_module_name_targeting_is_not_a_field():
    with pytest.raises(TypeError, match="target_modules"):
        HPRConfig(target_modules=["q_proj"])  # type: ignore[call-arg]


def test_json_round_trip(tmp_path):
    config = HPRConfig(
        target_layers=[0, 2, 3],
        alpha=1.5,
        threshold=0.3,
        angle_hidden_sizes=[16, 8],
        edit_positions="last",
        skip_sequence_start=False,
        init_weights=False,
        selected_layers=[2, 3],
        fit_results={"layers": {"2": {"accuracy": 0.8}}, "selected": [2, 3]},
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HPR"
    assert "target_modules" not in saved
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is HPRConfig
    assert loaded.to_dict() == config.to_dict()
    assert HPRConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_registration_is_idempotent_and_survives_reimport(monkeypatch):
    register_hpr()
    register_hpr()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HPR] is HPRModel
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HPR] is HPRConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HPR] == "hpr_"
    assert list(PeftType).count(PeftType.HPR) == 1
    assert PeftType("HPR") is PeftType.HPR is PeftType["HPR"]

    # a re-imported module defines a new class object with the same module and name: accepted
    stale = type("HPRModel", (), {"prefix": "hpr_", "__module__": HPRModel.__module__})
    stale.__qualname__ = HPRModel.__qualname__
    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, PeftType.HPR, stale)
    register_hpr()
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HPR] is HPRModel


def test_registration_refuses_a_foreign_hpr_tuner(monkeypatch):
    class OtherHPRModel:
        prefix = "hpr_"

    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, PeftType.HPR, OtherHPRModel)
    with pytest.raises(RuntimeError, match=r"already registers the PEFT type 'HPR'.*OtherHPRModel"):
        register_hpr()


def test_peft_layers_to_transform_becomes_target_layers():
    assert HPRConfig(layers_to_transform=[3, 1]).target_layers == [1, 3]
    config = HPRConfig(layers_to_transform=2)
    assert config.target_layers == [2] and config.layers_to_transform is None
    assert HPRConfig(target_layers=[1, 3], layers_to_transform=[3, 1]).target_layers == [1, 3]
    with pytest.raises(ValueError, match=r"disagree.*give only target_layers"):
        HPRConfig(target_layers=[1], layers_to_transform=[2])
    with pytest.raises(ValueError, match="layers_to_transform must contain only non-negative"):
        HPRConfig(layers_to_transform=[-1])
