"""HPRLayer: the PEFT tuner layer that wraps one decoder block and edits its output.

Per adapter the layer owns a probe ``hpr_probe[adapter]`` (``nn.Linear(d, 1, bias=False)``, weight
``w``), an angle predictor ``hpr_angle[adapter]`` (:func:`build_angle_net`) and a gain
``hpr_gain[adapter]`` (:class:`AngleGain`, a scalar ``g``). For each eligible token with
``sigmoid(w·h) < threshold`` the block output ``h`` is pseudo-rotated by ``theta = alpha * g * f(h)``
toward the positive side of the hyperplane ``w·x = 0`` (docs/math.md), in float32, and cast back.
Fitted editors have ``g = 1``.

Two config options change the rotation, never the gate: ``rotation_direction="mean_difference"`` turns
flagged tokens toward a stored direction ``hpr_direction[adapter]`` (:class:`RotationDirection`, the
mean difference of the fit) instead of ``ŵ``, and ``exclude_massive_dims=k`` keeps the ``k`` stored
dimensions ``hpr_protected[adapter]`` (:class:`ProtectedDims`) out of the rotation. Adapters that do not
ask for them have neither entry, so their checkpoints are unchanged.

Where the edit runs: transformers 5 records ``output_hidden_states`` with forward hooks on the
decoder-block *class* (``_can_record_outputs``), i.e. on the wrapped block, not on this wrapper. An
edit computed in ``HPRLayer.forward`` after calling the block would be invisible to that capture.
The edit is therefore a forward hook registered on the wrapped block with ``prepend=True``, so it
runs before any capture hook (also ones installed earlier) and everything downstream — next block,
``output_hidden_states``, gradient checkpointing (which in transformers 5 checkpoints ``forward``
only, keeping hooks outside) — sees the edited state. ``HPRLayer.forward`` only passes
``*args, **kwargs`` through.

Identity: ``init_weights=True`` starts with ``g = 0`` (like LoRA's ``B = 0``): no token turns, and a
rotation by exactly 0 returns the token bit for bit, so the model equals the base model until the gain
is trained, an editor is installed with :meth:`HPRLayer.set_editor` or one is loaded. The probe starts
as a real hyperplane (flagging about half of the tokens, :mod:`hpr_peft.tuner.probe_init`), so one
backward pass already gives ``g`` a gradient. When autograd records the adapter's weights the edit runs
:func:`~hpr_peft.tuner.trainable_edit.straight_through_edit` (same values, gradients through the gate).

Checkpoints saved before the gain existed have no ``hpr_gain`` entries; a load hook gives such editors
``g = 1``, so they edit exactly as when they were saved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from hpr_peft.rotation import apply_hpr, mask_from_logits, massive_dimensions, probe_logits, pseudo_rotate
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.positions import PositionContext, PositionTracker, context_from_inputs
from hpr_peft.tuner.angle_net import build_angle_net, predict_angle
from hpr_peft.tuner.run_scope import current_scope, effective_settings, monitors_of
from hpr_peft.tuner.trainable_edit import flag_probability, straight_through_edit


def flag_tokens(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tokens the probe calls negative from scores ``w·h``: ``sigmoid(w·h) < threshold``; at the
    default 0.5 ``w·h = 0`` counts as negative. Same rule as ``rotation.edit_mask``."""
    return mask_from_logits(scores, threshold)


class AngleGain(nn.Module):
    """The gain ``g`` of an editor's angle, ``θ = alpha · g · f(h)``: one learnable number (a module of
    its own, so that any adapter name can key it, as for the probe and the angle net)."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(value)))


class RotationDirection(nn.Module):
    """The direction ``u`` (``weight``, ``(d,)``) an editor turns flagged tokens toward instead of the
    probe's ``ŵ`` (``rotation_direction="mean_difference"``); only its direction matters."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))


