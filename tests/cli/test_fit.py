"""``hpr-peft fit`` on a tiny saved model: outputs, and clear errors for bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from hpr_peft.cli import fit as fit_cli
from support.models import make_char_tokenizer, make_tiny_causal_lm


def run_fit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpr-peft fit")
    fit_cli.add_arguments(parser)
    return fit_cli.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_causal_lm("llama").save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


def write_pairs(path, n=30):
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "prompt": f"Q: n{i}?\nA:",
                        "positive": f" yes {i % 3}",
                        "negative": f" no {i % 4}",
                        "group": f"g{i // 2}",
                    }
                )
                + "\n"
            )
    return path


def test_fit_cli_writes_adapter_report_and_plot(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    rc = run_fit(
        [
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--layers",
            "1,2,3",
            "--top-k",
            "2",
            "--epochs",
            "2",
            "--max-pairs",
            "24",
            "--token-selection",
            "response",
            "--angle-target",
            "probe",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert config["peft_type"] == "HPR" and len(config["selected_layers"]) == 2
    assert config["selected_layers"] == report["selected_layers"]
    assert report["n_train_pairs"] + report["n_val_pairs"] == 24 and report["token_selection"] == "response"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    assert report["settings"]["angle_target"] == "probe"
    assert config["fit_results"]["settings"]["angle_target"] == "probe"
    assert (out / "probe_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_fit_cli_errors(tiny_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = run_fit(["--model", str(tiny_dir), "--data", str(tmp_path / "missing.jsonl"), "--output", out])
    assert rc == 2 and "missing.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "positive": " a", "negative": " b"}) + "\n{not json\n")
    rc = run_fit(["--model", str(tiny_dir), "--data", str(bad), "--output", out])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2" in err
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Q", "positive": " a", "negative": " a"}) + "\n")
    rc = run_fit(["--model", str(tiny_dir), "--data", str(same), "--output", out])
    assert rc == 2 and "identical" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc = run_fit(["--model", str(tiny_dir), "--data", str(empty), "--output", out])
    assert rc == 2 and "empty" in capsys.readouterr().err
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    rc = run_fit(["--model", str(tiny_dir), "--data", str(data), "--layers", "9", "--output", out])
    assert rc == 2 and "out of range" in capsys.readouterr().err
    rc = run_fit(["--model", str(tiny_dir), "--data", str(data), "--top-k", "0", "--output", out])
    assert rc == 2 and "--min-accuracy" in capsys.readouterr().err
    rc = run_fit(["--model", str(tiny_dir), "--data", str(data), "--max-kl", "0", "--output", out])
    assert rc == 2 and "--max-kl must be a KL budget > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_fit(["--model", str(tiny_dir), "--data", str(data), "--layers", "a,b", "--output", out])
    with pytest.raises(SystemExit):
        run_fit(["--model", str(tiny_dir), "--data", str(data), "--angle-target", "cap", "--output", out])


def test_fit_cli_writes_hpr_card_and_can_keep_only_the_selected_layers(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl")
    argv = ["--model", str(tiny_dir), "--data", str(data), "--layers", "all", "--top-k", "1"]
    argv += ["--epochs", "1", "--max-pairs", "16", "--no-progress"]
    assert run_fit([*argv, "--output", str(tmp_path / "full")]) == 0
    assert run_fit([*argv, "--output", str(tmp_path / "small"), "--only-selected-layers"]) == 0
    card = (tmp_path / "full" / "README.md").read_text()
    assert (
        card.startswith("---\n") and "Householder Pseudo-Rotation" in card and "More Information" not in card
    )
    full = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    small = json.loads((tmp_path / "small" / "adapter_config.json").read_text())
    assert full["target_layers"] == "all" and len(full["selected_layers"]) == 1
    assert small["target_layers"] == full["selected_layers"] and small["selected_layers"] is None
    weights = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert {key.split(".hpr_")[0].rsplit(".", 1)[1] for key in weights} == {str(full["selected_layers"][0])}
    assert "holds the editors of layers" in (tmp_path / "small" / "README.md").read_text()


def test_fit_cli_replaces_the_previous_adapter_atomically(tiny_dir, tmp_path, monkeypatch, capsys):
    """A second fit that dies while its weights are written leaves the first adapter and its report."""
    import peft.peft_model as peft_model
    import safetensors.torch as st

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    argv = ["--model", str(tiny_dir), "--data", str(data), "--layers", "1,2", "--top-k", "1", "--epochs", "1"]
    argv += ["--max-pairs", "16", "--output", str(out), "--no-progress"]
    assert run_fit(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json", "probe_accuracy.png"} <= set(
        before
    )

    def dying(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("killed while writing the weights (injected)")

    monkeypatch.setattr(st, "save_file", dying)
    monkeypatch.setattr(peft_model, "safe_save_file", dying, raising=False)
    assert run_fit([*argv, "--seed", "1"]) == 2
    assert "killed while writing the weights" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_fit_cli_preference_objective_fine_tunes_the_selected_layers(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    argv = ["--model", str(tiny_dir), "--data", str(data), "--layers", "1,2,3", "--top-k", "2"]
    argv += ["--epochs", "1", "--seed", "1", "--no-progress"]
    assert run_fit([*argv, "--output", str(tmp_path / "paper")]) == 0
    pref = ["--objective", "preference", "--pref-epochs", "2", "--kl-weight", "0.5", "--kl-on", "neutral"]
    pref += ["--pref-freeze-probe", "--kl-budget", "0.02", "--pref-editor-lr", "1e-4"]
    assert run_fit([*argv, *pref, "--output", str(tmp_path / "pref")]) == 0
    assert "preference fit of layers" in capsys.readouterr().out
    report = json.loads((tmp_path / "pref" / "preference.json").read_text())
    config = json.loads((tmp_path / "pref" / "adapter_config.json").read_text())
    assert report["layers"] == config["selected_layers"] and len(report["epochs"]) == 2
    assert report["settings"]["kl_on"] == "neutral" and report["settings"]["kl_weight"] == 0.5
    assert report["settings"]["freeze_probe"] is True and report["settings"]["kl_budget"] == 0.02
    assert report["settings"]["editor_lr"] == 1e-4
    assert report["n_pairs"] + report["n_val_pairs"] == 24 and report["val_after"] is not None
    assert not (tmp_path / "paper" / "preference.json").exists()
    rc = run_fit([*argv, "--objective", "preference", "--kl-weight", "-1", "--output", str(tmp_path / "bad")])
    assert rc == 2 and "kl_weight" in capsys.readouterr().err


def test_fit_cli_max_kl_saves_the_calibrated_alpha(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    argv = [
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--layers",
        "1,2,3",
        "--top-k",
        "2",
        "--epochs",
        "2",
    ]
    assert run_fit([*argv, "--max-kl", "0.001", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    calibration = report["settings"]["kl_calibration"]
    assert config["alpha"] == calibration["alpha"] != 1.0
    assert 0.0009 <= calibration["kl"] <= 0.001 and calibration["target_kl"] == 0.001
    assert config["fit_results"]["settings"]["kl_calibration"] == calibration
    assert f"alpha {calibration['alpha']:.4g}: KL {calibration['kl']:.4g}" in printed


def test_fit_cli_rotation_options_are_saved_with_the_adapter(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl")
    argv = ["--model", str(tiny_dir), "--data", str(data), "--layers", "1,2", "--top-k", "1"]
    argv += ["--epochs", "1", "--max-pairs", "16", "--no-progress"]
    out = tmp_path / "out"
    options = ["--rotation-direction", "mean_difference", "--exclude-massive-dims", "2"]
    assert run_fit([*argv, *options, "--output", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rotation_direction"] == "mean_difference" and config["exclude_massive_dims"] == 2
    assert config["fit_results"]["settings"]["rotation_direction"] == "mean_difference"
    tensors = load_file(out / "adapter_model.safetensors")
    assert sum("hpr_direction" in k for k in tensors) == 2
    assert [tuple(v.shape) for k, v in tensors.items() if "hpr_protected" in k] == [(2,), (2,)]
    for bad in ("32", "-1"):
        rc = run_fit([*argv, "--exclude-massive-dims", bad, "--output", str(tmp_path / "bad")])
        assert rc == 2 and "exclude_massive_dims" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_fit([*argv, "--rotation-direction", "pca", "--output", str(tmp_path / "bad")])
