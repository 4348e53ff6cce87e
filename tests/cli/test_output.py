"""What a user sees on the terminal: ``--no-progress`` silences every bar (the GGUF conversion's too),
and the command line shows no warning (peft's FutureWarning under transformers 5 is filtered there,
and only there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
from peft import get_peft_model

from hpr_peft import HPRConfig
from hpr_peft.cli import main as cli_main
from hpr_peft.runtime.progress import quiet_library_bars
from support import REPO_ROOT
from support.models import make_char_tokenizer, make_tiny_causal_lm


def test_quiet_library_bars_silences_the_gguf_conversion_bar(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_module
    from transformers.utils import logging as transformers_logging

    def convert() -> str:
        for _ in gguf_module.tqdm(range(3), desc="Converting GGUF"):
            pass
        return capsys.readouterr().err

    assert "Converting GGUF" in convert()
    with quiet_library_bars():
        assert convert() == ""
        assert not transformers_logging.is_progress_bar_enabled()
    assert "Converting GGUF" in convert() and transformers_logging.is_progress_bar_enabled()
    with quiet_library_bars(False):
        assert "Converting GGUF" in convert()


def test_cli_shows_no_warning_and_the_library_keeps_peft_s(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_causal_lm("llama").save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Q: n{i}?\nA:", "positive": f" yes {i % 3}", "negative": f" no {i % 4}"})
            + "\n"
            for i in range(12)
        )
    )
    argv = ["fit", "--model", str(folder), "--data", str(data), "--layers", "1,2", "--top-k", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main([*argv, "--epochs", "1", "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert [str(w.message) for w in caught] == []
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1]))


@pytest.mark.slow
def test_eval_with_no_progress_prints_no_bar_and_no_warning(truthfulqa_dir, tmp_path):
    """The bundled GGUF model through ``hpr-peft eval --no-progress`` in a fresh process."""
    ids = tmp_path / "ids.txt"
    ids.write_text("tqa-0000\ntqa-0001\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-m", "hpr_peft", "eval", "--model", "smollm2", "--questions", str(ids),
         "--no-side-effects", "--no-progress", "--output", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr == "", proc.stderr[-4000:]
    assert "2 questions: MC1" in proc.stdout
