"""The fit report: per-layer probe accuracy / angle error, the chosen layers and timings.

A :class:`FitReport` prints as a table, round-trips through JSON (it also travels inside
``adapter_config.json`` as ``fit_results``) and plots probe accuracy per layer to a PNG.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpr_peft.runtime.atomic_files import atomic_file, write_text_atomic

REPORT_FORMAT = "hpr_peft.fit_report"
REPORT_VERSION = 1


@dataclass
class LayerFitResult:
    """Metrics of one layer's fitted editor, at its best epoch (epochs count from 1).

    Accuracies are probe accuracies over positives and negatives stacked (a row is called positive
    when ``w·h > 0``); angle MSE is in radians². ``train_angle_mse`` is the mean over the epoch's
    minibatches; validation metrics are over the whole validation set. ``score`` is the value of
    a user-supplied layer scorer, when one was used. ``angle_best_epoch`` is the epoch of the kept
    angle net when it was trained in its own stage (``angle_target="probe"``; ``best_epoch`` is then
    the probe's), else None (one joint stage: ``best_epoch`` for both).
    """

    layer: int
    train_accuracy: float
    train_angle_mse: float
    val_accuracy: float | None = None
    val_angle_mse: float | None = None
    best_epoch: int = 0
    history: list[dict[str, float | None]] = field(default_factory=list)
    score: float | None = None
    angle_best_epoch: int | None = None

    @property
    def selection_accuracy(self) -> float:
        """Validation accuracy when there was validation data, else training accuracy."""
        return self.val_accuracy if self.val_accuracy is not None else self.train_accuracy


@dataclass
class FitReport:
    """Outcome of :func:`hpr_peft.fitting.fit_hpr`."""

    layers: list[LayerFitResult]
    selected_layers: list[int]
    selection: str
    token_selection: str = "last"
    n_train_pairs: int = 0
    n_val_pairs: int = 0
    n_train_rows: int = 0
    n_val_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def layer(self, index: int) -> LayerFitResult:
        """The result of decoder block ``index``."""
        for result in self.layers:
            if result.layer == index:
                return result
        raise KeyError(f"layer {index} was not fitted; fitted layers: {[r.layer for r in self.layers]}.")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = REPORT_FORMAT
        out["version"] = REPORT_VERSION
        return _finite(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitReport:
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a fit report: expected a dict with format={REPORT_FORMAT!r}.")
        fields = {k: v for k, v in data.items() if k not in ("format", "version")}
        fields["layers"] = [LayerFitResult(**layer) for layer in fields.get("layers", [])]
        return cls(**fields)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """JSON text of the report; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> FitReport:
        """Read a report from JSON text or from a file path."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"fit report {path} does not exist.")
            text = path.read_text()
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ display
    def __str__(self) -> str:
        header = f"{'layer':>5}  {'train acc':>9}  {'val acc':>7}  {'train MSE':>9}  {'val MSE':>7}  {'epoch':>5}  sel"
        has_score = any(r.score is not None for r in self.layers)
        if has_score:
            header += "    score"
        lines = [
            f"HPR fit: {self.n_train_pairs} train / {self.n_val_pairs} validation pairs "
            f"({self.n_train_rows} / {self.n_val_rows} rows, token selection {self.token_selection!r})",
            header,
        ]
        for r in self.layers:
            line = (
                f"{r.layer:>5}  {r.train_accuracy:>9.3f}  {_fmt(r.val_accuracy, 7, 3)}  "
                f"{r.train_angle_mse:>9.4f}  {_fmt(r.val_angle_mse, 7, 4)}  {r.best_epoch:>5}  "
                f"{'*' if r.layer in self.selected_layers else ' ':>3}"
            )
            if has_score:
                line += f"  {_fmt(r.score, 7, 4)}"
            lines.append(line)
        lines.append(f"selected layers: {self.selected_layers} ({self.selection})")
        if self.timings:
            lines.append("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))
        return "\n".join(lines)

    def plot_probe_accuracy(self, path: str | os.PathLike) -> Path:
        """Write a PNG of train/validation probe accuracy per layer, selected layers marked (atomically)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        xs = [r.layer for r in self.layers]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.3 * len(xs) + 3), 3.5))
        try:
            ax.plot(xs, [r.train_accuracy for r in self.layers], "o-", label="train")
            if any(r.val_accuracy is not None for r in self.layers):
                ax.plot(
                    xs,
                    [r.val_accuracy if r.val_accuracy is not None else math.nan for r in self.layers],
                    "s-",
                    label="validation",
                )
            for layer in self.selected_layers:
                ax.axvline(layer, color="tab:green", alpha=0.25, linewidth=6)
            ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("decoder layer")
            ax.set_ylabel("probe accuracy")
            ax.set_title("HPR probe accuracy per layer (selected layers shaded)")
            ax.legend()
            fig.tight_layout()
            with atomic_file(path) as tmp:
                fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
        finally:
            plt.close(fig)
        return path


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None so the JSON is strict (it goes into adapter_config.json)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


__all__ = ["FitReport", "LayerFitResult"]
