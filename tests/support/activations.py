"""Synthetic fitting activations for the training tests."""

from __future__ import annotations

import torch

from hpr_peft.fitting import PairActivations


def interleaved_pairs(features: dict[int, torch.Tensor], group_ids: list[str]) -> PairActivations:
    """``PairActivations`` whose rows alternate positive, negative (one pair per entry of ``group_ids``;
    ``features[layer]`` is ``(2 n, d)``)."""
    n = len(group_ids)
    first = next(iter(features.values()))
    return PairActivations(
        layers=list(features),
        hidden_size=first.shape[1],
        token_selection="last",
        storage_dtype=torch.float32,
        pair_group_ids=list(group_ids),
        seq_offsets=torch.arange(2 * n + 1),
        pos_rows=torch.arange(0, 2 * n, 2),
        neg_rows=torch.arange(1, 2 * n, 2),
        row_pair=torch.arange(n),
        features=features,
    )
