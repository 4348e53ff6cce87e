"""The files of a saved HPR adapter, and the checks every reader of a saved adapter makes.

A saved adapter is a directory with ``adapter_config.json`` and ``adapter_model.safetensors``. A pickle
``adapter_model.bin`` is never read: loading a pickle can run arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "EVAL_RESULTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "WEIGHTS_NAME",
    "check_adapter_dir",
    "check_hpr_peft_type",
    "pickle_refusal",
    "read_json",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EVAL_RESULTS_NAME = "eval_results.json"
CARD_NAME = "README.md"


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ValueError (saying how to fix it) if it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); re-save the adapter with save_pretrained"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; re-save the adapter with save_pretrained")
    return data


def pickle_refusal(where: str) -> ValueError:
    """The error for an adapter (``where``: a directory or a Hub repo) that has only pickle weights."""
    return ValueError(
        f"{where} has only a pickle weights file ({PICKLE_WEIGHTS_NAME}) and no {WEIGHTS_NAME}. hpr_peft "
        "never unpickles files (a pickle can run arbitrary code when loaded). Ask the author to re-save the "
        f"adapter with save_pretrained (safetensors is the default), or convert a copy you trust with "
        f"safetensors.torch.save_file(torch.load(path, weights_only=True), '{WEIGHTS_NAME}')."
    )


def check_adapter_dir(directory: Path) -> dict:
    """Validate a saved adapter directory and return its config (safetensors only)."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} does not exist; pass a saved adapter dir"
        )
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONFIG_NAME}: it is not a saved adapter. Save one with "
            "model.save_pretrained(dir) or hpr_peft.save_adapter_atomic(model, dir)."
        )
    if not (directory / WEIGHTS_NAME).is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise pickle_refusal(f"adapter directory {str(directory)!r}")
        raise FileNotFoundError(
            f"{str(directory)!r} has no {WEIGHTS_NAME}; re-save the adapter with save_pretrained"
        )
    return read_json(config_path)


def _holds_hpr_editors(weights: Path) -> bool:
    """Whether the safetensors file has HPR editor tensors (reads only its header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = handle.keys()
        return any(".hpr_probe." in name or ".hpr_angle." in name for name in names)
    except Exception:  # an unreadable file is reported when the weights load
        return False


def check_hpr_peft_type(config: dict, directory: Path, label: str) -> None:
    """Raise ``ValueError`` unless the config of the adapter in ``directory`` (shown as ``label``) says
    ``"peft_type": "HPR"``: a missing or lower-case type, or another method's type, each named with its fix.
    """
    where = f"{CONFIG_NAME} of {label!r}"
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise ValueError(
            f'{where} has no "peft_type", so PEFT cannot tell which method the adapter is. An HPR adapter\'s '
            'config says "peft_type": "HPR": add it, or re-save the adapter with save_pretrained.'
        )
    if peft_type == "HPR":
        return
    if isinstance(peft_type, str) and peft_type.upper() == "HPR":
        raise ValueError(f'{where} has "peft_type": {peft_type!r}; PEFT types are upper-case: write "HPR".')
    if _holds_hpr_editors(directory / WEIGHTS_NAME):
        raise ValueError(
            f"{where} says peft_type {peft_type!r}, but its {WEIGHTS_NAME} holds HPR editors (hpr_probe / "
            'hpr_angle tensors): the config is wrong. Set "peft_type": "HPR", or re-save the adapter.'
        )
    raise ValueError(
        f"{label!r} is a {peft_type} adapter, not an HPR adapter: load it with peft.PeftModel.from_pretrained."
    )
