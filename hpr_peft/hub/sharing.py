"""Share HPR adapters on the Hugging Face Hub: push with a correct PEFT model card, load by repo id.

- :func:`push_to_hub` saves the adapter (safetensors + JSON) into a temporary directory, writes our own
  model card (``library_name: peft``; transformers' ``PushToHubMixin`` would overwrite it with
  ``library_name: transformers``) and uploads everything in **one** commit.
- :func:`load_adapter` / :class:`AutoHPRModelForCausalLM` load an adapter from a repo id or a directory.
  They register the ``HPR`` PEFT type themselves, so users need not remember ``import hpr_peft`` (without
  it, ``peft.PeftModel.from_pretrained`` fails with a bare ``KeyError: 'HPR'``), and they only ever read
  ``adapter_model.safetensors``: a pickle ``adapter_model.bin`` is refused, never unpickled.
- Hub failures (missing/bad token, no write access, private or missing repos, unknown revisions) are
  re-raised as :class:`HubAccessError` with a message naming the fix. Tokens never appear in messages.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "AutoHPRModelForCausalLM",
    "HubAccessError",
    "load_adapter",
    "push_to_hub",
    "render_model_card",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EVAL_RESULTS_NAME = "eval_results.json"
CARD_NAME = "README.md"
DEFAULT_COMMIT_MESSAGE = "Upload HPR adapter"

PAPER_URL = "https://arxiv.org/abs/2409.10053"
PAPER_BIBTEX = """@inproceedings{pham-nguyen-2024-householder,
    title = "Householder Pseudo-Rotation: A Novel Approach to Activation Editing in {LLM}s with Direction-Magnitude Perspective",
    author = "Pham, Van-Cuong and Nguyen, Thien Huu",
    booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing (EMNLP)",
    year = "2024",
    publisher = "Association for Computational Linguistics",
    eprint = "2409.10053",
    archivePrefix = "arXiv",
    url = "https://arxiv.org/abs/2409.10053"
}"""

# A Hub repo id: "name" or "namespace/name" (letters, digits, "-", "_", "."), not a filesystem path.
_REPO_ID_RE = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


class HubAccessError(RuntimeError):
    """A Hub request failed; the message says what went wrong and how to fix it (never the token)."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _register_hpr() -> None:
    """Make sure peft knows the HPR type (``import hpr_peft`` does it; idempotent)."""
    import hpr_peft  # noqa: F401  (the package registers HPR on import)


def _looks_like_repo_id(value: str | None) -> bool:
    return bool(value) and _REPO_ID_RE.fullmatch(value) is not None and not os.path.exists(value)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); re-save the adapter with save_pretrained"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; re-save the adapter with save_pretrained")
    return data


def _refuse_pickle(where: str) -> ValueError:
    return ValueError(
        f"{where} has only a pickle weights file ({PICKLE_WEIGHTS_NAME}) and no {WEIGHTS_NAME}. hpr_peft "
        "never unpickles files (a pickle can run arbitrary code when loaded). Ask the author to re-save the "
        f"adapter with save_pretrained (safetensors is the default), or convert a copy you trust with "
        f"safetensors.torch.save_file(torch.load(path, weights_only=True), '{WEIGHTS_NAME}')."
    )


def _check_adapter_dir(directory: Path) -> dict:
    """Validate a saved adapter directory and return its config (safetensors only)."""
    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {str(directory)!r} does not exist; pass a saved adapter dir"
        )
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no {CONFIG_NAME}: it is not a saved adapter. Save one with "
            "model.save_pretrained(dir) or hpr_peft.runtime.atomic_files.save_adapter_atomic(model, dir)."
        )
    if not (directory / WEIGHTS_NAME).is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise _refuse_pickle(f"adapter directory {str(directory)!r}")
        raise FileNotFoundError(
            f"{str(directory)!r} has no {WEIGHTS_NAME}; re-save the adapter with save_pretrained"
        )
    return _read_json(config_path)


