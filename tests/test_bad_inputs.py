"""The catalogue of bad inputs: what a careless or hostile user may hand hpr_peft, and the one clear error
(or warning) each one gets. One table per part; every row is one bad input.

- ``ADAPTER_FILES``: damaged or mismatched saved adapters, each loaded through ``hpr_peft.load_adapter``
  and through plain ``peft.PeftModel.from_pretrained`` (rows marked ``ours_only`` are config files
  peft reads before any HPR code runs, so only our loader can explain them).
- ``SAVE_TARGETS``: places an adapter cannot be saved to; nothing is written, nothing is left behind.
- ``VALUES``: bad settings and data for the Python API, refused before any slow work.
- ``CLI``: bad command lines; each ends with one line on stderr and exit status 2, no traceback.

``test_catalogue_size`` prints the count (``pytest -s``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import hpr_peft
from hpr_peft import HPRConfig, edit_settings
from hpr_peft.cli import main as cli_main
from hpr_peft.data import ContrastivePair, load_pairs_jsonl
from hpr_peft.experiment import JobSettings
from hpr_peft.fitting import fit_hpr
from hpr_peft.fitting.selection import select_layers
from hpr_peft.hub import save_adapter_atomic
from support import REPO_ROOT
from support.models import make_char_tokenizer, make_tiny_causal_lm

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass
class Kit:
    """What the rows work on: a scratch folder, a saved tiny model and a good saved adapter."""

    tmp: Path
    model_dir: Path
    good_adapter: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def adapter_copy(self, name: str = "adapter") -> Path:
        copy = self.tmp / name
        shutil.copytree(self.good_adapter, copy)
        return copy


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(a saved tiny Llama with a char tokenizer, a good HPR adapter for it on blocks 0 and 1)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir = root / "tiny"
    make_tiny_causal_lm("llama").save_pretrained(model_dir)
    make_char_tokenizer().save_pretrained(model_dir)
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[0, 1], init_weights=False))
    model.save_pretrained(root / "good")
    return model_dir, root / "good"


@pytest.fixture
def kit(saved, tmp_path) -> Kit:
    return Kit(tmp_path, *saved)


def _edit_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)
    return folder


def _edit_config(folder: Path, change: Callable[[dict], None]) -> Path:
    config = json.loads((folder / CONFIG).read_text())
    change(config)
    (folder / CONFIG).write_text(json.dumps(config))
    return folder


def _key(tensors: dict, block: int, part: str) -> str:
    return next(k for k in sorted(tensors) if f"layers.{block}.hpr_{part}" in k)


def _poison(block: int, part: str, value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[_key(tensors, block, part)].view(-1)[0] = value

    return change


def _drop_block(block: int) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        for key in [k for k in tensors if f"layers.{block}.hpr_" in k]:
            del tensors[key]

    return change


def _wider_model_adapter(kit: Kit) -> Path:
    """An adapter fitted on a model of hidden size 48 (the kit's model has 32)."""
    torch.manual_seed(0)
    wide = make_tiny_causal_lm("llama", hidden_size=48, head_dim=12)
    folder = kit.tmp / "wide"
    get_peft_model(wide, HPRConfig(target_layers=[0, 1], init_weights=False)).save_pretrained(folder)
    return folder


def _lora_adapter(kit: Kit) -> Path:
    from peft import LoraConfig

    folder = kit.tmp / "lora"
    lora = LoraConfig(target_modules=["q_proj"], r=2)
    get_peft_model(make_tiny_causal_lm("llama"), lora).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Row:
    """One bad input: how to make it, and the error (type, regex) it must get."""

    name: str
    make: Callable[[Kit], Any]
    error: type[BaseException]
    match: str
    ours_only: bool = False


# ----------------------------------------------------------------------------------------------------
# Saved adapters: (folder maker, error); loaded through both loaders
# ----------------------------------------------------------------------------------------------------

ADAPTER_FILES = [
    Row(
        "nan-probe-weight",
        lambda k: _edit_weights(k.adapter_copy(), _poison(0, "probe", math.nan)),
        ValueError,
        rf"adapter/{WEIGHTS} holds NaN or inf values in the editors of blocks \[0\].*Re-fit",
    ),
    Row(
        "inf-angle-net-weight",
        lambda k: _edit_weights(k.adapter_copy(), _poison(1, "angle", math.inf)),
        ValueError,
        r"NaN or inf values in the editors of blocks \[1\]",
    ),
    Row(
        "config-targets-fewer-layers-than-the-weights",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(target_layers=[0])),
        ValueError,
        r"holds editors for blocks \[1\].*does not target \(target_layers=\[0\]\).*do not belong together",
    ),
    Row(
        "missing-tensors-of-a-block",
        lambda k: _edit_weights(k.adapter_copy(), _drop_block(1)),
        ValueError,
        rf"{WEIGHTS} has no weights for blocks \[1\] that adapter_config.json targets",
    ),
    Row(
        "missing-tensors-with-random-init",
        lambda k: _edit_config(
            _edit_weights(k.adapter_copy(), _drop_block(0)), lambda c: c.update(init_weights=False)
        ),
        ValueError,
        r"has no weights for blocks \[0\]",
    ),
    Row(
        "hidden-size-mismatch",
        _wider_model_adapter,
        ValueError,
        r"fitted for hidden size 48; this model has 32\. Load it onto the model it was fitted for",
    ),
    Row(
        "angle-net-widths-disagree-with-the-weights",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(angle_hidden_sizes=[8])),
        ValueError,
        r"hpr_angle.*has shape \(16,?.*\), but angle_hidden_sizes=\[8\] in adapter_config.json builds \(8,?.*\)",
    ),
    Row(
        "absurd-angle-net-width",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(angle_hidden_sizes=[10**12])),
        ValueError,
        rf"adapter/{CONFIG}: angle_hidden_sizes \[1000000000000\] asks for an absurdly large angle net",
    ),
    Row(
        "absurd-angle-net-depth",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(angle_hidden_sizes=[4] * 17)),
        ValueError,
        r"absurdly large angle net \(at most 16 hidden layers",
    ),
    Row(
        "alpha-1e308-in-the-config",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(alpha=1e308)),
        ValueError,
        rf"adapter/{CONFIG}: alpha must be a finite number between -1000 and 1000",
    ),
    Row(
        "peft-type-missing",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.pop("peft_type")),
        ValueError,
        r'adapter_config.json of .*adapter\' has no "peft_type".*add it',
        ours_only=True,
    ),
    Row(
        "peft-type-lower-case",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(peft_type="hpr")),
        ValueError,
        r'"peft_type": \'hpr\'; PEFT types are upper-case: write "HPR"',
        ours_only=True,
    ),
    Row(
        "hpr-folder-whose-config-says-lora",
        lambda k: _edit_config(k.adapter_copy(), lambda c: c.update(peft_type="LORA")),
        ValueError,
        r"says peft_type 'LORA', but its adapter_model.safetensors holds HPR editors.*the config is wrong",
        ours_only=True,
    ),
    Row(
        "a-lora-adapter",
        _lora_adapter,
        ValueError,
        r"is a LORA adapter, not an HPR adapter: load it with peft.PeftModel.from_pretrained",
        ours_only=True,
    ),
]

