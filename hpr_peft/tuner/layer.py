"""HPRLayer: the PEFT tuner layer that wraps one decoder block and edits its output.

Per adapter the layer owns a probe ``hpr_probe[adapter]`` (``nn.Linear(d, 1, bias=False)``, weight
``w``) and an angle predictor ``hpr_angle[adapter]`` (:func:`build_angle_net`). For each eligible
token with ``sigmoid(w·h) < threshold`` the block output ``h`` is pseudo-rotated by
``theta = alpha * f(h)`` toward the positive side of the hyperplane ``w·x = 0`` (docs/math.md), in
float32, and cast back.

Where the edit runs: transformers 5 records ``output_hidden_states`` with forward hooks on the
decoder-block *class* (``_can_record_outputs``), i.e. on the wrapped block, not on this wrapper. An
edit computed in ``HPRLayer.forward`` after calling the block would be invisible to that capture.
The edit is therefore a forward hook registered on the wrapped block with ``prepend=True``, so it
runs before any capture hook (also ones installed earlier) and everything downstream — next block,
``output_hidden_states``, gradient checkpointing (which in transformers 5 checkpoints ``forward``
only, keeping hooks outside) — sees the edited state. ``HPRLayer.forward`` only passes
``*args, **kwargs`` through.

Identity: an all-zero probe weight has no hyperplane, and a layer whose probe is zero does not edit
(``init_weights=True`` creates zero probes, so the model is bit-identical to the base model until an
editor is installed with :meth:`HPRLayer.set_editor` or loaded from a checkpoint).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hpr_peft.rotation import apply_hpr, mask_from_logits, probe_logits, pseudo_rotate
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.positions import PositionContext, PositionTracker, context_from_inputs
from hpr_peft.tuner.angle_net import build_angle_net, predict_angle
from hpr_peft.tuner.run_scope import current_scope, effective_settings, monitors_of


def flag_tokens(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tokens the probe calls negative from scores ``w·h``: ``sigmoid(w·h) < threshold``; at the
    default 0.5 ``w·h = 0`` counts as negative. Same rule as ``rotation.edit_mask``."""
    return mask_from_logits(scores, threshold)