def _server_message(err: Exception) -> str:
    response = getattr(err, "response", None)
    message = getattr(err, "server_message", None) or ""
    if not message and response is not None:
        message = response.headers.get("X-Error-Message", "") or ""
    return message.strip()


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _explain(
    err: Exception,
    *,
    repo_id: str,
    action: str,
    revision: str | None,
    endpoint: str | None,
    token_given: bool,
) -> HubAccessError:
    """Turn a huggingface_hub error into a HubAccessError that says what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = _status(err)
    server = _server_message(err)
    hub = f" on {endpoint}" if endpoint else ""
    token_fix = "pass token=... (CLI: --token or the HF_TOKEN environment variable) or run `hf auth login`"
    if isinstance(err, OfflineModeIsEnabled):
        msg = (
            f"cannot {action} {repo_id!r}: Hugging Face offline mode is on (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "to reach the Hub (loading works offline only for files already in the cache)."
        )
    elif status is None and not isinstance(err, LocalEntryNotFoundError) and _is_transport_error(err):
        msg = (
            f"cannot {action} {repo_id!r}: could not reach the Hub at {endpoint or _default_endpoint()} "
            f"({type(err).__name__}: {err}). Check the network, proxy settings and HF_ENDPOINT."
        )
    elif isinstance(err, LocalEntryNotFoundError):
        msg = (
            f"cannot {action} {repo_id!r}: the files are not in the local cache and the Hub is not reachable "
            "(HF_HUB_OFFLINE=1 or no network). Load it once online, or pass a local adapter directory."
        )
    elif isinstance(err, RevisionNotFoundError):
        msg = (
            f"cannot {action} {repo_id!r}{hub}: revision {revision!r} does not exist. Pass an existing branch, "
            "tag or commit id (list them with huggingface_hub.HfApi().list_repo_refs(repo_id))."
        )
    elif isinstance(err, GatedRepoError):
        msg = f"cannot {action} {repo_id!r}{hub}: the repo is gated; request access on its page, then {token_fix}."
    elif status == 401 and "invalid credentials" in server.lower():
        msg = (
            f"cannot {action} {repo_id!r}{hub}: the token was rejected (401 invalid credentials): it is wrong, "
            "expired or revoked. Create a new token at https://huggingface.co/settings/tokens (write access to "
            f"push) and {token_fix}."
        )
    elif isinstance(err, RepositoryNotFoundError) or status == 404:
        if token_given:
            msg = (
                f"cannot {action} {repo_id!r}{hub}: the repository does not exist, or it is private and this "
                "token has no access to it. Check the repo id, or use a token of an account that can read it."
            )
        else:
            msg = (
                f"cannot {action} {repo_id!r}{hub}: the repository does not exist, or it is private and no token "
                f"was sent. Check the repo id; for a private repo {token_fix}."
            )
    elif isinstance(err, EntryNotFoundError):
        msg = f"cannot {action} {repo_id!r}{hub}: a required file is missing ({server or err})."
    elif status == 401:
        msg = f"cannot {action} {repo_id!r}{hub}: authentication is required (401). {token_fix[0].upper()}{token_fix[1:]}."
    elif status == 403:
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        msg = (
            f"cannot {action} {repo_id!r}{hub}: permission denied (403) for namespace {namespace!r}. Push to a "
            "namespace you own (e.g. 'your-username/<name>'), or use a token with write access to "
            f"{namespace!r} (a write or fine-grained token of a member of that organisation)."
        )
    elif status is not None:
        msg = f"cannot {action} {repo_id!r}{hub}: the Hub answered HTTP {status}" + (
            f" ({server})" if server else ""
        )
        msg += ". Retry later; if it persists check https://status.huggingface.co."
    else:
        msg = f"cannot {action} {repo_id!r}{hub}: {type(err).__name__}: {err}"
    if server and server not in msg:
        msg += f" [Hub said: {server}]"
    return HubAccessError(msg)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx before)."""
    found: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return tuple(found)


def _is_transport_error(err: BaseException) -> bool:
    return isinstance(err, _transport_errors())


def _default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, *_transport_errors())


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if (
        isinstance(value, (list, tuple))
        and len(value) <= 12
        and all(not isinstance(v, (dict, list)) for v in value)
    ):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text


