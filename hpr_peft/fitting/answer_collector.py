"""Recording fitting activations during a forward pass someone else runs (the scoring pass).

The TruthfulQA scorer already runs the unedited model over every ``context + answer``; recording the
decoder-block outputs at the answer tokens there makes the fitting activations free instead of a
second pass. The scorer knows nothing of fitting: it hands every packed forward to a watcher (the
:class:`AnswerCollector`) through :meth:`AnswerCollector.watch`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hpr_peft.data.prompts import answer_from_continuation
from hpr_peft.fitting.activations import STORAGE_DTYPES, TOKEN_SELECTIONS, PairActivations, pair_rows
from hpr_peft.runtime.blocks import find_decoder_stack
from hpr_peft.runtime.hooks import HookSet

__all__ = ["AnswerCollector"]


class AnswerCollector:
    """Records decoder-block outputs at the answer tokens of a forward someone else runs.

    The TruthfulQA scorer (:meth:`hpr_peft.evaluation.TruthfulQAScorer.score` with ``watcher=``)
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

    def watch(self, model: nn.Module, spans: Sequence[tuple[Any, int, int, int]], width: int) -> HookSet:
        """Hooks that record ``spans`` = ``(key, batch row, first column, n tokens)`` of the next forward
        (``width`` is its padded sequence length); use the returned :class:`HookSet` as a context
        manager around that forward."""
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
        hooks = HookSet()
        for layer in self.layers:
            hooks.on_block_output(stack.layers[layer], self._recorder(layer, index))
        return hooks

    def _recorder(self, layer: int, index: torch.Tensor):
        def record(hidden: torch.Tensor) -> None:
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index.to(hidden.device))
            self._parts[layer].append(rows.to(device="cpu", dtype=self.storage_dtype))

        return record

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
                "nothing was recorded: pass this collector to TruthfulQAScorer.score(watcher=...)."
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
        pos_rows, neg_rows, row_pair = pair_rows(pair_seqs, self.lengths, seq_offsets)
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
