"""Load an HPR adapter from a Hub repo id or a local directory, without ``import hpr_peft`` first.

Plain ``peft.PeftModel.from_pretrained`` fails with a bare ``KeyError: 'HPR'`` unless ``hpr_peft`` was
imported; these loaders register the ``HPR`` type themselves. They only ever read
``adapter_model.safetensors``: a pickle ``adapter_model.bin`` is refused, never unpickled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpr_peft.hub.adapter_files import (
    CONFIG_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_adapter_dir,
    check_hpr_peft_type,
    pickle_refusal,
)
from hpr_peft.hub.errors import explain_hub_error, hub_errors
from hpr_peft.hub.repo_ids import looks_like_repo_id
from hpr_peft.tuner.config import validate_adapter_name
from hpr_peft.tuner.registration import register_hpr

__all__ = ["AutoHPRModelForCausalLM", "fetch_adapter", "load_adapter"]


def fetch_adapter(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
    endpoint: str | None = None,
) -> tuple[Path, dict]:
    """(local directory holding adapter_config.json + adapter_model.safetensors, its config).

    A local directory is checked as it is; a Hub repo id is downloaded into the huggingface_hub cache
    (or found there, offline). Hub failures raise HubAccessError naming the fix.
    """
    local = Path(repo_or_dir).expanduser()
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        return local, check_adapter_dir(local)
    repo_id = str(repo_or_dir)
    if isinstance(repo_or_dir, os.PathLike) or not looks_like_repo_id(repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing adapter directory nor a Hub repo id ('namespace/name')"
        )
    download = dict(
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        subfolder=subfolder,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )
    try:
        folder = _download_adapter(repo_id, download)
    except hub_errors() as err:
        raise explain_hub_error(
            err,
            repo_id=repo_id,
            action="load",
            revision=revision,
            endpoint=endpoint,
            token_given=isinstance(token, str) and bool(token),
        ) from err
    return folder, check_adapter_dir(folder)


def _download_adapter(repo_id: str, download: dict[str, Any]) -> Path:
    """Download config and safetensors weights; return the cache folder holding both."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, **download))
    except RemoteEntryNotFoundError as err:
        subfolder, revision = download["subfolder"], download["revision"]
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} has no {CONFIG_NAME}"
            + (f" in {subfolder!r}" if subfolder else "")
            + (f" at revision {revision!r}" if revision else "")
            + "; it is not a PEFT adapter repo"
        ) from err
    try:
        hf_hub_download(repo_id, WEIGHTS_NAME, **download)
    except RemoteEntryNotFoundError as err:
        if _has_only_pickle_weights(repo_id, download):
            raise pickle_refusal(f"Hub repo {repo_id!r}") from None
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}; it is not a complete adapter"
        ) from err
    return config_path.parent


def _has_only_pickle_weights(repo_id: str, download: Mapping[str, Any]) -> bool:
    """Whether the repo has a pickle ``adapter_model.bin`` (asked online only; offline: unknown, False)."""
    from huggingface_hub import HfApi

    if download["local_files_only"]:
        return False
    subfolder = download["subfolder"]
    pickle_name = f"{subfolder}/{PICKLE_WEIGHTS_NAME}" if subfolder else PICKLE_WEIGHTS_NAME
    api = HfApi(endpoint=download["endpoint"])
    return api.file_exists(repo_id, pickle_name, revision=download["revision"], token=download["token"])


def load_adapter(
    base_model: Any,
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    subfolder: str | None = None,
    endpoint: str | None = None,
    base_model_kwargs: Mapping[str, Any] | None = None,
    **peft_kwargs: Any,
) -> Any:
    """Load an HPR adapter (Hub repo id or local directory) onto ``base_model``; return the ``PeftModel``.

    Registers the HPR PEFT type itself (no ``import hpr_peft`` needed first) and reads only
    ``adapter_model.safetensors`` (a pickle-only adapter raises ValueError, never unpickled). The
    config must say ``"peft_type": "HPR"``, and the weights must match it and the model (same hidden
    size and blocks, finite values; see :mod:`hpr_peft.tuner.checkpoint`): each mismatch raises
    ValueError naming the file and the fix.
    ``base_model=None`` loads ``AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path,
    **base_model_kwargs)``. If ``base_model`` is already a PeftModel, the adapter is added to it under
    ``adapter_name``. Hub failures raise HubAccessError naming the fix.
    """
    register_hpr()
    from peft import PeftModel

    validate_adapter_name(adapter_name)
    folder, config = fetch_adapter(
        repo_or_dir,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        subfolder=subfolder,
        endpoint=endpoint,
    )
    check_hpr_peft_type(config, folder, str(repo_or_dir) + (f"/{subfolder}" if subfolder else ""))
    if base_model is None:
        base_model = _load_base_model(config, repo_or_dir, token, base_model_kwargs)
    if isinstance(base_model, PeftModel):
        base_model.load_adapter(
            str(folder), adapter_name=adapter_name, is_trainable=is_trainable, **peft_kwargs
        )
        return base_model
    return PeftModel.from_pretrained(
        base_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, **peft_kwargs
    )


def _load_base_model(
    config: Mapping[str, Any],
    repo_or_dir: str | os.PathLike,
    token: str | bool | None,
    base_model_kwargs: Mapping[str, Any] | None,
) -> Any:
    """The base model named in the adapter config (``base_model_name_or_path``), loaded with transformers."""
    base_id = config.get("base_model_name_or_path")
    if not base_id:
        raise ValueError(
            f"{CONFIG_NAME} of {str(repo_or_dir)!r} does not name its base model (base_model_name_or_path); "
            "pass the base model: load_adapter(base_model, ...)"
        )
    from transformers import AutoModelForCausalLM

    extra = dict(base_model_kwargs or {})
    if isinstance(token, str):
        extra.setdefault("token", token)
    return AutoModelForCausalLM.from_pretrained(base_id, **extra)


class AutoHPRModelForCausalLM:
    """``AutoPeftModelForCausalLM`` for HPR adapters that needs no ``import hpr_peft`` first.

    ``AutoHPRModelForCausalLM.from_pretrained("user/repo", revision=..., token=..., torch_dtype=...)``
    loads the base model named in the adapter config, then the adapter (safetensors only).
    """

    def __init__(self) -> None:
        raise TypeError("use AutoHPRModelForCausalLM.from_pretrained(repo_or_dir, ...)")

    @classmethod
    def from_pretrained(
        cls,
        repo_or_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        adapter_name: str = "default",
        is_trainable: bool = False,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        **base_model_kwargs: Any,
    ) -> Any:
        """Load the base model named in the adapter config, then the adapter; return the ``PeftModel``."""
        return load_adapter(
            None,
            repo_or_dir,
            revision=revision,
            token=token,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            endpoint=endpoint,
            base_model_kwargs=base_model_kwargs,
        )
