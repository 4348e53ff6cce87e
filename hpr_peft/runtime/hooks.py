"""One hook mechanism for every place hpr_peft watches or changes a forward pass.

Every site (the edit of an HPR layer, activation collection, probe monitoring, additive steering,
early exit, the per-call position tracker, the LM-head gather of the scorer) registers its hooks
through a :class:`HookSet`. A hook set keeps every handle it registers and removes them all at once:
as a context manager it does so in ``finally``, so an exception inside the ``with`` body never leaves
a hook behind; a long-lived owner (an HPR layer) keeps one and calls :meth:`HookSet.remove` when it
is unloaded.

Hooks on decoder-block outputs share one signature, :data:`BlockOutputHook`: they receive the hidden
state ``(batch, seq, d)`` the block produced and return a replacement or ``None`` (unchanged). The
hook set splits and rejoins whatever else the block returned (a cache, attention weights), so no
site handles the block's output format itself.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from hpr_peft.runtime.blocks import join_block_output, split_block_output

__all__ = ["BlockOutputHook", "HookSet", "StopForward", "block_output_hooks"]

BlockOutputHook = Callable[[torch.Tensor], "torch.Tensor | None"]
"""``hook(hidden) -> new hidden or None``: the one signature of every block-output hook."""


class StopForward(Exception):
    """Raised by an early-exit hook to end a forward pass once the blocks that matter have run."""


class _BlockOutputAdapter:
    """A forward hook that hands a :data:`BlockOutputHook` the block's hidden state.

    An object rather than a closure so that ``copy.deepcopy`` of a model rebinds a hook that is a
    bound method (the edit of an HPR layer) to the copied owner.
    """

    def __init__(self, hook: BlockOutputHook) -> None:
        self.hook = hook

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        hidden, rest = split_block_output(output)
        replacement = self.hook(hidden)
        return None if replacement is None else join_block_output(replacement, rest)


def block_output_hooks(module: nn.Module) -> list[BlockOutputHook]:
    """The :data:`BlockOutputHook` s registered on ``module`` through :meth:`HookSet.on_block_output`.

    Lets a caller that bypasses a block (block-input replay) ask whether something would edit it.
    """
    return [hook.hook for hook in module._forward_hooks.values() if isinstance(hook, _BlockOutputAdapter)]


class HookSet:
    """Registers forward hooks, keeps every handle, and removes them together.

    >>> with HookSet() as hooks:
    ...     hooks.on_block_output(model.model.layers[3], record)
    ...     model(**batch)
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()

    def forward(
        self,
        module: nn.Module,
        hook: Callable[..., Any],
        *,
        prepend: bool = False,
        with_kwargs: bool = False,
        always_call: bool = False,
    ) -> RemovableHandle:
        """``module.register_forward_hook(hook, ...)``, handle kept."""
        handle = module.register_forward_hook(
            hook, prepend=prepend, with_kwargs=with_kwargs, always_call=always_call
        )
        self._handles.append(handle)
        return handle

    def forward_pre(
        self, module: nn.Module, hook: Callable[..., Any], *, prepend: bool = False, with_kwargs: bool = False
    ) -> RemovableHandle:
        """``module.register_forward_pre_hook(hook, ...)``, handle kept."""
        handle = module.register_forward_pre_hook(hook, prepend=prepend, with_kwargs=with_kwargs)
        self._handles.append(handle)
        return handle

    def on_block_output(
        self, block: nn.Module, hook: BlockOutputHook, *, prepend: bool = False
    ) -> RemovableHandle:
        """Call ``hook(hidden)`` on the hidden state ``block`` outputs; a returned tensor replaces it."""
        return self.forward(block, _BlockOutputAdapter(hook), prepend=prepend)

    def stop_after(self, module: nn.Module) -> RemovableHandle:
        """End the forward pass with :class:`StopForward` once ``module`` has run.

        Registered last, it runs after every hook already on ``module`` (those still see its output).
        """

        def stop(module: nn.Module, args: tuple, output: Any) -> None:
            raise StopForward

        return self.forward(module, stop)

    def remove(self) -> None:
        """Remove every hook registered through this set (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
