"""Run-time settings of an HPR model scoped to the current context (thread or asyncio task).

:func:`hpr_peft.tuner.control.edit_settings` and :func:`hpr_peft.tuner.control.monitor` change how a
model edits only for the code that runs inside their ``with`` block, in the thread that entered it:
another thread using the same model at the same time keeps the model's persistent settings
(``HPRModel.set_alpha`` / ``set_selected_layers``, which are process-wide). Each block adds one entry
to a :class:`contextvars.ContextVar`; the layers read the entries of the context their forward runs
in. On exit a block removes its own entry (by identity), so blocks exited out of order leave exactly
the others in force, and once every block has exited the persistent settings apply again.

A thread started inside a block does not inherit it (new threads start with an empty context); run
it in a copy of the context to carry the settings along::

    with edit_settings(model, alpha=2.0):
        context = contextvars.copy_context()
        Thread(target=context.run, args=(model.generate,), kwargs=inputs).start()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

__all__ = [
    "MonitorScope",
    "RecordProbes",
    "RunScope",
    "SettingsOverride",
    "current_scope",
    "effective_settings",
    "monitors_of",
    "scoped",
]

RecordProbes = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``record(layer, scores of eligible tokens, flagged mask over them, angles of flagged tokens)``."""


@dataclasses.dataclass(frozen=True, eq=False)
class SettingsOverride:
    """``alpha`` and/or the editing blocks (``selected``; None: unchanged) of ``adapter`` on ``layers``."""

    layers: Mapping[int, Any]  # block index -> the HPRLayer the override applies to
    adapter: str
    alpha: float | None = None
    selected: frozenset[int] | None = None

    def applies_to(self, layer: Any, adapter: str) -> bool:
        return self.adapter == adapter and self.layers.get(layer.layer_index) is layer


@dataclasses.dataclass(frozen=True, eq=False)
class MonitorScope:
    """Probe monitoring of ``adapter`` on ``layers``: no editing there, results go to ``record``."""

    layers: Mapping[int, Any]
    adapter: str
    record: RecordProbes

    def applies_to(self, layer: Any, adapter: str) -> bool:
        return self.adapter == adapter and self.layers.get(layer.layer_index) is layer


@dataclasses.dataclass(frozen=True)
class RunScope:
    """The overrides and monitors in force in one context, innermost last."""

    overrides: tuple[SettingsOverride, ...] = ()
    monitors: tuple[MonitorScope, ...] = ()


_NOTHING_IN_FORCE = RunScope()  # frozen, so one shared default is safe
_SCOPE: ContextVar[RunScope] = ContextVar("hpr_peft_run_scope", default=_NOTHING_IN_FORCE)


def current_scope() -> RunScope:
    """The overrides and monitors in force for the code running now."""
    return _SCOPE.get()


@contextmanager
def scoped(entry: SettingsOverride | MonitorScope) -> Iterator[None]:
    """Put ``entry`` in force for the current context until the block exits (also on exceptions)."""
    field = "overrides" if isinstance(entry, SettingsOverride) else "monitors"
    scope = _SCOPE.get()
    _SCOPE.set(dataclasses.replace(scope, **{field: (*getattr(scope, field), entry)}))
    try:
        yield
    finally:
        scope = _SCOPE.get()
        remaining = tuple(item for item in getattr(scope, field) if item is not entry)
        _SCOPE.set(dataclasses.replace(scope, **{field: remaining}))


def effective_settings(layer: Any, adapter: str, scope: RunScope | None = None) -> tuple[float, bool]:
    """``(alpha, selected)`` of ``adapter`` on ``layer`` in ``scope`` (default: the current one):
    the layer's persistent values, changed by every override in force, innermost last."""
    alpha, selected = layer.hpr_alpha[adapter], layer.hpr_selected[adapter]
    for override in (scope or _SCOPE.get()).overrides:
        if override.applies_to(layer, adapter):
            if override.alpha is not None:
                alpha = override.alpha
            if override.selected is not None:
                selected = layer.layer_index in override.selected
    return alpha, selected


def monitors_of(layer: Any, adapter: str, scope: RunScope | None = None) -> tuple[MonitorScope, ...]:
    """The monitors in ``scope`` (default: the current one) that watch ``adapter`` on ``layer``."""
    monitors = (scope or _SCOPE.get()).monitors
    return tuple(m for m in monitors if m.applies_to(layer, adapter)) if monitors else ()
