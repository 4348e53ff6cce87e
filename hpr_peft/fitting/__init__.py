"""Fitting: pairs → activations → trained editors → a layer-selected adapter.

- :mod:`~hpr_peft.fitting.activations`: the :class:`PairActivations` container (safetensors shards).
- :mod:`~hpr_peft.fitting.collection`: :func:`collect_activations` from the unedited model.
- :mod:`~hpr_peft.fitting.answer_collector`: :class:`AnswerCollector`, recording during a scoring pass.
- :mod:`~hpr_peft.fitting.angle_targets`: what the angle nets learn (``"paper"``, ``"probe"``).
- :mod:`~hpr_peft.fitting.training`: :func:`train_editors`, one loop for every target.
- :mod:`~hpr_peft.fitting.selection`: :func:`select_layers`.
- :mod:`~hpr_peft.fitting.fit`: :func:`fit_hpr`, all of the above in one call.
- :mod:`~hpr_peft.fitting.preference`: :func:`fit_preference`, the editors fine-tuned end to end on
  answer likelihood (DPO-style margin + KL to the unedited model); :func:`fit_preference_vectors`, the
  same training for the additive baseline's steering vectors.
- :mod:`~hpr_peft.fitting.report`: :class:`FitReport`.
"""

from hpr_peft.fitting.activations import PairActivations
from hpr_peft.fitting.angle_targets import ANGLE_TARGETS
from hpr_peft.fitting.answer_collector import AnswerCollector
from hpr_peft.fitting.collection import collect_activations
from hpr_peft.fitting.fit import LayerScorer, fit_hpr
from hpr_peft.fitting.preference import (
    PreferenceEpoch,
    PreferenceReport,
    PreferenceSettings,
    fit_preference,
    fit_preference_vectors,
    preference_margins,
)
from hpr_peft.fitting.report import FitReport, LayerFitResult
from hpr_peft.fitting.selection import select_layers
from hpr_peft.fitting.training import EditorWeights, train_editors

__all__ = [
    "ANGLE_TARGETS",
    "AnswerCollector",
    "EditorWeights",
    "FitReport",
    "LayerFitResult",
    "LayerScorer",
    "PairActivations",
    "PreferenceEpoch",
    "PreferenceReport",
    "PreferenceSettings",
    "collect_activations",
    "fit_hpr",
    "fit_preference",
    "fit_preference_vectors",
    "preference_margins",
    "select_layers",
    "train_editors",
]