LOADERS = {
    "load_adapter": lambda base, folder: hpr_peft.load_adapter(base, folder),
    "PeftModel.from_pretrained": lambda base, folder: PeftModel.from_pretrained(base, str(folder)),
}
ADAPTER_CASES = [
    pytest.param(row, loader, id=f"{row.name}-via-{loader}")
    for row in ADAPTER_FILES
    for loader in LOADERS
    if loader == "load_adapter" or not row.ours_only
]


@pytest.mark.parametrize(("row", "loader"), ADAPTER_CASES)
def test_damaged_or_mismatched_adapters_are_refused(kit: Kit, row: Row, loader: str) -> None:
    folder = row.make(kit)
    with pytest.raises(row.error, match=row.match):
        LOADERS[loader](make_tiny_causal_lm("llama"), folder)


def test_a_plain_peft_load_of_a_lora_labelled_hpr_config_is_refused_by_hpr_config(kit: Kit) -> None:
    """peft builds another method's config from the peft_type in the file; HPRConfig refuses to."""
    folder = _edit_config(kit.adapter_copy(), lambda c: c.update(peft_type="LORA"))
    with pytest.raises(ValueError, match=r'peft_type is \'LORA\', not "HPR"'):
        HPRConfig.from_pretrained(str(folder))


# ----------------------------------------------------------------------------------------------------
# Save targets: nothing written, nothing left behind
# ----------------------------------------------------------------------------------------------------


