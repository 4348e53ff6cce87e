"""Which token positions of the current forward call may be edited.

Decoder blocks do not see the 2-D attention mask or how long the KV cache already is, yet the
edit must know (a) which positions are padding (never edited, never counted in statistics)
and (b) which position is the first real token of its sequence: an attention sink with a norm
~30-100x the others, which HPR must not rotate (docs/math.md). A forward pre-hook on the top-level
model records this per call in a :class:`PositionContext`; editors read it from a shared
:class:`PositionTracker`. Masks are computed from the full 2-D attention mask (past + current),
so cached generation, uncached forwards and left-padded batches all agree.

The context of a call is kept per thread (a stack, so a forward nested inside another one restores
the outer call's context when it returns): one model may serve several threads at once, and each
call sees its own padding and sequence starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.hooks import HookSet


@dataclass
class PositionContext:
    """Per-call masks, each of shape ``(batch, seq)`` for the tokens of this call."""

    valid: torch.Tensor  # True for real (non-padding) tokens
    sequence_start: torch.Tensor  # True for the first real token of each sequence

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)  # type: ignore[return-value]


def _past_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    get_seq_length = getattr(past_key_values, "get_seq_length", None)
    if callable(get_seq_length):
        try:
            return int(get_seq_length())
        except Exception:  # pragma: no cover - exotic caches
            return 0
    if isinstance(past_key_values, (tuple, list)) and past_key_values:
        first = past_key_values[0]
        if isinstance(first, (tuple, list)) and first and isinstance(first[0], torch.Tensor):
            return int(first[0].shape[-2])
    return 0


def context_from_inputs(
    batch: int,
    seq: int,
    attention_mask: torch.Tensor | None,
    past_length: int,
    device: torch.device,
    position_ids: torch.Tensor | None = None,
) -> PositionContext:
    """Masks for the last ``seq`` tokens of sequences whose earlier ``past_length`` are cached.

    A 2-D mask marks padding directly. A 4-D mask (custom attention, e.g. :mod:`hpr_peft.evaluation.packing`)
    marks a token real when it may attend to itself (its diagonal entry is not blocked), and the
    sequence start is the real token at position id 0.
    """
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] == seq:
        mask4 = attention_mask[:, 0].to(device)
        keys = mask4.shape[-1]
        diagonal = mask4[:, torch.arange(seq, device=device), torch.arange(keys - seq, keys, device=device)]
        valid = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
        valid = valid.expand(batch, seq)
        if position_ids is not None:
            start = position_ids.to(device).expand(batch, seq) == 0
        else:
            start = (torch.arange(past_length, past_length + seq, device=device) == 0).expand(batch, seq)
        return PositionContext(valid=valid.clone(), sequence_start=start & valid)
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.to(device=device).bool()
        seen_before = torch.cumsum(mask.long(), dim=-1)
        first = mask & (seen_before == 1)
        return PositionContext(valid=mask[:, -seq:], sequence_start=first[:, -seq:])
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    absolute = torch.arange(past_length, past_length + seq, device=device)
    start = (absolute == 0).unsqueeze(0).expand(batch, seq)
    return PositionContext(valid=valid, sequence_start=start.clone())


class PositionTracker:
    """Holds the :class:`PositionContext` of the forward call in flight, per thread.

    ``attach(model)`` installs the hooks on the top-level model; editors call
    :meth:`context_for` with their hidden state to get masks of matching shape. Each thread has its
    own stack of calls in flight, so concurrent forwards of one model never see each other's masks.
    Outside a tracked call (a block called directly) the fallback treats every position as real and
    the first position of the call as the sequence start, which is right for an unpadded, uncached
    forward.
    """

    def __init__(self) -> None:
        self._calls = threading.local()
        self._hooks = HookSet()

    def __getstate__(self) -> dict:
        """Copies and pickles carry the hooks but no call in flight (thread-local state is per process)."""
        return {"_hooks": self._hooks}

    def __setstate__(self, state: dict) -> None:
        self._hooks = state["_hooks"]
        self._calls = threading.local()

    @property
    def current(self) -> PositionContext | None:
        """The context of this thread's innermost tracked call (None outside a call)."""
        stack = getattr(self._calls, "stack", ())
        return stack[-1] if stack else None

    def attach(self, model: nn.Module) -> None:
        """Track the calls of ``model`` (the top-level module users call)."""
        self.detach()
        self._hooks.forward_pre(model, self._before_forward, with_kwargs=True)
        self._hooks.forward(model, self._after_forward, always_call=True)

    def detach(self) -> None:
        self._hooks.remove()
        self._calls.stack = ()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        stack = getattr(self._calls, "stack", ())
        self._calls.stack = (*stack, self._context_of_call(args, kwargs))

    def _context_of_call(self, args: tuple, kwargs: dict) -> PositionContext | None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            return None
        batch, seq = reference.shape[0], reference.shape[1]
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        return context_from_inputs(
            batch,
            seq,
            kwargs.get("attention_mask"),
            _past_length(past),
            reference.device,
            position_ids=kwargs.get("position_ids"),
        )

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = getattr(self._calls, "stack", ())
        self._calls.stack = stack[:-1]

    def context_for(self, hidden: torch.Tensor) -> PositionContext:
        batch, seq = hidden.shape[0], hidden.shape[1]
        context = self.current
        if context is not None and context.shape == (batch, seq):
            if context.valid.device != hidden.device:
                context = PositionContext(
                    valid=context.valid.to(hidden.device),
                    sequence_start=context.sequence_start.to(hidden.device),
                )
            return context
        return context_from_inputs(batch, seq, None, 0, hidden.device)
