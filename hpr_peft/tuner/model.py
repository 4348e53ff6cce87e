"""HPRModel: the PEFT tuner that injects :class:`~hpr_peft.tuner.layer.HPRLayer` around decoder blocks.

Blocks are found structurally (:func:`hpr_peft.runtime.blocks.find_decoder_stack`), not by module-name
patterns (peft's ``layers_to_transform`` regex cannot select whole blocks). The tuner also installs a
:class:`~hpr_peft.runtime.positions.PositionTracker` on the top-level model so that every editor knows which
positions of the current call are padding or sequence starts.

Checkpoint keys are flat per adapter: ``<block>.hpr_probe.weight`` and ``<block>.hpr_angle.<i>.weight``
(the adapter name is removed also from the middle of angle-net keys, so an adapter loads under any
name). Merging is impossible (the edit depends on the input) and raises ``NotImplementedError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from hpr_peft.runtime.blocks import DecoderStack, decoder_layer_index, find_decoder_stack, hidden_size_of
from hpr_peft.runtime.positions import PositionTracker
from hpr_peft.tuner.checkpoint import check_adapter_state_dict
from hpr_peft.tuner.config import HPRConfig, validate_adapter_name, validate_alpha, validate_layer_choice
from hpr_peft.tuner.layer import HPRLayer
from hpr_peft.tuner.probe_init import balanced_probe, calibration_states, starting_share
from hpr_peft.tuner.run_scope import effective_settings

_MERGE_ERROR = (
    "HPR cannot be merged into the base weights: the edit depends on the input (the probe decides per token "
    "whether to rotate, the angle net how far), so there is no static weight delta. Keep the PeftModel for "
    "edited inference, or call unload() to get the untouched base model back."
)
WEIGHTED_ADAPTER_ERROR = (
    "HPR adapters cannot be combined into a weighted adapter: an editor is a hyperplane (the probe) that "
    "decides which tokens turn and a network that decides how far, so a weighted sum of two probes is a "
    "different hyperplane, not a blend of the two edits. Activate several HPR adapters at once instead "
    "(model.base_model.set_adapter(['a', 'b']) applies them one after the other), or scale one adapter's "
    "strength with hpr_peft.edit_settings(model, alpha=...)."
)
_ADAPTER_CONTAINERS = ("hpr_probe", "hpr_angle")


class HPRModel(BaseTuner):
    """Householder Pseudo-Rotation tuner: wraps the targeted decoder blocks of a causal LM.

    Use through ``peft.get_peft_model(model, HPRConfig(...))`` after ``import hpr_peft``.
    """

    prefix: str = "hpr_"
    tuner_layer_cls = HPRLayer
    target_module_mapping: dict = {}  # noqa: RUF012 - required BaseTuner attribute, unused by HPR

    # ------------------------------------------------------------------ injection

    def _stack(self) -> DecoderStack:
        cached = getattr(self, "_hpr_stack", None)
        if cached is None:
            cached = find_decoder_stack(self.model)
        return cached

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        if getattr(self, "hpr_tracker", None) is None:
            self.hpr_tracker = PositionTracker()
            self.hpr_tracker.attach(model)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Validate the adapter's config against the model, then let peft inject it.

        Also reached by ``add_adapter`` / ``load_adapter`` (which skip ``_pre_injection_hook``), so a
        bad second adapter fails before any block is touched.
        """
        validate_adapter_name(adapter_name)
        config = self.peft_config[adapter_name]
        if not isinstance(config, HPRConfig):
            raise TypeError(f"HPRModel needs an HPRConfig, got {type(config).__name__}.")
        stack = find_decoder_stack(model)
        config.resolved_selected_layers(len(stack))  # validates target/selected ranges early
        config.check_hidden_size(hidden_size_of(model))
        self._hpr_stack = stack  # reused while matching modules (the ModuleList object stays the same)
        samples = self._calibration_sample(model, stack, config, kwargs.get("low_cpu_mem_usage", False))
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        share = starting_share(config.init_weights)
        for index, layer in self.hpr_layers(adapter_name).items():
            weight = layer.hpr_probe[adapter_name].weight
            if index in samples and weight.device.type != "meta":
                with torch.no_grad():
                    weight[0].copy_(balanced_probe(weight[0], samples[index], share))
                layer.start_rotation_options(adapter_name, samples[index])

    def _calibration_sample(
        self, model: nn.Module, stack: DecoderStack, config: HPRConfig, low_cpu_mem_usage: bool
    ) -> dict[int, torch.Tensor]:
        """Hidden states of the targeted blocks on random ids, to start the probes from
        (:mod:`hpr_peft.tuner.probe_init`). Skipped when weights are about to be loaded (inference-mode
        configs, as ``PeftModel.from_pretrained`` makes them; ``low_cpu_mem_usage``) or cannot run."""
        if config.inference_mode or low_cpu_mem_usage:
            return {}
        if any(p.device.type == "meta" for p in model.parameters()):
            return {}
        blocks = {i: stack.layers[i] for i in config.resolved_target_layers(len(stack))}
        try:
            return calibration_states(model, blocks)
        except Exception as error:  # any model failure: the adapter is still valid, only less balanced
            warnings.warn(
                f"HPR could not run its calibration forward pass ({type(error).__name__}: {error}); the probes "
                "start as random directions, which may flag all or none of the tokens of an input.",
                stacklevel=3,
            )
            return {}

    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        return peft_config  # targets are decoder-block indices, resolved structurally

    def _check_target_module_exists(self, peft_config: Any, key: str) -> bool:  # type: ignore[override]
        stack = self._stack()
        index = decoder_layer_index(stack, key)
        if index is None:
            return False
        return index in peft_config.resolved_target_layers(len(stack))

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        stack = self._stack()
        index = decoder_layer_index(stack, current_key)
        if index is None:  # pragma: no cover - guarded by _check_target_module_exists
            raise ValueError(f"{current_key!r} is not a decoder block; HPR targets whole decoder blocks.")
        selected = index in peft_config.resolved_selected_layers(len(stack))
        if isinstance(target, HPRLayer):
            target.update_layer(adapter_name, peft_config, selected=selected)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(
                f"Block {current_key!r} is already wrapped by another PEFT method ({type(target).__name__}); "
                "HPR must wrap the plain decoder block."
            )
        new_module = HPRLayer(
            target,
            adapter_name,
            peft_config,
            hidden_size=hidden_size_of(self.model),
            layer_index=index,
            tracker=self.hpr_tracker,
            selected=selected,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(
        self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module
    ) -> None:
        # Decoder blocks have no `.weight`; HPRLayer places its adapter weights itself (device of the
        # block's first non-meta parameter), so only the attribute swap is needed here.
        setattr(parent, child_name, new_module)

    # ------------------------------------------------------------------ merge / unload

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(_MERGE_ERROR)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Not possible for HPR (input-dependent edit): raises ``NotImplementedError``."""
        raise NotImplementedError(_MERGE_ERROR)

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Not possible for HPR (input-dependent edit): raises ``NotImplementedError``. Use ``unload()``."""
        raise NotImplementedError(_MERGE_ERROR)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Not possible for HPR: raises ``NotImplementedError`` (see :data:`WEIGHTED_ADAPTER_ERROR`)."""
        raise NotImplementedError(WEIGHTED_ADAPTER_ERROR)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            raise NotImplementedError(_MERGE_ERROR)
        for module in self.model.modules():
            if isinstance(module, HPRLayer):
                module.detach_edit_hook()
        tracker = getattr(self, "hpr_tracker", None)
        if tracker is not None:
            tracker.detach()
            self.hpr_tracker = None
        return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)

    # ------------------------------------------------------------------ checkpoint keys

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``...hpr_angle.<adapter>.0.weight`` -> ``...hpr_angle.0.weight`` (the generic rule only strips a
        trailing adapter name, which would leave it inside angle-net keys and break loading under
        another name)."""
        for container in _ADAPTER_CONTAINERS:
            marker = f"{container}.{adapter_name}."
            position = key.find(marker)
            if position != -1 and (position == 0 or key[position - 1] == "."):
                return key[:position] + f"{container}." + key[position + len(marker) :]
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        """peft's key mapping, then :func:`~hpr_peft.tuner.checkpoint.check_adapter_state_dict`: every
        load of saved HPR weights (``PeftModel.from_pretrained`` / ``load_adapter``) passes here, and a
        damaged or mismatched file raises instead of loading partly."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state_dict(model.state_dict(), remapped, adapter_name, config)
        return remapped

    # ------------------------------------------------------------------ HPR API

    def resolve_adapter(self, adapter_name: str | None) -> str:
        """``adapter_name``, checked to exist, or the first active adapter when it is None."""
        if adapter_name is None:
            if not self.active_adapters:
                raise ValueError("No active adapter; pass adapter_name or call set_adapter().")
            return self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(
                f"Unknown adapter {adapter_name!r}; existing adapters: {sorted(self.peft_config)}."
            )
        return adapter_name

    def hpr_layers(self, adapter_name: str | None = None) -> dict[int, HPRLayer]:
        """Block index -> HPRLayer for the layers that hold ``adapter_name`` (default: the active one)."""
        adapter_name = self.resolve_adapter(adapter_name)
        layers: dict[int, HPRLayer] = {}
        for module in self._stack().layers:
            if isinstance(module, HPRLayer) and adapter_name in module.hpr_probe:
                layers[module.layer_index] = module
        return dict(sorted(layers.items()))

    def set_alpha(self, alpha: float, adapter_name: str | None = None) -> None:
        """Persistently set the strength ``alpha`` (layers and config, so it is saved)."""
        alpha = validate_alpha(alpha)
        adapter_name = self.resolve_adapter(adapter_name)
        for layer in self.hpr_layers(adapter_name).values():
            layer.hpr_alpha[adapter_name] = alpha
        self.peft_config[adapter_name].alpha = alpha

    def set_selected_layers(self, layers: Iterable[int] | None, adapter_name: str | None = None) -> None:
        """Persistently choose which targeted blocks edit (``None``: all targets); saved in the config."""
        adapter_name = self.resolve_adapter(adapter_name)
        hpr_layers = self.hpr_layers(adapter_name)
        chosen = validate_layer_choice(layers, hpr_layers)
        for index, layer in hpr_layers.items():
            layer.hpr_selected[adapter_name] = index in chosen
        self.peft_config[adapter_name].selected_layers = None if layers is None else sorted(chosen)

    @contextmanager
    def configured(
        self,
        alpha: float | None = None,
        layers: Iterable[int] | None = None,
        adapter_name: str | None = None,
    ) -> Iterator[None]:
        """Persistently set ``alpha`` and/or the selected ``layers`` (``None``: unchanged) for a ``with``
        block, then restore the adapter's own settings, also when the block raises. Use it for what
        reads the config (saving, training); it is process-wide like the setters, so one thread's
        forwards take ``edit_settings`` instead."""
        adapter_name = self.resolve_adapter(adapter_name)
        config = self.peft_config[adapter_name]
        previous_alpha, previous_layers = config.alpha, config.selected_layers
        try:
            if alpha is not None:
                self.set_alpha(alpha, adapter_name)
            if layers is not None:
                self.set_selected_layers(layers, adapter_name)
            yield
        finally:
            self.set_alpha(previous_alpha, adapter_name)
            self.set_selected_layers(previous_layers, adapter_name)

    def selected_layers(self, adapter_name: str | None = None) -> list[int]:
        """Block indices that currently edit for ``adapter_name`` (in this thread, inside any
        ``edit_settings`` block)."""
        adapter_name = self.resolve_adapter(adapter_name)
        layers = self.hpr_layers(adapter_name).items()
        return [i for i, layer in layers if effective_settings(layer, adapter_name)[1]]


def hpr_tuner(model: Any) -> HPRModel:
    """The :class:`HPRModel` inside ``model`` (a PeftModel or the tuner itself)."""
    if isinstance(model, HPRModel):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, HPRModel):
        return tuner
    raise TypeError(
        f"Expected a PeftModel with an HPR adapter (or an HPRModel), got {type(model).__name__}. "
        "Create it with peft.get_peft_model(model, HPRConfig(...)) after `import hpr_peft`."
    )


__all__ = ["WEIGHTED_ADAPTER_ERROR", "HPRModel", "hpr_tuner"]
