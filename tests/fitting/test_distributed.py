"""Past one device: 2 processes (``accelerate launch``, CPU, gloo) give the same adapter as one process.

Collection is split over ranks by whole batches (batches are formed before the split, so every batch
is computed exactly as in one process) and gathered in the original order; training runs on rank 0
and is broadcast. With the same thread count (1, as the launchers set it) the saved adapters are
bit-identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS_DIR = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from support.models import make_char_tokenizer, make_tiny_causal_lm
from peft import get_peft_model
from safetensors.torch import save_file
from hpr_peft import HPRConfig
from hpr_peft.fitting import collect_activations
from hpr_peft.runtime.model_io import ensure_distributed
from hpr_peft.data import ContrastivePair
from hpr_peft.fitting import fit_hpr

out = sys.argv[1]
rank, world = ensure_distributed()
tok = make_char_tokenizer()
primer = "A shared primer for all prompts. "
pairs = [ContrastivePair(primer + f"Q: n{{i}}?\nA:", f" yes {{i % 3}}", f" no {{'o' * (i % 4)}}", f"g{{i // 2}}")
         for i in range(30)]
model = get_peft_model(make_tiny_causal_lm("llama"), HPRConfig(target_layers=[1, 2, 3]))
report = fit_hpr(model, tok, pairs, top_k=2, epochs=2, collection_batch_size=4, progress=False)
state = {{k: v.contiguous() for k, v in model.state_dict().items() if "hpr_" in k}}
save_file(state, os.path.join(out, f"rank{{rank}}.safetensors"))
acts = collect_activations(model, tok, pairs, layers=[2], token_selection="response", batch_size=3,
                           progress=False, output_dir=os.path.join(out, "acts"), shard_rows=20)
if rank == 0:
    model.save_pretrained(os.path.join(out, "adapter"))
    save_file({{"pos": acts.pair_tensors(2)[0], "neg": acts.pair_tensors(2)[1]}}, os.path.join(out, "acts.safetensors"))
print("world", world, "selected", report.selected_layers)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_two_processes_give_the_same_adapter_as_one(tmp_path):
    script = tmp_path / "fit_script.py"
    script.write_text(SCRIPT.format(tests=str(TESTS_DIR)))
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    out1 = run([sys.executable, str(script), str(single)], tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    # accelerate 1.x: `--cpu` with several processes falls back to one process; `--multi_gpu` on a
    # machine without GPUs launches CPU processes with the gloo backend.
    out2 = run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            str(script),
            str(multi),
        ],
        tmp_path,
    )
    assert "world 1" in out1 and out2.count("world 2") == 2
    # same adapter, bit for bit
    assert (single / "adapter" / "adapter_model.safetensors").read_bytes() == (
        multi / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    # every rank holds the same weights
    r0, r1 = load_file(multi / "rank0.safetensors"), load_file(multi / "rank1.safetensors")
    ref = load_file(single / "rank0.safetensors")
    assert r0.keys() == r1.keys() == ref.keys()
    for key in ref:
        assert torch.equal(r0[key], ref[key]) and torch.equal(r1[key], ref[key])
    # streamed activations gathered from both ranks' shards, in the original order
    a, b = load_file(single / "acts.safetensors"), load_file(multi / "acts.safetensors")
    assert torch.equal(a["pos"], b["pos"]) and torch.equal(a["neg"], b["neg"])
    assert {p.name.split("-")[1] for p in (multi / "acts").glob("shard-*")} == {"r000", "r001"}