def _a_file(kit: Kit) -> Path:
    (kit.tmp / "file").write_text("not a directory")
    return kit.tmp / "file"


def _read_only_adapter(kit: Kit) -> Path:
    folder = kit.adapter_copy()
    os.chmod(folder, 0o555)
    return folder


def _broken_link(kit: Kit) -> Path:
    os.symlink(kit.tmp / "gone", kit.tmp / "latest")
    return kit.tmp / "latest"


def _under_a_file(kit: Kit) -> Path:
    return _a_file(kit) / "adapter"


SAVE_TARGETS = [
    Row("target-is-a-file", _a_file, FileExistsError, r"/file: it is a file; choose a directory path"),
    Row(
        "target-is-read-only", _read_only_adapter, PermissionError, r"adapter: it is read-only \(dr-xr-xr-x\)"
    ),
    Row("target-is-a-broken-link", _broken_link, FileNotFoundError, r"latest is a symbolic link to .*gone"),
    Row(
        "parent-is-a-file",
        _under_a_file,
        NotADirectoryError,
        r"cannot write .*file/adapter: .*file is a file",
    ),
]


def _snapshot(folder: Path) -> dict[str, Any]:
    return {
        str(p.relative_to(folder)): (stat.S_IMODE(p.lstat().st_mode), p.is_file() and p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("row", SAVE_TARGETS, ids=lambda row: row.name)
def test_unusable_save_targets_are_refused_and_nothing_changes(kit: Kit, row: Row) -> None:
    target = row.make(kit)
    before = _snapshot(kit.tmp)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[0]))
    try:
        with pytest.raises(row.error, match=row.match):
            save_adapter_atomic(model, target)
        assert _snapshot(kit.tmp) == before  # no .tmp-* / .old-* leftovers, no changed mode
    finally:
        for path in [kit.tmp, *kit.tmp.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, 0o755)


def test_an_unwritable_parent_is_named_not_a_temporary_path(kit: Kit, monkeypatch) -> None:
    """When the OS refuses the temporary directory, the error names the user's target."""
    import hpr_peft.runtime.atomic_files as atomic_files

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic_files.os, "mkdir", refuse)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[0]))
    with pytest.raises(PermissionError) as caught:
        save_adapter_atomic(model, kit.tmp / "adapter")
    message = str(caught.value)
    assert f"cannot write {kit.tmp / 'adapter'}" in message and ".tmp-" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_really_unwritable_parent_is_refused_before_saving(kit: Kit) -> None:
    parent = kit.tmp / "locked"
    parent.mkdir()
    os.chmod(parent, 0o555)
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[0]))
    try:
        with pytest.raises(PermissionError, match=rf"cannot write {parent / 'adapter'}: .*not writable"):
            save_adapter_atomic(model, parent / "adapter")
        assert list(parent.iterdir()) == []
    finally:
        os.chmod(parent, 0o755)


# ----------------------------------------------------------------------------------------------------
# Values: names, strengths, selection options, data
# ----------------------------------------------------------------------------------------------------


def _hpr_model() -> Any:
    torch.manual_seed(0)
    return get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2], init_weights=False))


