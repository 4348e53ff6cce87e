"""HPRConfig: the PEFT configuration of Householder Pseudo-Rotation activation editing.

The config travels in ``adapter_config.json`` (``to_dict`` / ``from_pretrained``), so every field is
plain JSON. Validation happens in ``__post_init__`` and raises ``ValueError`` / ``TypeError`` naming
the field and the fix, so a bad config never reaches the model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

from peft.config import PeftConfig
from peft.utils import TaskType

from hpr_peft.tuner.registration import PEFT_TYPE_NAME, ensure_peft_type

EDIT_POSITIONS = ("all", "last")
ROTATION_DIRECTIONS = ("probe", "mean_difference")
# |alpha| beyond this turns tokens by hundreds of full turns (the angle is alpha * f(h), f(h) < pi):
# no strength means that, and float32 angles lose their precision long before they overflow
MAX_ABS_ALPHA = 1000.0
# widest / deepest angle net a config may ask for (a tampered config could otherwise ask for terabytes)
MAX_ANGLE_WIDTH = 65536
MAX_ANGLE_DEPTH = 16


def validate_alpha(alpha: Any) -> float:
    """``alpha`` as a float: a finite real number (Python or numpy, not a bool) with
    ``|alpha| <= MAX_ABS_ALPHA``; raises ``ValueError`` otherwise.

    A flagged token is turned by ``alpha * f(h)`` radians towards the probe's positive side: ``0``
    switches editing off, ``1`` is the fitted strength, and a negative ``alpha`` turns flagged tokens
    the other way, away from the positive side (the opposite edit, e.g. for ablations).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (the strength, default 1.0), got {alpha!r}.")
    if abs(float(alpha)) > MAX_ABS_ALPHA:
        raise ValueError(
            f"alpha must be a finite number between -{MAX_ABS_ALPHA:g} and {MAX_ABS_ALPHA:g} (the angle is "
            f"alpha * f(h) radians with f(h) < pi; larger values only spin tokens round and round), got {alpha!r}."
        )
    return float(alpha)


