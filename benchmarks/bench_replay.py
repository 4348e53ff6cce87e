"""Block-input replay: scoring an edit at the last blocks with the unedited blocks below it replayed.

The real SmolLM2-135M (bundled GGUF, 30 blocks) gets an HPR adapter with random editors at blocks
``--first-block`` .. ``--first-block + 2`` (default 20-22). One unedited pass records what enters the
first edited block (:mod:`hpr_peft.runtime.replay`): TruthfulQA scoring (packed, first ``--questions``
questions) and the neutral-text reference. Then the edited model is scored ``full`` (every block runs)
and ``replay`` (blocks below the first edited one replayed), alternating for ``--rounds`` rounds; the
script prints one JSON line with the median seconds of each, the speed-ups ``full / replay``, the
one-off recording pass, and the largest difference between the two (MC2 per question, KL).

    python benchmarks/bench_replay.py [--questions 30] [--rounds 2] [--first-block 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--truthfulqa-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from hpr_peft import HPRConfig
    from hpr_peft.data import load_truthfulqa_mc
    from hpr_peft.evaluation import TruthfulQAScorer
    from hpr_peft.evaluation.side_effects import NeutralText
    from hpr_peft.runtime.bundled_models import load_bundled
    from hpr_peft.runtime.model_io import unedited_context
    from hpr_peft.runtime.replay import record_block_inputs, replay_from_block

    base, tokenizer = load_bundled("smollm2")
    edited = list(range(args.first_block, args.first_block + 3))
    torch.manual_seed(0)
    model = get_peft_model(base, HPRConfig(target_layers=edited, init_weights=False)).eval()
    questions = load_truthfulqa_mc(args.truthfulqa_dir)[: args.questions]
    scorer = TruthfulQAScorer(tokenizer, questions, packed=True)  # packed: the same calls every pass
    neutral = NeutralText(tokenizer)

    start = time.perf_counter()
    with record_block_inputs(model, args.first_block) as qa_record:
        scorer.score(model, context=unedited_context(model), progress=False)
    with record_block_inputs(model, args.first_block) as text_record:
        neutral.compute_reference(model, unedited_context(model))
    record_seconds = time.perf_counter() - start

    variants = {
        "full": lambda record: contextlib.nullcontext(),  # every block runs
        "replay": lambda record: replay_from_block(model, record),
    }
    seconds: dict[str, dict[str, list[float]]] = {name: {"mc": [], "kl": []} for name in variants}
    mc2: dict[str, list[float]] = {}
    kl: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, context in variants.items():
            with context(qa_record):
                result = scorer.score(model, progress=False)
            seconds[name]["mc"].append(result.seconds)
            mc2[name] = result.mc2
            begin = time.perf_counter()
            with context(text_record):
                kl[name] = neutral.measure(model).kl
            seconds[name]["kl"].append(time.perf_counter() - begin)
    median = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in seconds.items()}
    print(
        json.dumps(
            {
                "questions": len(questions),
                "threads": args.threads,
                "edited_blocks": edited,
                "record_seconds": round(record_seconds, 2),
                "seconds": median,
                "speedup_mc": round(median["full"]["mc"] / median["replay"]["mc"], 2),
                "speedup_kl": round(median["full"]["kl"] / median["replay"]["kl"], 2),
                "max_abs_mc2_diff": max(abs(a - b) for a, b in zip(mc2["full"], mc2["replay"], strict=True)),
                "kl": kl,
            }
        )
    )


if __name__ == "__main__":
    main()
