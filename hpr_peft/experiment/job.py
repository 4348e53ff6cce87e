"""The full TruthfulQA job: cross-validated HPR fit, additive baseline, nested selection, report, plots.

Protocol (DESIGN §6, issue #5):

1. k folds by question (default 2 over all 817, seeded; ids saved in ``results.json``).
2. One unedited scoring pass over all questions also records the fitting activations of every
   (question, answer) sequence at all layers (:class:`hpr_peft.fitting.activations.AnswerCollector`); they do
   not depend on the fold, and each fold uses only its training questions' rows.
3. Per fold the training questions are split again into fit / validation questions. HPR editors are
   trained on the fit part (all layers), layers are ranked by validation probe accuracy, and every
   setting (``top_k`` layers × ``alpha``) of HPR and of the additive mean-difference baseline (same
   layers, vectors from the same fit activations) is scored on the validation questions with its side
   effects (KL on neutral text). Per method the setting with the best validation MC2 among those with
   ``KL ≤ kl_budget`` is chosen (nested: the scored fold never influences any choice).
4. The chosen settings are scored once on the held-out fold. Scores are per question, so the result
   over all folds is a mean ± standard error over all questions; KL / perplexity are averaged over folds.

Outputs in ``output_dir``: ``results.json`` (everything, incl. split ids and per-fold numbers),
``results.md`` (the table), ``pareto_mc2_kl.png``, ``probe_accuracy.png``, ``hpr_monitor.png`` and
``adapter/`` (the HPR adapter of the fold with the best validation MC2, with its chosen layers / alpha).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["MODEL_DEFAULTS", "JobSettings", "format_table", "run_main_job"]

# Recommended settings per bundled model, used by ``hpr-peft main`` where the command line is silent.
# Gemma-3's residual stream is dominated by a few massive dimensions shared by every token, so the
# paper's angle target overshoots by 10-35 sd along the probe direction and breaks the model (KL ≈ 8
# at α=0.5); the probe-consistent target does not (docs/math.md, docs/results.md).
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma3": {"angle_target": "probe", "hpr_alphas": (0.5, 1.0, 2.0)},
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
    validation_fraction: float = 0.15
    max_validation_questions: int = 60
    hpr_alphas: tuple[float, ...] = (0.5, 1.0, 1.5)
    additive_alphas: tuple[float, ...] = (0.25, 0.5, 1.0)
    top_ks: tuple[int, ...] = (3,)
    kl_budget: float = 0.1
    epochs: int = 5
    normalize_additive: bool = True
    monitor_questions: int = 40
    neutral_paragraphs: int | None = None
    threads: int | None = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2 (k-fold cross-validation), got {self.folds}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction}.")
        if self.token_selection not in ("last", "response"):
            raise ValueError(f"token_selection must be 'last' or 'response', got {self.token_selection!r}.")
        if self.angle_target not in ("paper", "probe"):
            raise ValueError(f"angle_target must be 'paper' or 'probe', got {self.angle_target!r}.")
        for name in ("hpr_alphas", "additive_alphas", "top_ks"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one value.")
        if self.kl_budget <= 0:
            raise ValueError(f"kl_budget must be > 0, got {self.kl_budget}.")


def _pick(rows: list[dict[str, Any]], kl_budget: float) -> dict[str, Any]:
    """Best validation MC2 (then MC1) among rows with KL ≤ budget; else the smallest-KL row."""
    within = [r for r in rows if r["kl"] <= kl_budget]
    if within:
        return max(within, key=lambda r: (r["mc2"], r["mc1"], -r["kl"]))
    return min(rows, key=lambda r: r["kl"])


def _paired(edited: list[float], base: list[float]) -> tuple[float, float]:
    diffs = [a - b for a, b in zip(edited, base, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


def run_main_job(settings: JobSettings, model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run the job; writes the outputs and returns the results dict.

    ``model_and_tokenizer`` replaces loading ``settings.model`` (tests); that model gets an HPR adapter
    injected for the run and is restored (``unload()``) at the end.
    """
    from peft import get_peft_model
    from tqdm.auto import tqdm

    import hpr_peft  # noqa: F401  (registers the PEFT type)
    from hpr_peft import HPRConfig
    from hpr_peft.data import load_truthfulqa, load_truthfulqa_mc
    from hpr_peft.data.splits import kfold_groups, split_groups
    from hpr_peft.evaluation import MCResult, TruthfulQAScorer, stack_contexts
    from hpr_peft.evaluation.baselines import additive_steering, mean_difference_vectors
    from hpr_peft.evaluation.side_effects import NeutralText
    from hpr_peft.fitting import fit_hpr
    from hpr_peft.fitting.activations import AnswerCollector
    from hpr_peft.runtime.bundled_models import load_model
    from hpr_peft.tuner.control import edit_settings, monitor

    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - since
        return now

    t = time.perf_counter()
    base, tokenizer = model_and_tokenizer if model_and_tokenizer is not None else load_model(settings.model)
    t = lap("load_model", t)

    questions = load_truthfulqa_mc(settings.truthfulqa_dir)
    limit = settings.quick_questions if settings.quick else settings.max_questions
    if limit is not None and limit < len(questions):
        import random

        keep = sorted(random.Random(settings.seed).sample(range(len(questions)), limit))
        questions = [questions[i] for i in keep]
    by_id = {q.question_id: q for q in questions}
    ids = [q.question_id for q in questions]
    folds = kfold_groups(ids, settings.folds, seed=settings.seed)

    pairs = load_truthfulqa(settings.truthfulqa_dir, format="qa", answers="mc2", question_ids=ids)
    n_layers = len(__import__("hpr_peft.runtime.blocks", fromlist=["x"]).find_decoder_stack(base))
    model = get_peft_model(base, HPRConfig(target_layers="all"))
    model.eval()
    unedited = model.disable_adapter

    print(
        f"[hpr-peft main] {settings.model}: {len(questions)} questions, {len(pairs)} pairs, {n_layers} layers"
    )
    # One unedited pass both scores every question and records the fitting activations (all layers)
    # at the answer tokens it reads anyway: no separate collection pass.
    t = time.perf_counter()
    collector = AnswerCollector(range(n_layers), token_selection=settings.token_selection)
    scorer_all = TruthfulQAScorer(tokenizer, questions)
    base_result = scorer_all.score(
        model,
        context=unedited,
        progress=settings.progress,
        desc="unedited + activations",
        collector=collector,
    )
    acts = collector.pair_activations(pairs)
    del collector
    t = lap("score_unedited_and_collect", t)
    from hpr_peft.evaluation.side_effects import load_neutral_paragraphs

    paragraphs = load_neutral_paragraphs()
    if settings.quick or settings.neutral_paragraphs:
        paragraphs = paragraphs[: settings.neutral_paragraphs or 3]
    neutral = NeutralText(tokenizer, paragraphs)
    ref_ppl = neutral.compute_reference(model, unedited)
    t = lap("neutral_reference", t)
    pass_seconds = base_result.seconds * 817 / len(questions)
    print(
        f"[hpr-peft main] unedited pass: {base_result.seconds:.1f}s for {len(questions)} questions "
        f"({base_result.tokens / base_result.seconds:.0f} tok/s; ≈{pass_seconds:.0f} s per 817 questions)"
    )

    fold_results: list[dict[str, Any]] = []
    sweep_rows: list[dict[str, Any]] = []
    held_out: dict[str, list[MCResult]] = {"hpr": [], "additive": []}
    side: dict[str, list[dict[str, float]]] = {"hpr": [], "additive": []}
    probe_acc: dict[int, dict[int, float]] = {}
    best_val = -1.0
    monitor_data: dict[str, Any] = {}

    for fold in folds:
        f = fold.index
        split = split_groups(
            fold.train,
            fractions=(1 - settings.validation_fraction, settings.validation_fraction, 0.0),
            seed=settings.seed + 1000 + f,
        )
        fit_ids = list(split.train)
        val_ids = sorted(split.validation)[: settings.max_validation_questions]
        fit_ids += sorted(split.validation)[settings.max_validation_questions :]
        t = time.perf_counter()
        report = fit_hpr(
            model,
            activations=acts.select_groups(fit_ids),
            validation_activations=acts.select_groups(val_ids),
            top_k=max(settings.top_ks),
            epochs=settings.epochs,
            angle_target=settings.angle_target,
            seed=settings.seed + f,
            progress=settings.progress,
        )
        t = lap("fit", t)
        accs = {r.layer: float(r.selection_accuracy) for r in report.layers}
        probe_acc[f] = accs
        ranking = sorted(accs, key=lambda x: (-accs[x], x))

        val_scorer = TruthfulQAScorer(tokenizer, [by_id[q] for q in val_ids])
        base_val = base_result.subset(val_ids)
        fit_acts = acts.select_groups(fit_ids)
        configs = []
        for k in settings.top_ks:
            layers = sorted(ranking[:k])
            for a in settings.hpr_alphas:
                configs.append(("hpr", k, layers, a))
            vectors = mean_difference_vectors(fit_acts, layers=layers, normalize=settings.normalize_additive)
            for a in settings.additive_alphas:
                configs.append(("additive", k, layers, a, vectors))
        rows = []
        for cfg in tqdm(configs, desc=f"fold {f} validation sweep", disable=not settings.progress):
            method, k, layers, a = cfg[:4]
            ctx = _context(model, cfg, unedited, edit_settings, additive_steering, stack_contexts)
            res = val_scorer.score(model, context=ctx, progress=False)
            se = neutral.measure(model, ctx)
            row = {
                "method": method,
                "fold": f,
                "split": "validation",
                "top_k": k,
                "layers": layers,
                "alpha": a,
                "mc1": res.mc1_mean,
                "mc2": res.mc2_mean,
                "kl": se.kl,
                "perplexity": se.perplexity,
                "label": f"k={k} α={a:g}",
            }
            rows.append(row)
            sweep_rows.append(row)
        t = lap("validation_sweep", t)
        chosen = {}
        for method in ("hpr", "additive"):
            pick = _pick([r for r in rows if r["method"] == method], settings.kl_budget)
            pick["chosen"] = True
            chosen[method] = pick

        fold_out: dict[str, Any] = {
            "fold": f,
            "test_ids": list(fold.test),
            "fit_ids": fit_ids,
            "validation_ids": val_ids,
            "probe_accuracy": accs,
            "layer_ranking": ranking,
            "validation_unedited": base_val.summary(),
            "validation_sweep": rows,
            "chosen": {},
            "held_out": {},
            "fit_report": report.to_dict(),
        }
        test_scorer = TruthfulQAScorer(tokenizer, [by_id[q] for q in fold.test])
        for method, pick in chosen.items():
            cfg = _config_of(pick, fit_acts, settings, mean_difference_vectors)
            ctx = _context(model, cfg, unedited, edit_settings, additive_steering, stack_contexts)
            res = test_scorer.score(model, context=ctx, progress=settings.progress, desc=f"fold {f} {method}")
            se = neutral.measure(model, ctx)
            held_out[method].append(res)
            side[method].append(se.to_dict())
            base_test = base_result.subset(list(fold.test))
            fold_out["chosen"][method] = {
                k: pick[k] for k in ("top_k", "layers", "alpha", "mc1", "mc2", "kl")
            }
            fold_out["held_out"][method] = {
                **res.summary(),
                **se.to_dict(),
                "unedited_mc1": base_test.mc1_mean,
                "unedited_mc2": base_test.mc2_mean,
            }
            sweep_rows.append(
                {
                    "method": method,
                    "fold": f,
                    "split": "held-out",
                    "mc1": res.mc1_mean,
                    "mc2": res.mc2_mean,
                    "kl": se.kl,
                    "label": pick["label"],
                    "chosen": True,
                }
            )
        t = lap("score_held_out", t)

        # Probe statistics on held-out prompts with the chosen HPR layers (monitor: no editing).
        hpr_pick = chosen["hpr"]
        mon_q = [by_id[q] for q in list(fold.test)[: settings.monitor_questions]]
        with edit_settings(model, layers=hpr_pick["layers"]), monitor(model) as records:
            TruthfulQAScorer(tokenizer, mon_q).score(model, progress=False)
        fold_out["monitor"] = [r for r in records.summary() if r["layer"] in hpr_pick["layers"]]
        if hpr_pick["mc2"] > best_val:
            best_val = hpr_pick["mc2"]
            monitor_data = {
                "fractions": {i: records[i].fraction_flagged for i in sorted(records)},
                "angles": {i: records[i].angles.tolist() for i in hpr_pick["layers"]},
            }
            tuner = model.base_model
            tuner.set_selected_layers(hpr_pick["layers"])
            tuner.set_alpha(hpr_pick["alpha"])
            model.save_pretrained(str(out_dir / "adapter"))
            tuner.set_alpha(1.0)
            fold_out["saved_adapter"] = True
        t = lap("monitor_and_save", t)
        fold_results.append(fold_out)

    # Aggregate over folds: per-question scores of all held-out questions.
    methods: dict[str, Any] = {"unedited": {**base_result.summary(), "perplexity": ref_ppl, "kl": 0.0}}
    for method in ("hpr", "additive"):
        res = MCResult.concat(held_out[method])
        base_same = base_result.subset(res.question_ids)
        d1 = _paired(res.mc1, base_same.mc1)
        d2 = _paired(res.mc2, base_same.mc2)
        methods[method] = {
            **res.summary(),
            "kl": sum(s["kl"] for s in side[method]) / len(side[method]),
            "perplexity": sum(s["perplexity"] for s in side[method]) / len(side[method]),
            "delta_mc1": d1[0],
            "delta_mc1_se": d1[1],
            "delta_mc2": d2[0],
            "delta_mc2_se": d2[1],
        }
    timings["total"] = time.perf_counter() - t_start
    results = {
        "settings": {**asdict(settings)},
        "model": settings.model,
        "n_questions": len(questions),
        "folds": [{"fold": fo.index, "test_ids": list(fo.test)} for fo in folds],
        "methods": methods,
        "per_fold": fold_results,
        "sweep": sweep_rows,
        "timings_s": timings,
        "seconds_per_pass_817": pass_seconds,
        "tokens_per_pass": scorer_all.n_tokens,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
        },
    }
    if model_and_tokenizer is not None:
        model.unload()
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    table = format_table(results)
    (out_dir / "results.md").write_text(table + "\n")
    _plots(results, probe_acc, monitor_data, out_dir)
    print(table)
    print(f"[hpr-peft main] total {timings['total']:.0f}s; outputs in {out_dir}")
    return results


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _config_of(pick, fit_acts, settings, mean_difference_vectors):
    if pick["method"] == "hpr":
        return ("hpr", pick["top_k"], pick["layers"], pick["alpha"])
    vectors = mean_difference_vectors(fit_acts, layers=pick["layers"], normalize=settings.normalize_additive)
    return ("additive", pick["top_k"], pick["layers"], pick["alpha"], vectors)


