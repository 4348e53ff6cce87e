"""One fold's validation search: per method, candidate layer sets (by effect or by probe accuracy),
each calibrated to every KL target on neutral text and scored on the fold's validation questions.

``job`` is the main job's shared state (:mod:`hpr_peft.experiment.job`): settings, model, tokenizer,
the calibration neutral text, the unedited results and the fold's pairs.
"""

from __future__ import annotations

from typing import Any

from hpr_peft.data import MCQuestion
from hpr_peft.evaluation.calibration import KLCalibration
from hpr_peft.evaluation.truthfulqa import TruthfulQAScorer
from hpr_peft.experiment.layer_search import effect_ranking, layer_sets, ranking_comparison, screening_pool
from hpr_peft.experiment.methods import EditCandidate, candidates_for
from hpr_peft.experiment.sweep import BudgetedMeasure, Measurement, Replay, best_per_target, record_replay
from hpr_peft.fitting import PairActivations
from hpr_peft.fitting.preference import fit_preference, fit_preference_vectors
from hpr_peft.runtime.progress import progress_bar
from hpr_peft.tuner.model import hpr_tuner

__all__ = ["ValidationSearch"]


class ValidationSearch:
    """One fold's validation search: per method, layer sets (by effect or probe accuracy), each
    calibrated to every KL target and scored on the validation questions."""

    def __init__(
        self,
        job: Any,
        fold_index: int,
        validation: list[MCQuestion],
        fit_activations: PairActivations,
        probe_ranking: list[int],
        probe_accuracy: dict[int, float],
        fit_ids: list[str],
    ) -> None:
        s = job.settings
        self.job, self.fold_index, self.fit_activations = job, fold_index, fit_activations
        self.probe_ranking = probe_ranking
        packed = True if s.replay else None  # replay records deterministic passes only
        self.validation = TruthfulQAScorer(job.tokenizer, validation, packed=packed)
        self.screen = TruthfulQAScorer(job.tokenizer, validation[: s.screen_questions], packed=packed)
        self.measure = BudgetedMeasure(
            job.model, job.neutral, s.calibration_tolerance, s.max_alpha, self._record_replay()
        )
        self.probe_accuracy = probe_accuracy
        self.fit_ids, self.validation_ids = fit_ids, [q.question_id for q in validation]
        self.comparisons: dict[str, Any] = {}
        self.preference: dict[str, Any] = {}

    def _first_edited_block(self) -> int:
        """The lowest block any candidate of this fold can edit."""
        s = self.job.settings
        layers = set(self.probe_ranking[: max(s.top_ks)])
        if s.layer_search == "effect":
            layers |= set(screening_pool(len(self.probe_ranking), s.screen_layers))
        return min(layers)

    def _record_replay(self) -> Replay | None:
        """Record the repeated passes at the first edited block (None: replay off or nothing to skip)."""
        s, model = self.job.settings, self.job.model
        block = self._first_edited_block()
        if not s.replay or block < 1:
            return None
        passes = {
            "validation": lambda context: self.validation.score(model, context=context, progress=False),
            "neutral": lambda context: self.job.neutral.measure(model, context),
        }
        if s.layer_search == "effect":
            passes["screen"] = lambda context: self.screen.score(model, context=context, progress=False)
        return record_replay(model, block, passes)

    def _candidates(self, method: str, layer_sets: list[tuple[int, ...]]) -> list[EditCandidate]:
        s = self.job.settings
        return candidates_for(method, layer_sets, self.fit_activations, s.normalize_additive)

    def layer_sets(self, method: str) -> list[tuple[int, ...]]:
        """The candidate layer sets of ``method``: the top-k by effect (after screening single layers
        at the smallest KL target) plus the probe's top-k for comparison; or only the probe's."""
        s = self.job.settings
        by_probe = layer_sets(self.probe_ranking, s.top_ks)
        if s.layer_search == "probe":
            return by_probe
        pool = screening_pool(len(self.probe_ranking), s.screen_layers)
        singles = self._candidates(method, [(i,) for i in pool])
        target = min(s.kl_targets)
        bar = progress_bar(len(singles), f"fold {self.fold_index} {method} layer screen", s.progress)
        screen = []
        for candidate in singles:
            screen.append(self.measure.measure(candidate, target, self.screen, "screen"))
            bar.update(1)
        bar.close()
        self.comparisons[method] = ranking_comparison(screen, self.probe_accuracy)
        by_effect = layer_sets(effect_ranking(screen), s.top_ks)
        if self.tunes:  # trained jointly: the candidates are the effect sets only
            return by_effect
        return [*by_effect, by_probe[-1]]

    @property
    def tunes(self) -> bool:
        """Whether both methods are trained on the preference objective before validation."""
        return self.job.settings.objective == "preference"

    def preference_split(self) -> tuple[list[str], list[str]]:
        """The fit questions split into the preference stage's training questions and the questions
        that pick its best epoch (the last ``preference_stop_fraction``, at least one): the validation
        questions stay reserved for choosing among the candidates, so no question makes two choices."""
        stop = max(1, round(len(self.fit_ids) * self.job.settings.preference_stop_fraction))
        if stop >= len(self.fit_ids):
            raise ValueError(
                f"preference_stop_fraction leaves no training question out of {len(self.fit_ids)} fit "
                "questions: lower it or use more questions."
            )
        return self.fit_ids[:-stop], self.fit_ids[-stop:]

    def _fine_tuned(self, method: str, candidates: list[EditCandidate]) -> list[EditCandidate]:
        """The candidates after training the largest one's editors (HPR) or steering vectors (additive)
        jointly on the preference objective: same pairs, same settings for both methods (fit questions
        only; :meth:`preference_split` holds some of them back to pick the best epoch)."""
        s, model = self.job.settings, self.job.model
        largest = max(candidates, key=lambda c: len(c.layers))
        train_ids, stop_ids = self.preference_split()
        calibration = self._training_calibration(largest)
        alpha = 1.0 if calibration is None else calibration.alpha
        self.measure.forget_kl_points(method)  # the KL curve changes with the trained weights
        common = {
            "settings": s.preference_settings(seed=s.seed + self.fold_index),
            "neutral_paragraphs": self.job.neutral.paragraphs if s.preference_kl_on == "neutral" else None,
            "validation_pairs": self.job.pairs_of(stop_ids, 1),
            "progress": s.progress,
        }
        pairs = self.job.pairs_of(train_ids, s.preference_pairs_per_question)
        record = {
            "epoch_choice_ids": stop_ids,
            "training_alpha": alpha,
            "training_calibration": None if calibration is None else calibration.to_dict(),
        }
        if method == "hpr":
            with hpr_tuner(model).configured(alpha=alpha, layers=largest.layers):
                report = fit_preference(
                    model, self.job.tokenizer, pairs, layers=list(largest.layers), **common
                )
            self.preference[method] = {**report.to_dict(), **record}
            return candidates
        assert largest.vectors is not None
        vectors, report = fit_preference_vectors(
            model, self.job.tokenizer, pairs, largest.vectors, alpha=alpha, **common
        )
        self.preference[method] = {**report.to_dict(), **record}
        return [EditCandidate(method, c.layers, {i: vectors[i] for i in c.layers}) for c in candidates]

    def _training_calibration(self, candidate: EditCandidate) -> KLCalibration | None:
        """With ``preference_at_budget``, ``candidate`` calibrated to the largest KL target: the
        preference stage trains at its α, the strength the edit is then calibrated to (None: train
        at α = 1, without the option or when no α stays within the budget)."""
        s = self.job.settings
        if not s.preference_at_budget:
            return None
        return self.measure.calibrate(candidate, max(s.kl_targets))

    def choose(self, method: str) -> dict[float, Measurement | None]:
        """Per KL target the candidate of ``method`` with the best validation MC2 at that budget."""
        s = self.job.settings
        candidates = self._candidates(method, self.layer_sets(method))
        if self.tunes:
            candidates = self._fine_tuned(method, candidates)
        bar = progress_bar(
            len(candidates) * len(s.kl_targets), f"fold {self.fold_index} {method} validation", s.progress
        )
        measured = []
        for candidate in candidates:
            for target in s.kl_targets:
                measured.append(self.measure.measure(candidate, target, self.validation, "validation"))
                bar.update(1)
        bar.close()
        return best_per_target(measured, s.kl_targets)

    def rows(self) -> list[dict[str, Any]]:
        unedited = self.job.unedited
        return [m.row(self.fold_index, unedited) for m in self.measure.measured.values()]
