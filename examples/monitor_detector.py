"""Monitor mode as a detector: the fitted probes score answers as true or false, without editing.

    python examples/monitor_detector.py

Fits HPR probes on TruthfulQA pairs of 40 questions, then, inside ``hpr_peft.monitor(model)`` (probes
run, nothing is edited), reads the probe probability at the last token of every true and false answer
of 15 held-out questions. A good detector ranks true answers above false ones: the example prints the
AUROC and how often each kind is flagged (probability below the threshold, i.e. "would be edited").

Runs offline on the bundled SmolLM2-135M-Instruct in about a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

import hpr_peft
from hpr_peft import HPRConfig, fit_hpr, load_bundled, load_truthfulqa, load_truthfulqa_mc, qa_prompt


@torch.no_grad()
def last_token_probability(model, tokenizer, text: str, layer: int) -> float:
    """The probe probability ``sigmoid(w·h)`` of ``layer`` at the last token of ``text``."""
    with hpr_peft.monitor(model) as records:
        model(**tokenizer(text, return_tensors="pt"))
    return float(records[layer].probabilities[-1])


def auroc(positives: list[float], negatives: list[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truthfulqa-dir", default=None, help="default: $HPR_TRUTHFULQA_DIR")
    args = parser.parse_args()
    torch.manual_seed(0)

    questions = load_truthfulqa_mc(args.truthfulqa_dir)
    fit_ids = [q.question_id for q in questions[:40]]
    held_out = questions[40:55]
    base, tokenizer = load_bundled("smollm2", progress=False)
    model = get_peft_model(base, HPRConfig(target_layers="all"))
    pairs = load_truthfulqa(args.truthfulqa_dir, question_ids=fit_ids, primer=False, max_pairs_per_question=2)
    report = fit_hpr(model, tokenizer, pairs, top_k=3, epochs=3, progress=False)
    best = max(report.layers, key=lambda r: r.selection_accuracy)
    print(f"probe of layer {best.layer}: validation accuracy {best.selection_accuracy:.3f}")

    threshold = model.peft_config["default"].threshold
    scores: dict[bool, list[float]] = {True: [], False: []}
    for question in held_out:
        prompt = qa_prompt(question.question, primer=False)
        for answer, label in zip(question.mc2_choices, question.mc2_labels, strict=True):
            scores[label == 1].append(
                last_token_probability(model, tokenizer, f"{prompt} {answer}", best.layer)
            )
    flagged = {kind: sum(p < threshold for p in values) / len(values) for kind, values in scores.items()}
    print(
        f"{len(scores[True])} true and {len(scores[False])} false answers of {len(held_out)} held-out questions: "
        f"flagged false {100 * flagged[False]:.1f} %, flagged true {100 * flagged[True]:.1f} %"
    )
    print(f"detector AUROC (true above false): {auroc(scores[True], scores[False]):.3f}")


if __name__ == "__main__":
    main()
