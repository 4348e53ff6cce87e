"""hpr_peft: Householder Pseudo-Rotation (HPR) activation editing as a PEFT tuner.

``import hpr_peft`` registers the ``HPR`` PEFT type, so that ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` know it. Heavier parts of the API
(fitting, evaluation, Hub helpers) are imported lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from hpr_peft.tuner import HPRConfig, HPRLayer, HPRModel

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_LAZY_EXPORTS: dict[str, str] = {
    "edit_settings": "hpr_peft.tuner.control",
    "monitor": "hpr_peft.tuner.control",
    "ContrastivePair": "hpr_peft.data",
    "MCQuestion": "hpr_peft.data",
    "load_truthfulqa": "hpr_peft.data",
    "load_truthfulqa_mc": "hpr_peft.data",
    "load_pairs_jsonl": "hpr_peft.data",
    "split_groups": "hpr_peft.data",
    "kfold_groups": "hpr_peft.data",
    "collect_activations": "hpr_peft.fitting",
    "PairActivations": "hpr_peft.fitting",
    "fit_hpr": "hpr_peft.fitting",
    "fit_preference": "hpr_peft.fitting",
    "fit_preference_vectors": "hpr_peft.fitting",
    "PreferenceSettings": "hpr_peft.fitting",
    "PreferenceReport": "hpr_peft.fitting",
    "train_editors": "hpr_peft.fitting",
    "select_layers": "hpr_peft.fitting",
    "FitReport": "hpr_peft.fitting",
    "evaluate_truthfulqa": "hpr_peft.evaluation",
    "calibrate_alpha": "hpr_peft.evaluation.calibration",
    "kl_calibration": "hpr_peft.evaluation.calibration",
    "KLCalibration": "hpr_peft.evaluation.calibration",
    "paired_bootstrap": "hpr_peft.evaluation.statistics",
    "push_to_hub": "hpr_peft.hub",
    "load_adapter": "hpr_peft.hub",
    "AutoHPRModelForCausalLM": "hpr_peft.hub",
    "HubAccessError": "hpr_peft.hub",
    "save_adapter_atomic": "hpr_peft.hub",
    "save_shareable_adapter": "hpr_peft.hub",
    "save_pairs_jsonl": "hpr_peft.data",
    "QA_PRIMER": "hpr_peft.data",
    "qa_prompt": "hpr_peft.data",
    "question_context": "hpr_peft.data",
    "answer_continuation": "hpr_peft.data",
    "load_model": "hpr_peft.runtime.bundled_models",
    "HookSet": "hpr_peft.runtime.hooks",
    "GroupSplit": "hpr_peft.data",
    "save_split": "hpr_peft.data",
    "load_split": "hpr_peft.data",
    "load_bundled": "hpr_peft.runtime.bundled_models",
    "load_causal_lm": "hpr_peft.runtime.bundled_models",
}

__all__ = ["HPRConfig", "HPRLayer", "HPRModel", "__version__", *sorted(_LAZY_EXPORTS)]


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hpr_peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
