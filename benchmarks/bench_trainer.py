"""Benchmark: how many ``transformers.Trainer`` steps until the default HPR adapter edits non-trivially.

``get_peft_model(model, HPRConfig())`` (all blocks, ``init_weights=True``) starts as an exact identity
with a zero angle gain. It is trained with a plain ``Trainer`` (AdamW, constant learning rate) on a
language-model loss over TruthfulQA questions followed by a true answer (the pairs' desired completion,
``$HPR_TRUTHFULQA_DIR`` or ``--truthfulqa-dir``). After every optimizer step the script measures the edit
on held-out neutral prose (``hpr_peft/resources/neutral.txt``, which the adapter never trains on):

* ``kl``: mean per-token ``KL(edited ‖ base)`` of the next-token distributions, in nats;
* ``max |dlogit|``: the largest change of any logit;
* ``top-1 changed``: the share of positions whose most likely next token changed;
* ``flagged``: the share of held-out tokens the probes flag, averaged over the blocks.

It prints one row per step and the first step after which the edit is non-trivial, defined as a mean
KL of at least ``--kl-threshold`` (default 1e-3 nats per token) on the held-out prose.

Run: ``python benchmarks/bench_trainer.py [--model smollm2] [--steps 20] [--lr 1e-2] [--threads N]``
(``--model tiny`` runs the same on a tiny random Llama in seconds).
"""

from __future__ import annotations

import argparse
import time

import torch


def training_rows(tokenizer, truthfulqa_dir: str | None, count: int, length: int) -> list[dict]:
    """``count`` LM examples "prompt + true answer", left-truncated/padded to ``length`` tokens."""
    from hpr_peft.data import load_truthfulqa

    rows = []
    for pair in load_truthfulqa(truthfulqa_dir)[:count]:
        ids = tokenizer(pair.prompt + pair.positive, add_special_tokens=False)["input_ids"][-length:]
        pad = length - len(ids)
        input_ids = torch.tensor([tokenizer.pad_token_id] * pad + ids)
        mask = torch.tensor([0] * pad + [1] * len(ids))
        labels = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, -100))
        rows.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return rows


def held_out_batch(tokenizer, length: int) -> dict:
    from hpr_peft.evaluation.side_effects import load_neutral_paragraphs

    texts = load_neutral_paragraphs()[:4]
    return tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=length)


def edit_measures(model, batch: dict, base_logits: torch.Tensor) -> dict[str, float]:
    from hpr_peft.tuner.control import monitor

    with torch.no_grad():
        with monitor(model) as records:
            model(**batch)
        logits = model(**batch).logits
    real = batch["attention_mask"].bool()
    edited, base = logits.float().log_softmax(-1)[real], base_logits.float().log_softmax(-1)[real]
    kl = (edited.exp() * (edited - base)).sum(-1).mean()
    flagged = [r.fraction_flagged for r in records.values()]
    return {
        "kl": float(kl),
        "max_dlogit": float((logits - base_logits).abs().amax()),
        "top1_changed": float((edited.argmax(-1) != base.argmax(-1)).float().mean()),
        "flagged": sum(flagged) / len(flagged),
    }


def load(model_name: str):
    """(model, tokenizer): a bundled model, or for ``tiny`` a tiny random Llama with SmolLM2's tokenizer."""
    from hpr_peft.runtime.bundled_models import load_bundled

    if model_name != "tiny":
        return load_bundled(model_name)
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = load_bundled("smollm2")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="bundled model (smollm2, gemma3) or 'tiny'")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--kl-threshold", type=float, default=1e-3)
    parser.add_argument("--truthfulqa-dir", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hpr_peft import HPRConfig

    torch.manual_seed(0)
    base, tokenizer = load(args.model)
    held_out = held_out_batch(tokenizer, args.seq)
    with torch.no_grad():
        base_logits = base(**held_out).logits
    model = get_peft_model(base, HPRConfig())
    rows: list[dict[str, float]] = []

    class Measure(TrainerCallback):
        def on_step_end(self, training_args, state, control, **kwargs):
            rows.append({"step": state.global_step, **edit_measures(model, held_out, base_logits)})

    arguments = TrainingArguments(
        output_dir="/tmp/hpr-bench-trainer", max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    data = training_rows(tokenizer, args.truthfulqa_dir, args.steps * args.batch, args.seq)
    trainer = Trainer(model=model, args=arguments, train_dataset=data, callbacks=[Measure()])
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    print(f"\nTrainer on {args.model}, HPRConfig() (all blocks, identity start), lr {args.lr}, batch {args.batch} x "
          f"{args.seq}, {torch.get_num_threads()} threads, {elapsed:.0f} s")  # fmt: skip
    print(" step    loss   kl (nats/token)  max |dlogit|  top-1 changed  flagged")
    for row, loss in zip(rows, losses, strict=False):
        print(f"{row['step']:5d}  {loss:6.3f}  {row['kl']:14.2e}  {row['max_dlogit']:12.3g}  "
              f"{row['top1_changed']:13.3f}  {row['flagged']:7.2f}")  # fmt: skip
    first = next((row["step"] for row in rows if row["kl"] >= args.kl_threshold), None)
    print(
        f"edit non-trivial (mean KL >= {args.kl_threshold:g} nats/token on held-out prose) after step: {first}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
