"""End-to-end smoke test of the TruthfulQA job (``hpr-peft main --quick``) and the CLI wiring."""

from __future__ import annotations

import json

import pytest
import torch

from hpr_peft.cli import build_parser
from hpr_peft.experiment import JobSettings, run_main_job
from hpr_peft.experiment.methods import pick_within_budget
from support.models import make_tiny_causal_lm


def test_pick_respects_kl_budget():
    rows = [
        {"mc2": 0.6, "mc1": 0.3, "kl": 0.5},
        {"mc2": 0.5, "mc1": 0.3, "kl": 0.05},
        {"mc2": 0.45, "mc1": 0.4, "kl": 0.01},
    ]
    assert pick_within_budget(rows, 0.1)["kl"] == 0.05
    assert pick_within_budget(rows, 0.001)["kl"] == 0.01  # nothing within budget: least side effects


def test_settings_validation():
    with pytest.raises(ValueError, match="folds"):
        JobSettings(folds=1).validate()
    with pytest.raises(ValueError, match="hpr_alphas"):
        JobSettings(hpr_alphas=()).validate()


def test_cli_parses_main_and_eval():
    args = build_parser("main").parse_args(["main", "--quick", "--hpr-alphas", "0.5,1", "--top-k", "3,5"])
    assert args.quick and args.hpr_alphas == (0.5, 1.0) and args.top_k == (3, 5)
    args = build_parser("eval").parse_args(["eval", "--model", "smollm2", "--output", "x"])
    assert args.adapter is None
    with pytest.raises(SystemExit):
        build_parser("main").parse_args(["main", "--top-k", "three"])


def test_cli_applies_model_defaults_unless_overridden():
    from hpr_peft.cli.main_job import settings_from_args
    from hpr_peft.experiment import MODEL_DEFAULTS

    parse = build_parser("main").parse_args
    plain = settings_from_args(parse(["main"]))
    assert plain.angle_target == "paper" and plain.hpr_alphas == JobSettings().hpr_alphas
    gemma = settings_from_args(parse(["main", "--model", "gemma3"]))
    assert gemma.angle_target == "probe" and gemma.hpr_alphas == MODEL_DEFAULTS["gemma3"]["hpr_alphas"]
    mine = settings_from_args(
        parse(["main", "--model", "gemma3", "--angle-target", "paper", "--epochs", "2"])
    )
    assert mine.angle_target == "paper" and mine.epochs == 2 and mine.output_dir == "outputs/gemma3"
    with pytest.raises(ValueError, match="angle_target"):
        JobSettings(angle_target="reflection").validate()


@pytest.mark.slow
def test_quick_job_end_to_end(smollm2, truthfulqa_dir, tmp_path):
    """The whole job on 8 questions: a tiny random Llama with SmolLM2's real tokenizer (fast)."""
    _, tokenizer = smollm2
    model = make_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    settings = JobSettings(
        model="tiny",
        output_dir=str(tmp_path / "out"),
        truthfulqa_dir=str(truthfulqa_dir),
        quick=True,
        quick_questions=8,
        hpr_alphas=(1.0, 2.0),
        additive_alphas=(1.0,),
        top_ks=(2,),
        epochs=1,
        max_validation_questions=2,
        validation_fraction=0.5,
        progress=False,
    )
    results = run_main_job(settings, model_and_tokenizer=(model, tokenizer))
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["n_questions"] == 8
    tests = [set(f["test_ids"]) for f in saved["folds"]]
    assert not tests[0] & tests[1] and len(tests[0] | tests[1]) == 8
    for fold in saved["per_fold"]:
        scored = set(fold["test_ids"])
        assert not scored & set(fold["fit_ids"]) and not scored & set(fold["validation_ids"])
        assert set(fold["chosen"]) == {"hpr", "additive"}
        assert len(fold["chosen"]["hpr"]["layers"]) == 2
    for method in ("unedited", "additive", "hpr"):
        row = results["methods"][method]
        assert row["n"] == 8 and 0.0 <= row["mc2"] <= 1.0
    assert results["methods"]["hpr"]["kl"] > 0.0
    for name in ("results.md", "pareto_mc2_kl.png", "probe_accuracy.png", "hpr_monitor.png"):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    card = (out / "adapter" / "README.md").read_text()  # HPR's model card, not PEFT's placeholder
    assert "Householder Pseudo-Rotation" in card and "More Information Needed" not in card
    assert [p.name for p in out.rglob(".*")] == []  # every write went through a temporary file, none is left
    assert not hasattr(model, "peft_config")  # the passed model was restored
    assert isinstance(model.model.layers[0], torch.nn.Module)
