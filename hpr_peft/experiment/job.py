"""The full TruthfulQA job: cross-validated HPR fit, additive baseline, nested selection, report, plots.

Protocol (every choice on validation data; each held-out fold is scored once):

1. k folds by question (default 2 over all 817, seeded; ids saved in ``results.json``).
2. One unedited scoring pass over all questions also records the fitting activations of every
   (question, answer) sequence at all layers (:class:`hpr_peft.fitting.AnswerCollector`); they do
   not depend on the fold, and each fold uses only its training questions' rows.
3. Per fold the training questions are split into fit / validation questions (default half and half,
   at most 200 validation). HPR editors are trained on the fit part (all layers). Then, for HPR and for
   the additive mean-difference baseline alike (:mod:`hpr_peft.experiment.sweep`): single layers are
   screened by validation MC2 at the smallest KL target (``layer_search="effect"``; or the layers are
   ranked by probe accuracy, ``"probe"``); each candidate layer set (top-k by effect, and the probe's
   top-k for comparison) has its α calibrated to each KL target on the calibration neutral text and is
   scored on the validation questions; per method and target the best validation MC2 is chosen.
4. The choices are scored once on the held-out fold, their KL measured on a second neutral text that
   calibration never saw. Paired bootstrap CIs by question give HPR − additive, HPR − unedited and
   additive − unedited at each matched KL, per fold and pooled (:mod:`hpr_peft.experiment.comparison`).
5. Generation (``generation_questions``, default 40): unedited, additive and HPR (at the largest KL
   target) answer a held-out subset greedily, scored by lm-eval's ``truthfulqa_gen`` metrics.

Outputs in ``output_dir``: ``results.json`` (everything, incl. split ids and per-fold numbers),
``results.md`` (the tables, with the generations side by side), ``matched_kl.png``, ``pareto_mc2_kl.png``, ``probe_accuracy.png``, ``hpr_monitor.png`` and
``adapter/`` (the HPR adapter of the fold with the best validation MC2, with its chosen layers / alpha).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model

from hpr_peft.data import (
    ContrastivePair,
    Fold,
    GenerationQuestion,
    MCQuestion,
    kfold_groups,
    load_truthfulqa,
    load_truthfulqa_generation,
    load_truthfulqa_mc,
    split_groups,
)
from hpr_peft.evaluation.generation import lm_eval_truthfulqa_metrics
from hpr_peft.evaluation.mc_metrics import MCResult
from hpr_peft.evaluation.side_effects import NeutralText, load_neutral_paragraphs
from hpr_peft.evaluation.truthfulqa import TruthfulQAScorer
from hpr_peft.experiment.comparison import compare, method_summary
from hpr_peft.experiment.generations import (
    format_generation_tables,
    generate_held_out,
    generation_subset,
    summarize_generations,
)
from hpr_peft.experiment.methods import METHODS
from hpr_peft.experiment.settings import JobSettings
from hpr_peft.experiment.sweep import Measurement, result_key
from hpr_peft.experiment.table import chance_levels, format_table
from hpr_peft.experiment.validation_search import ValidationSearch
from hpr_peft.fitting import AnswerCollector, PairActivations, collect_activations, fit_hpr
from hpr_peft.fitting.selection import rank_layers
from hpr_peft.hub.shareable import save_shareable_adapter
from hpr_peft.runtime.atomic_files import check_output_path, write_text_atomic
from hpr_peft.runtime.blocks import find_decoder_stack
from hpr_peft.runtime.bundled_models import load_model
from hpr_peft.runtime.model_io import unedited_context
from hpr_peft.tuner import HPRConfig
from hpr_peft.tuner.control import LayerRecord, edit_settings, monitor
from hpr_peft.tuner.model import hpr_tuner

logger = logging.getLogger(__name__)

__all__ = ["run_main_job"]


class _Clock:
    """Seconds per named step, accumulated."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self._since = self.start

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._since
        self._since = now


@dataclass
class _Job:
    """What every fold shares: the model with its adapter, the questions, the unedited pass."""

    settings: JobSettings
    model: Any
    tokenizer: Any
    questions: list[MCQuestion]
    pairs: list[ContrastivePair]
    folds: list[Fold]
    activations: PairActivations
    unedited: MCResult
    neutral: NeutralText
    heldout_neutral: NeutralText
    tokens_per_pass: int
    generation_questions: dict[str, GenerationQuestion] = field(default_factory=dict)

    def questions_of(self, ids: list[str]) -> list[MCQuestion]:
        by_id = {q.question_id: q for q in self.questions}
        return [by_id[q] for q in ids]

    def pairs_of(self, ids: list[str], per_question: int) -> list[ContrastivePair]:
        """The first ``per_question`` pairs of each question in ``ids``."""
        wanted, taken, out = set(ids), dict.fromkeys(ids, 0), []
        for pair in self.pairs:
            if pair.group_id in wanted and taken[pair.group_id] < per_question:
                taken[pair.group_id] += 1
                out.append(pair)
        return out