def _save_with_escaping_adapter_name(kit: Kit) -> Any:
    """A model whose adapter got an absolute name behind the validators' back, then saved."""
    model = _hpr_model()
    model.peft_config[str(kit.tmp / "ESCAPED")] = model.peft_config["default"]
    return save_adapter_atomic(model, kit.tmp / "out")


def _fit_tiny(**options: Any) -> Callable[[Kit], Any]:
    """fit_hpr on a tiny model, with collection made to fail: an error about ``options`` proves the
    check ran before any collection or training."""

    def run(kit: Kit) -> Any:
        pairs = [ContrastivePair(f"Q{i}:", " yes", " no", f"g{i}") for i in range(6)]

        def never(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("collected activations before checking the options")

        kit.extra["monkeypatch"].setattr("hpr_peft.fitting.fit.collect_activations", never)
        return fit_hpr(_hpr_model(), make_char_tokenizer(), pairs, progress=False, **options)

    return run


def _jsonl(lines: list[dict]) -> Callable[[Kit], Any]:
    def run(kit: Kit) -> Any:
        path = kit.tmp / "pairs.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return load_pairs_jsonl(path)

    return run


def _validation_equal_to_training(kit: Kit) -> Any:
    pairs = [ContrastivePair(f"Q{i}:", " yes", " no", f"g{i}") for i in range(6)]
    return fit_hpr(_hpr_model(), make_char_tokenizer(), pairs, validation_pairs=pairs[:2], progress=False)


_PAIR = {"prompt": "Q:", "positive": " a", "negative": " b"}

VALUES = [
    Row(
        "absolute-adapter-name",
        lambda k: get_peft_model(
            make_tiny_causal_lm("llama"), HPRConfig(), adapter_name=str(k.tmp / "ESCAPED")
        ),
        ValueError,
        r"adapter_name '.*ESCAPED' is not a plain name.*write outside the save directory",
    ),
    Row(
        "relative-path-adapter-name",
        lambda k: get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(), adapter_name="../up"),
        ValueError,
        r"adapter_name '\.\./up' is not a plain name",
    ),
    Row(
        "path-like-adapter-name-at-save",
        _save_with_escaping_adapter_name,
        ValueError,
        r"adapter_name '/.*/ESCAPED' is not a plain name",
    ),
    Row(
        "path-like-adapter-name-at-load",
        lambda k: hpr_peft.load_adapter(_hpr_model(), k.good_adapter, adapter_name="a/b"),
        ValueError,
        r"adapter_name 'a/b' is not a plain name",
    ),
    Row("alpha-1e308-config", lambda k: HPRConfig(alpha=1e308), ValueError, r"between -1000 and 1000"),
    Row(
        "alpha-1e308-set-alpha", lambda k: _hpr_model().base_model.set_alpha(1e308), ValueError, r"-1000 and"
    ),
    Row(
        "alpha-1e308-edit-settings",
        lambda k: edit_settings(_hpr_model(), alpha=np.float64(1e308)).__enter__(),
        ValueError,
        r"between -1000 and 1000",
    ),
    Row("alpha-numpy-bool", lambda k: HPRConfig(alpha=np.bool_(True)), ValueError, r"alpha must be a finite"),
    Row(
        "alpha-tensor",
        lambda k: _hpr_model().base_model.set_alpha(torch.tensor(0.5)),
        ValueError,
        r"finite number",
    ),
    Row(
        "alpha-nan-numpy", lambda k: HPRConfig(alpha=np.float32("nan")), ValueError, r"alpha must be a finite"
    ),
    Row(
        "top-k-true-select",
        lambda k: select_layers([], top_k=True),
        ValueError,
        r"top_k must be a positive int",
    ),
    Row("top-k-true-fit", _fit_tiny(top_k=True), ValueError, r"top_k must be a positive int.*got True"),
    Row(
        "min-accuracy-1.5-fit",
        _fit_tiny(min_accuracy=1.5),
        ValueError,
        r"min_accuracy must be a probe accuracy between 0 and 1.*got 1.5",
    ),
    Row("min-accuracy-nan-fit", _fit_tiny(min_accuracy=math.nan), ValueError, r"min_accuracy must be"),
    Row(
        "validation-pairs-equal-training-pairs",
        _validation_equal_to_training,
        ValueError,
        r"2 of 2 validation",
    ),
    Row(
        "groups-1-and-string-1",
        _jsonl([{**_PAIR, "group": 1}, {**_PAIR, "negative": " c", "group": "1"}]),
        ValueError,
        r"pairs.jsonl: line 2: group '1' \(a string\) and group 1 at .*line 1 \(a number\) would silently",
    ),
    Row(
        "job-kl-target-nan",
        lambda k: JobSettings(kl_targets=(0.05, math.nan)).validate(),
        ValueError,
        r"target_kl must be a finite number",
    ),
    Row(
        "job-top-k-true",
        lambda k: JobSettings(top_ks=(True,)).validate(),
        ValueError,
        r"top_k must be a positive",
    ),
]


