"""lm-evaluation-harness on HPR adapters: its own truthfulqa_mc1 / mc2 (a local copy of the task
definitions, examples/lm_eval_tasks, reading $HPR_TRUTHFULQA_DIR) agree with our scorer to 1e-4 per
question, unedited and with a fitted adapter, from Python (HFLM on the PeftModel) and through
``hpr-peft lm-eval`` with ``peft=ADAPTER`` for a local folder and a Hub repo (the local test Hub).

The model is a small random Llama with SmolLM2's real tokenizer, saved to disk: lm-eval reads the
~300-token primer once per answer, which the real 135M model makes minutes long on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.data import load_truthfulqa, load_truthfulqa_mc
from hpr_peft.evaluation import TruthfulQAScorer
from hpr_peft.fitting import fit_hpr
from hpr_peft.hub import push_to_hub
from hpr_peft.integrations.lm_eval import hpr_lm, require_lm_eval, run_lm_eval_cli
from support import REPO_ROOT
from support.hub_adapters import TOKEN_A
from support.models import make_tiny_causal_lm

lm_eval = require_lm_eval()

TASKS_DIR = REPO_ROOT / "examples" / "lm_eval_tasks"
TASKS = ("truthfulqa_local_mc1", "truthfulqa_local_mc2")
N_QUESTIONS = 20
TOLERANCE = 1e-4
# The adapter edits hard enough that its scores differ clearly from the unedited ones.
ALPHA = 4.0


@pytest.fixture(scope="module")
def setup(smollm2, truthfulqa_dir, tmp_path_factory):
    """(model folder, adapter folder, fitted PeftModel, tokenizer, questions, our MC results)."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("lm_eval") / "base"
    base = make_tiny_causal_lm("llama", vocab_size=len(tokenizer))
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = get_peft_model(base, HPRConfig(target_layers="all", alpha=ALPHA)).eval()
    questions = load_truthfulqa_mc(truthfulqa_dir)[:N_QUESTIONS]
    fit_ids = [q.question_id for q in load_truthfulqa_mc(truthfulqa_dir)[100:160]]
    pairs = load_truthfulqa(truthfulqa_dir, question_ids=fit_ids, max_pairs_per_question=4)
    fit_hpr(model, tokenizer, pairs, top_k=4, epochs=2, progress=False)
    adapter = folder.parent / "adapter"
    model.save_pretrained(adapter)
    scorer = TruthfulQAScorer(tokenizer, questions)
    ours = {
        "unedited": scorer.score(model, context=model.disable_adapter, progress=False),
        "edited": scorer.score(model, progress=False),
    }
    return folder, adapter, model, tokenizer, questions, ours


def per_question(samples: list[dict]) -> list[float]:
    """lm-eval's per-document ``acc`` (MC1 or MC2), in document order."""
    return [float(s["acc"]) for s in sorted(samples, key=lambda s: s["doc_id"])]


def assert_agree(samples_by_task: dict[str, list[dict]], ours) -> None:
    for task, mine in (("truthfulqa_local_mc1", ours.mc1), ("truthfulqa_local_mc2", ours.mc2)):
        theirs = per_question(samples_by_task[task])
        assert len(theirs) == N_QUESTIONS
        worst = max(abs(a - b) for a, b in zip(theirs, mine, strict=True))
        print(f"{task}: lm-eval mean {sum(theirs) / len(theirs):.6f}, ours {sum(mine) / len(mine):.6f}, "
              f"max per-question difference {worst:.2e}")  # fmt: skip
        assert worst <= TOLERANCE, f"{task}: lm-eval and our scorer differ by {worst:.3g}"


def test_the_adapter_really_changes_the_scores(setup):
    *_, ours = setup
    changed = max(abs(a - b) for a, b in zip(ours["edited"].mc2, ours["unedited"].mc2, strict=True))
    assert changed > 10 * TOLERANCE


@pytest.mark.parametrize("state", ["unedited", "edited"])
def test_python_hflm_matches_our_scorer(setup, state):
    from lm_eval.tasks import TaskManager

    _, _, model, tokenizer, _, ours = setup
    lm = hpr_lm(model, tokenizer, batch_size=8)
    with model.disable_adapter() if state == "unedited" else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(TASKS),
            task_manager=TaskManager(include_path=str(TASKS_DIR)),
            limit=N_QUESTIONS,
            log_samples=True,
        )
    assert_agree(results["samples"], ours[state])


def cli_command(folder: Path, peft: str, output: Path) -> list[str]:
    return [
        "--model", "hf",
        "--model_args", f"pretrained={folder},peft={peft},dtype=float32",
        "--tasks", ",".join(TASKS),
        "--include_path", str(TASKS_DIR),
        "--limit", str(N_QUESTIONS),
        "--device", "cpu",
        "--batch_size", "8",
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip


def run_cli(
    entry: list[str], args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")])
    full_env.setdefault("HF_DATASETS_OFFLINE", "1")
    return subprocess.run(
        [sys.executable, *entry, *args], env=full_env, capture_output=True, text=True, timeout=600
    )


def logged_samples(output: Path) -> dict[str, list[dict]]:
    """The per-document samples lm-eval's command line wrote under ``output``."""
    found: dict[str, list[dict]] = {}
    for task in TASKS:
        files = sorted(output.rglob(f"samples_{task}_*.jsonl"))
        assert files, f"lm-eval wrote no samples for {task} under {output}"
        found[task] = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return found


def test_command_line_loads_a_local_adapter(setup, tmp_path):
    folder, adapter, *_, ours = setup
    args = cli_command(folder, str(adapter), tmp_path / "out")
    plain = run_cli(["-m", "lm_eval"], args)
    assert plain.returncode != 0 and "KeyError: 'HPR'" in plain.stderr  # why the command exists
    proc = run_cli(["-m", "hpr_peft", "lm-eval"], args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_agree(logged_samples(tmp_path / "out"), ours["edited"])


def test_command_line_loads_an_adapter_from_the_hub(setup, hub, online, tmp_path):
    folder, adapter, *_, ours = setup
    push_to_hub(str(adapter), "alice/tiny-truthful-hpr", token=TOKEN_A, endpoint=hub.url)
    proc = run_cli(
        ["-m", "hpr_peft.integrations.lm_eval"],
        cli_command(folder, "alice/tiny-truthful-hpr", tmp_path / "out"),
        env=hub.env(tmp_path / "hf_home"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert any("/alice/tiny-truthful-hpr/resolve/" in path for _, path in hub_requests(hub))
    assert_agree(logged_samples(tmp_path / "out"), ours["edited"])


def hub_requests(hub) -> list[tuple[str, str]]:
    """(method, path) of every request the local Hub served."""
    return [(r[0], r[1]) for r in hub.state.requests]


def test_passthrough_keeps_argv_and_returns_lm_eval_status(capsys):
    before = list(sys.argv)
    assert run_lm_eval_cli(["--help"]) == 0
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
    assert run_lm_eval_cli(["run", "--no-such-option"]) == 2
    assert sys.argv == before


def test_missing_lm_eval_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"hpr_peft\[lm-eval\]"):
        require_lm_eval()
    with pytest.raises(ImportError, match=r"hpr_peft\[lm-eval\]"):
        run_lm_eval_cli(["--help"])
    with pytest.raises(ImportError, match=r"hpr_peft\[lm-eval\]"):
        hpr_lm(torch.nn.Linear(2, 2), None)
