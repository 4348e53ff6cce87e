"""Evaluate an HPR adapter with lm-evaluation-harness, from Python and from its command line.

    pip install 'hpr_peft[lm-eval]'
    python examples/lm_eval_evaluation.py [--limit 5]

Python: ``import hpr_peft`` registers the HPR type; lm-eval's ``HFLM`` takes the PEFT model itself
(``hpr_peft.integrations.lm_eval.hpr_lm`` builds it), and ``disable_adapter()`` / ``edit_settings``
around the call choose what is evaluated. Command line: ``hpr-peft lm-eval`` is lm-eval's own CLI with
HPR registered, so ``--model_args pretrained=BASE,peft=ADAPTER`` loads a local or Hub adapter; the
example prints that command for the adapter it saved.

Tasks: ``truthfulqa_local_mc1`` / ``mc2`` in examples/lm_eval_tasks are lm-eval's truthfulqa_mc1 /
mc2 reading TruthfulQA from $HPR_TRUTHFULQA_DIR (offline); online, lm-eval's own ``truthfulqa_mc2``
(or any other task) works the same way. Bundled SmolLM2-135M-Instruct; about a minute on a CPU.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lm_eval
import torch
from lm_eval.tasks import TaskManager
from peft import get_peft_model

import hpr_peft
from hpr_peft import HPRConfig, fit_hpr, load_bundled, load_truthfulqa, load_truthfulqa_mc
from hpr_peft.integrations.lm_eval import hpr_lm
from hpr_peft.runtime.bundled_models import smollm2_gguf

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["truthfulqa_local_mc1", "truthfulqa_local_mc2"]


def evaluate(lm, limit: int) -> dict[str, float]:
    """lm-eval's accuracy per task on the first ``limit`` questions."""
    results = lm_eval.simple_evaluate(
        model=lm, tasks=TASKS, task_manager=TaskManager(include_path=str(TASKS_DIR)), limit=limit
    )
    return {task: float(results["results"][task]["acc,none"]) for task in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5, help="questions per task (from the first)")
    parser.add_argument("--truthfulqa-dir", default=None, help="default: $HPR_TRUTHFULQA_DIR")
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_bundled("smollm2", progress=False)
    model = get_peft_model(base, HPRConfig(target_layers="all"))
    # Fit on questions after the evaluated ones, so lm-eval scores held-out questions.
    ids = [q.question_id for q in load_truthfulqa_mc(args.truthfulqa_dir)[100:130]]
    pairs = load_truthfulqa(args.truthfulqa_dir, question_ids=ids, primer=False, max_pairs_per_question=2)
    fit_hpr(model, tokenizer, pairs, top_k=3, epochs=3, progress=False)

    lm = hpr_lm(model, tokenizer, batch_size=8)
    with model.disable_adapter():
        unedited = evaluate(lm, args.limit)
    edited = evaluate(lm, args.limit)
    with hpr_peft.edit_settings(model, alpha=0.5):
        half = evaluate(lm, args.limit)
    print(f"lm-eval on the first {args.limit} TruthfulQA questions:")
    for task in TASKS:
        print(
            f"  {task}: unedited {unedited[task]:.4f}  HPR α=1 {edited[task]:.4f}  HPR α=0.5 {half[task]:.4f}"
        )

    adapter = Path(tempfile.mkdtemp(prefix="hpr-adapter-"))
    hpr_peft.save_adapter_atomic(model, adapter)
    folder, gguf = smollm2_gguf()
    print("\nThe same from the command line (a Hub id works for peft= too):")
    print(
        f"  hpr-peft lm-eval --model hf --model_args pretrained={folder},gguf_file={gguf},peft={adapter} "
        f"--tasks {','.join(TASKS)} --include_path {TASKS_DIR} --limit {args.limit} --device cpu"
    )


if __name__ == "__main__":
    main()
