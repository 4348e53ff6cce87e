"""TruthfulQA scoring throughput: tree-packed (several questions per forward) vs one question at a time.

Both variants score the same questions with the real SmolLM2-135M (bundled GGUF) and the shared primer
KV cache; ``plain`` runs one question forward plus one answer batch per question (the pre-packing
path), ``packed`` runs :mod:`hpr_peft.evaluation.packing` batches of about ``--max-tokens`` tokens. The variants
alternate for ``--rounds`` rounds after a warm-up, and the script prints one JSON line with the median
seconds, tokens/s, the speed-up ``plain / packed`` and the largest score difference between them.

    python benchmarks/bench_scoring.py [--questions 80] [--rounds 2] [--max-tokens 768] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--truthfulqa-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hpr_peft.data import load_truthfulqa_mc
    from hpr_peft.evaluation import TruthfulQAScorer
    from hpr_peft.runtime.bundled_models import load_bundled

    model, tokenizer = load_bundled("smollm2")
    model.eval()
    questions = load_truthfulqa_mc(args.truthfulqa_dir)[: args.questions]
    scorers = {
        "plain": TruthfulQAScorer(tokenizer, questions, packed=False),
        "packed": TruthfulQAScorer(tokenizer, questions, packed=True, max_tokens=args.max_tokens),
    }
    TruthfulQAScorer(tokenizer, questions[:4], packed=True).score(model, progress=False)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    answers: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            result = scorer.score(model, progress=False, keep_answer_scores=True)
            seconds[name].append(result.seconds)
            answers[name] = result.answer_scores
    tokens = scorers["plain"].n_tokens
    diff = max(
        abs(answers["plain"][q][a] - answers["packed"][q][a])
        for q in answers["plain"]
        for a in answers["plain"][q]
    )
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(
        json.dumps(
            {
                "questions": len(questions),
                "tokens_per_pass": tokens,
                "threads": args.threads,
                "seconds": median,
                "tokens_per_s": {name: round(tokens / s, 1) for name, s in median.items()},
                "speedup_packed_over_plain": round(median["plain"] / median["packed"], 2),
                "max_abs_score_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