def validate_adapter_name(name: Any) -> str:
    """``name`` checked to be a usable adapter name; raises ``ValueError`` naming the fix otherwise.

    PEFT saves a non-default adapter in the sub-directory ``<save dir>/<adapter name>`` and uses the
    name inside module keys, so a name must be one plain path component without dots: an absolute or
    path-like name would make a save write outside the target directory.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"adapter_name must be a non-empty string such as 'default', got {name!r}.")
    separators = {"/", "\\", os.sep, os.altsep or "/"}
    if any(sep in name for sep in separators) or "." in name or "\0" in name or name != name.strip():
        raise ValueError(
            f"adapter_name {name!r} is not a plain name: it must not contain '/', '\\', '.', NUL or "
            "surrounding spaces (PEFT saves a named adapter in the sub-directory of that name, so a path "
            "would write outside the save directory). Use letters, digits, '_' or '-', e.g. 'truthful'."
        )
    return name


def validate_layer_choice(layers: Iterable[int] | None, available: Iterable[int]) -> set[int]:
    """The block indices ``layers`` names (all of ``available`` for None), each checked to be one of
    ``available`` (the blocks that carry an editor)."""
    available = set(available)
    if layers is None:
        return available
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be an iterable of block indices or None, got {layers!r}.")
    chosen = list(layers)
    bad = [i for i in chosen if not _is_int(i)]
    if bad:
        raise TypeError(f"layers must contain integer block indices, got {bad!r}.")
    chosen = [int(i) for i in chosen]
    unknown = sorted(set(chosen) - available)
    if unknown:
        raise ValueError(
            f"layers {unknown} carry no HPR editor for this adapter; edited blocks are {sorted(available)}."
        )
    return set(chosen)


def _is_int(value: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _layer_list(name: str, value: Any, allow_all: bool) -> list[int] | str:
    """Validate a list of decoder block indices (or ``"all"``) and return it sorted."""
    hint_all = ' or "all"' if allow_all else ""
    if isinstance(value, str):
        if allow_all and value == "all":
            return value
        if value.lower() == "all-linear":
            raise ValueError(
                f"{name}='all-linear' is not supported: HPR edits the output of whole decoder blocks, not linear "
                f"layers. Pass block indices such as {name}=[10, 14, 18]{hint_all}."
            )
        raise ValueError(
            f"{name}={value!r} is not supported: HPR selects decoder blocks by index, not by module name or "
            f"pattern. Pass a list of block indices such as {name}=[10, 14, 18]{hint_all}."
        )
    if _is_int(value):
        raise ValueError(f"{name}={value} must be a list of block indices: pass {name}=[{value}]{hint_all}.")
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of non-negative block indices{hint_all}, got {type(value).__name__}."
        )
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty: list at least one decoder block index{hint_all}.")
    bad = [item for item in value if not _is_int(item) or item < 0]
    if bad:
        raise ValueError(
            f"{name} must contain only non-negative integer block indices, got {bad!r}. Pass e.g. {name}=[0, 3]."
        )
    value = [int(item) for item in value]
    if len(set(value)) != len(value):
        duplicates = sorted({item for item in value if value.count(item) > 1})
        raise ValueError(f"{name} lists block indices {duplicates} more than once; list each block once.")
    return sorted(value)


def _check_angle_net_size(sizes: list[int]) -> None:
    """Refuse angle nets no fit would ask for (a damaged or tampered config could ask for terabytes)."""
    too_wide = [s for s in sizes if s > MAX_ANGLE_WIDTH]
    if too_wide or len(sizes) > MAX_ANGLE_DEPTH:
        raise ValueError(
            f"angle_hidden_sizes {sizes if len(sizes) <= 8 else [*sizes[:8], '...']} asks for an absurdly "
            f"large angle net (at most {MAX_ANGLE_DEPTH} hidden layers of at most {MAX_ANGLE_WIDTH} units "
            "each; fitted adapters use [d // 2]): the config is damaged. Re-save the adapter, or fix "
            "angle_hidden_sizes in adapter_config.json."
        )


@dataclass
class HPRConfig(PeftConfig):
    """Configuration of an HPR adapter (Householder Pseudo-Rotation of decoder-block outputs).

    Args:
        target_layers: decoder block indices whose output is edited, or ``"all"``. Blocks are found
            structurally (any transformers decoder-only causal LM); module names and ``"all-linear"``
            are rejected because HPR edits whole blocks.
        alpha: strength; the rotation angle is ``alpha * f(h)``. Finite, ``|alpha| <= 1000``; ``0``
            disables the edit; a negative ``alpha`` turns flagged tokens away from the probe's positive
            side (the opposite edit).
        threshold: a token is edited where the probe gives ``sigmoid(w·h) < threshold`` (with the
            default 0.5: ``w·h <= 0``; ``w·h = 0`` counts as negative). In ``(0, 1)``.
        angle_hidden_sizes: widths of the hidden Linear+GELU blocks of the angle predictor; ``None``
            means ``[d // 2]``; ``[]`` means a single Linear.
        edit_positions: ``"all"`` edits every eligible position of every forward call (cache- and
            padding-equivalent); ``"last"`` edits only the last position of each call (the paper's
            generation mode; not equivalent between cached and uncached decoding).
        skip_sequence_start: never edit the first real token of a sequence (an attention sink whose
            rotation wrecks the model). Default True.
        init_weights: True (default): an exact identity that trains. Each editor's angle is
            ``alpha * g * f(h)`` with a gain ``g`` that starts at 0 (like LoRA's ``B = 0``): nothing
            turns and the logits equal the base model's bit for bit, yet one backward pass gives ``g``
            a gradient, and from the next step on the probe and the angle net learn too. The probe
            starts as a real hyperplane that flags about half of the tokens (calibrated on the model's
            own hidden states, whatever their common offset), so the gate has tokens on both sides.
            While autograd records the adapter's weights the hard gate passes gradients straight
            through (docs/math.md); inference keeps the hard gate. ``fit_hpr`` installs ``g = 1``.
            False: random editors that really edit (``g = 1``, probes flagging about three quarters
            of the tokens, angles around pi/2), for tests and end-to-end training.
        rotation_direction: the direction a flagged token is turned toward (the probe still decides
            which tokens): ``"probe"`` (default, the paper's): the probe's ``ŵ``; ``"mean_difference"``:
            the normalised mean difference ``u = mean(x⁺) − mean(x⁻)`` of the fitting activations (ITI's
            mass-mean shift), stored per layer in the adapter. The rotation is the same norm-preserving
            turn in the plane of ``h`` and ``u`` (docs/math.md).
        exclude_massive_dims: ``k >= 0``; with ``k > 0`` the rotation leaves the ``k`` "massive"
            dimensions (largest mean ``h_i²`` over the fitting activations, chosen by ``fit_hpr`` and
            stored per layer) untouched and turns the rest of ``h`` within its own subspace, so ``|h|``
            is still preserved. For models whose tokens all share a few huge coordinates (Gemma-3).
            Must be below the hidden size. Default 0 (the paper's rotation).
        selected_layers: the subset of ``target_layers`` that edit; ``None`` means all targets.
            Unselected layers keep their weights (and can be switched on at run time).
        fit_results: JSON-able dict that travels with the adapter (per-layer metrics etc.).
        layers_to_transform: PEFT's generic name for the blocks to edit (an index or a list), accepted so
            that generic PEFT code can choose them; it becomes ``target_layers`` (give one of the two).
    """

    target_layers: list[int] | Literal["all"] = field(
        default="all", metadata={"help": 'Decoder block indices to edit, or "all".'}
    )
    alpha: float = field(default=1.0, metadata={"help": "Strength: the rotation angle is alpha * f(h)."})
    threshold: float = field(
        default=0.5, metadata={"help": "Edit tokens whose probe probability is below this, in (0, 1)."}
    )
    angle_hidden_sizes: list[int] | None = field(
        default=None, metadata={"help": "Hidden widths of the angle predictor MLP (None: [d // 2])."}
    )
    edit_positions: Literal["all", "last"] = field(
        default="all", metadata={"help": '"all" positions of every call, or only the "last" of each call.'}
    )
    skip_sequence_start: bool = field(
        default=True, metadata={"help": "Never edit the first real token of a sequence (attention sink)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: identity until fitted. False: random editors (tests/training)."},
    )
    rotation_direction: Literal["probe", "mean_difference"] = field(
        default="probe",
        metadata={
            "help": 'Turn flagged tokens toward the "probe" direction or the "mean_difference" of the fit.'
        },
    )
    exclude_massive_dims: int = field(
        default=0,
        metadata={"help": "Leave the k largest (massive) dimensions out of the rotation (0: none)."},
    )
    selected_layers: list[int] | None = field(
        default=None, metadata={"help": "Subset of target_layers that edit (None: all targets)."}
    )
    fit_results: dict[str, Any] | None = field(
        default=None, metadata={"help": "JSON-able fit/eval metadata that travels with the adapter."}
    )
    task_type: TaskType | str | None = field(
        default=TaskType.CAUSAL_LM, metadata={"help": "PEFT task type (HPR edits causal LMs)."}
    )
    layers_to_transform: int | list[int] | None = field(
        default=None, metadata={"help": "PEFT's name for the blocks to edit; becomes target_layers."}
    )

    # HPR has no module-name targeting; peft's generic injection code reads this attribute.
    target_modules: ClassVar[None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ensure_peft_type()

        self.target_layers = _layer_list("target_layers", self.target_layers, allow_all=True)
        self._take_layers_to_transform()

        self.alpha = validate_alpha(self.alpha)

        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, Real)
            or not (0.0 < float(self.threshold) < 1.0)
        ):
            raise ValueError(
                f"threshold must be a probability strictly between 0 and 1 (default 0.5), got {self.threshold!r}."
            )
        self.threshold = float(self.threshold)

        if self.angle_hidden_sizes is not None:
            if not isinstance(self.angle_hidden_sizes, (list, tuple)):
                raise TypeError(
                    "angle_hidden_sizes must be a list of positive ints (e.g. [256]) or None for [d // 2], got "
                    f"{type(self.angle_hidden_sizes).__name__}."
                )
            bad = [s for s in self.angle_hidden_sizes if not _is_int(s) or s <= 0]
            if bad:
                raise ValueError(
                    f"angle_hidden_sizes must contain only positive ints (layer widths), got {bad!r}; "
                    "use e.g. [256], [] for a single Linear, or None for [d // 2]."
                )
            self.angle_hidden_sizes = [int(s) for s in self.angle_hidden_sizes]
            _check_angle_net_size(self.angle_hidden_sizes)

        if self.edit_positions not in EDIT_POSITIONS:
            raise ValueError(
                f'edit_positions must be one of {list(EDIT_POSITIONS)} ("all": every position, cache-equivalent; '
                f'"last": last position of each forward call), got {self.edit_positions!r}.'
            )

        for name in ("skip_sequence_start", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")

        self._check_rotation_options()

        if self.selected_layers is not None:
            self.selected_layers = _layer_list("selected_layers", self.selected_layers, allow_all=False)
            if self.target_layers != "all":
                outside = sorted(set(self.selected_layers) - set(self.target_layers))
                if outside:
                    raise ValueError(
                        f"selected_layers {outside} are not in target_layers {self.target_layers}: selected "
                        "layers must be a subset of the targets (add them to target_layers or drop them)."
                    )

        if self.fit_results is not None:
            if not isinstance(self.fit_results, dict):
                raise TypeError(
                    f"fit_results must be a JSON-able dict or None, got {type(self.fit_results).__name__}."
                )
            try:
                json.dumps(self.fit_results)
            except (TypeError, ValueError) as error:
                raise ValueError(
                    "fit_results must be JSON-serialisable (it is saved in adapter_config.json): convert "
                    f"tensors/arrays to lists and keys to str ({error})."
                ) from error

    def _check_rotation_options(self) -> None:
        """``rotation_direction`` one of :data:`ROTATION_DIRECTIONS`, ``exclude_massive_dims`` an int >= 0."""
        if self.rotation_direction not in ROTATION_DIRECTIONS:
            raise ValueError(
                f'rotation_direction must be one of {list(ROTATION_DIRECTIONS)} ("probe": toward the probe\'s '
                f'direction; "mean_difference": toward mean(x+) - mean(x-) of the fit), got {self.rotation_direction!r}.'
            )
        k = self.exclude_massive_dims
        if not _is_int(k) or k < 0:
            raise ValueError(
                f"exclude_massive_dims must be a non-negative int (the number of massive dimensions left out "
                f"of the rotation; 0 = none), got {k!r}."
            )
        self.exclude_massive_dims = int(k)

    def check_hidden_size(self, hidden_size: int) -> None:
        """Refuse ``exclude_massive_dims >= hidden_size`` (no dimension would be left to rotate in)."""
        if self.exclude_massive_dims >= hidden_size:
            raise ValueError(
                f"exclude_massive_dims={self.exclude_massive_dims} must be below the model's hidden size "
                f"{hidden_size}: some dimensions must be left to rotate in (a few, e.g. 1-8, is typical)."
            )

    def _take_layers_to_transform(self) -> None:
        """Move PEFT's ``layers_to_transform`` into ``target_layers`` (an int means one block)."""
        if self.layers_to_transform is None:
            return
        layers = self.layers_to_transform
        layers = [layers] if _is_int(layers) else layers
        layers = _layer_list("layers_to_transform", layers, allow_all=False)
        if self.target_layers not in ("all", layers):
            raise ValueError(
                f"target_layers={self.target_layers} and layers_to_transform={self.layers_to_transform} disagree: "
                "they name the same thing (the blocks to edit); give only target_layers."
            )
        self.target_layers, self.layers_to_transform = layers, None

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """Refuse a loaded config whose ``peft_type`` is not ``"HPR"`` (peft would silently build
        another method's config from it)."""
        peft_type = kwargs.get("peft_type", PEFT_TYPE_NAME)
        if str(getattr(peft_type, "value", peft_type)) != PEFT_TYPE_NAME:
            raise ValueError(
                f'peft_type is {peft_type!r}, not "HPR": this is not an HPR adapter config. Load it with '
                'peft.PeftModel.from_pretrained, or, if the folder holds HPR weights, set "peft_type": "HPR".'
            )
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any
    ) -> HPRConfig:
        """Load ``adapter_config.json`` (PEFT's loader); a bad value raises naming the file, and the
        config remembers where it came from (``loaded_from``) so that weight checks can name the folder."""
        source = str(pretrained_model_name_or_path) + (f"/{subfolder}" if subfolder else "")
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:
            if source in str(error):  # already names the folder (peft: "Can't find ... at ...")
                raise
            raise type(error)(f"{source}/adapter_config.json: {error}") from error
        config.loaded_from = source
        return config

    def resolved_target_layers(self, num_layers: int) -> list[int]:
        """Target block indices for a model with ``num_layers`` blocks (validates the range)."""
        if self.target_layers == "all":
            return list(range(num_layers))
        out_of_range = [i for i in self.target_layers if i >= num_layers]
        if out_of_range:
            raise ValueError(
                f"target_layers {out_of_range} out of range: the model has {num_layers} decoder blocks "
                f"(valid indices 0..{num_layers - 1})."
            )
        return list(self.target_layers)

    def resolved_selected_layers(self, num_layers: int) -> list[int]:
        """Block indices that edit (selected subset of the targets) for a model with ``num_layers`` blocks."""
        targets = self.resolved_target_layers(num_layers)
        if self.selected_layers is None:
            return targets
        outside = sorted(set(self.selected_layers) - set(targets))
        if outside:
            raise ValueError(
                f"selected_layers {outside} are not targeted (targets: {targets}, model has {num_layers} blocks)."
            )
        return list(self.selected_layers)
