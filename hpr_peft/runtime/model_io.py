"""How hpr_peft calls a transformers model, written once: padding, KV cache, device, adapter off,
early exit, distributed rank and the context limits of the config.

Every part that runs a model (collection, scoring, side effects, the main job) uses these helpers,
so a new transformers release that renames the cache argument, or a tokenizer without a pad token,
is handled in one place.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.hooks import HookSet, StopForward

__all__ = [
    "ContextFactory",
    "HeadGather",
    "broadcast_from_rank0",
    "cache_argument",
    "cache_inputs",
    "context_length",
    "distributed_rank_world",
    "ensure_distributed",
    "eval_mode",
    "forward_until",
    "input_device",
    "output_cache",
    "pad_token_id",
    "sliding_window",
    "stack_contexts",
    "unedited_context",
]

ContextFactory = Callable[[], AbstractContextManager]
"""A zero-argument callable giving a fresh context manager that puts a model into some state."""


def pad_token_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Padding never reaches a score (it is masked), so any valid id works; 0 is the last resort.
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def _plain_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (whose own ``forward`` takes ``**kwargs``)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def cache_argument(model: nn.Module) -> str:
    """Name of the KV-cache keyword of ``model.forward``: ``cache`` (recent transformers 5 releases)
    or ``past_key_values`` (earlier ones)."""
    try:
        parameters = inspect.signature(_plain_model(model).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_inputs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments for a forward that reads and extends ``cache`` (or starts one when None)."""
    if cache is None:
        return {"use_cache": True}
    return {cache_argument(model): cache, "use_cache": True}


def output_cache(outputs: Any) -> Any:
    """The KV cache a forward returned (``cache`` or ``past_key_values``), or None."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embeddings (first parameter as fallback)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class HeadGather:
    """Runs the LM head only at the positions of ``select`` (bool ``(batch, seq)``), flattened to
    ``(1, N, d)``; the logits of a forward are then those ``N`` positions in row-major order."""

    def __init__(self) -> None:
        self.select: torch.Tensor | None = None

    def attach(self, model: nn.Module, hooks: HookSet) -> bool:
        """Hook the model's output embeddings; False (nothing hooked) when it has none."""
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if not isinstance(head, nn.Module):
            return False
        hooks.forward_pre(head, self._gather)
        return True

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        select = self.select
        if select is None or not args:
            return None
        hidden = args[0]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(select.shape):
            return None
        return (hidden[select].unsqueeze(0), *args[1:])


def unedited_context(model: nn.Module) -> ContextFactory:
    """A context factory giving the unedited model: ``disable_adapter`` for PEFT models, else nothing."""
    disable = getattr(model, "disable_adapter", None)
    if callable(disable) and hasattr(model, "peft_config"):
        return disable
    return contextlib.nullcontext


def forward_until(model: nn.Module, last_block: nn.Module, **inputs: Any) -> None:
    """Run ``model(**inputs)`` only up to and including ``last_block``; later blocks and the LM head
    are skipped. Hooks already on ``last_block`` (those recording its output) still run."""
    with HookSet() as hooks, contextlib.suppress(StopForward):
        hooks.stop_after(last_block)
        model(**inputs)


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's position scheme accepts, when the config says."""
    text = _text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of models with sliding-window layers (None when every layer sees all)."""
    text = _text_config(model)
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if isinstance(window, int) and window > 0 and (layer_types is None or "sliding_attention" in layer_types):
        return window
    return None


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process under torch.distributed, ``(0, 1)`` otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def ensure_distributed() -> tuple[int, int]:
    """Initialise torch.distributed (through accelerate) when launched with several processes
    (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE``); returns ``(rank, world_size)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and distributed_rank_world()[1] == 1:
        from accelerate import PartialState

        PartialState()
    return distributed_rank_world()


def broadcast_from_rank0(obj: Any) -> Any:
    """``obj`` of rank 0 on every rank (``obj`` itself without torch.distributed)."""
    if distributed_rank_world()[1] > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def stack_contexts(*factories: ContextFactory | None) -> ContextFactory:
    """One context factory entering every given factory's context in order (None entries skipped)."""

    @contextlib.contextmanager
    def combined() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for factory in factories:
                if factory is not None:
                    stack.enter_context(factory())
            yield

    return combined


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; its train/eval mode of before is restored
    on exit, also after an exception."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
