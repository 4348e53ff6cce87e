"""PNG plots of the TruthfulQA job: MC2-vs-KL Pareto, per-layer probe accuracy, angles / edited fractions.

matplotlib is optional (``pip install hpr_peft[plots]``); every function raises a clear ImportError
without it. All functions take plain JSON-able data (what ``results.json`` holds) and return the path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpr_peft.runtime.atomic_files import atomic_file

__all__ = ["plot_matched_kl", "plot_monitor", "plot_pareto", "plot_probe_accuracy"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("Plots need matplotlib: pip install 'hpr_peft[plots]'.") from exc
    return plt


def plot_pareto(
    sweeps: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "", baseline: float | None = None
) -> Path:
    """MC2 against KL(edited ‖ unedited) for every swept setting.

    ``sweeps`` rows: ``{"method": "hpr"|"additive", "fold": int, "kl": float, "mc2": float,
    "label": str, "split": "validation"|"held-out", "chosen": bool}``. The lines join each method's
    points of one fold/split in KL order; chosen settings are circled; ``baseline`` (the unedited MC2)
    is a horizontal line.
    """
    plt = _pyplot()
    colors = {"hpr": "tab:blue", "additive": "tab:orange", "unedited": "black"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for row in sweeps:
        if row.get("kl") is None:  # a budget out of reach: nothing to place
            continue
        groups.setdefault(
            (row["method"], int(row.get("fold", 0)), row.get("split", "validation")), []
        ).append(row)
    for (method, fold, split), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["kl"])
        style = "-" if split == "held-out" else "--"
        marker = "o" if split == "held-out" else "s"
        ax.plot(
            [max(r["kl"], 1e-5) for r in rows],
            [r["mc2"] for r in rows],
            style,
            marker=marker,
            color=colors.get(method, "gray"),
            alpha=0.85 if split == "held-out" else 0.5,
            label=f"{method} fold {fold} ({split})",
        )
        for r in rows:
            if r.get("chosen"):
                ax.scatter([max(r["kl"], 1e-5)], [r["mc2"]], s=160, facecolors="none", edgecolors="red")
    if baseline is not None:
        ax.axhline(baseline, color="black", lw=1, ls=":", label="unedited (all questions)")
    ax.set_xscale("log")
    ax.set_xlabel("KL(edited ‖ unedited) per token on neutral text [nats]")
    ax.set_ylabel("TruthfulQA MC2")
    ax.set_title(title or "MC2 vs side effects")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_matched_kl(
    methods: dict[str, dict[str, Any]], targets: Sequence[float], path: str | os.PathLike, title: str = ""
) -> Path:
    """Held-out MC2 against held-out KL for each method at each KL target, with the 95 % paired
    bootstrap CI band of its gain over the unedited model (``methods`` as in ``results.json``)."""
    plt = _pyplot()
    colors = {"hpr": "tab:blue", "additive": "tab:orange"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    base = methods["unedited"]["mc2"]
    for method, color in colors.items():
        rows = [methods[f"{method}@kl{t:g}"] for t in targets if f"{method}@kl{t:g}" in methods]
        if not rows:
            continue
        kl = [0.0, *[r["kl"] for r in rows]]
        low = [base, *[base + r["delta_mc2"]["low"] for r in rows]]
        high = [base, *[base + r["delta_mc2"]["high"] for r in rows]]
        ax.plot(kl, [base, *[r["mc2"] for r in rows]], "-o", color=color, label=method)
        ax.fill_between(kl, low, high, color=color, alpha=0.2, label=f"{method} 95 % CI")
    ax.axhline(base, color="black", lw=1, ls=":", label="unedited")
    for target in targets:
        ax.axvline(target, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("KL(edited ‖ unedited) per token on held-out neutral text [nats]")
    ax.set_ylabel("TruthfulQA MC2 (held-out folds)")
    ax.set_title(title or "MC2 at matched side effects")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_probe_accuracy(
    per_fold: dict[int, dict[int, float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Validation probe accuracy per layer, one line per fold (``{fold: {layer: accuracy}}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for fold, accs in sorted(per_fold.items()):
        layers = sorted(accs)
        ax.plot(layers, [accs[x] for x in layers], marker="o", label=f"fold {fold}")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("probe accuracy (validation)")
    ax.set_title(title or "Per-layer probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_monitor(
    fractions: dict[int, float], angles: dict[int, Sequence[float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Left: fraction of tokens flagged for editing per layer; right: histogram of predicted angles."""
    import math

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    layers = sorted(fractions)
    left.bar(layers, [fractions[x] for x in layers], color="tab:blue")
    left.set_xlabel("decoder layer")
    left.set_ylabel("fraction of tokens edited")
    left.set_ylim(0, 1)
    left.grid(alpha=0.3)
    for layer in sorted(angles):
        values = [math.degrees(a) for a in angles[layer]]
        if values:
            right.hist(values, bins=40, histtype="step", label=f"layer {layer}")
    right.set_xlabel("predicted angle f(h) [degrees] (before alpha)")
    right.set_ylabel("tokens")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    fig.suptitle(title or "HPR probes on TruthfulQA prompts")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | os.PathLike) -> Path:
    """Write the figure atomically (never a half-written PNG where a good one stood) and close it."""
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path
