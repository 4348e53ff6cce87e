"""PEFT's own generic tuner tests (``tests/testing_common.py`` of the installed peft release), at test time.

The tests are not part of peft's wheel, so the source distribution of the installed version is taken
from PyPI with pip (``pip download --no-deps --no-binary :all: peft==X``) into ``.cache/peft-tests``
(ignored by git; set ``HPR_PEFT_TESTS_CACHE`` to move it) and the two files the generic suite needs,
``testing_common.py`` and ``testing_utils.py``, are extracted into a package there. Nothing of peft is
committed here. The files import two packages that the decoder tests never use: ``diffusers`` (an
``isinstance`` check on Stable Diffusion pipelines) and ``datasets`` (loaders for other test files);
when they are not installed, empty stand-ins take their place instead of new dependencies.

The generic tests load their model with ``from_pretrained(model_id)``: the tiny models
(:func:`support.models.make_tiny_causal_lm`) are saved for them into a directory of the test process.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft

from support.models import make_tiny_causal_lm

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "peft_generic_tests"
_NEEDED = ("testing_common.py", "testing_utils.py")


def cache_dir() -> Path:
    return Path(os.environ.get("HPR_PEFT_TESTS_CACHE", REPO_ROOT / ".cache" / "peft-tests"))


def _download_sdist(version: str, target: Path) -> Path:
    """``peft-<version>.tar.gz`` from PyPI through pip, into ``target``."""
    existing = sorted(target.glob(f"peft-{version}.tar.gz"))
    if existing:
        return existing[0]
    target.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "-q", "-d", str(target), f"peft=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    found = sorted(target.glob(f"peft-{version}.tar.gz"))
    if result.returncode != 0 or not found:
        raise RuntimeError(
            f"Could not download the source distribution of peft=={version} from PyPI, which holds PEFT's "
            f"generic tests ({result.stderr.strip()[-500:]}). Run the tests once with network access, or "
            f"put peft-{version}.tar.gz into {target}."
        )
    return found[0]


def _extract_tests(sdist: Path, package_dir: Path) -> None:
    """The generic-test files of ``sdist`` into ``package_dir`` (a package), written atomically."""
    staging = package_dir.with_name(package_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in _NEEDED:
                source = archive.extractfile(member)
                (staging / parts[2]).write_bytes(source.read())
    missing = [name for name in _NEEDED if not (staging / name).is_file()]
    if missing:
        raise RuntimeError(f"{sdist.name} has no tests/{missing}: is it peft's source distribution?")
    (staging / "__init__.py").write_text("")
    shutil.rmtree(package_dir, ignore_errors=True)
    staging.rename(package_dir)


def _stand_in_for_unused_imports() -> None:
    if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
        diffusers = types.ModuleType("diffusers")
        diffusers.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # only isinstance'd
        sys.modules["diffusers"] = diffusers
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        datasets = types.ModuleType("datasets")

        def load_dataset(*args: object, **kwargs: object) -> None:
            raise RuntimeError("datasets is not installed; the decoder tests never load a dataset")

        datasets.load_dataset = load_dataset
        sys.modules["datasets"] = datasets


def peft_testing_common() -> types.ModuleType:
    """PEFT's ``testing_common`` module for the installed peft version (downloaded once, then cached)."""
    version = peft.__version__
    root = cache_dir() / version
    package_dir = root / PACKAGE
    if not all((package_dir / name).is_file() for name in _NEEDED):
        _extract_tests(_download_sdist(version, root), package_dir)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    _stand_in_for_unused_imports()
    return importlib.import_module(f"{PACKAGE}.testing_common")


def saved_tiny_models(archs: list[str]) -> dict[str, str]:
    """``{arch: directory}`` of ``make_tiny_causal_lm(arch)`` saved with ``save_pretrained`` into a fresh
    directory of this process (removed at exit), so a changed factory never meets a stale copy."""
    root = Path(tempfile.mkdtemp(prefix="tiny-models-", dir=_ensure(cache_dir())))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    directories = {}
    for arch in archs:
        # peft's tests skip methods without Conv1D support when "gpt2" is in the model id; HPR edits
        # block outputs and never touches a Conv1D, so the directory name must not say "gpt2"
        directory = root / f"tiny-{arch.replace('gpt2', 'gpt-2')}"
        make_tiny_causal_lm(arch).save_pretrained(directory)
        directories[arch] = str(directory)
    return directories


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
