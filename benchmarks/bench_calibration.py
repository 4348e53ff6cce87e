"""KL calibration to several budgets: each budget searched from scratch vs from the points measured before.

The real SmolLM2-135M (bundled GGUF) gets an HPR adapter with random editors at ``--layers``; α is
calibrated to each of ``--targets`` on the calibration neutral corpus twice: ``fresh`` (every budget
its own search from α = 1, what the main job did before) and ``reused`` (each search starts from every
``(α, KL)`` point measured so far, ``kl_calibration(known=...)``, what it does now). The script prints
one JSON line: neutral-text passes and seconds of each, their ratios ``fresh / reused``, and the
calibrated α of both (equal up to the band's tolerance; both always within budget).

    python benchmarks/bench_calibration.py [--targets 0.05,0.1] [--layers 10,14,18] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _calibrate_all(model, neutral, edit, targets, reuse: bool) -> tuple[list, float]:
    from hpr_peft.evaluation.calibration import kl_calibration

    points: list[tuple[float, float]] = []
    results = []
    start = time.perf_counter()
    for target in targets:
        result = kl_calibration(model, neutral, edit, target, known=points if reuse else ())
        points = list(result.evaluations) if reuse else points
        results.append(result)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.05,0.1")
    parser.add_argument("--layers", default="10,14,18")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from hpr_peft import HPRConfig
    from hpr_peft.evaluation.calibration import hpr_edit
    from hpr_peft.evaluation.side_effects import NeutralText
    from hpr_peft.runtime.bundled_models import load_bundled
    from hpr_peft.runtime.model_io import unedited_context

    base, tokenizer = load_bundled("smollm2")
    layers = [int(x) for x in args.layers.split(",")]
    targets = [float(x) for x in args.targets.split(",")]
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=layers, init_weights=False)).eval()
    neutral = NeutralText(tokenizer)
    neutral.compute_reference(model, unedited_context(model))
    edit = hpr_edit(model, layers=layers)

    fresh, fresh_seconds = _calibrate_all(model, neutral, edit, targets, reuse=False)
    reused, reused_seconds = _calibrate_all(model, neutral, edit, targets, reuse=True)
    fresh_passes = sum(r.passes for r in fresh)
    reused_passes = sum(r.passes for r in reused)
    print(
        json.dumps(
            {
                "targets": targets,
                "fresh_passes": fresh_passes,
                "reused_passes": reused_passes,
                "passes_ratio": round(fresh_passes / max(reused_passes, 1), 3),
                "fresh_seconds": round(fresh_seconds, 2),
                "reused_seconds": round(reused_seconds, 2),
                "speedup": round(fresh_seconds / reused_seconds, 3),
                "alpha_fresh": [round(r.alpha, 4) for r in fresh],
                "alpha_reused": [round(r.alpha, 4) for r in reused],
                "kl_reused": [round(r.kl, 4) for r in reused],
            }
        )
    )


if __name__ == "__main__":
    main()
