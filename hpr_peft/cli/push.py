"""``hpr-peft push DIR REPO``: upload a saved HPR adapter with its model card in one commit.

The token comes from ``--token`` or, better (command lines are visible to other users of the machine),
the ``HF_TOKEN`` environment variable or ``hf auth login``. It is never printed.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory",
        metavar="DIR",
        help="saved adapter directory (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument("repo_id", metavar="REPO", help="Hub repo id, e.g. your-name/smollm2-truthful-hpr")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (if it does not exist)"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Hub write token (default: the HF_TOKEN environment variable or `hf auth login`)",
    )
    parser.add_argument(
        "--revision", default=None, help="branch to commit to (created if missing; default main)"
    )
    parser.add_argument("--commit-message", default=None, help="commit summary")
    parser.add_argument(
        "--base-model",
        default=None,
        help="Hub id of the base model for the card (default: from adapter_config.json)",
    )
    parser.add_argument(
        "--eval-results",
        default=None,
        help="JSON file of evaluation results for the card (default: DIR/eval_results.json)",
    )
    parser.add_argument("--no-create-repo", action="store_true", help="fail if the repo does not exist")
    parser.add_argument(
        "--only-selected-layers",
        action="store_true",
        help="upload only the editors of the selected (editing) layers: a smaller adapter, same logits",
    )
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")


def run(args: argparse.Namespace) -> int:
    from hpr_peft.hub import DEFAULT_COMMIT_MESSAGE, HubAccessError, push_to_hub

    try:
        info = push_to_hub(
            args.directory,
            args.repo_id,
            private=args.private,
            token=args.token or None,
            revision=args.revision,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
            create_repo=not args.no_create_repo,
            base_model=args.base_model,
            eval_results=args.eval_results,
            endpoint=args.endpoint,
            only_selected_layers=args.only_selected_layers,
        )
    except (HubAccessError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"hpr-peft push: error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.directory} to {args.repo_id} (commit {info.oid}): {info.commit_url}")
    return 0