@dataclass
class _FoldOutcome:
    """One fold's report, its held-out results and side effects per method, and its sweep rows."""

    report: dict[str, Any]
    held_out: dict[str, MCResult]
    side_effects: dict[str, dict[str, float]]
    sweep: list[dict[str, Any]]
    probe_accuracy: dict[int, float]
    monitor: dict[str, Any] = field(default_factory=dict)
    generations: dict[str, Any] = field(default_factory=dict)
    chosen_hpr: Measurement | None = None


def run_main_job(settings: JobSettings, model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run the job; writes the outputs and returns the results dict.

    ``model_and_tokenizer`` replaces loading ``settings.model`` (tests); that model gets an HPR adapter
    injected for the run and is restored (``unload()``) at the end.
    """
    settings = settings.resolved()
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_dir = Path(settings.output_dir)
    check_output_path(out_dir, "directory")  # a file or unwritable place fails now, not after the job
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    job = _prepare(settings, model_and_tokenizer, clock)
    outcomes, best_val, monitor_data = [], -1.0, {}
    for fold in job.folds:
        outcome = _run_fold(job, fold, clock)
        chosen_hpr = outcome.chosen_hpr
        if chosen_hpr is not None and chosen_hpr.result.mc2_mean > best_val:  # type: ignore[union-attr]
            best_val, monitor_data = chosen_hpr.result.mc2_mean, outcome.monitor  # type: ignore[union-attr]
            _save_adapter(job.model, chosen_hpr, out_dir / "adapter")
            outcome.report["saved_adapter"] = True
        clock.lap("monitor_and_save")
        outcomes.append(outcome)
    results = _results(job, outcomes, clock)
    if model_and_tokenizer is not None:
        job.model.unload()
    _write_outputs(results, {o.report["fold"]: o.probe_accuracy for o in outcomes}, monitor_data, out_dir)
    return results


def _prepare(settings: JobSettings, model_and_tokenizer: tuple[Any, Any] | None, clock: _Clock) -> _Job:
    """Load the model and questions, run the unedited pass (scores + activations), neutral reference."""
    if settings.generation_limit:
        try:
            lm_eval_truthfulqa_metrics()  # fail before the long run when lm-eval is missing
        except ImportError as exc:
            raise ImportError(f"{exc}; or run without generation (--generation-questions 0)") from None
    base, tokenizer = (
        model_and_tokenizer
        if model_and_tokenizer is not None
        else load_model(settings.model, settings.progress)
    )
    clock.lap("load_model")
    questions = _questions(settings)
    ids = [q.question_id for q in questions]
    n_layers = len(find_decoder_stack(base))
    model = get_peft_model(base, _adapter_config(settings, base))
    model.eval()
    unedited, scorer, pairs, activations = _unedited_pass(settings, model, tokenizer, questions)
    print(
        f"[hpr-peft main] {settings.model}: {len(questions)} questions, {len(pairs)} pairs, {n_layers} layers"
    )
    clock.lap("score_unedited_and_collect")
    # α is calibrated on one neutral text; the held-out side effects are measured on another.
    neutral = NeutralText(tokenizer, _neutral_paragraphs(settings, "calibration"))
    neutral.compute_reference(model, model.disable_adapter)
    heldout_neutral = NeutralText(tokenizer, _neutral_paragraphs(settings, "heldout"))
    heldout_neutral.compute_reference(model, model.disable_adapter)
    clock.lap("neutral_reference")
    print(
        f"[hpr-peft main] unedited pass: {unedited.seconds:.1f}s for {len(questions)} questions "
        f"({unedited.tokens / unedited.seconds:.0f} tok/s)"
    )
    folds = kfold_groups(ids, settings.folds, seed=settings.seed)
    return _Job(
        settings,
        model,
        tokenizer,
        questions,
        pairs,
        folds,
        activations,
        unedited,
        neutral,
        heldout_neutral,
        scorer.n_tokens,
        _generation_questions(settings, ids),
    )


def _adapter_config(settings: JobSettings, base: Any) -> HPRConfig:
    """An adapter on every block, with the run's rotation options (and the paper's 4-layer angle net)."""
    options: dict[str, Any] = {
        "rotation_direction": settings.rotation_direction,
        "exclude_massive_dims": settings.exclude_massive_dims,
    }
    if settings.paper_config:
        width = base.get_input_embeddings().embedding_dim
        options["angle_hidden_sizes"] = [width // 2, width // 4, width // 8]
    return HPRConfig(target_layers="all", **options)


def _unedited_pass(
    settings: JobSettings, model: Any, tokenizer: Any, questions: list[MCQuestion]
) -> tuple[MCResult, TruthfulQAScorer, list[ContrastivePair], PairActivations]:
    """Score every question unedited; the fitting activations come from the same pass (its answer
    tokens, QA prompts) or, with ``paper_config``, from the paper's chat-format multiple-choice prompts
    (response tokens, a separate collection)."""
    ids = [q.question_id for q in questions]
    scorer = TruthfulQAScorer(tokenizer, questions)
    n_layers = len(find_decoder_stack(model))
    if settings.paper_config:
        pairs = load_truthfulqa(
            settings.truthfulqa_dir,
            format="mc_chat",
            tokenizer=tokenizer,
            question_ids=ids,
            max_pairs_per_question=settings.paper_pairs_per_question,
        )
        unedited = scorer.score(
            model, context=model.disable_adapter, progress=settings.progress, desc="unedited"
        )
        activations = collect_activations(
            model,
            tokenizer,
            pairs,
            layers=range(n_layers),
            token_selection="response",
            progress=settings.progress,
        )
        return unedited, scorer, pairs, activations
    pairs = load_truthfulqa(settings.truthfulqa_dir, format="qa", answers="mc2", question_ids=ids)
    # One unedited pass both scores every question and records the fitting activations (all layers)
    # at the answer tokens it reads anyway: no separate collection pass.
    collector = AnswerCollector(range(n_layers), token_selection=settings.token_selection)
    unedited = scorer.score(
        model,
        context=model.disable_adapter,
        progress=settings.progress,
        desc="unedited + activations",
        watcher=collector,
    )
    return unedited, scorer, pairs, collector.pair_activations(pairs)


def _generation_questions(settings: JobSettings, ids: list[str]) -> dict[str, GenerationQuestion]:
    """The questions with their reference answers, by id (none when generation is off)."""
    if not settings.generation_limit:
        return {}
    return {q.question_id: q for q in load_truthfulqa_generation(settings.truthfulqa_dir, question_ids=ids)}


def _questions(settings: JobSettings) -> list[MCQuestion]:
    """All TruthfulQA questions, or a seeded random subset of ``settings.question_limit``."""
    questions = load_truthfulqa_mc(settings.truthfulqa_dir)
    limit = settings.question_limit
    if limit is not None and limit < len(questions):
        keep = sorted(random.Random(settings.seed).sample(range(len(questions)), limit))
        questions = [questions[i] for i in keep]
    return questions


def _neutral_paragraphs(settings: JobSettings, which: str) -> list[str]:
    paragraphs = load_neutral_paragraphs(which=which)
    if settings.quick or settings.neutral_paragraphs:
        paragraphs = paragraphs[: settings.neutral_paragraphs or 3]
    return paragraphs


# --------------------------------------------------------------------------------------------------
# One fold


def _fit_and_validation_ids(settings: JobSettings, fold: Fold) -> tuple[list[str], list[str]]:
    """The fold's training questions split into fit and (at most ``max_validation_questions``)
    validation questions; validation questions over the cap go back to fitting."""
    split = split_groups(
        fold.train,
        fractions=(1 - settings.validation_fraction, settings.validation_fraction, 0.0),
        seed=settings.seed + 1000 + fold.index,
    )
    validation = sorted(split.validation)
    cap = settings.max_validation_questions
    return list(split.train) + validation[cap:], validation[:cap]


def _run_fold(job: _Job, fold: Fold, clock: _Clock) -> _FoldOutcome:
    """Fit on the fold's fit questions; per method and KL target choose layers and α on its validation
    questions only; score each choice once on its held-out questions."""
    s = job.settings
    fit_ids, val_ids = _fit_and_validation_ids(s, fold)
    fit_acts = job.activations.select_groups(fit_ids)
    fit_report = fit_hpr(
        job.model,
        activations=fit_acts,
        validation_activations=job.activations.select_groups(val_ids),
        top_k=max(s.top_ks),
        epochs=s.epochs,
        angle_target=s.angle_target,
        seed=s.seed + fold.index,
        progress=s.progress,
    )
    clock.lap("fit")
    accuracies = {r.layer: float(r.selection_accuracy) for r in fit_report.layers}
    search = ValidationSearch(
        job,
        fold.index,
        job.questions_of(val_ids),
        fit_acts,
        rank_layers(fit_report.layers),
        accuracies,
        fit_ids,
    )
    chosen = {method: search.choose(method) for method in METHODS}
    clock.lap("validation_sweep")
    report = {
        "fold": fold.index,
        "test_ids": list(fold.test),
        "fit_ids": fit_ids,
        "validation_ids": val_ids,
        "probe_accuracy": accuracies,
        "layer_ranking": search.probe_ranking,
        "ranking_comparison": search.comparisons,
        "preference": search.preference,
        "validation_unedited": job.unedited.subset(val_ids).summary(),
        "validation_sweep": search.rows(),
        "chosen": {},
        "held_out": {},
        "fit_report": fit_report.to_dict(),
    }
    outcome = _FoldOutcome(report, {}, {}, search.rows(), accuracies)
    _score_held_out(job, fold, chosen, outcome)
    clock.lap("score_held_out")
    largest = {m: _largest_reached(chosen[m]) for m in METHODS}
    outcome.chosen_hpr = largest["hpr"]
    if largest["hpr"] is not None:
        outcome.monitor = _monitor_held_out(job, fold, list(largest["hpr"].candidate.layers), outcome)
    if all(pick is not None for pick in largest.values()):
        contexts = {m: pick.candidate.at(job.model, pick.alpha) for m, pick in largest.items() if pick}
        outcome.generations = _generate(job, fold, {"unedited": unedited_context(job.model), **contexts})
    else:
        logger.warning("fold %d: no generation, a method reached none of the KL targets.", fold.index)
    clock.lap("generation")
    return outcome


def _largest_reached(picks: dict[float, Measurement | None]) -> Measurement | None:
    """The choice at the largest KL target a method reached (None: it reached none)."""
    reached = [target for target, pick in picks.items() if pick is not None]
    return picks[max(reached)] if reached else None


def _generate(job: _Job, fold: Fold, contexts: dict[str, Any]) -> dict[str, Any]:
    """Each method's answers to the fold's generation subset (none when generation is off)."""
    s = job.settings
    ids = generation_subset(list(fold.test), s.generation_limit, s.folds)
    if not ids:
        return {}
    questions = [job.generation_questions[i] for i in ids]
    return generate_held_out(
        job.model, job.tokenizer, questions, contexts, s.max_new_tokens, s.progress, f"fold {fold.index}"
    )


def _score_held_out(
    job: _Job, fold: Fold, chosen: dict[str, dict[float, Measurement | None]], outcome: _FoldOutcome
) -> None:
    """Score each method's choice at each KL target once on the held-out questions; its side effects
    are measured on the held-out neutral text, which calibration never saw."""
    scorer = TruthfulQAScorer(job.tokenizer, job.questions_of(list(fold.test)))
    for method, picks in chosen.items():
        for target, pick in picks.items():
            key = result_key(method, target)
            if pick is None:
                outcome.report["chosen"][key] = None
                continue
            context = pick.candidate.at(job.model, pick.alpha)
            result = scorer.score(
                job.model, context=context, progress=job.settings.progress, desc=f"fold {fold.index} {key}"
            )
            side = job.heldout_neutral.measure(job.model, context).to_dict()
            outcome.held_out[key] = result
            outcome.side_effects[key] = side
            outcome.report["chosen"][key] = {
                **pick.row(fold.index, job.unedited),
                "calibration": pick.calibration.to_dict() if pick.calibration else None,
            }
            outcome.report["held_out"][key] = {**result.summary(), **side}
            outcome.sweep.append(
                {
                    "method": method,
                    "target_kl": target,
                    "fold": fold.index,
                    "split": "held-out",
                    "mc1": result.mc1_mean,
                    "mc2": result.mc2_mean,
                    "kl": side["kl"],
                    "label": key,
                    "chosen": True,
                }
            )


def _monitor_held_out(job: _Job, fold: Fold, layers: list[int], outcome: _FoldOutcome) -> dict[str, Any]:
    """Probe statistics on held-out prompts with the chosen HPR layers (monitor: no editing), and the
    gate's selectivity: the mean edit angle on those prompts against that on the held-out neutral
    text, where the KL budget is spent (1 = the editors treat both alike)."""
    questions = job.questions_of(list(fold.test)[: job.settings.monitor_questions])
    with edit_settings(job.model, layers=layers):
        with monitor(job.model) as records:
            TruthfulQAScorer(job.tokenizer, questions).score(job.model, progress=False)
        with monitor(job.model) as neutral:
            job.heldout_neutral.run(job.model)
    outcome.report["monitor"] = [r for r in records.summary() if r["layer"] in layers]
    outcome.report["selectivity"] = [_selectivity(records[i], neutral[i]) for i in layers]
    return {
        "fractions": {i: records[i].fraction_flagged for i in sorted(records)},
        "angles": {i: records[i].angles.tolist() for i in layers},
    }


def _selectivity(prompts: LayerRecord, neutral: LayerRecord) -> dict[str, Any]:
    edit, neutral_edit = prompts.mean_edit_angle, neutral.mean_edit_angle
    return {
        "layer": prompts.layer_index,
        "prompts_fraction_flagged": prompts.fraction_flagged,
        "neutral_fraction_flagged": neutral.fraction_flagged,
        "prompts_mean_edit_angle": edit,
        "neutral_mean_edit_angle": neutral_edit,
        "ratio": edit / neutral_edit if neutral_edit > 0 else math.nan,
    }


def _save_adapter(model: Any, hpr_pick: Measurement, directory: Path) -> None:
    """Save the adapter with the chosen layers and strength, then restore the model's own settings."""
    with hpr_tuner(model).configured(alpha=hpr_pick.alpha, layers=hpr_pick.candidate.layers):
        save_shareable_adapter(model, directory)  # atomic, with HPR's model card


