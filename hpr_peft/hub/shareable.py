"""What a fit leaves behind, ready to share: HPR's model card, a base model others can resolve, and on
request only the editors of the layers that edit.

``save_pretrained`` writes PEFT's placeholder README (with whatever ``base_model_name_or_path`` says,
often an absolute local path) and every targeted layer's editor: a fit over all 30 blocks of SmolLM2
keeps 30 editors (20 MB) when 3 edit. :func:`save_shareable_adapter` saves atomically, writes HPR's card
(:func:`~hpr_peft.hub.card.render_model_card`), records where the base model's weights came from when
they were the dequantised GGUF of a bundled model (:func:`~hpr_peft.runtime.bundled_models.weights_source`;
the base model is then named by its Hub id), and with ``only_selected_layers`` keeps only the selected
layers' editors (:func:`keep_selected_layers`), which loads back with the same logits: the left-out
layers did not edit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from hpr_peft.hub.adapter_files import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, check_adapter_dir, read_json
from hpr_peft.hub.card import BASE_WEIGHTS_KEY, render_model_card
from hpr_peft.hub.saving import save_adapter_atomic
from hpr_peft.runtime.bundled_models import weights_source
from hpr_peft.tuner.model import hpr_tuner

__all__ = ["keep_selected_layers", "record_weights_source", "save_shareable_adapter"]

_BLOCK_OF_KEY = re.compile(r"\.(\d+)\.hpr_")


def save_shareable_adapter(
    model: Any,
    directory: str | os.PathLike,
    *,
    only_selected_layers: bool = False,
    adapter_name: str | None = None,
    base_model: str | None = None,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model``'s HPR adapter into ``directory`` with HPR's model card, atomically.

        ``only_selected_layers``: keep only the editors of the layers that edit (``selected_layers``); the
        saved ``target_layers`` then lists exactly those, and the card says which layers it holds.
        ``base_model``: the Hub id to record as ``base_model_name_or_path`` (default: what PEFT recorded, the
        Hub id for bundled models). Other files already in ``directory`` are kept; ``add_files(folder)`` may
    write more (a report, plots) that are swapped in together with the adapter
    (:func:`~hpr_peft.hub.saving.save_adapter_atomic`). Returns the directory.
    """
    tuner = hpr_tuner(model)
    adapter = tuner.resolve_adapter(adapter_name)

    def finish(staging: Path) -> None:
        saved = staging / adapter if adapter != "default" else staging
        if saved != staging:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                os.replace(saved / name, staging / name)
            shutil.rmtree(saved)
        record_weights_source(model, staging, base_model=base_model)
        if only_selected_layers:
            keep_selected_layers(staging)
        config = read_json(staging / CONFIG_NAME)
        (staging / CARD_NAME).write_text(render_model_card(config), encoding="utf-8")
        if add_files is not None:
            add_files(staging)

    return save_adapter_atomic(
        model, directory, selected_adapters=[adapter], safe_serialization=True, add_files=finish
    )


def record_weights_source(model: Any, directory: Path, *, base_model: str | None = None) -> None:
    """Write into the saved ``adapter_config.json`` where the base model's weights came from (GGUF
    models loaded by hpr_peft, under ``fit_results["base_model_weights"]``) and ``base_model`` as
    ``base_model_name_or_path`` when given."""
    source = weights_source(model)
    if source is None and base_model is None:
        return
    path = directory / CONFIG_NAME
    config = read_json(path)
    if source is not None:
        config["fit_results"] = {**(config.get("fit_results") or {}), BASE_WEIGHTS_KEY: source}
        config["base_model_name_or_path"] = source.get("hub_id", config.get("base_model_name_or_path"))
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def keep_selected_layers(directory: Path) -> list[int]:
    """Rewrite a saved adapter (a staging directory: files are replaced in place) to hold only the
    editors of its ``selected_layers``; returns the layers it holds. With no selection (every target
    edits) nothing changes. The config's ``target_layers`` becomes the selection."""
    config = check_adapter_dir(directory)
    tensors = load_file(directory / WEIGHTS_NAME)
    by_block: dict[str, int] = {}
    for key in tensors:
        match = _BLOCK_OF_KEY.search(key)
        if match is None:
            raise ValueError(
                f"{WEIGHTS_NAME} holds {key!r}, which is not an HPR editor weight of a decoder block."
            )
        by_block[key] = int(match.group(1))
    selected = config.get("selected_layers")
    if selected is None:
        return sorted(set(by_block.values()))
    missing = sorted(set(selected) - set(by_block.values()))
    if missing:
        raise ValueError(
            f"selected_layers {missing} have no editor weights in {directory}; re-save the adapter."
        )
    kept = {key: tensor for key, tensor in tensors.items() if by_block[key] in selected}
    save_file(kept, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config["target_layers"], config["selected_layers"] = sorted(selected), None
    (directory / CONFIG_NAME).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return sorted(selected)
