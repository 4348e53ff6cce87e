"""End-to-end smoke test of the TruthfulQA job (``hpr-peft main --quick``) and the CLI wiring."""

from __future__ import annotations

import json

import pytest
import torch

from hpr_peft.cli import build_parser
from hpr_peft.experiment import JobSettings, run_main_job
from support.models import make_tiny_causal_lm

KL_TARGETS = (0.001, 0.002)


def _quick_settings(tmp_path, truthfulqa_dir, **overrides) -> JobSettings:
    """The job on a few questions with a tiny model: what each end-to-end test varies is in ``overrides``."""
    settings = {
        "model": "tiny",
        "output_dir": str(tmp_path / "out"),
        "truthfulqa_dir": str(truthfulqa_dir),
        "quick": True,
        "quick_questions": 6,
        "kl_targets": KL_TARGETS[:1],
        "screen_layers": 2,
        "screen_questions": 2,
        "epochs": 1,
        "max_validation_questions": 2,
        "validation_fraction": 0.5,
        "calibration_tolerance": 0.5,  # fewer calibration steps: the tests check the flow, not precision
        "generation_questions": 0,
        "progress": False,
    }
    return JobSettings(**{**settings, **overrides})


def test_settings_validation():
    with pytest.raises(ValueError, match="folds"):
        JobSettings(folds=1).validate()
    with pytest.raises(ValueError, match="preference_stop_fraction"):
        JobSettings(preference_stop_fraction=1.0).validate()
    with pytest.raises(ValueError, match="kl_weight"):
        JobSettings(preference_kl_weight=-1.0).validate()
    with pytest.raises(ValueError, match="kl_on must be one of"):
        JobSettings(preference_kl_on="everywhere").validate()
    with pytest.raises(ValueError, match="freeze_probe must be True or False"):
        JobSettings(preference_freeze_probe="yes").validate()
    with pytest.raises(ValueError, match="editor_lr must be a positive finite number or None"):
        JobSettings(preference_editor_lr=-1e-5).validate()
    with pytest.raises(ValueError, match="preference_at_budget must be True or False"):
        JobSettings(preference_at_budget=1).validate()
    with pytest.raises(ValueError, match="kl_budget"):
        JobSettings(preference_kl_budget=-0.1).validate()
    with pytest.raises(ValueError, match="lr"):
        JobSettings(preference_lr=0.0).validate()
    with pytest.raises(ValueError, match="kl_targets"):
        JobSettings(kl_targets=()).validate()
    with pytest.raises(ValueError, match="layer_search"):
        JobSettings(layer_search="accuracy").validate()
    with pytest.raises(ValueError, match="screen_layers"):
        JobSettings(screen_layers=0).validate()


def test_cli_parses_main_and_eval():
    args = build_parser("main").parse_args(["main", "--quick", "--kl-targets", "0.05,0.1", "--top-k", "1,3"])
    assert args.quick and args.kl_targets == (0.05, 0.1) and args.top_k == (1, 3)
    args = build_parser("eval").parse_args(["eval", "--model", "smollm2", "--output", "x"])
    assert args.adapter is None
    with pytest.raises(SystemExit):
        build_parser("main").parse_args(["main", "--top-k", "three"])


