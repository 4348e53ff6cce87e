"""The results table: a pick calibrated short of its budget is marked, one in the band is not."""

from __future__ import annotations

from hpr_peft.experiment.table import format_table


def _results(hpr_pick: dict) -> dict:
    row = {"mc1": 0.25, "mc2": 0.45, "kl": 0.07, "perplexity": 20.0}
    return {
        "model": "tiny",
        "n_questions": 10,
        "folds": [0],
        "kl_targets": [0.1],
        "methods": {"unedited": {**row, "kl": 0.0}, "hpr@kl0.1": row},
        "per_fold": [{"fold": 0, "chosen": {"hpr@kl0.1": hpr_pick}}],
        "comparisons": {},
        "timings_s": {"total": 1.0},
        "seconds_per_pass": 1.0,
    }


def test_a_pick_short_of_its_budget_is_marked_in_the_table():
    short = {"layers": [2], "alpha": 27.5, "kl": 0.0747, "in_band": False}
    table = format_table(_results(short))
    assert "| hpr | 0.1 |" in table and "[2] α=27.5 (calibrated KL 0.0747: short of the budget)" in table
    in_band = format_table(_results({**short, "kl": 0.095, "in_band": True}))
    assert "[2] α=27.5 |" in in_band and "short of the budget" not in in_band