# --------------------------------------------------------------------------------------------------
# All folds together


def _results(job: _Job, outcomes: list[_FoldOutcome], clock: _Clock) -> dict[str, Any]:
    methods: dict[str, Any] = {
        "unedited": {
            **job.unedited.summary(),
            "perplexity": job.heldout_neutral.reference_perplexity,
            "kl": 0.0,
        }
    }
    comparisons: dict[str, Any] = {}
    for target in job.settings.kl_targets:
        held_out = {}
        for method in METHODS:
            key = result_key(method, target)
            if all(key in o.held_out for o in outcomes):  # reached in every fold
                held_out[method] = [o.held_out[key] for o in outcomes]
                sides = [o.side_effects[key] for o in outcomes]
                methods[key] = method_summary(held_out[method], job.unedited, sides, job.settings.seed)
        if held_out:
            comparisons[f"{target:g}"] = compare(held_out, job.unedited, job.settings.seed)
    clock.timings["total"] = time.perf_counter() - clock.start
    generations = [o.generations for o in outcomes if o.generations]
    return {
        "generation": summarize_generations(generations, job.generation_questions) if generations else None,
        "settings": asdict(job.settings),
        "model": job.settings.model,
        "n_questions": len(job.questions),
        "chance": chance_levels(job.questions),
        "folds": [{"fold": fo.index, "test_ids": list(fo.test)} for fo in job.folds],
        "methods": methods,
        "comparisons": comparisons,
        "kl_targets": list(job.settings.kl_targets),
        "per_fold": [o.report for o in outcomes],
        "sweep": [row for o in outcomes for row in o.sweep],
        "timings_s": clock.timings,
        "seconds_per_pass": job.unedited.seconds,
        "tokens_per_pass": job.tokens_per_pass,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }


