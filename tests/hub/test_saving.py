"""Atomic adapter saves (hpr_peft.hub.saving): a failure mid-save leaves the old adapter intact, no temp dirs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hpr_peft
from hpr_peft import HPRConfig
from hpr_peft.hub import save_adapter_atomic
from support.models import make_tiny_causal_lm


def _peft(seed: int):
    from peft import get_peft_model

    base = make_tiny_causal_lm("llama")
    torch.manual_seed(seed)
    return get_peft_model(base, HPRConfig(target_layers=[0, 1], init_weights=False))


def _hpr_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".hpr_" in k}


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_save_creates_adapter_and_replaces_it(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    first, second = _peft(1), _peft(2)
    assert save_adapter_atomic(first, target) == target.absolute()
    saved1 = load_file(target / "adapter_model.safetensors")
    (target / "fit_report.json").write_text('{"kept": true}')  # a user file beside the adapter
    (target / "plots").mkdir()
    (target / "plots" / "a.txt").write_text("plot")
    (target / "adapter_model.bin").write_bytes(b"stale pickle")

    save_adapter_atomic(second, target)
    saved2 = load_file(target / "adapter_model.safetensors")
    assert saved1.keys() == saved2.keys() and len(saved2) > 0
    assert any(not torch.equal(saved1[k], saved2[k]) for k in saved1), (
        "second save did not replace the weights"
    )
    assert json.loads((target / "adapter_config.json").read_text())["peft_type"] == "HPR"
    # other files are carried over, a stale pickle beside fresh safetensors is dropped
    assert (target / "fit_report.json").read_text() == '{"kept": true}'
    assert (target / "plots" / "a.txt").read_text() == "plot"
    assert not (target / "adapter_model.bin").exists()
    assert _leftovers(tmp_path, "adapter") == []


def test_failure_mid_save_keeps_old_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors' save_file writes part of the file, then raises: the old adapter must be untouched."""
    import safetensors.torch as st

    target = tmp_path / "adapter"
    good = _peft(1)
    save_adapter_atomic(good, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real_save_file = st.save_file
    calls = []

    def broken_save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        real_save_file(tensors, filename, *args, **kwargs)
        with open(filename, "r+b") as handle:  # leave a truncated, corrupt file behind
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (injected)")

    import peft.peft_model as peft_model

    monkeypatch.setattr(st, "save_file", broken_save_file)
    monkeypatch.setattr(peft_model, "safe_save_file", broken_save_file, raising=False)

    with pytest.raises(OSError, match="disk full"):
        save_adapter_atomic(_peft(2), target)
    assert calls, "the injected failure never ran: the test would prove nothing"
    assert calls[0] != str(target / "adapter_model.safetensors"), "save wrote straight into the target"
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before
    assert _leftovers(tmp_path, "adapter") == []
    # and the old adapter still loads with the old weights
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), str(target))
    for key, value in _hpr_state(good).items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_failure_in_save_pretrained_after_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_pretrained raises after writing the config: nothing changes, also for a first save."""
    model = _peft(3)
    real = type(model).save_pretrained

    def half_save(self, save_directory, **kwargs):
        real(self, save_directory, **kwargs)
        Path(save_directory, "adapter_model.safetensors").unlink()
        raise RuntimeError("killed after the config (injected)")

    monkeypatch.setattr(type(model), "save_pretrained", half_save)
    fresh = tmp_path / "new_adapter"
    with pytest.raises(RuntimeError, match="injected"):
        save_adapter_atomic(model, fresh)
    assert not fresh.exists()
    assert _leftovers(tmp_path, "new_adapter") == []


@pytest.mark.parametrize(
    ("model", "kwargs", "error", "message"),
    [
        pytest.param(object(), {}, TypeError, "save_pretrained", id="no-save-pretrained"),
        pytest.param("hpr", {"safe_serialization": False}, ValueError, "pickle", id="pickle"),
    ],
)
def test_bad_inputs_are_refused_before_writing(
    tmp_path: Path, model: object, kwargs: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        save_adapter_atomic(_peft(1) if model == "hpr" else model, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_save_into_a_file_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(FileExistsError, match="is a file"):
        save_adapter_atomic(_peft(1), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a dir"


def test_keep_existing_false_drops_other_files(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    save_adapter_atomic(_peft(1), target)
    (target / "fit_report.json").write_text("{}")
    save_adapter_atomic(_peft(2), target, keep_existing=False)
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_package_exports_the_same_function() -> None:
    assert hpr_peft.save_adapter_atomic is save_adapter_atomic


def _modes(folder: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}


def test_permissions_follow_the_umask_like_a_plain_save(tmp_path: Path) -> None:
    """Under umask 022 the adapter is 0755 / 0644 (readable by teammates), also the safetensors file,
    which safetensors itself creates 0600."""
    previous = os.umask(0o022)
    try:
        save_adapter_atomic(_peft(1), tmp_path / "adapter")
    finally:
        os.umask(previous)
    modes = _modes(tmp_path / "adapter")
    assert modes.pop("adapter") == 0o755
    assert modes == {
        name: 0o644 for name in ("adapter_config.json", "adapter_model.safetensors", "README.md")
    }


def test_a_symlinked_target_keeps_its_link(tmp_path: Path) -> None:
    """``latest -> run1``: the save replaces run1's adapter atomically; the link stays a link."""
    save_adapter_atomic(_peft(1), tmp_path / "run1")
    (tmp_path / "latest").symlink_to("run1")
    assert save_adapter_atomic(_peft(2), tmp_path / "latest") == (tmp_path / "latest").absolute()
    assert (tmp_path / "latest").is_symlink() and os.readlink(tmp_path / "latest") == "run1"
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), str(tmp_path / "latest"))
    for key, value in _hpr_state(_peft(2)).items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run1"]


def test_add_files_change_together_with_the_adapter(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    save_adapter_atomic(_peft(1), target, add_files=lambda folder: (folder / "report.json").write_text("1"))
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def half_report(folder: Path) -> None:
        (folder / "report.json").write_text("2")
        raise RuntimeError("plot failed (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        save_adapter_atomic(_peft(2), target, add_files=half_report)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _leftovers(tmp_path, "adapter") == []


def test_saving_an_adapter_of_a_gguf_base_warns_nothing(tmp_path: Path) -> None:
    """A bundled (GGUF) base folder has no config.json; peft's vocabulary check would warn about it."""
    import warnings

    from peft import get_peft_model

    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1]))
    gguf_folder = tmp_path / "gguf_base"
    gguf_folder.mkdir()
    model.peft_config["default"].base_model_name_or_path = str(gguf_folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter_atomic(model, tmp_path / "adapter")
    assert [str(w.message) for w in caught] == []