def test_cli_applies_model_defaults_unless_overridden():
    from hpr_peft.cli.main_job import settings_from_args

    parse = build_parser("main").parse_args
    plain = settings_from_args(parse(["main"]))
    assert plain.angle_target == "paper" and plain.kl_targets == JobSettings().kl_targets
    gemma = settings_from_args(parse(["main", "--model", "gemma3", "--layer-search", "probe"]))
    assert gemma.angle_target == "probe" and gemma.layer_search == "probe"
    assert gemma.exclude_massive_dims == 4 and plain.exclude_massive_dims == 0
    overrides = ["--angle-target", "paper", "--epochs", "2", "--exclude-massive-dims", "0"]
    mine = settings_from_args(parse(["main", "--model", "gemma3", *overrides]))
    assert mine.angle_target == "paper" and mine.epochs == 2 and mine.output_dir == "outputs/gemma3"
    assert mine.exclude_massive_dims == 0
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
        kl_targets=KL_TARGETS,
        calibration_tolerance=0.5,
        screen_layers=2,
        screen_questions=2,
        top_ks=(1, 2),
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
        assert set(fold["chosen"]) == {f"{m}@kl{t:g}" for m in ("hpr", "additive") for t in KL_TARGETS}
        for key, pick in fold["chosen"].items():
            target = float(key.split("@kl")[1])
            # calibrated on the calibration text: never above the budget, and within the tolerance
            # below it unless the budget was out of reach (then the strongest alpha within it)
            assert pick["kl"] <= target, (key, pick)
            assert target * 0.5 <= pick["kl"] or not pick["in_band"], (key, pick)
            assert len(pick["layers"]) in (1, 2)
        # both methods went through the same layer search
        assert set(fold["ranking_comparison"]) == {"hpr", "additive"}
        stages = {(r["method"], r["stage"]) for r in fold["validation_sweep"]}
        assert stages == {(m, s) for m in ("hpr", "additive") for s in ("screen", "validation")}
    assert results["methods"]["unedited"]["n"] == 8
    for target in KL_TARGETS:
        for method in ("additive", "hpr"):
            row = results["methods"][f"{method}@kl{target:g}"]
            assert row["n"] == 8 and 0.0 <= row["mc2"] <= 1.0 and row["kl"] > 0.0
            assert row["delta_mc2"]["low"] <= row["delta_mc2"]["mean"] <= row["delta_mc2"]["high"]
        pairs = results["comparisons"][f"{target:g}"]
        assert set(pairs) == {"hpr-additive", "hpr-unedited", "additive-unedited"}
        assert len(pairs["hpr-additive"]["mc2"]["per_fold"]) == 2
    for fold in saved["per_fold"]:
        # measured for HPR's choice at the largest KL budget
        at_largest_budget = fold["chosen"][f"hpr@kl{max(KL_TARGETS):g}"]
        selectivity = fold["selectivity"]
        assert [s["layer"] for s in selectivity] == at_largest_budget["layers"]
        for layer in selectivity:
            assert 0 <= layer["neutral_fraction_flagged"] <= 1 and 0 <= layer["prompts_fraction_flagged"] <= 1
            assert layer["neutral_mean_edit_angle"] >= 0 and layer["prompts_mean_edit_angle"] >= 0
    table = (out / "results.md").read_text()
    assert "hpr-additive" in table and "Spearman" in table and "edit selectivity" in table
    for name in (
        "results.md",
        "matched_kl.png",
        "pareto_mc2_kl.png",
        "probe_accuracy.png",
        "hpr_monitor.png",
    ):
        assert (out / name).is_file(), name
    assert (out / "adapter" / "adapter_config.json").is_file()
    card = (out / "adapter" / "README.md").read_text()  # HPR's model card, not PEFT's placeholder
    assert "Householder Pseudo-Rotation" in card and "More Information Needed" not in card
    assert [p.name for p in out.rglob(".*")] == []  # every write went through a temporary file, none is left
    assert not hasattr(model, "peft_config")  # the passed model was restored
    assert isinstance(model.model.layers[0], torch.nn.Module)


@pytest.mark.slow
def test_quick_job_with_the_preference_objective(smollm2, truthfulqa_dir, tmp_path):
    """Both methods are trained on the preference objective (same pairs, same settings) before the
    matched-KL validation; the effect sets are the only candidates."""
    _, tokenizer = smollm2
    model = make_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    settings = _quick_settings(
        tmp_path,
        truthfulqa_dir,
        quick_questions=8,
        top_ks=(2,),
        objective="preference",
        preference_epochs=2,
        preference_kl_weight=10.0,
        preference_kl_on="neutral",
        preference_freeze_probe=True,
        preference_kl_budget=0.01,
        preference_at_budget=True,
        preference_lr=1e-3,
    )
    results = run_main_job(settings, model_and_tokenizer=(model, tokenizer))
    for fold in results["per_fold"]:
        assert set(fold["preference"]) == {"hpr", "additive"}
        for method, report in fold["preference"].items():
            assert report["n_pairs"] >= 1 and len(report["epochs"]) == 2, method
            assert report["settings"]["kl_weight"] == 10.0 and report["settings"]["lr"] == 1e-3
            assert report["settings"]["kl_on"] == "neutral"  # the calibration text, as the budgets are
            assert report["settings"]["freeze_probe"] is True and report["settings"]["kl_budget"] == 0.01
            # trained at the strength calibrated to the largest KL target, not at alpha 1
            assert 0 < report["training_alpha"] != 1.0
            training = report["training_calibration"]  # the calibration it came from, on record
            assert training["alpha"] == report["training_alpha"]
            assert training["target_kl"] == max(settings.kl_targets)
            assert training["kl"] <= training["target_kl"]
            assert all(epoch["kl"] > 0 for epoch in report["epochs"])
            # the best epoch is picked on fit questions held back from training, never on the
            # validation questions that then choose among the candidates
            stop_ids = set(report["epoch_choice_ids"])
            assert stop_ids and stop_ids <= set(fold["fit_ids"]) and report["n_val_pairs"] == len(stop_ids)
            assert not stop_ids & set(fold["validation_ids"])
            validated = {
                tuple(r["layers"])
                for r in fold["validation_sweep"]
                if r["method"] == method and r["stage"] == "validation"
            }
            assert validated == {tuple(report["layers"])}  # only the trained set
    assert set(results["comparisons"]) == {f"{KL_TARGETS[0]:g}"}