def _write_outputs(results: dict[str, Any], probe_accuracy, monitor_data, out_dir: Path) -> None:
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1, default=_json_default))
    table = format_table(results)
    if results.get("generation"):
        table += "\n\n" + format_generation_tables(results["generation"])
    write_text_atomic(out_dir / "results.md", table + "\n")
    _plots(results, probe_accuracy, monitor_data, out_dir)
    print(table)
    print(f"[hpr-peft main] total {results['timings_s']['total']:.0f}s; outputs in {out_dir}")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)


def _plots(results, probe_accuracy, monitor_data, out_dir: Path) -> None:
    try:
        from hpr_peft.experiment.plots import plot_matched_kl, plot_monitor, plot_pareto, plot_probe_accuracy

        name = results["model"]
        plot_pareto(
            results["sweep"],
            out_dir / "pareto_mc2_kl.png",
            title=f"{name}: MC2 vs KL",
            baseline=results["methods"]["unedited"]["mc2"],
        )
        plot_matched_kl(
            results["methods"],
            results["kl_targets"],
            out_dir / "matched_kl.png",
            title=f"{name}: MC2 at matched KL",
        )
        plot_probe_accuracy(probe_accuracy, out_dir / "probe_accuracy.png", title=f"{name}: probe accuracy")
        if monitor_data:
            plot_monitor(
                monitor_data["fractions"],
                monitor_data["angles"],
                out_dir / "hpr_monitor.png",
                title=f"{name}: HPR probes on held-out TruthfulQA prompts",
            )
    except ImportError as exc:
        logger.warning("plots skipped: %s", exc)
