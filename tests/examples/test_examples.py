"""Every script in examples/ runs as a user runs it (a fresh process, the bundled model, offline) and
shows what it claims; each one is linked from the README."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from support import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` and return its standard output (fails with its stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS=str(min(2, os.cpu_count() or 1)),
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,  # minutes on a quiet 2-core machine; far more when it is shared
        cwd=str(REPO_ROOT),
    )
    print(f"{name}: {time.perf_counter() - start:.0f} s")
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def number_after(pattern: str, text: str) -> float:
    match = re.search(pattern + r"\s*(-?[0-9.]+(?:e-?\d+)?)", text)
    assert match, f"{pattern!r} not in output:\n{text}"
    return float(match.group(1))


def test_every_example_is_linked_from_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    assert SCRIPTS
    for name in SCRIPTS:
        assert f"(examples/{name})" in readme, f"README does not link examples/{name}"


@pytest.mark.slow
def test_quickstart_fits_and_edits_generation():
    out = run_example("quickstart.py")
    assert "selected layers" in out
    answers = re.findall(r"^  (unedited |HPR α=1): (.*)$", out, flags=re.MULTILINE)
    unedited = [a for kind, a in answers if kind.startswith("unedited")]
    edited = [a for kind, a in answers if kind.startswith("HPR")]
    assert len(unedited) == len(edited) == 2 and unedited != edited


@pytest.mark.slow
def test_custom_concept_shows_in_monitor_and_generation():
    out = run_example("custom_concept.py")
    assert number_after("casual flagged", out) > number_after("formal flagged", out)
    assert number_after(r"HPR α=1", out) > number_after("unedited", out)
    assert out.count("  HPR      :") == 3


@pytest.mark.slow
def test_monitor_detects_false_answers():
    out = run_example("monitor_detector.py")
    assert number_after("AUROC \\(true above false\\):", out) > 0.55
    assert number_after("flagged false", out) > number_after("flagged true", out)


@pytest.mark.slow
def test_hub_round_trip_is_exact():
    out = run_example("hub_share.py")
    assert "using a local Hub at http://127.0.0.1:" in out and "pushed demo/smollm2-formal-hpr" in out
    assert number_after("pushed vs loaded:", out) == 0.0
    assert number_after("edited vs unedited:", out) > 0.0


@pytest.mark.slow
def test_lm_eval_example_runs_lm_eval_on_the_adapter():
    out = run_example("lm_eval_evaluation.py", "--limit", "3")
    rows = re.findall(
        r"(truthfulqa_local_mc[12]): unedited ([0-9.]+)\s+HPR α=1 ([0-9.]+)\s+HPR α=0.5 ([0-9.]+)", out
    )
    assert [r[0] for r in rows] == ["truthfulqa_local_mc1", "truthfulqa_local_mc2"]
    assert all(0.0 <= float(v) <= 1.0 for row in rows for v in row[1:])
    assert rows[1][1] != rows[1][2]  # the adapter changes lm-eval's MC2
    assert "hpr-peft lm-eval --model hf --model_args pretrained=" in out and ",peft=" in out