class HPRLayer(nn.Module, BaseTunerLayer):
    """Wraps one decoder block; edits its output hidden states with the active adapters' editors."""

    adapter_layer_names = ("hpr_probe", "hpr_angle")
    other_param_names = (
        "hpr_alpha",
        "hpr_threshold",
        "hpr_edit_positions",
        "hpr_skip_sequence_start",
        "hpr_selected",
    )

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        hidden_size: int,
        layer_index: int,
        tracker: PositionTracker | None = None,
        selected: bool = True,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = int(hidden_size)
        self.layer_index = int(layer_index)
        self.hpr_probe = nn.ModuleDict({})
        self.hpr_angle = nn.ModuleDict({})
        self.hpr_alpha: dict[str, float] = {}
        self.hpr_threshold: dict[str, float] = {}
        self.hpr_edit_positions: dict[str, str] = {}
        self.hpr_skip_sequence_start: dict[str, bool] = {}
        self.hpr_selected: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.tracker = tracker
        self._edit_hooks = HookSet()
        self.update_layer(adapter_name, config, selected=selected)
        self.attach_edit_hook()

    # ------------------------------------------------------------------ adapters

    def update_layer(self, adapter_name: str, config: Any, selected: bool = True) -> None:
        """Create the probe and angle net of ``adapter_name`` from ``config`` (an HPRConfig)."""
        d = self.hidden_size
        probe = nn.Linear(d, 1, bias=False)
        net = build_angle_net(d, config.angle_hidden_sizes)
        with torch.no_grad():
            if config.init_weights:
                # identity: a zero probe has no hyperplane, so nothing is edited until fitted
                probe.weight.zero_()
            else:
                # random but valid: a random hyperplane through the origin flags a data-dependent
                # share of the tokens (20-80 % on the tiny test models; hidden states with a large
                # common mean can give all or none on a short input); the angle net starts around
                # pi/2 (large angles) with some spread
                probe.weight.normal_(0.0, 1.0 / math.sqrt(d))
                last = net[-1]
                last.weight.normal_(0.0, 2.0 / math.sqrt(last.in_features))
                last.bias.uniform_(-0.5, 0.5)
        self.hpr_probe[adapter_name] = probe
        self.hpr_angle[adapter_name] = net
        self.hpr_alpha[adapter_name] = float(config.alpha)
        self.hpr_threshold[adapter_name] = float(config.threshold)
        self.hpr_edit_positions[adapter_name] = str(config.edit_positions)
        self.hpr_skip_sequence_start[adapter_name] = bool(config.skip_sequence_start)
        self.hpr_selected[adapter_name] = bool(selected)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        """A decoder block has no ``.weight``: use its first floating, non-meta parameter."""
        for param in base_layer.parameters():
            if param.is_floating_point():
                if param.device.type == "meta":
                    return None, None
                return param.device, param.dtype
        return None, None

    def set_editor(
        self, adapter_name: str, probe_weight: torch.Tensor, angle_state_dict: dict[str, torch.Tensor]
    ) -> None:
        """Install fitted weights: probe weight ``w`` (shape ``(d,)``) and the angle net's state dict.

        Weights are copied into the existing parameters (their device and dtype are kept).
        """
        if adapter_name not in self.hpr_probe:
            raise ValueError(
                f"Adapter {adapter_name!r} does not exist on layer {self.layer_index}; existing adapters: "
                f"{sorted(self.hpr_probe.keys())}. Add it first with add_adapter()."
            )
        probe_weight = torch.as_tensor(probe_weight)
        if probe_weight.shape != (self.hidden_size,):
            raise ValueError(
                f"probe_weight must have shape ({self.hidden_size},) (the hidden size), got "
                f"{tuple(probe_weight.shape)}."
            )
        if not torch.isfinite(probe_weight).all():
            raise ValueError("probe_weight contains NaN or inf; refit the probe.")
        probe = self.hpr_probe[adapter_name]
        net = self.hpr_angle[adapter_name]
        device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        for module in (probe, net):
            if any(p.device.type == "meta" for p in module.parameters()):
                module.to_empty(device=device or torch.device("cpu"))
        expected = set(net.state_dict().keys())
        given = set(angle_state_dict.keys())
        if given != expected:
            raise ValueError(
                f"angle_state_dict keys {sorted(given)} do not match the angle net of layer {self.layer_index} "
                f"({sorted(expected)}); build it with build_angle_net(d, config.angle_hidden_sizes)."
            )
        with torch.no_grad():
            probe.weight[0].copy_(probe_weight.to(probe.weight.device, probe.weight.dtype))
            for name, tensor in net.state_dict().items():
                source = torch.as_tensor(angle_state_dict[name])
                if source.shape != tensor.shape:
                    raise ValueError(
                        f"angle_state_dict[{name!r}] has shape {tuple(source.shape)}, expected "
                        f"{tuple(tensor.shape)}."
                    )
                tensor.copy_(source.to(tensor.device, tensor.dtype))

    def is_identity(self, adapter_name: str) -> bool:
        """True if the adapter's probe is all zero (not fitted: no edit)."""
        weight = self.hpr_probe[adapter_name].weight
        return weight.device.type == "meta" or not bool(torch.count_nonzero(weight).item())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "HPR cannot be merged into the base weights: the edit depends on the input (which tokens are "
            "flagged, by how much they rotate). Use unload() to get the base model back."
        )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    # ------------------------------------------------------------------ hook plumbing

    def attach_edit_hook(self) -> None:
        """Register the edit as the first forward hook of the wrapped block (idempotent)."""
        self._edit_hooks.remove()
        self._edit_hooks.on_block_output(self.base_layer, self._edit, prepend=True)

    def detach_edit_hook(self) -> None:
        """Remove this layer's edit hook from the wrapped block."""
        self._edit_hooks.remove()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped block; the edit itself runs in its forward hook (see module docstring)."""
        return self.base_layer(*args, **kwargs)

    def _context_for(self, hidden: torch.Tensor) -> PositionContext:
        if self.tracker is not None:
            return self.tracker.context_for(hidden)
        return context_from_inputs(hidden.shape[0], hidden.shape[1], None, 0, hidden.device)

    def _edit(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The block-output hook: ``hidden`` edited by every active adapter, or None when untouched."""
        if self.disable_adapters or hidden.dim() != 3:
            return None
        adapters = [name for name in self.active_adapters if name in self.hpr_probe]
        if not adapters:
            return None
        context = self._context_for(hidden)
        edited = hidden
        for adapter_name in adapters:
            edited = self._apply_adapter(adapter_name, edited, context)
        return None if edited is hidden else edited

    def eligible_positions(self, adapter_name: str, context: PositionContext) -> torch.Tensor:
        """(batch, seq) bool: real tokens the adapter may edit (not padding, not a sequence start if
        ``skip_sequence_start``, only the last position of the call if ``edit_positions == "last"``)."""
        eligible = context.valid
        if self.hpr_skip_sequence_start[adapter_name]:
            eligible = eligible & ~context.sequence_start
        if self.hpr_edit_positions[adapter_name] == "last":
            last = torch.zeros_like(eligible)
            last[:, -1] = True
            eligible = eligible & last
        return eligible

    def _apply_adapter(
        self, adapter_name: str, hidden: torch.Tensor, context: PositionContext
    ) -> torch.Tensor:
        """Edit ``hidden`` (batch, seq, d) with one adapter; untouched tokens stay bit-identical.

        ``w·h`` is computed for every token first (O(d) each). On CPU the angle net and the rotation
        then run only on the flagged tokens (gather / scatter); on accelerators every token is
        computed and merged with ``torch.where`` (no host synchronisation). A zero probe (identity
        init) edits nothing: on CPU it is skipped, elsewhere the rotation returns such tokens
        unchanged bit for bit.
        """
        scope = current_scope()  # edit_settings / monitor of this thread (hpr_peft.tuner.run_scope)
        alpha, selected = effective_settings(self, adapter_name, scope)
        monitors = monitors_of(self, adapter_name, scope)
        monitoring = bool(monitors)
        if not monitoring and (not selected or alpha == 0.0):
            return hidden
        probe_weight = self.hpr_probe[adapter_name].weight[0]
        if probe_weight.device.type == "meta":
            return hidden  # not loaded yet (low_cpu_mem_usage)
        on_cpu = hidden.device.type == "cpu"
        if (on_cpu or monitoring) and self.is_identity(adapter_name):
            return hidden
        probe_weight = probe_weight.to(hidden.device)
        net = self.hpr_angle[adapter_name]
        eligible = self.eligible_positions(adapter_name, context)
        scores = probe_logits(hidden, probe_weight)
        flagged = eligible & flag_tokens(scores, self.hpr_threshold[adapter_name])
        if monitoring:
            with torch.no_grad():
                angles = predict_angle(net, hidden[flagged])
                for watcher in monitors:
                    watcher.record(self, scores[eligible], flagged[eligible], angles)
            return hidden
        if not on_cpu:
            return apply_hpr(hidden, probe_weight, alpha * predict_angle(net, hidden), flagged)
        index = flagged.nonzero(as_tuple=True)
        if index[0].numel() == 0:
            return hidden
        selected = hidden[index]  # (n, d)
        rotated = pseudo_rotate(selected, probe_weight, alpha * predict_angle(net, selected))
        return hidden.index_put(index, rotated)

    def __repr__(self) -> str:
        return f"hpr.{super().__repr__()}"
