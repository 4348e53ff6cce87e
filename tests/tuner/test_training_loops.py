"""Real training loops: transformers' Trainer (also with gradient checkpointing), accelerate on 2 CPU
processes, and continuing from a saved adapter loaded with ``is_trainable=True``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import hpr_peft
from hpr_peft import HPRConfig
from support.models import make_char_tokenizer, make_tiny_causal_lm

TESTS_DIR = Path(__file__).resolve().parents[1]
TEXT = "The sky is green and the grass is blue. " * 40
SEQUENCE = 24


def text_dataset(count: int = 16) -> list[dict[str, torch.Tensor]]:
    """``count`` equal-length windows of one text (no padding: every step averages the same tokens)."""
    ids = make_char_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    windows = [torch.tensor(ids[i * 7 : i * 7 + SEQUENCE]) for i in range(count)]
    return [{"input_ids": w, "attention_mask": torch.ones_like(w), "labels": w.clone()} for w in windows]


def training_arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**settings, **overrides})


class EditSize(TrainerCallback):
    """After every optimizer step: the largest change of the held-out logits against the base model."""

    def __init__(self, model, held_out: torch.Tensor, base_logits: torch.Tensor):
        self.model, self.held_out, self.base_logits = model, held_out, base_logits
        self.per_step: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            logits = self.model(self.held_out).logits
        self.per_step.append(float((logits - self.base_logits).abs().amax()))


def _train(tmp_path: Path, **overrides) -> tuple[list[float], list[float], dict]:
    """(losses, edit size after each step, trained adapter weights) of a Trainer run on the tiny Llama."""
    base = make_tiny_causal_lm("llama")
    held_out = torch.tensor([[40, 77, 84, 88, 73, 88, 72, 1, 86]])
    with torch.no_grad():
        base_logits = base(held_out).logits
    model = get_peft_model(base, HPRConfig())
    edit_size = EditSize(model, held_out, base_logits)
    trainer = Trainer(
        model=model,
        args=training_arguments(tmp_path, **overrides),
        train_dataset=text_dataset(),
        callbacks=[edit_size],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, edit_size.per_step, weights


def test_trainer_trains_the_default_adapter_and_its_edit_grows(tmp_path):
    losses, edit_sizes, _ = _train(tmp_path)
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.05, losses
    assert edit_sizes[0] > 0  # the exact identity is left after the first step
    assert edit_sizes[-1] > 1e-2 and edit_sizes[-1] > edit_sizes[0], edit_sizes


def test_trainer_with_gradient_checkpointing_takes_the_same_steps(tmp_path):
    losses, _, weights = _train(tmp_path / "plain")
    checkpointed_losses, _, checkpointed = _train(tmp_path / "checkpointed", gradient_checkpointing=True)
    torch.testing.assert_close(checkpointed_losses, losses, rtol=1e-5, atol=1e-6)
    for name, weight in weights.items():
        torch.testing.assert_close(checkpointed[name], weight, rtol=1e-5, atol=1e-6)


def _sgd_step(model, batch) -> dict[str, torch.Tensor]:
    """One SGD step of ``model`` on ``batch``; its trainable weights after it."""
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.zero_grad()
    model(**batch).loss.backward()
    optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loading_with_is_trainable_continues_training(tmp_path):
    batch = {k: torch.stack([row[k] for row in text_dataset(4)]) for k in ("input_ids", "labels")}
    model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2])).train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    continued = _sgd_step(model, batch)  # what one more step from the saved adapter gives

    frozen = PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    for loaded in (
        PeftModel.from_pretrained(make_tiny_causal_lm("llama"), tmp_path, is_trainable=True),
        hpr_peft.load_adapter(make_tiny_causal_lm("llama"), str(tmp_path), is_trainable=True),
    ):
        trainable = {n: p for n, p in loaded.named_parameters() if p.requires_grad}
        assert trainable.keys() == saved.keys()
        for name, parameter in trainable.items():
            assert torch.equal(parameter, saved[name]), name
        after = _sgd_step(loaded, batch)
        for name, weight in continued.items():
            assert not torch.equal(weight, saved[name]), name  # the step moved every weight
            torch.testing.assert_close(after[name], weight, rtol=1e-6, atol=1e-7)


SCRIPT = r"""
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from peft import get_peft_model
from safetensors.torch import save_file
from transformers import Trainer
from hpr_peft import HPRConfig
from support.models import make_tiny_causal_lm
from tuner.test_training_loops import text_dataset, training_arguments

out, per_device = sys.argv[1], int(sys.argv[2])
model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2, 3]))
# plain SGD: an update linear in the gradient, so the all-reduce's summation order stays at rounding level
args = training_arguments(out, per_device_train_batch_size=per_device, max_steps=4, optim="sgd", learning_rate=1.0)
trainer = Trainer(model=model, args=args, train_dataset=text_dataset())
trainer.train()
if trainer.args.process_index == 0:
    state = {{n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}}
    save_file(state, os.path.join(out, "weights.safetensors"))
with open(os.path.join(out, f"rank{{trainer.args.process_index}}.txt"), "w") as marker:
    marker.write(str(trainer.args.world_size))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_processes_train_the_same_weights_as_one_at_the_same_effective_batch(tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.fail("the accelerate command line is missing: install accelerate (a hpr_peft dependency)")
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR)))
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    _run([sys.executable, str(script), str(single), "4"], tmp_path)
    # accelerate 1.x on a machine without GPUs: --multi_gpu launches CPU processes with gloo
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    _run([*launch, str(script), str(double), "2"], tmp_path)
    assert sorted(p.name for p in single.glob("rank*.txt")) == ["rank0.txt"]
    assert [p.read_text() for p in sorted(double.glob("rank*.txt"))] == ["2", "2"]
    one, two = load_file(single / "weights.safetensors"), load_file(double / "weights.safetensors")
    assert one.keys() == two.keys() and len(one) == 3 * 6
    start = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2, 3]))
    initial = {n: p.detach() for n, p in start.named_parameters() if p.requires_grad}
    for name, weight in one.items():
        assert not torch.equal(weight, initial[name]), name  # it trained
        torch.testing.assert_close(
            two[name], weight, rtol=1e-5, atol=1e-6
        )  # all-reduce sums in another order
