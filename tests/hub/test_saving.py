"""Atomic adapter saves (hpr_peft.runtime.atomic_files): a failure mid-save leaves the old adapter intact, no temp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hpr_peft.runtime.atomic_files as saving
from hpr_peft import HPRConfig
from hpr_peft.runtime.atomic_files import (
    atomic_directory,
    replace_directory,
    save_adapter_atomic,
    write_text_atomic,
)
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


def test_replace_directory_restores_old_when_swap_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, new = tmp_path / "t", tmp_path / "n"
    target.mkdir()
    (target / "a").write_text("old")
    new.mkdir()
    (new / "a").write_text("new")
    real_replace = os.replace

    def flaky_replace(src, dst):
        if Path(src) == new:
            raise OSError("rename failed (injected)")
        return real_replace(src, dst)

    monkeypatch.setattr(saving.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="injected"):
        replace_directory(new, target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n", "t"]


def test_atomic_directory_and_bad_inputs(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "d") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".d.tmp-")
        (tmp / "x.json").write_text("{}")
    assert (tmp_path / "d" / "x.json").read_text() == "{}"
    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(FileExistsError, match="is a file"), atomic_directory(tmp_path / "file"):
        pass
    with pytest.raises(TypeError, match="save_pretrained"):
        save_adapter_atomic(object(), tmp_path / "x")
    with pytest.raises(ValueError, match="pickle"):
        save_adapter_atomic(_peft(1), tmp_path / "x", safe_serialization=False)
    assert not (tmp_path / "x").exists()
    write_text_atomic(tmp_path / "card" / "README.md", "hello")
    assert (tmp_path / "card" / "README.md").read_text() == "hello"
    assert os.listdir(tmp_path / "card") == ["README.md"]