def _context(model, cfg, unedited, edit_settings, additive_steering, stack_contexts):
    method, _k, layers, alpha = cfg[:4]
    if method == "hpr":
        return lambda: edit_settings(model, alpha=alpha, layers=layers)
    vectors = cfg[4]
    return stack_contexts(unedited, lambda: additive_steering(model, vectors, alpha=alpha))


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the per-method results (held-out folds, mean ± s.e. over questions)."""
    m = results["methods"]
    lines = [
        f"TruthfulQA ({results['model']}, {results['n_questions']} questions, "
        f"{len(results['folds'])}-fold CV, nested selection at KL ≤ {results['settings']['kl_budget']})",
        "",
        "| method | MC1 % | MC2 % | ΔMC1 (pp) | ΔMC2 (pp) | KL (nats/token) | perplexity | settings per fold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("unedited", "additive", "hpr"):
        row = m[name]
        delta = ("–", "–")
        if "delta_mc1" in row:
            delta = (
                f"{100 * row['delta_mc1']:+.1f} ± {100 * row['delta_mc1_se']:.1f}",
                f"{100 * row['delta_mc2']:+.1f} ± {100 * row['delta_mc2_se']:.1f}",
            )
        chosen = (
            "; ".join(
                f"layers {fo['chosen'][name]['layers']} α={fo['chosen'][name]['alpha']:g}"
                for fo in results["per_fold"]
                if name in fo["chosen"]
            )
            or "–"
        )
        lines.append(
            f"| {name} | {100 * row['mc1']:.1f} ± {100 * row['mc1_se']:.1f} | {100 * row['mc2']:.1f} ± "
            f"{100 * row['mc2_se']:.1f} | {delta[0]} | {delta[1]} | {row['kl']:.3f} | {row['perplexity']:.2f} | {chosen} |"
        )
    lines.append("")
    lines.append(
        "Chance: MC1 22.6 %, MC2 (uniform over choices) 44.8 %. Total time "
        f"{results['timings_s']['total']:.0f} s; one scoring pass over 817 questions ≈ "
        f"{results['seconds_per_pass_817']:.0f} s."
    )
    return "\n".join(lines)


def _plots(results, probe_acc, monitor_data, out_dir: Path) -> None:
    try:
        from hpr_peft.experiment.plots import plot_monitor, plot_pareto, plot_probe_accuracy
    except ImportError:  # pragma: no cover
        return
    try:
        name = results["model"]
        plot_pareto(
            results["sweep"],
            out_dir / "pareto_mc2_kl.png",
            title=f"{name}: MC2 vs KL",
            baseline=results["methods"]["unedited"]["mc2"],
        )
        plot_probe_accuracy(probe_acc, out_dir / "probe_accuracy.png", title=f"{name}: probe accuracy")
        if monitor_data:
            plot_monitor(
                monitor_data["fractions"],
                monitor_data["angles"],
                out_dir / "hpr_monitor.png",
                title=f"{name}: HPR probes on held-out TruthfulQA prompts",
            )
    except ImportError as exc:
        logger.warning("plots skipped: %s", exc)
