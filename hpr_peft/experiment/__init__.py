"""The application layer: the cross-validated TruthfulQA job (:func:`run_main_job`) and its plots."""

from hpr_peft.experiment.job import run_main_job
from hpr_peft.experiment.settings import MODEL_DEFAULTS, JobSettings
from hpr_peft.experiment.table import format_table

__all__ = ["MODEL_DEFAULTS", "JobSettings", "format_table", "run_main_job"]
