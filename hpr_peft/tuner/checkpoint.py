"""Checks of a saved HPR adapter's weights against its config and the model, before they load.

PEFT loads adapter weights with ``load_state_dict(strict=False)``: tensors the model has no place for
are dropped, missing ones only warned about, and non-finite values accepted. For HPR each of these
gives a silently wrong model (fewer edited blocks, random or no-op editors), so
:func:`check_adapter_state_dict` turns each into one ``ValueError`` that names the file, says what is
wrong and how to fix it. ``HPRModel._remap_adapter_state_dict_for_load`` calls it, so the checks run
for ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` and ``hpr_peft.load_adapter`` alike.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["check_adapter_state_dict"]

_BLOCK = re.compile(r"(?:^|\.)(\d+)\.hpr_(?:probe|angle|gain|direction|protected)\.")
_PARTS = ("hpr_probe", "hpr_angle", "hpr_gain", "hpr_direction", "hpr_protected")
_PEFT_PREFIX = "base_model.model."


def _is_hpr_key(key: str) -> bool:
    return any(f".{part}." in key or key.startswith(f"{part}.") for part in _PARTS)


def _block_of(key: str) -> int | None:
    match = _BLOCK.search(key)
    return int(match.group(1)) if match else None


def _blocks(keys: Any) -> list[int]:
    return sorted({b for b in map(_block_of, keys) if b is not None})


def _short(key: str) -> str:
    return key.removeprefix(_PEFT_PREFIX)


def weights_file_of(config: Any) -> str:
    """The file (or folder / repo) the adapter weights came from, for messages."""
    source = getattr(config, "loaded_from", None)
    if not source:
        return "the adapter weights being loaded"
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(source, name)):
            return os.path.join(source, name)
    return f"the adapter weights of {source!r}"


def _targets(config: Any) -> str:
    layers = getattr(config, "target_layers", None)
    return f"target_layers={layers!r}" if layers != "all" else "target_layers='all' (every block)"


def _check_hidden_size(expected: Mapping, given: Mapping, where: str, config: Any) -> None:
    model_sizes = {v.shape[-1] for k, v in expected.items() if ".hpr_probe." in k}
    file_sizes = {v.shape[-1] for k, v in given.items() if ".hpr_probe." in k and v.dim() == 2}
    if model_sizes and file_sizes and file_sizes != model_sizes:
        base = getattr(config, "base_model_name_or_path", None)
        fitted = ", ".join(str(s) for s in sorted(file_sizes))
        raise ValueError(
            f"{where}: this adapter was fitted for hidden size {fitted}; this model has "
            f"{', '.join(str(s) for s in sorted(model_sizes))}. Load it onto the model it was fitted for"
            + (f" ({base})." if base else ".")
        )


def _check_layer_sets(expected: Mapping, given: Mapping, where: str, config: Any) -> None:
    extra = [k for k in given if k not in expected]
    if extra:
        raise ValueError(
            f"{where} holds editors for blocks {_blocks(extra)} (e.g. {_short(extra[0])!r}) that "
            f"adapter_config.json does not target ({_targets(config)}): the config and the weights do not "
            "belong together. Re-save the adapter (save_pretrained), or list those blocks in target_layers."
        )
    # an editor saved without its angle gain (hpr_peft 0.1) loads with g = 1 (HPRLayer's load hook)
    missing = [k for k in expected if k not in given and ".hpr_gain." not in k]
    if missing:
        raise ValueError(
            f"{where} has no weights for blocks {_blocks(missing)} that adapter_config.json targets "
            f"({_targets(config)}; missing e.g. {_short(missing[0])!r}): the file is incomplete or belongs "
            "to another config. Re-save the adapter (save_pretrained), or drop those blocks from target_layers."
        )


def _check_shapes(expected: Mapping, given: Mapping, where: str, config: Any) -> None:
    for key, tensor in given.items():
        if ".hpr_protected." in key and tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {_short(key)!r} lists {tensor.numel()} protected dimensions, but "
                f"exclude_massive_dims={config.exclude_massive_dims} in adapter_config.json: the config and "
                "the weights do not belong together. Re-save the adapter, or fix exclude_massive_dims."
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{where}: {_short(key)!r} has shape {tuple(tensor.shape)}, but "
                f"angle_hidden_sizes={config.angle_hidden_sizes!r} in adapter_config.json builds "
                f"{tuple(expected[key].shape)}: the config and the weights do not belong together. Re-save "
                "the adapter, or set angle_hidden_sizes to the widths it was fitted with."
            )


def _check_finite(given: Mapping, where: str) -> None:
    bad = [
        k
        for k, v in given.items()
        if v.is_floating_point() and v.device.type != "meta" and not bool(torch.isfinite(v).all())
    ]
    if bad:
        raise ValueError(
            f"{where} holds NaN or inf values in the editors of blocks {_blocks(bad)} (e.g. "
            f"{_short(bad[0])!r}): the file is damaged, and such an editor would silently edit nothing. "
            "Re-fit the adapter or restore the file from a good copy."
        )


def _check_protected_dims(expected: Mapping, given: Mapping, where: str) -> None:
    """Protected dimensions must be distinct indices below the hidden size (a damaged file could
    otherwise index out of range at the first forward pass)."""
    sizes = {v.shape[-1] for k, v in expected.items() if ".hpr_probe." in k}
    if not sizes:
        return
    for key, index in given.items():
        if ".hpr_protected." not in key or index.numel() == 0 or index.device.type == "meta":
            continue
        d = max(sizes)
        bad_dtype = index.is_floating_point() or index.dtype == torch.bool
        if (
            bad_dtype
            or int(index.min()) < 0
            or int(index.max()) >= d
            or index.unique().numel() != index.numel()
        ):
            raise ValueError(
                f"{where}: {_short(key)!r} must hold distinct integer dimension indices in [0, {d}), got "
                f"{index.dtype} {index.tolist()[:16]}: the file is damaged. Re-fit the adapter or restore "
                "the file from a good copy."
            )


def check_adapter_state_dict(
    model_state: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str,
    config: Any,
) -> None:
    """Raise ``ValueError`` unless ``state_dict`` (checkpoint tensors, keys already mapped to the model's)
    holds exactly the editors of ``adapter_name`` that ``model_state`` has places for: same hidden size,
    same blocks, same shapes, finite values."""
    markers = tuple(f"{part}.{adapter_name}." for part in _PARTS)
    expected = {k: v for k, v in model_state.items() if any(m in k for m in markers)}
    given = {k: v for k, v in state_dict.items() if _is_hpr_key(k)}
    where = weights_file_of(config)
    _check_hidden_size(expected, given, where, config)
    _check_layer_sets(expected, given, where, config)
    _check_shapes(expected, given, where, config)
    _check_finite(given, where)
    _check_protected_dims(expected, given, where)
