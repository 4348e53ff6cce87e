"""Batched collection of the unedited model's hidden states for contrastive pairs.

:func:`collect_activations` runs the *unedited* model over every unique ``prompt + completion`` once
(TruthfulQA pairs reuse each answer about twice), with hooks on the targeted decoder blocks only,
and stops the forward right after the last targeted block (the later blocks and the LM head are
never computed). When all sequences start with the same tokens (the 6-shot TruthfulQA primer, ~300
tokens) the primer's key/value cache is computed once and reused for every batch; the activations
equal those of a plain forward (tested). Under ``torch.distributed`` the batches are split across
ranks and gathered, in the original order, on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from hpr_peft.fitting.activations import (
    STORAGE_DTYPES,
    TOKEN_SELECTIONS,
    PairActivations,
    pair_rows,
    write_index,
)
from hpr_peft.runtime.blocks import DecoderStack, find_decoder_stack, hidden_size_of
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.model_io import (
    cache_inputs,
    context_length,
    distributed_rank_world,
    eval_mode,
    forward_until,
    input_device,
    pad_token_id,
    sliding_window,
    unedited_context,
)
from hpr_peft.runtime.progress import progress_bar

__all__ = ["collect_activations", "tokenize_pairs_texts"]

# A shared prefix shorter than this is not worth a cache copy per batch.
MIN_SHARED_PREFIX = 8


def collect_activations(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[Any],
    layers: Sequence[int] | None = None,
    token_selection: str = "last",
    batch_size: int = 8,
    storage_dtype: torch.dtype = torch.float32,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    shared_prefix: bool | None = None,
    early_exit: bool = True,
    shard_rows: int = 65536,
) -> PairActivations:
    """Collect the output hidden states of decoder blocks ``layers`` for every pair.

    ``pairs`` are :class:`hpr_peft.data.ContrastivePair` (``prompt``, ``positive``, ``negative``,
    ``group_id``); the model input is ``prompt + completion``. ``token_selection="last"`` keeps the
    last completion token; ``"response"`` keeps every completion token, positive and negative paired
    by position up to the shorter completion (the paper). The adapter of a PEFT model is disabled
    while collecting. ``shared_prefix`` (None = auto) reuses the KV cache of the tokens all sequences
    share; ``early_exit`` stops each forward after the last targeted block. With ``output_dir`` the
    features stream to safetensors shards there (bounded RAM) and the result reads layers on demand.
    """
    pairs = _checked_pairs(pairs, token_selection, storage_dtype, batch_size)
    stack = find_decoder_stack(model)
    layers = _checked_layers(layers, len(stack))
    plan = _SequencePlan.build(model, tokenizer, pairs, token_selection)
    rank, world = distributed_rank_world()
    batches = [b for k, b in enumerate(_make_batches(plan.token_lengths, batch_size)) if k % world == rank]
    sink = _FeatureSink(layers, output_dir, rank, shard_rows)
    run = _CollectionRun(model, stack, layers, storage_dtype, early_exit, pad_token_id(tokenizer))
    prefix_len = run.collect(
        plan, batches, plan.shared_prefix_length(model, shared_prefix), sink, progress and rank == 0
    )
    features, shards = sink.finish(world, plan.n_sequences)
    result = PairActivations(
        layers=layers,
        hidden_size=run.hidden_size or hidden_size_of(model),
        token_selection=token_selection,
        storage_dtype=storage_dtype,
        pair_group_ids=[p.group_id for p in pairs],
        seq_offsets=plan.offsets,
        pos_rows=torch.tensor(plan.rows[0], dtype=torch.long),
        neg_rows=torch.tensor(plan.rows[1], dtype=torch.long),
        row_pair=torch.tensor(plan.rows[2], dtype=torch.long),
        features=features,
        directory=sink.directory,
        shards=shards,
        metadata={
            "n_sequences": plan.n_sequences,
            "shared_prefix_tokens": prefix_len,
            "early_exit": early_exit,
            "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "tokens": int(sum(plan.token_lengths)),
        },
    )
    _write_index_once(result, sink.directory, rank, world)
    return result


def _checked_pairs(
    pairs: Sequence[Any], token_selection: str, storage_dtype: torch.dtype, batch_size: int
) -> list:
    pairs = list(pairs)
    if not pairs:
        raise ValueError("pairs is empty: collect_activations needs at least one ContrastivePair.")
    if token_selection not in TOKEN_SELECTIONS:
        raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}.")
    if storage_dtype not in STORAGE_DTYPES:
        raise TypeError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    for i, pair in enumerate(pairs):
        for name in ("prompt", "positive", "negative", "group_id"):
            if not hasattr(pair, name):
                raise TypeError(
                    f"pairs[{i}] has no field {name!r}: pass hpr_peft.data.ContrastivePair objects."
                )
        if pair.positive == pair.negative:
            raise ValueError(
                f"pairs[{i}] (group {pair.group_id!r}) has identical positive and negative completions "
                f"{pair.positive!r}: a contrastive pair needs two different completions; drop it."
            )
        if not pair.positive or not pair.negative:
            raise ValueError(f"pairs[{i}] (group {pair.group_id!r}) has an empty completion.")
    return pairs


def _checked_layers(layers: Sequence[int] | None, n_blocks: int) -> list[int]:
    layers = list(range(n_blocks)) if layers is None else sorted({int(x) for x in layers})
    if not layers:
        raise ValueError("layers is empty: name at least one decoder block index.")
    bad = [x for x in layers if x < 0 or x >= n_blocks]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: the model has {n_blocks} decoder blocks (0..{n_blocks - 1})."
        )
    return layers


# --------------------------------------------------------------------------------------------------
# Which sequences run, and which of their tokens become rows


def _completion_start_from_offsets(offsets: Sequence[tuple[int, int]], prompt_chars: int) -> int:
    """First token whose character span ends past the prompt (a token straddling the boundary counts
    as completion: it carries completion characters). Special tokens have span (0, 0)."""
    for i, (start, end) in enumerate(offsets):
        if end > prompt_chars and end > start:
            return i
    return len(offsets)


def tokenize_pairs_texts(
    tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``prompt + completion`` (tokenised jointly) and the index of the first completion
    token of each. Uses character offsets when the tokenizer is fast, else the longest common token
    prefix with the prompt tokenised alone."""
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        ids = [list(x) for x in enc["input_ids"]]
        starts = [
            _completion_start_from_offsets(offsets, len(prompt))
            for offsets, prompt in zip(enc["offset_mapping"], prompts, strict=True)
        ]
        return ids, starts
    ids = [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    return ids, [_common_prefix_length([joint, alone]) for joint, alone in zip(ids, prompt_ids, strict=True)]


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        limit = min(n, len(s))
        while k < limit and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return n


@dataclass
class _SequencePlan:
    """The unique ``(prompt, completion)`` sequences of the pairs, their tokens and feature rows."""

    texts: list[tuple[str, str]]
    token_ids: list[list[int]]
    positions: list[list[int]]  # token positions each sequence contributes as rows
    offsets: torch.Tensor  # sequence s owns feature rows offsets[s]:offsets[s + 1]
    rows: tuple[list[int], list[int], list[int]]  # positive rows, negative rows, pair of each row
    starts: list[int]  # first completion token of each sequence

    @property
    def n_sequences(self) -> int:
        return len(self.texts)

    @property
    def token_lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def row_counts(self) -> list[int]:
        return [len(p) for p in self.positions]

    @classmethod
    def build(cls, model: nn.Module, tokenizer: Any, pairs: list, token_selection: str) -> _SequencePlan:
        """Deduplicate sequences (each unique one runs once), tokenise them and lay out the rows."""
        index: dict[tuple[str, str], int] = {}
        pair_seqs = []
        for pair in pairs:
            ends = [index.setdefault((pair.prompt, c), len(index)) for c in (pair.positive, pair.negative)]
            pair_seqs.append((ends[0], ends[1]))
        texts = list(index)
        token_ids, starts = tokenize_pairs_texts(tokenizer, [p for p, _ in texts], [c for _, c in texts])
        _check_lengths(model, texts, token_ids, starts, pair_seqs)
        if token_selection == "last":
            positions = [[len(ids) - 1] for ids in token_ids]
        else:
            positions = [list(range(start, len(ids))) for ids, start in zip(token_ids, starts, strict=True)]
        counts = [len(p) for p in positions]
        offsets = torch.zeros(len(texts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.tensor(counts, dtype=torch.long), 0)
        return cls(texts, token_ids, positions, offsets, pair_rows(pair_seqs, counts, offsets), starts)

    def shared_prefix_length(self, model: nn.Module, shared_prefix: bool | None) -> int:
        """Tokens every sequence starts with and whose KV cache can be shared (0: none is shared)."""
        if shared_prefix is False:
            return 0
        length = min(
            _common_prefix_length(self.token_ids), min(self.starts), min(len(t) - 1 for t in self.token_ids)
        )
        window = sliding_window(model)
        if window is not None and max(self.token_lengths) > window:
            return 0
        if shared_prefix is None and length < MIN_SHARED_PREFIX:
            return 0
        return length


def _check_lengths(model: nn.Module, texts, token_ids, starts, pair_seqs) -> None:
    context = context_length(model)
    for s, (ids, start) in enumerate(zip(token_ids, starts, strict=True)):
        if start >= len(ids):
            raise ValueError(
                f"completion {texts[s][1]!r} tokenises to no tokens after its prompt: completions must "
                "be non-empty text."
            )
        if context is not None and len(ids) > context:
            first = next(i for i, (a, b) in enumerate(pair_seqs) if s in (a, b))
            raise ValueError(
                f"pairs[{first}] is {len(ids)} tokens long (prompt + completion) but the model's context is "
                f"{context} tokens: shorten the prompt or drop the pair."
            )


def _make_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sequences grouped longest-first into fixed batches (deterministic, independent of world size)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --------------------------------------------------------------------------------------------------
# Running the model


class _CollectionRun:
    """Runs the batches through the unedited model and hands each block's selected rows to a sink."""

    def __init__(
        self,
        model: nn.Module,
        stack: DecoderStack,
        layers: list[int],
        storage_dtype: torch.dtype,
        early_exit: bool,
        pad_id: int,
    ) -> None:
        self.model = model
        self.stack = stack
        self.layers = layers
        self.storage_dtype = storage_dtype
        self.early_exit = early_exit
        self.pad_id = pad_id
        self.hidden_size: int | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._captured: dict[int, torch.Tensor] = {}

    def collect(
        self, plan: _SequencePlan, batches: list[list[int]], prefix_len: int, sink, progress: bool
    ) -> int:
        """Run every batch; returns the shared-prefix length actually used."""
        model = self.model
        with eval_mode(model), torch.inference_mode(), unedited_context(model)():
            kv = None
            if prefix_len > 0:
                needed = max(self.layers) + 1 if self.early_exit else len(self.stack)
                kv = _prefix_cache(model, self.stack, plan.token_ids[0][:prefix_len], needed)
                prefix_len = prefix_len if kv is not None else 0
            self._run_batches(plan, batches, prefix_len, kv, sink, progress)
        return prefix_len

    def _run_batches(self, plan, batches, prefix_len: int, kv, sink, progress: bool) -> None:
        bar = progress_bar(len(batches), "collecting activations", progress, unit="batch")
        with HookSet() as hooks:
            for layer in self.layers:
                hooks.on_block_output(self.stack.layers[layer], self._recorder(layer))
            for batch in batches:
                inputs, self._rows = _batch_inputs(self.model, plan, batch, prefix_len, self.pad_id, kv)
                self._captured.clear()
                if self.early_exit:
                    forward_until(self.model, self.stack.layers[max(self.layers)], **inputs)
                else:
                    self.model(**inputs)
                if self.hidden_size is None:
                    self.hidden_size = int(self._captured[self.layers[0]].shape[-1])
                sink.add(batch, plan.row_counts, self._captured)
                bar.update(1)
                bar.set_postfix(tokens=int(inputs["attention_mask"].sum()))
        bar.close()
        sink.flush()

    def _recorder(self, layer: int):
        def record(hidden: torch.Tensor) -> None:
            batch_index, position = self._rows
            rows = hidden[batch_index.to(hidden.device), position.to(hidden.device)]
            self._captured[layer] = rows.to(device="cpu", dtype=self.storage_dtype)

        return record


def _batch_inputs(
    model: nn.Module, plan: _SequencePlan, batch: list[int], prefix_len: int, pad_id: int, kv
) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded inputs of ``batch`` after the shared prefix, and the (row, position) of every
    feature row in them."""
    suffixes = [plan.token_ids[s][prefix_len:] for s in batch]
    width = max(len(x) for x in suffixes)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    row_b, row_p = [], []
    for j, (s, suffix) in enumerate(zip(batch, suffixes, strict=True)):
        pad = width - len(suffix)
        input_ids[j, pad:] = torch.tensor(suffix)
        mask[j, pad:] = 1
        row_b.extend([j] * len(plan.positions[s]))
        row_p.extend(pad + q - prefix_len for q in plan.positions[s])
    position_ids = (torch.cumsum(mask, dim=1) - 1).clamp(min=0) + prefix_len
    if prefix_len:
        mask = torch.cat([torch.ones(len(batch), prefix_len, dtype=torch.long), mask], dim=1)
    device = input_device(model)
    inputs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }
    inputs.update(
        cache_inputs(model, _expanded_cache(model, kv, len(batch)))
        if kv is not None
        else {"use_cache": False}
    )
    return inputs, (torch.tensor(row_b), torch.tensor(row_p))


def _prefix_cache(model: nn.Module, stack: DecoderStack, prefix_ids: list[int], blocks_needed: int):
    """Key/value tensors of the shared prefix for the first ``blocks_needed`` blocks (None when the
    cache does not expose them)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], device=input_device(model))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **cache_inputs(model, cache)}
    if blocks_needed < len(stack):
        forward_until(model, stack.layers[blocks_needed - 1], **inputs)
    else:
        model(**inputs)
    kv = []
    for layer in cache.layers[:blocks_needed]:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if keys is None or values is None:
            return None
        kv.append((keys, values))
    return kv


