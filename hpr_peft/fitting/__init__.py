"""Fitting: activations of contrastive pairs, editor training, layer selection and the fit report."""

from hpr_peft.fitting.activations import AnswerCollector, PairActivations, collect_activations
from hpr_peft.fitting.report import FitReport, LayerFitResult
from hpr_peft.fitting.training import ANGLE_TARGETS, EditorWeights, fit_hpr, select_layers, train_editors

__all__ = [
    "ANGLE_TARGETS",
    "AnswerCollector",
    "EditorWeights",
    "FitReport",
    "LayerFitResult",
    "PairActivations",
    "collect_activations",
    "fit_hpr",
    "select_layers",
    "train_editors",
]