@pytest.mark.parametrize("row", VALUES, ids=lambda row: row.name)
def test_bad_values_are_refused(kit: Kit, row: Row, monkeypatch) -> None:
    kit.extra["monkeypatch"] = monkeypatch
    with pytest.raises(row.error, match=row.match):
        row.make(kit)
    assert not (kit.tmp / "ESCAPED").exists() and not (kit.tmp / "out").exists()


def test_validation_pairs_sharing_groups_with_training_pairs_warn() -> None:
    pairs = [ContrastivePair(f"Q{i}:", " yes", " no", f"g{i}") for i in range(6)]
    validation = [ContrastivePair("Q0:", " sure", " never", "g0")]
    with pytest.warns(UserWarning, match=r"1 group\(s\) have pairs in both the training and the validation"):
        fit_hpr(
            _hpr_model(), make_char_tokenizer(), pairs, validation_pairs=validation, epochs=1, progress=False
        )


# ----------------------------------------------------------------------------------------------------
# Command line: one line on stderr, exit status 2, no traceback
# ----------------------------------------------------------------------------------------------------


def _pickle_only_adapter(kit: Kit) -> str:
    folder = kit.adapter_copy("pickled")
    torch.save(load_file(folder / WEIGHTS), folder / "adapter_model.bin")
    (folder / WEIGHTS).unlink()
    return str(folder)


def _eval(*extra: str) -> Callable[[Kit], list[str]]:
    def argv(kit: Kit) -> list[str]:
        return ["eval", "--model", str(kit.model_dir), "--output", str(kit.tmp / "eval"), *extra]

    return argv


def _fit(*extra: str, output: Callable[[Kit], str] | None = None, model: str | None = None):
    """``hpr-peft fit`` argv on the kit's model and a small pairs file (``output``/``model`` override)."""

    def argv(kit: Kit) -> list[str]:
        data = kit.tmp / "pairs.jsonl"
        data.write_text("".join(json.dumps({**_PAIR, "group": f"g{i}"}) + "\n" for i in range(6)))
        out = output(kit) if output is not None else str(kit.tmp / "fit")
        return ["fit", "--model", model or str(kit.model_dir), "--data", str(data), "--output", out, *extra]

    return argv


@dataclass(frozen=True)
class Command:
    """One bad command line (built from the kit) and the regex its one-line error must match."""

    name: str
    argv: Callable[[Kit], list[str]]
    match: str


TOKEN = ["--token", "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"]

