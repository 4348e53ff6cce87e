"""Tree packing: many continuations of one context in a single row, each attending only to its context.

Multiple-choice scoring reads one context (a question) and several continuations (its answers). Run one
at a time, each forward is tiny (~10 tokens × 8 answers) and a 2-core CPU spends most of its time on
per-call overhead (≈100 tokens/s). Packed, one row holds the context followed by every continuation,
and a 4-D attention mask lets continuation ``b`` see the shared prefix (KV-cached), the context and its
own earlier tokens only; position ids restart after the context for every continuation. The logits
are then exactly those of running ``prefix + context + continuation`` alone, and a batch of rows
(several questions) makes forwards large enough to run near matmul speed (≈4× faster here).

Padding positions attend to the prefix (or, without one, to absolute key 0) and never to themselves,
so they stay finite and
:func:`hpr_peft.runtime.positions.context_from_inputs` can tell them apart from real tokens by the mask's
diagonal. transformers passes a 4-D mask through unchanged (``masking_utils``); it is additive
(0 = attend, dtype minimum = blocked) so eager and SDPA attention both read it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PackedBatch", "TreeRow", "pack_rows", "plan_batches"]


@dataclass(frozen=True)
class TreeRow:
    """One context (tokens after the shared prefix) and the continuations that branch off it."""

    context: Sequence[int]
    branches: Sequence[Sequence[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(b) for b in self.branches)


@dataclass
class PackedBatch:
    """Model inputs for a batch of :class:`TreeRow` plus where each token landed.

    ``context_end[r]`` is the column of row ``r``'s last context token; ``branch_start[r][b]`` the
    column of branch ``b``'s first token (its tokens are contiguous). ``valid`` marks real tokens.
    """

    input_ids: torch.Tensor  # (B, T)
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, prefix_len + T), additive
    valid: torch.Tensor  # (B, T) bool
    context_end: list[int]
    branch_start: list[list[int]]


def plan_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of similar length whose padded size stays within ``max_tokens``.

    Rows are sorted by length (so padding is small); a row longer than ``max_tokens`` gets a batch of
    its own. The caller restores the original order from the returned indices.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = max(lengths[i], *(lengths[j] for j in current)) if current else lengths[i]
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_rows(
    rows: Sequence[TreeRow],
    prefix_len: int,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Right-padded inputs, position ids and the additive 4-D tree mask for ``rows``.

    ``prefix_len`` tokens are assumed to be in the KV cache already (shared by every row); every row
    sees all of them. Each context must be non-empty.
    """
    if not rows:
        raise ValueError("pack_rows needs at least one TreeRow.")
    for r, row in enumerate(rows):
        if not row.context:
            raise ValueError(f"rows[{r}] has an empty context: every row needs at least one context token.")
    width = max(row.length for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    allowed = torch.zeros((batch, width, prefix_len + width), dtype=torch.bool)
    allowed[:, :, :prefix_len] = True
    valid = torch.zeros((batch, width), dtype=torch.bool)
    context_end: list[int] = []
    branch_start: list[list[int]] = []
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        n_ctx = len(row.context)
        input_ids[r, :n_ctx] = torch.as_tensor(list(row.context), dtype=torch.long)
        position_ids[r, :n_ctx] = torch.arange(prefix_len, prefix_len + n_ctx)
        allowed[r, :n_ctx, prefix_len : prefix_len + n_ctx] = causal[:n_ctx, :n_ctx]
        valid[r, :n_ctx] = True
        context_end.append(n_ctx - 1)
        starts = []
        col = n_ctx
        for branch in row.branches:
            n = len(branch)
            starts.append(col)
            if n:
                input_ids[r, col : col + n] = torch.as_tensor(list(branch), dtype=torch.long)
                position_ids[r, col : col + n] = torch.arange(prefix_len + n_ctx, prefix_len + n_ctx + n)
                allowed[r, col : col + n, prefix_len : prefix_len + n_ctx] = True
                allowed[r, col : col + n, prefix_len + col : prefix_len + col + n] = causal[:n, :n]
                valid[r, col : col + n] = True
            col += n
        branch_start.append(starts)
        # Padding sees the prefix (and key 0), never itself: finite outputs, recognised as padding.
        allowed[r, col:, 0] = True
        if col < width:
            position_ids[r, col:] = position_ids[r, col - 1]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return PackedBatch(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask.unsqueeze(1).to(device),
        valid=valid.to(device),
        context_end=context_end,
        branch_start=branch_start,
    )
