"""Activation-collection throughput vs a plain batched forward over the same tokens (SmolLM2-135M).

Runs in one process, on the same sequences (unique prompt+completion texts of TruthfulQA pairs,
6-shot QA primer included), each timing after a warm-up:

- ``plain``: a left-padded batched forward of the full sequences through the whole model (LM head
  included, no cache), ``torch.inference_mode``;
- ``collect (hooks only)``: ``collect_activations`` with ``shared_prefix=False, early_exit=False``
  (same work as ``plain`` plus the hooks: the overhead of collection itself);
- ``collect (early exit)``: ``shared_prefix=False, early_exit=True``;
- ``collect (prefix + early exit)``: the default (primer KV computed once and reused).

Throughput is counted in tokens of the full sequences for every variant, so the ratios are speed-ups
over ``plain``. Prints one JSON line.

    python benchmarks/bench_collection.py [--pairs 48] [--batch-size 8] [--rounds 2] [--layers all|0-19|8,14,20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def parse_layers(text: str, n: int) -> list[int]:
    if text == "all":
        return list(range(n))
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def plain_forward(model, tokenizer, texts: list[str], batch_size: int) -> None:
    order = sorted(range(len(texts)), key=lambda i: -len(tokenizer(texts[i])["input_ids"]))
    with torch.inference_mode():
        for i in range(0, len(order), batch_size):
            batch = [texts[j] for j in order[i : i + batch_size]]
            enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
            position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
            model(**enc, position_ids=position_ids, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each counts")
    parser.add_argument(
        "--random-init-from",
        default=None,
        help="folder with config.json + tokenizer files: build that model with random weights instead of "
        "loading the bundled SmolLM2 (timings do not depend on the weights; for machines without the GGUF)",
    )
    parser.add_argument("--truthfulqa-dir", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hpr_peft.data import load_truthfulqa
    from hpr_peft.fitting import collect_activations
    from hpr_peft.runtime.blocks import num_decoder_layers
    from hpr_peft.runtime.bundled_models import load_bundled

    if args.random_init_from:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(args.random_init_from)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.random_init_from, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        model, tokenizer = load_bundled("smollm2")
    model.to(args.device)
    pairs = load_truthfulqa(args.truthfulqa_dir)[: args.pairs]
    texts = sorted({p.prompt + c for p in pairs for c in (p.positive, p.negative)})
    n_tokens = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    layers = parse_layers(args.layers, num_decoder_layers(model))

    def timed(fn) -> float:
        if args.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    variants = {
        "plain": lambda: plain_forward(model, tokenizer, texts, args.batch_size),
        "collect (hooks only)": lambda: collect_activations(
            model,
            tokenizer,
            pairs,
            layers=layers,
            batch_size=args.batch_size,
            progress=False,
            shared_prefix=False,
            early_exit=False,
        ),
        "collect (early exit)": lambda: collect_activations(
            model,
            tokenizer,
            pairs,
            layers=layers,
            batch_size=args.batch_size,
            progress=False,
            shared_prefix=False,
            early_exit=True,
        ),
        "collect (prefix + early exit)": lambda: collect_activations(
            model, tokenizer, pairs, layers=layers, batch_size=args.batch_size, progress=False
        ),
    }
    plain_forward(model, tokenizer, texts[: args.batch_size], args.batch_size)  # warm-up
    # variants alternate over several rounds; the fastest round of each counts (robust to a busy machine)
    seconds = {name: math.inf for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            seconds[name] = min(seconds[name], timed(fn))
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "sequences": len(texts),
        "tokens": n_tokens,
        "layers": f"{min(layers)}-{max(layers)} ({len(layers)})",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "tokens_per_s": {k: round(n_tokens / v, 1) for k, v in seconds.items()},
        "speedup_vs_plain": {k: round(seconds["plain"] / v, 3) for k, v in seconds.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
