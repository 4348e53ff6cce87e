"""Upload an HPR adapter with its model card to the Hub in one commit.

The adapter is staged in a temporary directory (saved from a ``PeftModel``, or copied from a saved
adapter directory), the model card and evaluation results are written beside it, and everything goes up
in one ``create_commit``. ``PeftModel.push_to_hub`` is not used: in transformers 5.x it goes through
``PushToHubMixin``, which replaces the card with one saying ``library_name: transformers``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpr_peft.hub.adapter_files import (
    CARD_NAME,
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    PICKLE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    check_adapter_dir,
    read_json,
)
from hpr_peft.hub.card import render_model_card
from hpr_peft.hub.errors import explain_hub_error, hub_errors, missing_token_error
from hpr_peft.hub.repo_ids import is_repo_id
from hpr_peft.hub.shareable import keep_selected_layers, record_weights_source

__all__ = ["DEFAULT_COMMIT_MESSAGE", "push_to_hub"]

DEFAULT_COMMIT_MESSAGE = "Upload HPR adapter"

# uploaded when present in the staged directory, in this order
_UPLOADED = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, EVAL_RESULTS_NAME)


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    commit_description: str | None = None,
    create_repo: bool = True,
    adapter_name: str | None = None,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | str | os.PathLike | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    only_selected_layers: bool = False,
) -> Any:
    """Upload an HPR adapter with its model card to ``repo_id`` in one commit; return the ``CommitInfo``.

    Args:
        model: a ``PeftModel`` holding an HPR adapter, or the path of a saved adapter directory.
        repo_id: ``"namespace/name"`` (or ``"name"`` for your own namespace).
        private: create the repo private (ignored when it exists already).
        token: a write token; default: ``HF_TOKEN`` or the token saved by ``hf auth login``.
        revision: branch to commit to (created from ``main`` if missing); default ``main``.
        create_repo: create the repo if it does not exist (``exist_ok``); False: it must exist.
        adapter_name: which adapter of ``model`` (default: the active one).
        base_model: Hub id of the base model for the card (default: ``base_model_name_or_path``).
        eval_results: dict or JSON file of evaluation results for the card; default: ``eval_results.json``
            beside a saved adapter, else ``fit_results["eval_results"]``. Uploaded as ``eval_results.json``.
        endpoint: Hub URL (default ``HF_ENDPOINT`` / huggingface.co).
        only_selected_layers: upload only the editors of the layers that edit (``selected_layers``);
            the uploaded config's ``target_layers`` lists them and the card says so.

    Uploads ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (+ ``eval_results.json``)
    and deletes a stale pickle ``adapter_model.bin`` from the branch. Raises HubAccessError (with the fix)
    when the Hub refuses, ValueError/TypeError/FileNotFoundError for bad inputs.
    """
    from huggingface_hub import HfApi

    effective_token = _check_push_arguments(repo_id, commit_message, token)
    api = HfApi(endpoint=endpoint, token=effective_token)
    with tempfile.TemporaryDirectory(prefix="hpr-push-") as tmp_name:
        staged, source_eval = _stage_adapter(model, Path(tmp_name) / "adapter", adapter_name)
        if not isinstance(model, (str, os.PathLike)):
            record_weights_source(model, staged)
        if only_selected_layers:
            keep_selected_layers(staged)
        config = check_adapter_dir(staged)
        if str(config.get("peft_type")) != "HPR":
            raise ValueError(
                f"push_to_hub: {CONFIG_NAME} has peft_type={config.get('peft_type')!r}, not 'HPR'; "
                "this function pushes HPR adapters only"
            )
        evaluation = _resolve_eval_results(eval_results, source_eval)
        if evaluation is not None:
            (staged / EVAL_RESULTS_NAME).write_text(json.dumps(evaluation, indent=2, default=str) + "\n")
        card = render_model_card(config, repo_id, base_model=base_model, eval_results=evaluation)
        (staged / CARD_NAME).write_text(card, encoding="utf-8")
        try:
            return _commit(
                api,
                repo_id,
                staged,
                private=private,
                revision=revision,
                create_repo=create_repo,
                commit_message=commit_message,
                commit_description=commit_description,
                create_pr=create_pr,
            )
        except hub_errors() as err:
            raise explain_hub_error(
                err, repo_id=repo_id, action="push to", revision=revision, endpoint=endpoint, token_given=True
            ) from err


def _check_push_arguments(repo_id: str, commit_message: str, token: str | None) -> str:
    """Validate the arguments before any work; return the token to use (given, HF_TOKEN or saved)."""
    from huggingface_hub.utils import get_token

    if not is_repo_id(repo_id):
        raise ValueError(f"push_to_hub: repo_id={repo_id!r} is not a Hub repo id; use 'namespace/name'")
    if not commit_message:
        raise ValueError("push_to_hub: commit_message must not be empty")
    if token is not None and not isinstance(token, str):
        raise TypeError("push_to_hub: token must be a string (or None to use HF_TOKEN / `hf auth login`)")
    effective_token = token or get_token()
    if not effective_token:
        raise missing_token_error(repo_id)
    return effective_token


def _stage_adapter(model: Any, staging: Path, adapter_name: str | None) -> tuple[Path, Path | None]:
    """Put the adapter's files under ``staging``; return (their directory, eval_results.json beside the source).

    A saved adapter directory is checked and its config and weights copied; a ``PeftModel`` is saved.
    """
    if not isinstance(model, (str, os.PathLike)):
        return _save_peft_model(model, staging, adapter_name), None
    source = Path(model).expanduser()
    check_adapter_dir(source)
    staging.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        shutil.copy2(source / name, staging / name)
    source_eval = source / EVAL_RESULTS_NAME
    return staging, source_eval if source_eval.is_file() else None


def _save_peft_model(model: Any, directory: Path, adapter_name: str | None) -> Path:
    """Save the HPR adapter of a PeftModel into ``directory``; return the dir holding its files."""
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, Mapping) or not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"push_to_hub: model must be a PeftModel with an HPR adapter or a saved adapter directory, "
            f"got {type(model).__name__}"
        )
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else next(iter(peft_config))
    if adapter_name not in peft_config:
        raise ValueError(
            f"push_to_hub: adapter_name={adapter_name!r} not in the model; choose from {list(peft_config)}"
        )
    peft_type = str(getattr(peft_config[adapter_name], "peft_type", ""))
    if peft_type.rsplit(".", 1)[-1] != "HPR":
        raise ValueError(
            f"push_to_hub: adapter {adapter_name!r} is a {peft_type} adapter, not HPR; use model.push_to_hub for it"
        )
    model.save_pretrained(
        str(directory), selected_adapters=[adapter_name], safe_serialization=True, save_embedding_layers=False
    )
    sub = directory / adapter_name
    return sub if adapter_name != "default" and (sub / CONFIG_NAME).is_file() else directory


def _resolve_eval_results(
    eval_results: Mapping[str, Any] | str | os.PathLike | None, source_eval: Path | None
) -> Mapping[str, Any] | None:
    """The evaluation results for the card: given (dict or JSON file), else the file beside the source."""
    if isinstance(eval_results, (str, os.PathLike)):
        return read_json(Path(eval_results))
    if eval_results is not None:
        return dict(eval_results)
    if source_eval is not None:
        return read_json(source_eval)
    return None


def _commit(
    api: Any,
    repo_id: str,
    staged: Path,
    *,
    private: bool,
    revision: str | None,
    create_repo: bool,
    commit_message: str,
    commit_description: str | None,
    create_pr: bool,
) -> Any:
    """Create the repo and branch if needed, then upload the staged files (dropping a stale pickle)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name))
        for name in _UPLOADED
        if (staged / name).is_file()
    ]
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    if PICKLE_WEIGHTS_NAME in api.list_repo_files(repo_id, revision=revision):
        operations.append(CommitOperationDelete(path_in_repo=PICKLE_WEIGHTS_NAME))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message,
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )
