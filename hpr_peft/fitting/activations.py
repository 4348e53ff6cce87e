"""Per-layer activations of contrastive pairs: the container fitting trains on.

:class:`PairActivations` holds per-layer features of deduplicated sequences and the row index that
forms the pairs: ``pair_tensors(layer) -> (positives, negatives)``, each ``(n_rows, d)``, with
``row_pair`` / ``group_ids`` telling which pair / group each row belongs to. It saves to (and streams
into) safetensors shards + a JSON index; nothing is pickled. It is filled by
:func:`hpr_peft.fitting.collection.collect_activations` or, during a scoring pass, by
:class:`hpr_peft.fitting.answer_collector.AnswerCollector`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hpr_peft.runtime.atomic_files import write_text_atomic

__all__ = [
    "INDEX_FILE",
    "STORAGE_DTYPES",
    "TOKEN_SELECTIONS",
    "PairActivations",
    "pair_rows",
    "write_index",
]

TOKEN_SELECTIONS = ("last", "response")
STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPE_BY_NAME = {name: dtype for dtype, name in STORAGE_DTYPES.items()}
INDEX_FILE = "activations.json"
FORMAT_VERSION = 1


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
            write_index(self, directory)
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
        write_index(saved, directory)
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


def write_index(acts: PairActivations, directory: Path) -> None:
    """Write the pairing index (``pairs.safetensors``) and the JSON description of ``acts``."""
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


def pair_rows(
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
