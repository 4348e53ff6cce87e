"""Block-input replay: skip the decoder blocks that an edit at later blocks cannot change.

An edit at blocks ≥ L leaves blocks < L computing exactly what the unedited model computes. A sweep
over edit settings (alpha, layers, HPR or additive steering) on the same inputs therefore records once,
during an unedited pass, what enters block L in every forward call (:func:`record_block_inputs`), and
then runs each setting with blocks < L skipped (:func:`replay_from_block`):

>>> with record_block_inputs(model, 20) as record:
...     scorer.score(model, context=unedited_context(model))      # scorer built with packed=True
>>> for alpha in alphas:
...     with edit_settings(model, alpha=alpha, layers=[20, 21, 22]), replay_from_block(model, record):
...         results[alpha] = scorer.score(model)

Inside the replay, blocks < L are swapped for stubs: a stub returns the hidden state it is handed (a
tensor, as transformers 5 blocks return) and the stub of block L − 1 returns the recorded input of block
L for the current call. The embeddings, the rotary embedding, the masks and the position tracker still
run as usual (blocks ≥ L need them). A stub also extends the KV cache of its block with a one-value
placeholder per token, so a cache built during the replay (the scorer's primer, then packed rows on top
of it) keeps the lengths every mask and position is computed from; blocks ≥ L get their real keys.

Rules:

- the replayed calls must be the recorded ones, in the same order, with the same inputs: each call's
  embedded input is checked against the record (shape and a per-token fingerprint), a call past the
  record or a record not used up raises. Record deterministic passes only: the TruthfulQA scorer with
  ``packed=True`` or ``packed=False`` (auto mode adds a probe pass once per model), the neutral text
  during :meth:`~hpr_peft.evaluation.side_effects.NeutralText.compute_reference`, then replay each
  :meth:`~hpr_peft.evaluation.side_effects.NeutralText.measure`;
- enter edit contexts (``edit_settings``, ``additive_steering``) *before* the replay: while stubs are
  in place the blocks are no longer identical and ``find_decoder_stack`` does not find the stack;
- an edit at a block < L cannot run (its block is skipped): a stub calls the block-output hooks of the
  block it replaces and raises when one changes the state (additive steering always does; an HPR layer
  when it flags a token of the state it is handed). ``monitor`` records nothing meaningful below L;
- the replay belongs to the thread that entered it: other threads calling the model meanwhile run
  the real blocks (each stub hands their calls to the block it stands in for).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.blocks import DecoderStack, find_decoder_stack, split_block_output
from hpr_peft.runtime.hooks import HookSet, block_output_hooks

__all__ = ["BlockInputs", "ReplayMismatch", "record_block_inputs", "replay_from_block"]

_FIX = "record with the same inputs, in the same order (e.g. the scorer with packed=True, not auto)"


class ReplayMismatch(RuntimeError):
    """The forward calls inside :func:`replay_from_block` are not the ones that were recorded."""


@dataclass
class BlockInputs:
    """What entered decoder block ``block`` in each forward call of a recorded pass, in call order.

    ``fingerprints[i]`` is the embedded input of call ``i`` (the input of block 0) summed over the width,
    ``(batch, seq)``: cheap to keep, and it tells a replayed call with other tokens of the same shape.
    """

    block: int
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    fingerprints: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden_states)


def _check_block(stack: DecoderStack, block: Any) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block < len(stack):
        raise ValueError(
            f"block must be an int in 1..{len(stack) - 1} (the first edited block; blocks below it are "
            f"replayed), got {block!r}."
        )


def _hidden_argument(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise TypeError("a decoder block was called without a (batch, seq, d) hidden state first.")
    return hidden


def _fingerprint(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.detach().float().sum(dim=-1)


@contextmanager
def record_block_inputs(model: nn.Module, block: int) -> Iterator[BlockInputs]:
    """Record the hidden state entering decoder block ``block`` in every forward call inside the ``with``.

    Run the model unedited (e.g. inside ``unedited_context(model)``) on exactly the calls you will
    replay; the record then serves every edit at blocks ≥ ``block``.
    """
    stack = find_decoder_stack(model)
    _check_block(stack, block)
    record = BlockInputs(block)

    def embedded(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        record.fingerprints.append(_fingerprint(_hidden_argument(args, kwargs)))

    def entering(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        record.hidden_states.append(_hidden_argument(args, kwargs).detach().clone())

    def plain_tensor(module: nn.Module, args: tuple, output: Any) -> None:
        if split_block_output(output)[1] is not None:
            raise TypeError(
                f"{type(module).__name__} returns a tuple: replay supports decoder blocks that return the "
                "hidden state alone (transformers 5). Score without replay."
            )

    with HookSet() as hooks:
        hooks.forward_pre(stack.layers[0], embedded, with_kwargs=True)
        hooks.forward_pre(stack.layers[block], entering, with_kwargs=True)
        hooks.forward(stack.layers[block - 1], plain_tensor)
        yield record
    if len(record.fingerprints) != len(record.hidden_states):
        raise ReplayMismatch(
            f"a forward call stopped before block {block}: record whole forward passes (no early exit)."
        )


class _ReplayState:
    """Which recorded call the current forward is, and the checks that it matches the record."""

    def __init__(self, record: BlockInputs) -> None:
        self.record = record
        self.calls = 0
        self.thread = threading.get_ident()

    def start_call(self, embedded: torch.Tensor) -> None:
        index, recorded = self.calls, len(self.record)
        if index >= recorded:
            raise ReplayMismatch(
                f"forward call {index + 1} inside the replay, but {recorded} were recorded: {_FIX}."
            )
        want = self.record.hidden_states[index]
        if embedded.shape != want.shape or embedded.dtype != want.dtype:
            raise ReplayMismatch(
                f"forward call {index + 1} gets a {tuple(embedded.shape)} {embedded.dtype} hidden state, the "
                f"recorded call a {tuple(want.shape)} {want.dtype} one: {_FIX}."
            )
        fingerprint = self.record.fingerprints[index].to(embedded.device)
        if not torch.allclose(_fingerprint(embedded), fingerprint, rtol=1e-5, atol=1e-5):
            raise ReplayMismatch(f"forward call {index + 1} has other tokens than the recorded call: {_FIX}.")

    def finish_call(self) -> torch.Tensor:
        hidden = self.record.hidden_states[self.calls]
        self.calls += 1
        return hidden

    def check_complete(self) -> None:
        if self.calls != len(self.record):
            raise ReplayMismatch(
                f"the replay ran {self.calls} forward calls, {len(self.record)} were recorded: {_FIX}."
            )


def _extend_cache(index: int, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> None:
    """Extend the KV cache of block ``index`` (if the call has one) by one placeholder value per token."""
    for value in (*args[1:], *kwargs.values()):
        if callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None)):
            placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            value.update(placeholder, placeholder, index)
            return


class _SkippedBlock(nn.Module):
    """Stands in for decoder block ``index`` during a replay (see the module docstring)."""

    def __init__(self, index: int, original: nn.Module, state: _ReplayState, last: bool) -> None:
        super().__init__()
        self.index = index
        self.state = state
        self.last = last
        # Not a submodule: the skipped block's parameters stay listed once, under the real model.
        object.__setattr__(self, "original", original)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != self.state.thread:
            return self.original(*args, **kwargs)
        hidden = _hidden_argument(args, kwargs)
        if self.index == 0:
            self.state.start_call(hidden)
        self._refuse_edits(hidden)
        _extend_cache(self.index, hidden, args, kwargs)
        return self.state.finish_call() if self.last else hidden

    def _refuse_edits(self, hidden: torch.Tensor) -> None:
        inner = getattr(self.original, "base_layer", None)
        modules = [self.original] + ([inner] if isinstance(inner, nn.Module) else [])
        for module in modules:
            for hook in block_output_hooks(module):
                if hook(hidden) is not None:
                    raise ReplayMismatch(
                        f"block {self.index} edits, but the replay skips blocks < {self.state.record.block}: "
                        "edit only blocks at or after the recorded block, or record at an earlier block."
                    )


@contextmanager
def replay_from_block(model: nn.Module, record: BlockInputs) -> Iterator[None]:
    """Run the forward calls inside the ``with`` with blocks < ``record.block`` replayed from ``record``.

    Enter edit contexts before this one; every call must match the record, in order, and the record
    must be used up on a normal exit (module docstring). The real blocks are back on any exit.
    """
    if not isinstance(record, BlockInputs):
        raise TypeError(
            f"record must be the BlockInputs of record_block_inputs, got {type(record).__name__}."
        )
    stack = find_decoder_stack(model)
    _check_block(stack, record.block)
    if not record.hidden_states:
        raise ValueError("the record is empty: run the forward calls inside record_block_inputs first.")
    state = _ReplayState(record)
    originals = [stack.layers[i] for i in range(record.block)]
    try:
        for i, original in enumerate(originals):
            stack.layers[i] = _SkippedBlock(i, original, state, last=i == record.block - 1)
        yield
    finally:
        for i, original in enumerate(originals):
            stack.layers[i] = original
    state.check_complete()