def _expanded_cache(model: nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for idx, (keys, values) in enumerate(kv):
        cache.update(keys.expand(batch, *keys.shape[1:]), values.expand(batch, *values.shape[1:]), idx)
    return cache


# --------------------------------------------------------------------------------------------------
# Where the rows go


class _FeatureSink:
    """Captured rows, kept per sequence in memory or streamed to safetensors shards in ``output_dir``."""

    def __init__(
        self, layers: list[int], output_dir: str | os.PathLike | None, rank: int, shard_rows: int
    ) -> None:
        self.layers = layers
        self.directory = Path(output_dir) if output_dir is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.shard_rows = shard_rows
        self.shards: list[dict[str, Any]] = []
        self._pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self._pending_seqs: list[int] = []
        self._pending_lengths: list[int] = []
        self._in_memory: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}

    def add(self, batch: list[int], row_counts: list[int], captured: dict[int, torch.Tensor]) -> None:
        """Split each layer's captured rows of ``batch`` back into its sequences."""
        for layer in self.layers:
            rows = captured[layer]
            cursor = 0
            for s in batch:
                chunk = rows[cursor : cursor + row_counts[s]]
                cursor += row_counts[s]
                if self.directory is not None:
                    self._pending[layer].append(chunk)
                else:
                    self._in_memory[layer][s] = chunk
        if self.directory is not None:
            self._pending_seqs.extend(batch)
            self._pending_lengths.extend(row_counts[s] for s in batch)
            if sum(self._pending_lengths) >= self.shard_rows:
                self.flush()

    def flush(self) -> None:
        """Write the pending rows as one shard (streaming mode only)."""
        if not self._pending_seqs or self.directory is None:
            return
        name = f"shard-r{self.rank:03d}-{len(self.shards):05d}.safetensors"
        save_file(
            {f"layer.{layer}": torch.cat(self._pending[layer]) for layer in self.layers},
            str(self.directory / name),
        )
        self.shards.append(
            {"file": name, "sequences": list(self._pending_seqs), "lengths": list(self._pending_lengths)}
        )
        for layer in self.layers:
            self._pending[layer].clear()
        self._pending_seqs.clear()
        self._pending_lengths.clear()

    def finish(
        self, world: int, n_sequences: int
    ) -> tuple[dict[int, torch.Tensor] | None, list[dict[str, Any]]]:
        """``(features in sequence order, None when streamed; shards)``, gathered from every rank."""
        if world > 1:
            gathered: list[Any] = [None] * world
            payload = self.shards if self.directory is not None else self._in_memory
            torch.distributed.all_gather_object(gathered, payload)
            if self.directory is not None:
                self.shards = [shard for part in gathered for shard in part]
            else:
                for part in gathered:
                    for layer in self.layers:
                        self._in_memory[layer].update(part[layer])
        if self.directory is not None:
            return None, self.shards
        features = {}
        for layer in self.layers:
            per_seq = self._in_memory[layer]
            features[layer] = torch.cat([per_seq[s] for s in range(n_sequences)])
            per_seq.clear()
        return features, self.shards


def _write_index_once(result: PairActivations, directory: Path | None, rank: int, world: int) -> None:
    """Rank 0 writes the index of streamed activations, the others wait for it."""
    if directory is None:
        return
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        write_index(result, directory)
    if world > 1:
        torch.distributed.barrier()