def test_paper_config_applies_the_papers_choices():
    plain = JobSettings()
    assert plain.resolved() is plain
    paper = JobSettings(paper_config=True, top_ks=(1, 3)).resolved()
    assert paper.token_selection == "response" and paper.top_ks == (5,) and paper.layer_search == "probe"
    with pytest.raises(ValueError, match="rotation_direction"):
        JobSettings(rotation_direction="sideways").validate()
    args = build_parser("main").parse_args(
        ["main", "--paper-config", "--rotation-direction", "mean_difference", "--exclude-massive-dims", "2"]
    )
    from hpr_peft.cli.main_job import settings_from_args

    settings = settings_from_args(args)
    assert settings.paper_config and settings.rotation_direction == "mean_difference"
    assert settings.exclude_massive_dims == 2
    args = build_parser("main").parse_args(
        [
            "main",
            "--preference-epochs",
            "3",
            "--preference-lr",
            "0.001",
            "--preference-kl-weight",
            "10",
            "--preference-kl-on",
            "neutral",
            "--preference-freeze-probe",
            "--preference-at-budget",
            "--preference-kl-budget",
            "0.1",
            "--preference-editor-lr",
            "1e-5",
        ]
    )
    settings = settings_from_args(args)
    assert (settings.preference_epochs, settings.preference_lr, settings.preference_kl_weight) == (
        3,
        1e-3,
        10.0,
    )
    assert settings.preference_kl_on == "neutral" and JobSettings().preference_kl_on == "prompts"
    assert settings.preference_freeze_probe and not JobSettings().preference_freeze_probe
    assert settings.preference_kl_budget == 0.1 and JobSettings().preference_kl_budget == 0.0
    assert settings.preference_at_budget and not JobSettings().preference_at_budget
    assert settings.preference_settings().editor_lr == 1e-5 and JobSettings().preference_editor_lr is None
    assert settings_from_args(build_parser("main").parse_args(["main"])).preference_freeze_probe is False


@pytest.mark.slow
def test_quick_job_in_the_paper_configuration_with_rotation_options(smollm2, truthfulqa_dir, tmp_path):
    """The paper's configuration (chat-format MC pairs, response tokens, 4-layer angle net, top-5 by
    probe accuracy), rotating toward the mean difference outside the massive dimensions."""
    _, tokenizer = smollm2
    model = make_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    settings = _quick_settings(
        tmp_path,
        truthfulqa_dir,
        paper_config=True,
        paper_pairs_per_question=2,
        rotation_direction="mean_difference",
        exclude_massive_dims=2,
    )
    results = run_main_job(settings, model_and_tokenizer=(model, tokenizer))
    assert results["settings"]["token_selection"] == "response" and tuple(results["settings"]["top_ks"]) == (
        5,
    )
    n_layers = len(model.model.layers)
    for fold in results["per_fold"]:
        assert fold["ranking_comparison"] == {}  # layers by probe accuracy: no screening
        chosen = fold["chosen"][f"hpr@kl{KL_TARGETS[0]:g}"]
        assert chosen is not None and len(chosen["layers"]) == min(5, n_layers)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["rotation_direction"] == "mean_difference" and config["exclude_massive_dims"] == 2
    width = model.config.hidden_size
    assert config["angle_hidden_sizes"] == [width // 2, width // 4, width // 8]
