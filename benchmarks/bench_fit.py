"""Time to fit HPR editors for all 30 SmolLM2-135M layers on half of TruthfulQA from cached activations.

Default: random activations of the real shapes (30 layers, d=576, angle net 576->288->1, ~5.4k
last-token pairs, 20 % of the groups for validation) — the timing does not depend on the values.
``--real`` collects real SmolLM2 activations for half of TruthfulQA first (slow: ~minutes of
forward passes) and times the fit on those. Prints one JSON line with the numbers.

    python benchmarks/bench_fit.py [--pairs 5400] [--layers 30] [--epochs 5] [--threads 2] [--real]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def random_activations(n_pairs: int, n_layers: int, d: int, seed: int = 0):
    from hpr_peft.fitting import PairActivations

    gen = torch.Generator().manual_seed(seed)
    feats = {}
    for layer in range(n_layers):
        scale = 1 + 5 * torch.rand(d, generator=gen)
        offset = 3 * torch.randn(d, generator=gen)
        feats[layer] = torch.randn(2 * n_pairs, d, generator=gen) * scale + offset
    return PairActivations(
        layers=list(range(n_layers)),
        hidden_size=d,
        token_selection="last",
        storage_dtype=torch.float32,
        pair_group_ids=[f"g{i // 2}" for i in range(n_pairs)],
        seq_offsets=torch.arange(2 * n_pairs + 1),
        pos_rows=torch.arange(0, 2 * n_pairs, 2),
        neg_rows=torch.arange(1, 2 * n_pairs, 2),
        row_pair=torch.arange(n_pairs),
        features=feats,
    )


def real_activations(n_pairs: int, batch_size: int):
    from hpr_peft.data import load_truthfulqa
    from hpr_peft.fitting import collect_activations
    from hpr_peft.runtime.bundled_models import load_bundled

    model, tokenizer = load_bundled("smollm2")
    pairs = load_truthfulqa()
    questions = sorted({p.group_id for p in pairs})
    half = set(questions[: len(questions) // 2])
    pairs = [p for p in pairs if p.group_id in half][:n_pairs]
    t = time.perf_counter()
    acts = collect_activations(model, tokenizer, pairs, token_selection="last", batch_size=batch_size)
    return acts, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5400)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where training runs (cpu, cuda)")
    parser.add_argument("--real", action="store_true", help="collect real SmolLM2 activations first")
    parser.add_argument("--collect-batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hpr_peft.data.splits import split_groups
    from hpr_peft.fitting import select_layers, train_editors

    result: dict = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    if args.real:
        acts, collect_s = real_activations(args.pairs, args.collect_batch_size)
        result.update(source="real SmolLM2-135M TruthfulQA", collection_s=round(collect_s, 1))
    else:
        acts = random_activations(args.pairs, args.layers, args.hidden)
        result["source"] = "random activations of the real shapes"
    split = split_groups(
        sorted(set(acts.pair_group_ids)), (1 - args.val_fraction, args.val_fraction, 0.0), seed=0
    )
    train, val = acts.select_groups(split.train), acts.select_groups(split.validation)
    t = time.perf_counter()
    _, results = train_editors(
        train, val, epochs=args.epochs, batch_size=args.batch_size, progress=False, device=args.device
    )
    fit_s = time.perf_counter() - t
    selected, _ = select_layers(results, top_k=5)
    result.update(
        layers=len(acts.layers),
        hidden=acts.hidden_size,
        train_rows=train.n_rows,
        val_rows=val.n_rows,
        fit_s=round(fit_s, 1),
        selected=selected,
        val_accuracy={r.layer: round(r.val_accuracy, 3) for r in results},
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