class ProtectedDims(nn.Module):
    """The dimensions (``index``, int64 ``(k,)``) left out of an editor's rotation
    (``exclude_massive_dims=k``); a buffer, saved with the adapter."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.register_buffer("index", torch.arange(count, dtype=torch.long))


class HPRLayer(nn.Module, BaseTunerLayer):
    """Wraps one decoder block; edits its output hidden states with the active adapters' editors."""

    adapter_layer_names = ("hpr_probe", "hpr_angle", "hpr_gain", "hpr_direction", "hpr_protected")
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
        self.hpr_gain = nn.ModuleDict({})
        self.hpr_direction = nn.ModuleDict({})
        self.hpr_protected = nn.ModuleDict({})
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
        self.register_load_state_dict_pre_hook(_full_gain_for_checkpoints_without_one)
        self.update_layer(adapter_name, config, selected=selected)
        self.attach_edit_hook()

    # ------------------------------------------------------------------ adapters

    def update_layer(self, adapter_name: str, config: Any, selected: bool = True) -> None:
        """Create the probe and angle net of ``adapter_name`` from ``config`` (an HPRConfig)."""
        d = self.hidden_size
        probe = nn.Linear(d, 1, bias=False)
        net = build_angle_net(d, config.angle_hidden_sizes)
        with torch.no_grad():
            # a random hyperplane through the origin; the tuner then tilts it so that it flags about
            # half of the tokens whatever the hidden states' common offset (tuner.probe_init)
            probe.weight.normal_(0.0, 1.0 / math.sqrt(d))
            if not config.init_weights:
                # random but valid editors: the angle net starts around pi/2 (large angles) with spread
                last = net[-1]
                last.weight.normal_(0.0, 2.0 / math.sqrt(last.in_features))
                last.bias.uniform_(-0.5, 0.5)
        # init_weights=True: g = 0 turns no token (identity) and still has a gradient, like LoRA's B = 0
        gain = AngleGain(0.0 if config.init_weights else 1.0)
        self.hpr_probe[adapter_name] = probe
        self.hpr_angle[adapter_name] = net
        self.hpr_gain[adapter_name] = gain
        self._add_rotation_options(adapter_name, config, probe.weight[0])
        self.hpr_alpha[adapter_name] = float(config.alpha)
        self.hpr_threshold[adapter_name] = float(config.threshold)
        self.hpr_edit_positions[adapter_name] = str(config.edit_positions)
        self.hpr_skip_sequence_start[adapter_name] = bool(config.skip_sequence_start)
        self.hpr_selected[adapter_name] = bool(selected)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _add_rotation_options(self, adapter_name: str, config: Any, probe_weight: torch.Tensor) -> None:
        """The direction and protected dimensions of ``adapter_name``, where its config asks for them.

        Before a fit the direction is the probe's own (so the edit starts as the probe-direction edit) and
        the protected dimensions are the first ``k`` (the tuner and ``fit_hpr`` choose them)."""
        for container in (self.hpr_direction, self.hpr_protected):
            if adapter_name in container:
                del container[adapter_name]
        if config.rotation_direction == "mean_difference":
            direction = RotationDirection(self.hidden_size)
            with torch.no_grad():
                direction.weight.copy_(probe_weight)
            self.hpr_direction[adapter_name] = direction
        if config.exclude_massive_dims > 0:
            self.hpr_protected[adapter_name] = ProtectedDims(config.exclude_massive_dims)

    @torch.no_grad()
    def start_rotation_options(self, adapter_name: str, states: torch.Tensor) -> None:
        """Starting values from sample hidden states ``(n, d)`` of this block, before any fit: the
        direction is the (calibrated) probe's, the protected dimensions the sample's massive ones."""
        if adapter_name in self.hpr_direction:
            self.hpr_direction[adapter_name].weight.copy_(self.hpr_probe[adapter_name].weight[0])
        if adapter_name in self.hpr_protected:
            index = self.hpr_protected[adapter_name].index
            index.copy_(massive_dimensions(states.float(), len(index)).to(index.device))

    def rotation_direction(self, adapter_name: str) -> torch.Tensor:
        """The direction flagged tokens turn toward, ``(d,)``: the stored ``u`` or the probe's weight."""
        if adapter_name in self.hpr_direction:
            return self.hpr_direction[adapter_name].weight
        return self.hpr_probe[adapter_name].weight[0]

    def protected_dims(self, adapter_name: str) -> torch.Tensor | None:
        """The dimensions left out of the rotation (int64 ``(k,)``), or None for none."""
        if adapter_name in self.hpr_protected:
            return self.hpr_protected[adapter_name].index
        return None

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        """A decoder block has no ``.weight``: use its first floating, non-meta parameter."""
        for param in base_layer.parameters():
            if param.is_floating_point():
                if param.device.type == "meta":
                    return None, None
                return param.device, param.dtype
        return None, None

    def set_editor(
        self,
        adapter_name: str,
        probe_weight: torch.Tensor,
        angle_state_dict: dict[str, torch.Tensor],
        gain: float = 1.0,
        direction: torch.Tensor | None = None,
        protected_dims: torch.Tensor | None = None,
    ) -> None:
        """Install fitted weights: probe weight ``w`` (shape ``(d,)``), the angle net's state dict and the
        gain ``g`` (default 1: the angle is the net's own, as fitted); ``direction`` ``(d,)`` and
        ``protected_dims`` (int ``(k,)``) exactly when the adapter's config asks for them
        (``rotation_direction="mean_difference"``, ``exclude_massive_dims=k``).

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
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
            raise ValueError(f"gain must be a finite number (1.0 for a fitted editor), got {gain!r}.")
        probe = self.hpr_probe[adapter_name]
        net = self.hpr_angle[adapter_name]
        device, _ = self._get_base_layer_device_and_dtype(self.get_base_layer())
        for module in (probe, net, self.hpr_gain[adapter_name], *self._rotation_modules(adapter_name)):
            if any(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()]):
                module.to_empty(device=device or torch.device("cpu"))
        expected = set(net.state_dict().keys())
        given = set(angle_state_dict.keys())
        if given != expected:
            raise ValueError(
                f"angle_state_dict keys {sorted(given)} do not match the angle net of layer {self.layer_index} "
                f"({sorted(expected)}); build it with build_angle_net(d, config.angle_hidden_sizes)."
            )
        self._install_rotation_options(adapter_name, direction, protected_dims)
        with torch.no_grad():
            self.hpr_gain[adapter_name].weight.fill_(float(gain))
            probe.weight[0].copy_(probe_weight.to(probe.weight.device, probe.weight.dtype))
            for name, tensor in net.state_dict().items():
                source = torch.as_tensor(angle_state_dict[name])
                if source.shape != tensor.shape:
                    raise ValueError(
                        f"angle_state_dict[{name!r}] has shape {tuple(source.shape)}, expected "
                        f"{tuple(tensor.shape)}."
                    )
                tensor.copy_(source.to(tensor.device, tensor.dtype))

    def _rotation_modules(self, adapter_name: str) -> list[nn.Module]:
        containers = (self.hpr_direction, self.hpr_protected)
        return [container[adapter_name] for container in containers if adapter_name in container]

    def _install_rotation_options(
        self, adapter_name: str, direction: torch.Tensor | None, protected_dims: torch.Tensor | None
    ) -> None:
        """Copy ``direction`` / ``protected_dims`` into the adapter, each checked against its config."""
        if (direction is None) != (adapter_name not in self.hpr_direction):
            asked = adapter_name in self.hpr_direction
            raise ValueError(
                f"adapter {adapter_name!r} has rotation_direction={'mean_difference' if asked else 'probe'!r}: "
                + ("pass direction=u (shape (d,))." if asked else "direction must be None (the probe's own).")
            )
        if (protected_dims is None) != (adapter_name not in self.hpr_protected):
            k = len(self.hpr_protected[adapter_name].index) if adapter_name in self.hpr_protected else 0
            raise ValueError(
                f"adapter {adapter_name!r} has exclude_massive_dims={k}: "
                + ("pass protected_dims (int64, shape (k,))." if k else "protected_dims must be None.")
            )
        if direction is not None:
            weight = self.hpr_direction[adapter_name].weight
            direction = check_direction(direction, self.hidden_size)
            with torch.no_grad():
                weight.copy_(direction.to(weight.device, weight.dtype))
        if protected_dims is not None:
            index = self.hpr_protected[adapter_name].index
            index.copy_(check_protected_dims(protected_dims, len(index), self.hidden_size).to(index.device))

    def is_identity(self, adapter_name: str) -> bool:
        """True if the adapter cannot edit: its gain is zero (``init_weights=True``, untrained) or its
        probe is all zero (no hyperplane). Reads the weights (a host synchronisation): the edit itself
        never calls it while gradients are recorded or under ``torch.compile``."""
        weight = self.hpr_probe[adapter_name].weight
        gain = self.hpr_gain[adapter_name].weight
        if weight.device.type == "meta" or gain.device.type == "meta":
            return True
        return not bool(gain.item()) or not bool(torch.count_nonzero(weight).item())

    def learned_angle(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``g · f(h)`` in radians (float32, shape ``hidden.shape[:-1]``): the angle before ``alpha``."""
        return self.hpr_gain[adapter_name].weight.float() * predict_angle(
            self.hpr_angle[adapter_name], hidden
        )

    def records_gradients(self, adapter_name: str) -> bool:
        """Whether autograd is recording this adapter's weights (training, or any backward pass)."""
        if not torch.is_grad_enabled():
            return False
        modules = (
            self.hpr_gain[adapter_name],
            self.hpr_probe[adapter_name],
            self.hpr_angle[adapter_name],
            *self._rotation_modules(adapter_name),
        )
        return any(p.requires_grad for module in modules for p in module.parameters())

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

        ``w·h`` is computed for every token first (O(d) each). Eager on CPU, the angle net and the
        rotation then run only on the flagged tokens (gather / scatter), and an editor that cannot
        edit (:meth:`is_identity`) is skipped; on accelerators and under ``torch.compile`` every token
        is computed and merged with ``torch.where`` (no host synchronisation, no graph break). A token
        whose angle is exactly 0 (``g = 0``) is returned bit for bit. While autograd records the
        adapter's weights the edit runs :func:`straight_through_edit` (same values).
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
        training = not monitoring and self.records_gradients(adapter_name)
        dense = training or hidden.device.type != "cpu" or torch.compiler.is_compiling()
        if (monitoring or not dense) and self.is_identity(adapter_name):
            return hidden
        probe_weight = probe_weight.to(hidden.device)
        direction = self.rotation_direction(adapter_name).to(hidden.device)
        protected = self.protected_dims(adapter_name)
        protected = None if protected is None else protected.to(hidden.device)
        eligible = self.eligible_positions(adapter_name, context)
        scores = probe_logits(hidden, probe_weight)
        threshold = self.hpr_threshold[adapter_name]
        flagged = eligible & flag_tokens(scores, threshold)
        if monitoring:
            with torch.no_grad():
                angles = self.learned_angle(adapter_name, hidden[flagged])
                for watcher in monitors:
                    watcher.record(self, scores[eligible], flagged[eligible], angles)
            return hidden
        if dense:
            theta = alpha * self.learned_angle(adapter_name, hidden)
            if training:
                probability = flag_probability(scores, threshold)
                return straight_through_edit(
                    hidden, direction, theta, flagged, eligible, probability, protected
                )
            return apply_hpr(hidden, direction, theta, flagged & (theta != 0), protected)
        index = flagged.nonzero(as_tuple=True)
        if index[0].numel() == 0:
            return hidden
        chosen = hidden[index]  # (n, d)
        theta = alpha * self.learned_angle(adapter_name, chosen)
        rotated = pseudo_rotate(chosen, direction, theta, protected)
        return hidden.index_put(index, rotated)

    def __repr__(self) -> str:
        return f"hpr.{super().__repr__()}"


