"""``hpr-peft eval`` on a tiny saved model and adapter: ``--max-kl`` evaluates at the calibrated alpha."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.cli import main as cli_main
from support.models import make_char_tokenizer, make_tiny_causal_lm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a tiny Llama with a char tokenizer and room for TruthfulQA's prompt, an HPR adapter for it)."""
    root = tmp_path_factory.mktemp("eval")
    make_tiny_causal_lm("llama", max_position_embeddings=2048).save_pretrained(root / "tiny")
    make_char_tokenizer().save_pretrained(root / "tiny")
    torch.manual_seed(0)
    base = make_tiny_causal_lm("llama", max_position_embeddings=2048)
    get_peft_model(base, HPRConfig(target_layers=[1, 2], init_weights=False)).save_pretrained(
        root / "adapter"
    )
    ids = root / "ids.txt"
    ids.write_text("tqa-0000\ntqa-0001\n")
    return root


def eval_argv(root, tmp_path, truthfulqa_dir, *extra: str) -> list[str]:
    return ["eval", "--model", str(root / "tiny"), "--adapter", str(root / "adapter"), "--questions",
            str(root / "ids.txt"), "--truthfulqa-dir", str(truthfulqa_dir), "--output", str(tmp_path / "out"),
            "--no-progress", *extra]  # fmt: skip


def test_eval_max_kl_calibrates_alpha_and_the_side_effects_keep_the_budget(
    saved, tmp_path, truthfulqa_dir, capsys
):
    assert cli_main(eval_argv(saved, tmp_path, truthfulqa_dir, "--max-kl", "0.005")) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    calibration = result["kl_calibration"]
    assert calibration["target_kl"] == 0.005 and 0.0045 <= calibration["kl"] <= 0.005
    assert calibration["alpha"] != 1.0
    # evaluated at that alpha: the side effects are measured on the same corpus as the calibration
    assert result["side_effects"]["kl"] == pytest.approx(calibration["kl"], rel=1e-6)
    assert f"alpha {calibration['alpha']:.4g}: KL {calibration['kl']:.4g}" in printed
    assert "2 questions: MC1" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-kl", "0.01", "--alpha", "2"], "--alpha and --max-kl both set the strength"),
        (["--max-kl", "0"], "--max-kl must be a KL budget > 0"),
        (["--max-kl", "nan"], "--max-kl must be a KL budget > 0"),
    ],
)
def test_eval_max_kl_errors(saved, tmp_path, truthfulqa_dir, capsys, extra, message):
    assert cli_main(eval_argv(saved, tmp_path, truthfulqa_dir, *extra)) == 2
    assert message in capsys.readouterr().err


def test_eval_max_kl_needs_an_adapter(saved, tmp_path, capsys):
    argv = ["eval", "--model", str(saved / "tiny"), "--max-kl", "0.01", "--output", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert "--max-kl calibrates the strength of an adapter" in capsys.readouterr().err
