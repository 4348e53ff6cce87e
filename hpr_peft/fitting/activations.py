"""Batched collection of per-layer hidden states for contrastive pairs (DESIGN §3: data → activations).

:func:`collect_activations` runs the *unedited* model over every unique ``prompt + completion`` once
(TruthfulQA pairs reuse each answer about twice), with forward hooks on the targeted decoder blocks
only, and stops the forward right after the last targeted block (the later blocks and the LM head are
never computed). When all sequences start with the same tokens (the 6-shot TruthfulQA primer, ~300
tokens) the primer's key/value cache is computed once and reused for every batch; the activations
equal those of a plain forward (tested).

The result, :class:`PairActivations`, holds per-layer features of the deduplicated sequences and the
row index that forms the pairs: ``pair_tensors(layer) -> (positives, negatives)``, each
``(n_rows, d)``, with ``row_pair`` / ``group_ids`` telling which pair / group each row belongs to.
It saves to (and streams into) safetensors shards + a JSON index; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hpr_peft.data.prompts import answer_from_continuation
from hpr_peft.runtime.atomic_files import write_text_atomic
from hpr_peft.runtime.blocks import find_decoder_stack, split_block_output

TOKEN_SELECTIONS = ("last", "response")
STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BY_NAME = {name: dtype for dtype, name in STORAGE_DTYPES.items()}
INDEX_FILE = "activations.json"
FORMAT_VERSION = 1
# A shared prefix shorter than this is not worth a cache copy per batch.
MIN_SHARED_PREFIX = 8


class _StopForward(Exception):
    """Raised by the hook on the last targeted block to end the forward early."""


# --------------------------------------------------------------------------------------------------
# The result container


@dataclass
class PairActivations:
    """Per-layer activations of contrastive pairs, stored per unique sequence and paired by index.

    ``features[layer]`` is ``(n_sequence_rows, d)``; sequence ``s`` owns rows
    ``seq_offsets[s]:seq_offsets[s + 1]`` (one row for ``"last"``, one per completion token for
    ``"response"``). Row ``r`` of the pair view is ``features[pos_rows[r]]`` (positive) against
    ``features[neg_rows[r]]`` (negative), from pair ``row_pair[r]`` of group
    ``pair_group_ids[row_pair[r]]``. When ``directory`` is set and ``features`` is None the features
    live on disk (safetensors shards) and each layer is read when asked for.
    """

    layers: list[int]
    hidden_size: int
    token_selection: str
    storage_dtype: torch.dtype
    pair_group_ids: list[str]
    seq_offsets: torch.Tensor
    pos_rows: torch.Tensor
    neg_rows: torch.Tensor
    row_pair: torch.Tensor
    features: dict[int, torch.Tensor] | None = None
    directory: Path | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- views
    @property
    def n_pairs(self) -> int:
        return len(self.pair_group_ids)

    @property
    def n_rows(self) -> int:
        return int(self.row_pair.numel())

    @property
    def group_ids(self) -> list[str]:
        """Group id of every row (rows of one pair share their pair's group)."""
        return [self.pair_group_ids[i] for i in self.row_pair.tolist()]

    def layer_features(self, layer: int) -> torch.Tensor:
        """All per-sequence features of ``layer``, ``(n_sequence_rows, d)``, in sequence order."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not collected: available layers are {self.layers}.")
        if self.features is not None:
            return self.features[layer]
        if self.directory is None:
            raise ValueError("PairActivations has neither in-memory features nor a directory.")
        return _read_layer_from_shards(self.directory, self.shards, layer, self.seq_offsets)

    def pair_tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(positives, negatives)`` of ``layer``, each ``(n_rows, d)`` in the storage dtype."""
        feats = self.layer_features(layer)
        return feats.index_select(0, self.pos_rows), feats.index_select(0, self.neg_rows)

    def select_pairs(self, pair_indices: Sequence[int] | torch.Tensor) -> PairActivations:
        """The rows of the given pairs (indices into the original pair list); features are shared."""
        wanted = torch.zeros(self.n_pairs, dtype=torch.bool)
        idx = torch.as_tensor(list(pair_indices) if not torch.is_tensor(pair_indices) else pair_indices)
        if idx.numel():
            if int(idx.min()) < 0 or int(idx.max()) >= self.n_pairs:
                raise ValueError(
                    f"pair indices must lie in [0, {self.n_pairs}); got {idx.min()}..{idx.max()}."
                )
            wanted[idx.long()] = True
        keep = wanted[self.row_pair]
        return PairActivations(
            layers=list(self.layers),
            hidden_size=self.hidden_size,
            token_selection=self.token_selection,
            storage_dtype=self.storage_dtype,
            pair_group_ids=self.pair_group_ids,
            seq_offsets=self.seq_offsets,
            pos_rows=self.pos_rows[keep],
            neg_rows=self.neg_rows[keep],
            row_pair=self.row_pair[keep],
            features=self.features,
            directory=self.directory,
            shards=self.shards,
            metadata=dict(self.metadata),
        )

    def select_groups(self, groups: Sequence[str]) -> PairActivations:
        """The rows of all pairs whose group id is in ``groups``."""
        wanted = set(groups)
        return self.select_pairs([i for i, g in enumerate(self.pair_group_ids) if g in wanted])

    def to_memory(self) -> PairActivations:
        """A copy with every layer's features loaded into RAM."""
        if self.features is not None:
            return self
        feats = {layer: self.layer_features(layer) for layer in self.layers}
        return PairActivations(**{**self.__dict__, "features": feats})

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write safetensors shard(s) + ``activations.json`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if (
            self.features is None
            and self.directory is not None
            and self.directory.resolve() == directory.resolve()
        ):
            _write_index(self, directory)
            return directory
        n_seq = int(self.seq_offsets.numel() - 1)
        tensors = {f"layer.{layer}": self.layer_features(layer).contiguous() for layer in self.layers}
        name = "shard-00000.safetensors"
        save_file(tensors, str(directory / name))
        lengths = (self.seq_offsets[1:] - self.seq_offsets[:-1]).tolist()
        saved = PairActivations(
            **{
                **self.__dict__,
                "features": None,
                "directory": directory,
                "shards": [{"file": name, "sequences": list(range(n_seq)), "lengths": lengths}],
            }
        )
        _write_index(saved, directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, in_memory: bool = False) -> PairActivations:
        """Open activations saved by :meth:`save` or streamed by ``collect_activations(output_dir=)``."""
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: pass the folder written by PairActivations.save or "
                "collect_activations(output_dir=...)."
            )
        meta = json.loads(index_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{index_path}: unsupported format_version {meta.get('format_version')!r}.")
        with safe_open(str(directory / "pairs.safetensors"), framework="pt") as handle:
            index = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        result = cls(
            layers=[int(x) for x in meta["layers"]],
            hidden_size=int(meta["hidden_size"]),
            token_selection=meta["token_selection"],
            storage_dtype=_DTYPE_BY_NAME[meta["storage_dtype"]],
            pair_group_ids=list(meta["pair_group_ids"]),
            seq_offsets=index["seq_offsets"],
            pos_rows=index["pos_rows"],
            neg_rows=index["neg_rows"],
            row_pair=index["row_pair"],
            features=None,
            directory=directory,
            shards=meta["shards"],
            metadata=meta.get("metadata", {}),
        )
        return result.to_memory() if in_memory else result


def _write_index(acts: PairActivations, directory: Path) -> None:
    save_file(
        {
            "seq_offsets": acts.seq_offsets.contiguous(),
            "pos_rows": acts.pos_rows.contiguous(),
            "neg_rows": acts.neg_rows.contiguous(),
            "row_pair": acts.row_pair.contiguous(),
        },
        str(directory / "pairs.safetensors"),
    )
    meta = {
        "format_version": FORMAT_VERSION,
        "layers": acts.layers,
        "hidden_size": acts.hidden_size,
        "token_selection": acts.token_selection,
        "storage_dtype": STORAGE_DTYPES[acts.storage_dtype],
        "pair_group_ids": acts.pair_group_ids,
        "shards": acts.shards,
        "metadata": acts.metadata,
    }
    write_text_atomic(directory / INDEX_FILE, json.dumps(meta))


def _read_layer_from_shards(
    directory: Path, shards: list[dict[str, Any]], layer: int, seq_offsets: torch.Tensor
) -> torch.Tensor:
    """Assemble one layer's per-sequence rows from shards into sequence order."""
    total = int(seq_offsets[-1])
    out: torch.Tensor | None = None
    for shard in shards:
        with safe_open(str(directory / shard["file"]), framework="pt") as handle:
            block = handle.get_tensor(f"layer.{layer}")
        if out is None:
            out = torch.empty(total, block.shape[1], dtype=block.dtype)
        cursor = 0
        for seq, length in zip(shard["sequences"], shard["lengths"], strict=True):
            start = int(seq_offsets[seq])
            out[start : start + length] = block[cursor : cursor + length]
            cursor += length
    if out is None:
        raise ValueError(f"No activation shards under {directory}.")
    return out


# --------------------------------------------------------------------------------------------------
# Tokenisation with exact completion positions


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
    starts: list[int] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
        ids = [list(x) for x in enc["input_ids"]]
        for offsets, prompt in zip(enc["offset_mapping"], prompts, strict=True):
            starts.append(_completion_start_from_offsets(offsets, len(prompt)))
    else:
        ids = [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        for joint, alone in zip(ids, prompt_ids, strict=True):
            k = 0
            while k < min(len(joint), len(alone)) and joint[k] == alone[k]:
                k += 1
            starts.append(k)
    return ids, starts


# --------------------------------------------------------------------------------------------------
# Distributed helpers


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def ensure_distributed() -> tuple[int, int]:
    """Initialise torch.distributed (via accelerate) when launched with several processes
    (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``); returns ``(rank, world_size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        from accelerate import PartialState

        PartialState()
    return _dist_rank_world()


# --------------------------------------------------------------------------------------------------
# Collection


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _context_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _disabled_adapter(model: nn.Module):
    """``model.disable_adapter()`` for PEFT models (activations of the unedited model), else a no-op."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable) and hasattr(model, "peft_config"):
        return disable()
    return contextlib.nullcontext()


def _sliding_window(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if isinstance(window, int) and window > 0 and (layer_types is None or "sliding_attention" in layer_types):
        return window
    return None


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


class _Capture:
    """Forward hooks on the targeted blocks that gather the selected rows of each block's output."""

    def __init__(
        self, blocks: nn.ModuleList, layers: list[int], storage_dtype: torch.dtype, early_exit: bool
    ):
        self.layers = layers
        self.storage_dtype = storage_dtype
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch index, position) per row
        self.out: dict[int, torch.Tensor] = {}
        self.last = max(layers)
        self.early_exit = early_exit
        self._handles = [blocks[i].register_forward_hook(self._hook(i)) for i in layers]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.rows is None:  # not collecting (e.g. the shared-prefix forward)
                return
            hidden, _ = split_block_output(output)
            b, p = self.rows
            b = b.to(hidden.device)
            p = p.to(hidden.device)
            self.out[index] = hidden[b, p].to(device="cpu", dtype=self.storage_dtype)
            if self.early_exit and index == self.last:
                raise _StopForward

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _pair_rows(
    pair_seqs: Sequence[tuple[int, int]], lengths: Sequence[int], seq_offsets: torch.Tensor
) -> tuple[list[int], list[int], list[int]]:
    """Feature rows of each pair: positive and negative paired by position up to the shorter one."""
    pos_rows, neg_rows, row_pair = [], [], []
    for i, (a, b) in enumerate(pair_seqs):
        m = min(lengths[a], lengths[b])
        pos_rows.extend(range(int(seq_offsets[a]), int(seq_offsets[a]) + m))
        neg_rows.extend(range(int(seq_offsets[b]), int(seq_offsets[b]) + m))
        row_pair.extend([i] * m)
    return pos_rows, neg_rows, row_pair


class AnswerCollector:
    """Records decoder-block outputs at the answer tokens of a forward someone else runs.

    The TruthfulQA scorer (:meth:`hpr_peft.evaluation.TruthfulQAScorer.score` with ``collector=``)
    already runs the unedited model over every ``context + answer``; recording there makes the
    fitting activations free instead of a second pass. ``token_selection`` is ``"last"`` (the last
    answer token) or ``"response"`` (every answer token). Each answer is stored under the key the
    caller gives (the scorer uses ``(question_id, answer)``); :meth:`pair_activations` then pairs them.
    """

    def __init__(
        self,
        layers: Sequence[int],
        token_selection: str = "last",
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        if token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}.")
        if storage_dtype not in STORAGE_DTYPES:
            raise TypeError(f"storage_dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}.")
        self.layers = sorted({int(x) for x in layers})
        if not self.layers:
            raise ValueError("layers is empty: name at least one decoder block index.")
        self.token_selection = token_selection
        self.storage_dtype = storage_dtype
        self.keys: list[Any] = []
        self.lengths: list[int] = []
        self._parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.features: dict[int, torch.Tensor] = {}

    def attach(self, model: nn.Module, spans: Sequence[tuple[Any, int, int, int]], width: int) -> list[Any]:
        """Hooks recording ``spans`` = ``(key, batch row, first column, n tokens)`` of the next forward.

        ``width`` is the padded sequence length of that forward. Returns the hook handles to remove.
        """
        stack = find_decoder_stack(model)
        bad = [x for x in self.layers if x >= len(stack)]
        if bad:
            raise ValueError(f"layers {bad} are out of range: the model has {len(stack)} decoder blocks.")
        flat: list[int] = []
        for key, row, start, n in spans:
            cols = [start + n - 1] if self.token_selection == "last" else list(range(start, start + n))
            flat.extend(row * width + c for c in cols)
            self.keys.append(key)
            self.lengths.append(len(cols))
        index = torch.tensor(flat, dtype=torch.long)

        def make_hook(layer: int):
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                hidden, _ = split_block_output(output)
                rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))
                self._parts[layer].append(rows.to(device="cpu", dtype=self.storage_dtype))

            return hook

        return [stack.layers[layer].register_forward_hook(make_hook(layer)) for layer in self.layers]

    def finish(self) -> None:
        """Concatenate what was recorded (called by the scorer at the end of its pass)."""
        for layer in self.layers:
            if self._parts[layer]:
                self.features[layer] = torch.cat(
                    [*([self.features[layer]] if layer in self.features else []), *self._parts[layer]]
                )
                self._parts[layer] = []

    def pair_activations(self, pairs: Sequence[Any], key_of: Any = None) -> PairActivations:
        """:class:`PairActivations` for ``pairs`` from the recorded answers.

        ``key_of(group_id, completion)`` maps a pair's completion to the recording key; the default
        fits TruthfulQA ``qa`` pairs scored by the scorer: ``(group_id, answer)`` with the answer
        from :func:`hpr_peft.data.answer_from_continuation`.
        """
        self.finish()
        if not self.features:
            raise ValueError(
                "nothing was recorded: pass this collector to TruthfulQAScorer.score(collector=...)."
            )
        key_of = key_of or (lambda group, completion: (group, answer_from_continuation(completion)))
        position = {key: i for i, key in enumerate(self.keys)}
        seq_offsets = torch.zeros(len(self.keys) + 1, dtype=torch.long)
        seq_offsets[1:] = torch.cumsum(torch.tensor(self.lengths, dtype=torch.long), 0)
        pair_seqs = []
        for i, pair in enumerate(pairs):
            ends = []
            for completion in (pair.positive, pair.negative):
                key = key_of(pair.group_id, completion)
                if key not in position:
                    raise ValueError(
                        f"pairs[{i}]: completion {completion!r} of group {pair.group_id!r} was not recorded; "
                        "score the same questions (and answers) the pairs come from."
                    )
                ends.append(position[key])
            pair_seqs.append((ends[0], ends[1]))
        pos_rows, neg_rows, row_pair = _pair_rows(pair_seqs, self.lengths, seq_offsets)
        return PairActivations(
            layers=list(self.layers),
            hidden_size=int(next(iter(self.features.values())).shape[-1]),
            token_selection=self.token_selection,
            storage_dtype=self.storage_dtype,
            pair_group_ids=[p.group_id for p in pairs],
            seq_offsets=seq_offsets,
            pos_rows=torch.tensor(pos_rows, dtype=torch.long),
            neg_rows=torch.tensor(neg_rows, dtype=torch.long),
            row_pair=torch.tensor(row_pair, dtype=torch.long),
            features=dict(self.features),
            metadata={"n_sequences": len(self.keys), "source": "scoring pass"},
        )


def _make_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Sequences grouped longest-first into fixed batches (deterministic, independent of world size)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    base = (
        model.get_base_model()
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        else model
    )
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _prefix_cache(model: nn.Module, prefix_ids: list[int], device: torch.device, blocks_needed: int):
    """Key/value tensors of the shared prefix for the first ``blocks_needed`` blocks."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prefix_ids], device=device)
    stop_handle = None
    if blocks_needed < len(find_decoder_stack(model)):
        stack = find_decoder_stack(model)

        def stop(module, args, output):
            raise _StopForward

        stop_handle = stack.layers[blocks_needed - 1].register_forward_hook(stop)
    try:
        with contextlib.suppress(_StopForward):
            model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                use_cache=True,
                **{_cache_kwarg(model): cache},
            )
    finally:
        if stop_handle is not None:
            stop_handle.remove()
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
    Under ``torch.distributed`` (e.g. ``accelerate launch``) batches are split across ranks and
    gathered, in the original order, on every rank.
    """
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

    stack = find_decoder_stack(model)
    n_blocks = len(stack)
    layers = list(range(n_blocks)) if layers is None else sorted({int(x) for x in layers})
    if not layers:
        raise ValueError("layers is empty: name at least one decoder block index.")
    bad = [x for x in layers if x < 0 or x >= n_blocks]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: the model has {n_blocks} decoder blocks (0..{n_blocks - 1})."
        )

    # Deduplicate sequences: each unique (prompt, completion) is run once.
    seq_index: dict[tuple[str, str], int] = {}
    seq_texts: list[tuple[str, str]] = []
    pair_seqs: list[tuple[int, int]] = []
    for pair in pairs:
        ids = []
        for completion in (pair.positive, pair.negative):
            key = (pair.prompt, completion)
            if key not in seq_index:
                seq_index[key] = len(seq_texts)
                seq_texts.append(key)
            ids.append(seq_index[key])
        pair_seqs.append((ids[0], ids[1]))

    token_ids, starts = tokenize_pairs_texts(tokenizer, [p for p, _ in seq_texts], [c for _, c in seq_texts])
    context = _context_length(model)
    for s, (ids, start) in enumerate(zip(token_ids, starts, strict=True)):
        if start >= len(ids):
            raise ValueError(
                f"completion {seq_texts[s][1]!r} tokenises to no tokens after its prompt: completions must "
                "be non-empty text."
            )
        if context is not None and len(ids) > context:
            first = next(i for i, (a, b) in enumerate(pair_seqs) if s in (a, b))
            raise ValueError(
                f"pairs[{first}] is {len(ids)} tokens long (prompt + completion) but the model's context is "
                f"{context} tokens: shorten the prompt or drop the pair."
            )

    # Rows each sequence contributes.
    if token_selection == "last":
        seq_positions = [[len(ids) - 1] for ids in token_ids]
    else:
        seq_positions = [list(range(start, len(ids))) for ids, start in zip(token_ids, starts, strict=True)]
    lengths = [len(p) for p in seq_positions]
    seq_offsets = torch.zeros(len(seq_texts) + 1, dtype=torch.long)
    seq_offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0)

    pos_rows, neg_rows, row_pair = _pair_rows(pair_seqs, lengths, seq_offsets)

    # Shared prefix (TruthfulQA primer): computed once, reused by every batch.
    prefix_len = 0
    if shared_prefix is not False:
        prefix_len = min(_common_prefix_length(token_ids), min(starts), min(len(t) - 1 for t in token_ids))
        window = _sliding_window(model)
        if window is not None and max(len(t) for t in token_ids) > window:
            prefix_len = 0
        if shared_prefix is None and prefix_len < MIN_SHARED_PREFIX:
            prefix_len = 0

    rank, world = _dist_rank_world()
    batches = _make_batches([len(t) for t in token_ids], batch_size)
    my_batches = [b for k, b in enumerate(batches) if k % world == rank]
    device = _input_device(model)
    hidden_size = None

    out_dir = Path(output_dir) if output_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    pending_seqs: list[int] = []
    pending_lengths: list[int] = []
    in_memory: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}  # layer -> seq -> rows

    def flush() -> None:
        if not pending_seqs or out_dir is None:
            return
        name = f"shard-r{rank:03d}-{len(shards):05d}.safetensors"
        save_file({f"layer.{layer}": torch.cat(pending[layer]) for layer in layers}, str(out_dir / name))
        shards.append({"file": name, "sequences": list(pending_seqs), "lengths": list(pending_lengths)})
        for layer in layers:
            pending[layer].clear()
        pending_seqs.clear()
        pending_lengths.clear()

    was_training = model.training
    model.eval()
    capture = _Capture(stack.layers, layers, storage_dtype, early_exit)
    cache_name = _cache_kwarg(model)
    try:
        with torch.inference_mode(), _disabled_adapter(model):
            kv = None
            if prefix_len > 0:
                kv = _prefix_cache(
                    model, token_ids[0][:prefix_len], device, max(layers) + 1 if early_exit else n_blocks
                )
                if kv is None:
                    prefix_len = 0
            bar = _progress(progress and rank == 0, len(my_batches), "collecting activations")
            for batch in my_batches:
                suffixes = [token_ids[s][prefix_len:] for s in batch]
                width = max(len(x) for x in suffixes)
                input_ids = torch.full((len(batch), width), _pad_id(tokenizer), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                row_b, row_p = [], []
                for j, (s, suffix) in enumerate(zip(batch, suffixes, strict=True)):
                    pad = width - len(suffix)
                    input_ids[j, pad:] = torch.tensor(suffix)
                    mask[j, pad:] = 1
                    row_b.extend([j] * lengths[s])
                    row_p.extend(pad + q - prefix_len for q in seq_positions[s])
                position_ids = (torch.cumsum(mask, dim=1) - 1).clamp(min=0) + prefix_len
                if prefix_len:
                    mask = torch.cat([torch.ones(len(batch), prefix_len, dtype=torch.long), mask], dim=1)
                capture.rows = (torch.tensor(row_b), torch.tensor(row_p))
                capture.out.clear()
                kwargs: dict[str, Any] = {
                    "input_ids": input_ids.to(device),
                    "attention_mask": mask.to(device),
                    "position_ids": position_ids.to(device),
                }
                if kv is not None:
                    kwargs[cache_name] = _expanded_cache(model, kv, len(batch))
                    kwargs["use_cache"] = True
                else:
                    kwargs["use_cache"] = False
                with contextlib.suppress(_StopForward):
                    model(**kwargs)
                if hidden_size is None:
                    hidden_size = int(capture.out[layers[0]].shape[-1])
                # Split captured rows back into sequences.
                for layer in layers:
                    rows = capture.out[layer]
                    cursor = 0
                    for s in batch:
                        chunk = rows[cursor : cursor + lengths[s]]
                        cursor += lengths[s]
                        if out_dir is not None:
                            pending[layer].append(chunk)
                        else:
                            in_memory[layer][s] = chunk
                if out_dir is not None:
                    pending_seqs.extend(batch)
                    pending_lengths.extend(lengths[s] for s in batch)
                    if sum(pending_lengths) >= shard_rows:
                        flush()
                bar.update(1)
                bar.set_postfix(tokens=int(mask.sum()))
            bar.close()
            flush()
    finally:
        capture.remove()
        if was_training:
            model.train()

    if hidden_size is None:  # this rank had no batch (more ranks than batches)
        from hpr_peft.runtime.blocks import hidden_size_of

        hidden_size = hidden_size_of(model)

    features: dict[int, torch.Tensor] | None = None
    if world > 1:
        gathered: list[Any] = [None] * world
        payload = shards if out_dir is not None else {layer: in_memory[layer] for layer in layers}
        torch.distributed.all_gather_object(gathered, payload)
        if out_dir is not None:
            shards = [shard for part in gathered for shard in part]
        else:
            for part in gathered:
                for layer in layers:
                    in_memory[layer].update(part[layer])
    if out_dir is None:
        features = {}
        for layer in layers:
            per_seq = in_memory[layer]
            features[layer] = torch.cat([per_seq[s] for s in range(len(seq_texts))])
            per_seq.clear()

    result = PairActivations(
        layers=layers,
        hidden_size=hidden_size,
        token_selection=token_selection,
        storage_dtype=storage_dtype,
        pair_group_ids=[p.group_id for p in pairs],
        seq_offsets=seq_offsets,
        pos_rows=torch.tensor(pos_rows, dtype=torch.long),
        neg_rows=torch.tensor(neg_rows, dtype=torch.long),
        row_pair=torch.tensor(row_pair, dtype=torch.long),
        features=features,
        directory=out_dir,
        shards=shards,
        metadata={
            "n_sequences": len(seq_texts),
            "shared_prefix_tokens": prefix_len,
            "early_exit": early_exit,
            "model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "tokens": int(sum(len(t) for t in token_ids)),
        },
    )
    if out_dir is not None:
        if world > 1:
            torch.distributed.barrier()
        if rank == 0:
            _write_index(result, out_dir)
        if world > 1:
            torch.distributed.barrier()
    return result


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch")


def iter_layer_chunks(layers: Sequence[int], chunk: int | None) -> Iterator[list[int]]:
    """Split ``layers`` into chunks of at most ``chunk`` (None = one chunk)."""
    layers = list(layers)
    if chunk is None or chunk >= len(layers):
        yield layers
        return
    for i in range(0, len(layers), max(1, chunk)):
        yield layers[i : i + chunk]


__all__ = [
    "STORAGE_DTYPES",
    "TOKEN_SELECTIONS",
    "PairActivations",
    "collect_activations",
    "ensure_distributed",
    "iter_layer_chunks",
    "tokenize_pairs_texts",
]