def _flatten(data: Mapping[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 2:
            rows.extend(_flatten(value, f"{name}.", depth + 1))
        else:
            rows.append((name, value))
    return rows


def _metrics_markdown(data: Mapping[str, Any], max_rows: int = 60) -> str:
    """A metric table; a mapping of layer -> {metric: value} becomes one row per layer."""
    lines: list[str] = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    if scalars:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in list(scalars.items())[:max_rows]]
        lines.append("")
    for name, sub in tables.items():
        rows = list(sub.items())
        if rows and all(isinstance(v, Mapping) for _, v in rows):  # e.g. per-layer metrics
            columns: list[str] = []
            for _, row in rows:
                columns += [c for c in row if c not in columns and not isinstance(row[c], Mapping)]
            columns = columns[:10]
            lines += [
                f"**{_fmt(name)}**",
                "",
                "| key | " + " | ".join(columns) + " |",
                "| --- |" + " --- |" * len(columns),
            ]
            for key, row in rows[:max_rows]:
                lines.append(f"| {_fmt(key)} | " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
        else:
            flat = _flatten(sub)
            lines += [f"**{_fmt(name)}**", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in flat[:max_rows]]
        lines.append("")
    return "\n".join(lines).strip()


def _eval_from(config: Mapping[str, Any], eval_results: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if eval_results:
        return eval_results
    fit = config.get("fit_results") or {}
    if isinstance(fit, Mapping):
        for key in ("eval_results", "evaluation", "eval"):
            if isinstance(fit.get(key), Mapping) and fit[key]:
                return fit[key]
    return None


def render_model_card(
    config: Mapping[str, Any],
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
) -> str:
    """The README.md (YAML metadata + body) for an HPR adapter described by ``config`` (adapter_config.json).

    ``base_model`` defaults to ``config["base_model_name_or_path"]``; it goes into the metadata only when
    it is a Hub repo id (a local path is mentioned in the body instead). ``eval_results`` defaults to
    ``fit_results["eval_results" | "evaluation" | "eval"]``.
    """
    import yaml

    base = base_model if base_model is not None else config.get("base_model_name_or_path")
    hub_base = base if _looks_like_repo_id(base) else None
    tags = ["hpr", "activation-editing", "peft"]
    metadata: dict[str, Any] = {"library_name": "peft"}
    if hub_base:
        metadata["base_model"] = hub_base
        tags.append(f"base_model:adapter:{hub_base}")
    metadata["pipeline_tag"] = "text-generation"
    metadata["tags"] = tags
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()

    target = config.get("target_layers")
    selected = config.get("selected_layers")
    edited = selected if selected is not None else target
    repo = repo_id or "<this-repo-id>"
    base_for_code = hub_base or "<base-model-id-or-path>"
    title = repo_id.split("/")[-1] if repo_id else "HPR adapter"

    if hub_base:
        base_line = f"Base model: [`{hub_base}`](https://huggingface.co/{hub_base})."
    elif base:
        base_line = (
            f"Base model: `{base}` (a local path when this adapter was saved, not a Hub id; load that "
            "model yourself and pass it to `PeftModel.from_pretrained` / `load_adapter`)."
        )
    else:
        base_line = "Base model: not recorded in `adapter_config.json`; pass the base model yourself."

    settings = [
        ("edited layers", _fmt(edited)),
        ("target layers (have weights)", _fmt(target)),
        ("alpha (strength)", _fmt(config.get("alpha"))),
        ("threshold", _fmt(config.get("threshold"))),
        ("edit positions", _fmt(config.get("edit_positions"))),
        ("skip first token", _fmt(config.get("skip_sequence_start"))),
        ("angle net hidden sizes", _fmt(config.get("angle_hidden_sizes"))),
    ]
    body = [
        f"# {title}",
        "",
        "An **HPR** (Householder Pseudo-Rotation) activation-editing adapter, packaged as a PEFT adapter by "
        "`hpr_peft`. At each edited decoder layer a linear probe flags hidden states on the "
        "undesired side of a hyperplane; those are rotated toward their Householder reflection by a learned "
        "angle, which keeps their norm (Pham & Nguyen, EMNLP 2024).",
        "",
        base_line,
        "",
        "## Usage",
        "",
        "`import hpr_peft` first: it registers the `HPR` PEFT type. Without it, peft fails with "
        "`KeyError: 'HPR'`.",
        "",
        "```python",
        "import hpr_peft  # registers the HPR PEFT type (required before any PEFT loading)",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_for_code}")',
        f'model = PeftModel.from_pretrained(base, "{repo}")',
        "```",
        "",
        "Or with nothing to remember (registers HPR itself, loads the base model named in "
        "`adapter_config.json`, reads safetensors only):",
        "",
        "```python",
        "from hpr_peft import load_adapter",
        "",
        f'model = load_adapter(None, "{repo}")  # or load_adapter(base, "{repo}", revision=..., token=...)',
        "```",
        "",
        "`AutoPeftModelForCausalLM.from_pretrained(...)` works too once `hpr_peft` is imported. The edit depends "
        "on the input, so it cannot be merged into the base weights.",
        "",
        "## Adapter",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in settings],
        "",
    ]
    fit = config.get("fit_results")
    evaluation = _eval_from(config, eval_results)
    if isinstance(fit, Mapping) and fit:
        shown = {k: v for k, v in fit.items() if k not in ("eval_results", "evaluation", "eval")}
        if shown:
            body += ["## Fit metrics", "", _metrics_markdown(shown), ""]
    if evaluation:
        body += ["## Evaluation", "", _metrics_markdown(evaluation), ""]
    body += [
        "## Citation",
        "",
        f"Householder Pseudo-Rotation, Pham & Nguyen, EMNLP 2024 ([arXiv:2409.10053]({PAPER_URL})).",
        "",
        "```bibtex",
        PAPER_BIBTEX,
        "```",
        "",
    ]
    return f"---\n{front}\n---\n\n" + "\n".join(body)


# --------------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------------


def _save_model_to(model: Any, directory: Path, adapter_name: str | None) -> Path:
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
    model.save_pretrained(str(directory), selected_adapters=[adapter_name], safe_serialization=True)
    sub = directory / adapter_name
    return sub if adapter_name != "default" and (sub / CONFIG_NAME).is_file() else directory


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

    Uploads ``adapter_config.json``, ``adapter_model.safetensors``, ``README.md`` (+ ``eval_results.json``)
    and deletes a stale pickle ``adapter_model.bin`` from the branch. Raises HubAccessError (with the fix)
    when the Hub refuses, ValueError/TypeError/FileNotFoundError for bad inputs.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import get_token

    if not isinstance(repo_id, str) or _REPO_ID_RE.fullmatch(repo_id) is None:
        raise ValueError(f"push_to_hub: repo_id={repo_id!r} is not a Hub repo id; use 'namespace/name'")
    if not commit_message:
        raise ValueError("push_to_hub: commit_message must not be empty")
    if token is not None and not isinstance(token, str):
        raise TypeError("push_to_hub: token must be a string (or None to use HF_TOKEN / `hf auth login`)")
    effective_token = token or get_token()
    if not effective_token:
        raise HubAccessError(
            f"cannot push to {repo_id!r}: no Hugging Face token found. Pushing needs a token with write access: "
            "pass token=... (CLI: --token, or set the HF_TOKEN environment variable) or run `hf auth login`. "
            "Create one at https://huggingface.co/settings/tokens."
        )

    api = HfApi(endpoint=endpoint, token=effective_token)
    with tempfile.TemporaryDirectory(prefix="hpr-push-") as tmp_name:
        tmp = Path(tmp_name)
        source_eval: Path | None = None
        if isinstance(model, (str, os.PathLike)):
            source = Path(model).expanduser()
            _check_adapter_dir(source)
            staged = tmp / "adapter"
            staged.mkdir()
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copy2(source / name, staged / name)
            if (source / EVAL_RESULTS_NAME).is_file():
                source_eval = source / EVAL_RESULTS_NAME
        else:
            staged = _save_model_to(model, tmp / "adapter", adapter_name)
        config = _check_adapter_dir(staged)
        if str(config.get("peft_type")) != "HPR":
            raise ValueError(
                f"push_to_hub: {CONFIG_NAME} has peft_type={config.get('peft_type')!r}, not 'HPR'; "
                "this function pushes HPR adapters only"
            )

        evaluation: Mapping[str, Any] | None
        if isinstance(eval_results, (str, os.PathLike)):
            evaluation = _read_json(Path(eval_results))
        elif eval_results is not None:
            evaluation = dict(eval_results)
        elif source_eval is not None:
            evaluation = _read_json(source_eval)
        else:
            evaluation = None
        if evaluation is not None:
            (staged / EVAL_RESULTS_NAME).write_text(json.dumps(evaluation, indent=2, default=str) + "\n")

        card = render_model_card(config, repo_id, base_model=base_model, eval_results=evaluation)
        (staged / CARD_NAME).write_text(card, encoding="utf-8")

        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staged / name))
            for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, EVAL_RESULTS_NAME)
            if (staged / name).is_file()
        ]
        action = "push to"
        try:
            if create_repo:
                api.create_repo(repo_id, private=private, exist_ok=True)
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            existing = api.list_repo_files(repo_id, revision=revision)
            if PICKLE_WEIGHTS_NAME in existing:
                operations.append(CommitOperationDelete(path_in_repo=PICKLE_WEIGHTS_NAME))
            return api.create_commit(
                repo_id,
                operations,
                commit_message=commit_message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )
        except _hub_errors() as err:
            raise _explain(
                err, repo_id=repo_id, action=action, revision=revision, endpoint=endpoint, token_given=True
            ) from err


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