CLI = [
    Command(
        "eval-missing-adapter", lambda k: _eval("--adapter", str(k.tmp / "nope"))(k), r"nope' is neither"
    ),
    Command(
        "eval-pickle-only-adapter",
        lambda k: _eval("--adapter", _pickle_only_adapter(k))(k),
        r"only a pickle weights file \(adapter_model.bin\).*never unpickles",
    ),
    Command(
        "eval-alpha-nan",
        lambda k: _eval("--adapter", str(k.good_adapter), "--alpha", "nan")(k),
        r"alpha must be a finite number",
    ),
    Command(
        "eval-alpha-1e308",
        lambda k: _eval("--adapter", str(k.good_adapter), "--alpha", "1e308")(k),
        r"between -1000 and 1000",
    ),
    Command(
        "eval-alpha-without-adapter", _eval("--alpha", "0.5"), r"--alpha sets the strength of an adapter"
    ),
    Command(
        "eval-unknown-question-id",
        lambda k: _eval("--questions", str(_ids_file(k, ["tqa-0000", "no-such-question"])))(k),
        r"1 id\(s\) are not TruthfulQA question ids, e\.g\. \['no-such-question'\]",
    ),
    Command(
        "eval-output-under-a-file",
        lambda k: [*_eval()(k)[:-2], "--output", str(_a_file(k))],
        r"eval.json: .*/file is a file, not a directory",
    ),
    Command(
        "fit-missing-model",
        _fit(model="/missing"),
        r"model '/missing': no such folder",
    ),
    Command(
        "fit-output-is-a-file",
        _fit(output=lambda k: str(_a_file(k))),
        r"cannot write the directory .*/file: it is a file",
    ),
    Command("fit-output-read-only", _fit(output=lambda k: str(_read_only_adapter(k))), r"it is read-only"),
    Command(
        "fit-min-accuracy-1.5",
        _fit("--top-k", "0", "--min-accuracy", "1.5"),
        r"min_accuracy must be a probe accuracy between 0 and 1",
    ),
    Command(
        "main-output-is-a-file",
        lambda k: ["main", "--model", str(k.model_dir), "--quick", "--output", str(_a_file(k))],
        r"/file: it is a file",
    ),
    Command(
        "main-kl-target-nan",
        lambda k: ["main", "--kl-targets", "0.05,nan", "--output", str(k.tmp / "job")],
        r"target_kl must be a finite",
    ),
    Command(
        "push-missing-directory",
        lambda k: ["push", str(k.tmp / "nope"), "me/repo", *TOKEN],
        r"does not exist",
    ),
    Command(
        "push-bad-repo-id",
        lambda k: ["push", str(k.good_adapter), "not a repo", *TOKEN],
        r"not a Hub repo id",
    ),
]


def _ids_file(kit: Kit, ids: list[str]) -> Path:
    path = kit.tmp / "ids.txt"
    path.write_text("\n".join(ids))
    return path


@pytest.mark.parametrize("command", CLI, ids=lambda command: command.name)
def test_bad_command_lines_end_with_one_line_and_status_2(
    kit: Kit, command: Command, capsys, monkeypatch
) -> None:
    """Also proves each is caught before a model is loaded (loading one fails the test)."""
    import transformers

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("loaded a model before checking the command line")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_model)
    argv = command.argv(kit)
    try:
        status = cli_main(argv)
    finally:
        for path in [kit.tmp, *kit.tmp.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                os.chmod(path, 0o755)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith(f"hpr-peft {argv[0]}: error: "), err
    assert "Traceback" not in err
    assert re.search(command.match, err), err


def test_the_installed_command_prints_no_traceback(kit: Kit) -> None:
    """The real entry point (a fresh interpreter): one line, status 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    argv = [
        "eval",
        "--model",
        str(kit.model_dir),
        "--adapter",
        str(kit.tmp / "nope"),
        "--output",
        str(kit.tmp),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "hpr_peft", *argv], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and "is neither an existing adapter directory" in done.stderr


def test_internal_errors_keep_their_traceback(monkeypatch) -> None:
    def broken(args: Any) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr("hpr_peft.cli.push.run", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_main(["push", "somewhere", "me/repo"])


def test_catalogue_size() -> None:
    counts = {
        "adapter files": len(ADAPTER_FILES),
        "save targets": len(SAVE_TARGETS) + 1,  # + the unwritable parent
        "values": len(VALUES) + 1,  # + validation groups shared with training (a warning)
        "command lines": len(CLI),
    }
    print(f"\nbad inputs in the catalogue: {sum(counts.values())} {counts}")
    assert sum(counts.values()) >= 50
