"""The settings of the cross-validated TruthfulQA job, and the recommended ones per bundled model."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from hpr_peft.fitting.activations import TOKEN_SELECTIONS
from hpr_peft.fitting.angle_targets import ANGLE_TARGETS
from hpr_peft.fitting.preference import PreferenceSettings
from hpr_peft.fitting.selection import check_selection
from hpr_peft.tuner.config import HPRConfig, validate_alpha

__all__ = ["LAYER_SEARCHES", "MODEL_DEFAULTS", "OBJECTIVES", "PAPER_CONFIG", "JobSettings"]

# How each fold picks the edited layers: "effect" screens single layers by validation ΔMC2 at the
# smallest KL target; "probe" takes the layers with the best validation probe accuracy.
LAYER_SEARCHES = ("effect", "probe")
# How the HPR editors are trained: the paper's objective on cached activations, or that fit then
# fine-tuned end to end on answer likelihood (hpr_peft.fitting.preference) for the largest layer set.
OBJECTIVES = ("paper", "preference")
# The paper's own configuration (Pham & Nguyen 2024): chat-format multiple-choice prompts, response
# tokens, a 4-layer angle net (job.py) and the top-5 layers by probe accuracy.
PAPER_CONFIG: dict[str, Any] = {"token_selection": "response", "top_ks": (5,), "layer_search": "probe"}

# Recommended settings per bundled model, used by ``hpr-peft main`` where the command line is silent.
# Gemma-3's residual stream is dominated by a few massive dimensions shared by every token, so the
# paper's angle target overshoots by 10-35 sd along the probe direction and breaks the model (KL ≈ 8
# at α=0.5); the probe-consistent target does not (docs/math.md, docs/results.md). Of the rotation
# options, leaving the 4 massive dimensions out scored best on Gemma-3's validation questions
# (docs/results.md, "Gemma-3-270M at matched KL").
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3": {"angle_target": "probe", "exclude_massive_dims": 4},
}


@dataclass
class JobSettings:
    """Everything that defines a run (saved into ``results.json``)."""

    model: str = "smollm2"
    output_dir: str = "outputs/smollm2"
    truthfulqa_dir: str | None = None
    folds: int = 2
    seed: int = 0
    quick: bool = False
    quick_questions: int = 24
    max_questions: int | None = None
    token_selection: str = "last"
    angle_target: str = "paper"
    validation_fraction: float = 0.5
    max_validation_questions: int = 200
    kl_targets: tuple[float, ...] = (0.05, 0.1)
    calibration_tolerance: float = 0.1
    max_alpha: float = 64.0
    layer_search: str = "effect"
    screen_layers: int = 6
    screen_questions: int = 80
    top_ks: tuple[int, ...] = (1, 3)
    replay: bool = True
    objective: str = "paper"
    preference_pairs_per_question: int = 1
    preference_epochs: int = 1
    preference_lr: float = 5e-3
    preference_kl_weight: float = 1.0
    preference_kl_on: str = "prompts"
    preference_kl_budget: float = 0.0
    preference_freeze_probe: bool = False
    preference_editor_lr: float | None = None
    preference_at_budget: bool = False
    preference_stop_fraction: float = 0.2
    rotation_direction: str = "probe"
    exclude_massive_dims: int = 0
    paper_config: bool = False
    paper_pairs_per_question: int = 4
    epochs: int = 5
    normalize_additive: bool = True
    monitor_questions: int = 40
    neutral_paragraphs: int | None = None
    threads: int | None = None
    progress: bool = True
    generation_questions: int = 40
    max_new_tokens: int = 64

    def validate(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2 (k-fold cross-validation), got {self.folds}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be 'last' or 'response', got {self.token_selection!r}.")
        if self.angle_target not in ANGLE_TARGETS:
            raise ValueError(f"angle_target must be one of {list(ANGLE_TARGETS)}, got {self.angle_target!r}.")
        for name in ("kl_targets", "top_ks"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one value.")
        for target in self.kl_targets:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target < math.inf:
                raise ValueError(f"target_kl must be a finite number > 0 (nats per token), got {target!r}.")
        if not 0 < self.calibration_tolerance < 1:
            raise ValueError(f"calibration_tolerance must be in (0, 1), got {self.calibration_tolerance!r}.")
        validate_alpha(self.max_alpha)
        HPRConfig(rotation_direction=self.rotation_direction, exclude_massive_dims=self.exclude_massive_dims)
        for top_k in self.top_ks:
            check_selection(top_k, None)
        if self.layer_search not in LAYER_SEARCHES:
            raise ValueError(
                f"layer_search must be one of {list(LAYER_SEARCHES)}, got {self.layer_search!r}."
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}.")
        for name in (
            "screen_layers",
            "screen_questions",
            "preference_pairs_per_question",
            "preference_epochs",
            "paper_pairs_per_question",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.preference_at_budget, bool):
            raise ValueError(
                f"preference_at_budget must be True or False, got {self.preference_at_budget!r}."
            )
        if not 0 < self.preference_stop_fraction < 1:
            raise ValueError(
                f"preference_stop_fraction must be in (0, 1), got {self.preference_stop_fraction!r}."
            )
        self.preference_settings().validate()
        if self.generation_questions < 0:
            raise ValueError(
                f"generation_questions must be >= 0 (0: no generation), got {self.generation_questions}."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")

    def preference_settings(self, seed: int = 0) -> PreferenceSettings:
        """The preference stage's :class:`PreferenceSettings` from these settings (``seed`` per fold)."""
        return PreferenceSettings(
            epochs=self.preference_epochs,
            lr=self.preference_lr,
            kl_weight=self.preference_kl_weight,
            kl_on=self.preference_kl_on,
            kl_budget=self.preference_kl_budget,
            freeze_probe=self.preference_freeze_probe,
            editor_lr=self.preference_editor_lr,
            seed=seed,
        )

    def resolved(self) -> JobSettings:
        """These settings with ``paper_config``'s choices applied (the paper's response tokens, top-5
        layers by probe accuracy); unchanged without it."""
        return replace(self, **PAPER_CONFIG) if self.paper_config else self

    @property
    def question_limit(self) -> int | None:
        """How many questions the run scores (None: all)."""
        return self.quick_questions if self.quick else self.max_questions

    @property
    def generation_limit(self) -> int:
        """How many held-out questions get generations (all folds together; a few when ``quick``)."""
        return min(self.generation_questions, 4) if self.quick else self.generation_questions