def _fetch_adapter(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    subfolder: str | None,
    endpoint: str | None,
) -> tuple[Path, dict]:
    """Local directory holding adapter_config.json + adapter_model.safetensors (downloaded if a repo id)."""
    local = Path(repo_or_dir).expanduser()
    if subfolder:
        local = local / subfolder
    if local.is_dir():
        return local, _check_adapter_dir(local)
    repo_id = str(repo_or_dir)
    if isinstance(repo_or_dir, os.PathLike) or not _looks_like_repo_id(repo_id):
        raise FileNotFoundError(
            f"{repo_id!r} is neither an existing adapter directory nor a Hub repo id ('namespace/name')"
        )
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    kwargs = dict(
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        subfolder=subfolder,
        local_files_only=local_files_only,
        endpoint=endpoint,
    )
    try:
        config_path = Path(hf_hub_download(repo_id, CONFIG_NAME, **kwargs))
        try:
            hf_hub_download(repo_id, WEIGHTS_NAME, **kwargs)
        except RemoteEntryNotFoundError as err:
            pickle_only = False
            if not local_files_only:
                pickle_name = f"{subfolder}/{PICKLE_WEIGHTS_NAME}" if subfolder else PICKLE_WEIGHTS_NAME
                api = HfApi(endpoint=endpoint)
                pickle_only = api.file_exists(repo_id, pickle_name, revision=revision, token=token)
            if pickle_only:
                raise _refuse_pickle(f"Hub repo {repo_id!r}") from None
            raise FileNotFoundError(
                f"Hub repo {repo_id!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}; it is not a complete adapter"
            ) from err
    except RemoteEntryNotFoundError as err:
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} has no {CONFIG_NAME}"
            + (f" in {subfolder!r}" if subfolder else "")
            + (f" at revision {revision!r}" if revision else "")
            + "; it is not a PEFT adapter repo"
        ) from err
    except _hub_errors() as err:
        raise _explain(
            err,
            repo_id=repo_id,
            action="load",
            revision=revision,
            endpoint=endpoint,
            token_given=isinstance(token, str) and bool(token),
        ) from err
    folder = config_path.parent
    return folder, _check_adapter_dir(folder)


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
    ``adapter_model.safetensors`` (a pickle-only adapter raises ValueError, never unpickled).
    ``base_model=None`` loads ``AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path,
    **base_model_kwargs)``. If ``base_model`` is already a PeftModel, the adapter is added to it under
    ``adapter_name``. Hub failures raise HubAccessError naming the fix.
    """
    _register_hpr()
    from peft import PeftModel

    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError("load_adapter: adapter_name must be a non-empty string")
    folder, config = _fetch_adapter(
        repo_or_dir,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        subfolder=subfolder,
        endpoint=endpoint,
    )
    if base_model is None:
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
        base_model = AutoModelForCausalLM.from_pretrained(base_id, **extra)
    if isinstance(base_model, PeftModel):
        base_model.load_adapter(
            str(folder), adapter_name=adapter_name, is_trainable=is_trainable, **peft_kwargs
        )
        return base_model
    return PeftModel.from_pretrained(
        base_model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, **peft_kwargs
    )


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
