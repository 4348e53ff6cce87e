"""Checks on a saved adapter directory (hpr_peft.hub.adapter_files): safetensors only, readable JSON config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpr_peft.hub.adapter_files import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_adapter_dir,
    read_json,
)

CONFIG = json.dumps({"peft_type": "HPR", "target_layers": [0]})

# (files in the directory, or None for no directory; the error; what its message says)
BROKEN = [
    pytest.param(None, FileNotFoundError, "does not exist; pass a saved adapter dir", id="no-directory"),
    pytest.param({}, FileNotFoundError, "not a saved adapter.*save_adapter_atomic", id="empty"),
    pytest.param(
        {WEIGHTS_NAME: b"weights"}, FileNotFoundError, f"has no {CONFIG_NAME}", id="weights-without-config"
    ),
    pytest.param({CONFIG_NAME: CONFIG}, FileNotFoundError, f"has no {WEIGHTS_NAME}", id="config-only"),
    pytest.param(
        {CONFIG_NAME: CONFIG, PICKLE_WEIGHTS_NAME: b"pickle"},
        ValueError,
        r"only a pickle weights file \(adapter_model.bin\).*never unpickles.*weights_only=True",
        id="pickle-only",
    ),
    pytest.param(
        {CONFIG_NAME: "{not json", WEIGHTS_NAME: b"w"}, ValueError, "is not valid JSON", id="invalid-json"
    ),
    pytest.param(
        {CONFIG_NAME: "[1, 2]", WEIGHTS_NAME: b"w"}, ValueError, "must hold a JSON object", id="list"
    ),
]


def _adapter_dir(tmp_path: Path, files: dict[str, str | bytes] | None) -> Path:
    directory = tmp_path / "adapter"
    if files is None:
        return directory
    directory.mkdir()
    for name, content in files.items():
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return directory


@pytest.mark.parametrize(("files", "error", "message"), BROKEN)
def test_broken_adapter_directories_are_refused(
    tmp_path: Path, files: dict | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_adapter_dir(_adapter_dir(tmp_path, files))


def test_complete_adapter_directory_gives_its_config(tmp_path: Path) -> None:
    files = {CONFIG_NAME: CONFIG, WEIGHTS_NAME: b"w", PICKLE_WEIGHTS_NAME: b"ignored pickle"}
    assert check_adapter_dir(_adapter_dir(tmp_path, files)) == json.loads(CONFIG)


def test_read_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "eval_results.json"
    path.write_text('{"mc1": 0.25}')
    assert read_json(path) == {"mc1": 0.25}
    path.write_text("mc1 = 0.25")
    with pytest.raises(ValueError, match=r"eval_results.json is not valid JSON"):
        read_json(path)
