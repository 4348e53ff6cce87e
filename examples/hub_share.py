"""Share an HPR adapter through the Hugging Face Hub and load it back, bit for bit.

    python examples/hub_share.py            # offline: a local Hub server (tests/support/hub_server.py)
    HF_TOKEN=hf_... python examples/hub_share.py --repo me/smollm2-formal-hpr   # the real Hub (private repo)

Fits a formal-vs-casual adapter on SmolLM2 (the pairs of examples/data), pushes it with a model card
(``hpr_peft.push_to_hub``), loads it onto a fresh copy of the base model (``hpr_peft.load_adapter``;
``PeftModel.from_pretrained`` works too after ``import hpr_peft``) and checks that the loaded model
gives the same logits. Without ``HF_TOKEN`` it runs against the small Hub-protocol server the test
suite uses, started on 127.0.0.1 (needs this repository's tests/ folder). About a minute on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_HUB = bool(os.environ.get("HF_TOKEN"))
if not REAL_HUB:
    # The local server is on this machine; huggingface_hub reads these at import. A throwaway cache
    # keeps the local repo out of the real Hub cache.
    import tempfile

    os.environ.update(
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_XET="1",
        HF_HOME=tempfile.mkdtemp(prefix="hpr-example-hf-home-"),
        NO_PROXY="127.0.0.1,localhost",
    )

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402

import hpr_peft  # noqa: E402
from hpr_peft import HPRConfig, fit_hpr, load_bundled, load_pairs_jsonl  # noqa: E402

PAIRS = Path(__file__).parent / "data" / "formal_vs_casual.jsonl"
LOCAL_TOKEN = "hf_exampleTOKENforTheLocalHub0123"


def local_hub():
    """The test suite's Hub-protocol server with one user, ``demo``."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from support.hub_server import HubServer

    server = HubServer()
    server.add_user("demo", LOCAL_TOKEN)
    return server


def share(repo: str, token: str, endpoint: str | None) -> None:
    base, tokenizer = load_bundled("smollm2", progress=False)
    fresh_base = copy.deepcopy(base)  # get_peft_model wraps `base` in place
    model = get_peft_model(base, HPRConfig(target_layers="all"))
    fit_hpr(model, tokenizer, load_pairs_jsonl(PAIRS), top_k=3, epochs=3, progress=False)

    commit = hpr_peft.push_to_hub(model, repo, token=token, private=True, endpoint=endpoint)
    print(f"pushed {repo} at commit {commit.oid[:12]} ({commit.commit_url})")
    loaded = hpr_peft.load_adapter(fresh_base, repo, token=token, endpoint=endpoint)

    inputs = tokenizer("Message: Did you get my email?\nReply: yeah got it lol", return_tensors="pt")
    with torch.no_grad():
        expected, actual = model(**inputs).logits, loaded.eval()(**inputs).logits
        with loaded.disable_adapter():
            unedited = loaded(**inputs).logits
    print(f"loaded adapter: layers {loaded.peft_config['default'].selected_layers}")
    print(f"max |logit difference| pushed vs loaded: {float((expected - actual).abs().max()):.3g}")
    print(f"max |logit difference| edited vs unedited: {float((actual - unedited).abs().max()):.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repo", default=None, help="repo id (default demo/smollm2-formal-hpr on the local Hub)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if REAL_HUB:
        if not args.repo:
            parser.error("with HF_TOKEN set, pass --repo YOUR_NAME/REPO (a private repo is created)")
        share(args.repo, os.environ["HF_TOKEN"], endpoint=None)
        return
    with local_hub() as server:
        print(f"no HF_TOKEN: using a local Hub at {server.url}")
        share(args.repo or "demo/smollm2-formal-hpr", LOCAL_TOKEN, endpoint=server.url)


if __name__ == "__main__":
    main()
