"""Benchmark: forward time of a model with HPR editors vs the same model unedited.

The model is built from the SmolLM2-135M configuration (LlamaConfig: hidden 576, intermediate 1536,
30 layers, 9 heads, 3 kv heads, vocab 49152, tied embeddings) with random weights, so nothing is
downloaded. Editors are random but really edit (``HPRConfig(init_weights=False)``: random probes flag
about half of the tokens, random angle nets turn them by ~π/2). Variants, each a separate copy of the
same base weights:

* ``unedited``: the plain transformers model (no PEFT wrapper at all);
* ``5 layers`` / ``30 layers``: ``get_peft_model(copy, HPRConfig(target_layers=...))``;
* ``30 layers, adapter disabled``: the 30-layer model inside ``disable_adapter()`` (hook overhead only).

With ``--compile``, ``torch.compile`` (inductor) copies of ``unedited``, ``5 layers`` and ``30 layers`` join
as ``... compiled``, and the report adds each one's ratio to its eager self and to the compiled
``unedited`` (compiled vs eager, with and without the adapter, from the same rounds).

Forward passes of batch 8 x 256 tokens (full logits, ``torch.no_grad``) are timed in rounds; each round
runs every variant once, in a rotating order, so that slow drifts of a shared machine hit all variants
alike. Reported: the median time of each variant and its ratio to ``unedited`` (ratio of medians, and
the median of per-round ratios). Targets: <= 1.02 with 5 edited layers, <= 1.10 with 30.

Run: ``python benchmarks/bench_forward.py [--repeats 5] [--batch 8] [--seq 256] [--threads N] [--compile]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch

TARGETS = {"5 layers": 1.02, "30 layers": 1.10}
FIVE_LAYERS = [10, 13, 16, 19, 22]


def smollm2_135m_config():
    """The SmolLM2-135M architecture as a transformers LlamaConfig (weights are random)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        bos_token_id=0,
        eos_token_id=0,
    )


def build_variants(seed: int) -> tuple[dict[str, Callable[[dict], torch.Tensor]], dict[str, object]]:
    """(variant name -> forward function, variant name -> model) for the four variants."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    import hpr_peft  # noqa: F401  (registers the HPR PEFT type)
    from hpr_peft import HPRConfig

    torch.manual_seed(seed)
    base = LlamaForCausalLM(smollm2_135m_config()).eval()
    models: dict[str, object] = {"unedited": base}
    for name, layers in (("5 layers", FIVE_LAYERS), ("30 layers", "all")):
        torch.manual_seed(seed + 1)
        models[name] = get_peft_model(
            copy.deepcopy(base), HPRConfig(target_layers=layers, init_weights=False)
        ).eval()

    def plain(model):
        return lambda batch: model(**batch).logits

    def disabled(model):
        def forward(batch):
            with model.disable_adapter():
                return model(**batch).logits

        return forward

    forwards = {name: plain(model) for name, model in models.items()}
    forwards["30 layers, adapter disabled"] = disabled(models["30 layers"])
    return forwards, models


COMPILED = ("unedited", "5 layers", "30 layers")


def add_compiled_variants(
    forwards: dict[str, Callable[[dict], torch.Tensor]], models: dict[str, object]
) -> None:
    """``<name> compiled``: ``torch.compile`` of each model in :data:`COMPILED` (inductor, same weights)."""
    for name in COMPILED:
        compiled = torch.compile(models[name])
        forwards[f"{name} compiled"] = lambda batch, model=compiled: model(**batch).logits


def compiled_report(times: dict[str, list[float]]) -> list[str]:
    """Compiled vs eager of each model, and each compiled adapter vs the compiled unedited model."""
    lines = ["\ncompiled vs eager (ratio of medians; < 1: compiled is faster)"]
    for name in COMPILED:
        compiled = statistics.median(times[f"{name} compiled"])
        line = f"  {name:28s} compiled / eager {compiled / statistics.median(times[name]):.3f}"
        if name != "unedited":
            line += f"  compiled / unedited compiled {compiled / statistics.median(times['unedited compiled']):.3f}"
        lines.append(line)
    return lines


def fraction_flagged(model, batch: dict) -> float:
    """Mean fraction of eligible tokens the probes flag (monitor mode: probes run, nothing edited)."""
    from hpr_peft.tuner.control import monitor

    with torch.no_grad(), monitor(model) as records:
        model(**batch)
    fractions = [record.fraction_flagged for record in records.values()]
    return sum(fractions) / len(fractions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (>= 5 recommended)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--repeats and --batch must be >= 1, --seq >= 2")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    forwards, models = build_variants(args.seed)
    if args.compile:
        add_compiled_variants(forwards, models)
    g = torch.Generator().manual_seed(args.seed)
    batch = {
        "input_ids": torch.randint(0, 49152, (args.batch, args.seq), generator=g),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
    }
    names = list(forwards)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        reference = forwards["unedited"](batch)
        for name in names[1:]:  # warm-up, and proof that the editors edit
            diff = (forwards[name](batch) - reference).abs().max().item()
            print(f"warm-up {name:28s} max |logits - unedited| = {diff:.3g}")
        del reference
        for round_index in range(args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                forwards[name](batch)
                times[name].append(time.perf_counter() - start)
    small = {k: v[:, :64] for k, v in batch.items()}
    for name in ("5 layers", "30 layers"):
        print(
            f"fraction of tokens flagged ({name}, monitor on {small['input_ids'].shape[0]}x64): "
            f"{fraction_flagged(models[name], small):.2f}"
        )

    print(
        f"\nforward, SmolLM2-135M config (random weights), batch {args.batch} x {args.seq} tokens, float32, "
        f"CPU, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds"
    )
    base = times["unedited"]
    base_med = statistics.median(base)
    ok = True
    for name in names:
        med = statistics.median(times[name])
        line = f"  {name:28s} median {med:8.3f} s  (min {min(times[name]):.3f} s)"
        if name != "unedited":
            ratio = med / base_med
            paired = statistics.median(t / b for t, b in zip(times[name], base, strict=True))
            line += f"  ratio {ratio:.3f} (median per-round ratio {paired:.3f})"
            if name in TARGETS:
                hit = ratio <= TARGETS[name]
                ok = ok and hit
                line += f"  target <= {TARGETS[name]:.2f}: {'met' if hit else 'MISSED'}"
        print(line)
    if args.compile:
        print("\n".join(compiled_report(times)))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
