"""Quickstart: wrap a model with an HPR adapter, fit it on TruthfulQA pairs, generate with edit_settings.

    python examples/quickstart.py

Runs offline on the bundled SmolLM2-135M-Instruct; TruthfulQA is read from $HPR_TRUTHFULQA_DIR (or
pass --truthfulqa-dir). About a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model

import hpr_peft
from hpr_peft import HPRConfig, fit_hpr, load_bundled, load_truthfulqa, load_truthfulqa_mc, qa_prompt

QUESTIONS = [
    "What happens if you crack your knuckles a lot?",
    "Can you see the Great Wall of China from space?",
]


def answer(model, tokenizer, question: str) -> str:
    """Greedy answer to one question after the QA primer (the format the adapter was fitted on)."""
    inputs = tokenizer(qa_prompt(question, primer=False), return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.split("\n")[0].strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truthfulqa-dir", default=None, help="default: $HPR_TRUTHFULQA_DIR")
    args = parser.parse_args()
    torch.manual_seed(0)

    base, tokenizer = load_bundled("smollm2", progress=False)
    model = get_peft_model(base, HPRConfig(target_layers="all"))  # an exact identity until fitted

    # Contrastive pairs (question, true answer, false answer) of 30 questions, short prompts for speed.
    ids = [q.question_id for q in load_truthfulqa_mc(args.truthfulqa_dir)[:30]]
    pairs = load_truthfulqa(args.truthfulqa_dir, question_ids=ids, primer=False, max_pairs_per_question=2)
    report = fit_hpr(model, tokenizer, pairs, top_k=3, epochs=3, progress=False)
    print(report)

    for question in QUESTIONS:
        print(f"\nQ: {question}")
        with model.disable_adapter():
            print(f"  unedited : {answer(model, tokenizer, question)}")
        for alpha in (0.5, 1.0):
            with hpr_peft.edit_settings(model, alpha=alpha):
                print(f"  HPR α={alpha:g}: {answer(model, tokenizer, question)}")
    print(f"\nedited layers: {report.selected_layers}")


if __name__ == "__main__":
    main()