def check_direction(direction: Any, hidden_size: int) -> torch.Tensor:
    """``direction`` as a tensor, checked to be finite with shape ``(hidden_size,)``."""
    direction = torch.as_tensor(direction)
    if direction.shape != (hidden_size,) or not direction.is_floating_point():
        raise ValueError(
            f"direction must be a float tensor of shape ({hidden_size},) (the hidden size), got "
            f"{direction.dtype} {tuple(direction.shape)}."
        )
    if not torch.isfinite(direction).all():
        raise ValueError(
            "direction contains NaN or inf; refit it (hpr_peft.rotation.mean_difference_direction)."
        )
    return direction


def check_protected_dims(index: Any, count: int, hidden_size: int) -> torch.Tensor:
    """``index`` as int64, checked to be ``count`` distinct dimension indices in ``[0, hidden_size)``."""
    index = torch.as_tensor(index)
    if index.shape != (count,) or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(
            f"protected_dims must be an integer tensor of shape ({count},) (exclude_massive_dims), got "
            f"{index.dtype} {tuple(index.shape)}."
        )
    index = index.long()
    if count and (int(index.min()) < 0 or int(index.max()) >= hidden_size or index.unique().numel() != count):
        raise ValueError(
            f"protected_dims must be {count} distinct dimension indices in [0, {hidden_size}), got "
            f"{index.tolist()[:16]}."
        )
    return index


def _full_gain_for_checkpoints_without_one(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Load hook: an editor saved without a gain (hpr_peft 0.1) gets ``g = 1``, so it edits as saved."""
    for adapter_name in module.hpr_probe:
        gain_key = f"{prefix}hpr_gain.{adapter_name}.weight"
        if f"{prefix}hpr_probe.{adapter_name}.weight" in state_dict and gain_key not in state_dict:
            state_dict[gain_key] = torch.ones(())
