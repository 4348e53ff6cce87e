"""Side effects of an edit on ordinary text: perplexity and KL(edited ‖ unedited) on a neutral corpus.

A TruthfulQA score alone can look good on a broken model (MC2 0.52 at perplexity 1e8), so every score
is reported beside these two numbers. The corpus is ``hpr_peft/resources/neutral.txt``: plain encyclopedic prose about
everyday topics (bread, bicycles, rivers, ...), one paragraph per sequence (~2.5k tokens in all).
``resources/neutral_heldout.txt`` is a second corpus of the same kind on other topics (soap, bridges,
chess, ...): a KL budget calibrated on the first is checked on it
(``load_neutral_paragraphs(which="heldout")``).

- perplexity: ``exp`` of the mean negative log-likelihood of every real token after the first of each
  paragraph (padding excluded);
- KL: mean over the same positions of ``KL(p_edited ‖ p_unedited)`` of the next-token distributions,
  ``Σ_v p_e(v) (log p_e(v) − log p_u(v))`` in nats.

The unedited log-probabilities are computed once (:meth:`NeutralText.compute_reference`) and kept
(float32, or float16 when they would exceed ``max_reference_bytes``), so each edited configuration
costs one pass over ~2.5k tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import nn

from hpr_peft.runtime.model_io import (
    ContextFactory,
    eval_mode,
    input_device,
    pad_token_id,
    unedited_context,
)

__all__ = ["NeutralText", "SideEffects", "load_neutral_paragraphs", "unedited_context"]


# the bundled neutral corpora: "calibration" is the one side effects are measured (and KL budgets
# calibrated) on; "heldout" is independent prose on other topics, to check a calibrated budget holds
_NEUTRAL_CORPORA = {"calibration": "resources/neutral.txt", "heldout": "resources/neutral_heldout.txt"}


def load_neutral_paragraphs(text: str | None = None, which: str = "calibration") -> list[str]:
    """Paragraphs (blank-line separated) of ``text`` or of a bundled neutral corpus.

    ``which`` chooses the bundled corpus when ``text`` is None: ``"calibration"`` (the default, the one
    :class:`NeutralText` uses) or ``"heldout"`` (same style, other topics, never used for calibration).
    """
    if which not in _NEUTRAL_CORPORA:
        raise ValueError(f"which must be one of {sorted(_NEUTRAL_CORPORA)}, got {which!r}.")
    if text is None:
        path = _NEUTRAL_CORPORA[which]
        text = resources.files("hpr_peft").joinpath(path).read_text(encoding="utf-8")
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    if not paragraphs:
        raise ValueError(
            "text has no non-empty paragraph: give some prose, paragraphs separated by blank lines."
        )
    return paragraphs


@dataclass
class SideEffects:
    """Perplexity on the neutral text and mean KL(edited ‖ unedited) per token (nats)."""

    perplexity: float
    kl: float
    reference_perplexity: float
    n_tokens: int
    kl_max: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "kl": self.kl,
            "kl_max": self.kl_max,
            "reference_perplexity": self.reference_perplexity,
            "n_tokens": self.n_tokens,
        }


class NeutralText:
    """Tokenised neutral corpus + cached unedited log-probabilities; measures any model state.

    Paragraphs are tokenised with the tokenizer's defaults (BOS where the tokenizer adds one), cut to
    ``max_length`` tokens, and batched ``batch_size`` at a time, right-padded.
    """

    def __init__(
        self,
        tokenizer: Any,
        paragraphs: Sequence[str] | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        max_reference_bytes: int = 1 << 30,
    ) -> None:
        if paragraphs is None:
            paragraphs = load_neutral_paragraphs()
        if isinstance(paragraphs, str):
            raise TypeError(
                "paragraphs must be a list of str, not one str: use load_neutral_paragraphs(text)."
            )
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}.")
        self.paragraphs = list(paragraphs)
        self.sequences = [list(tokenizer(p)["input_ids"])[:max_length] for p in self.paragraphs]
        self.sequences = [s for s in self.sequences if len(s) >= 2]
        if not self.sequences:
            raise ValueError("no paragraph has 2 or more tokens: give longer paragraphs.")
        self.pad_id = pad_token_id(tokenizer)
        self.batch_size = batch_size
        self.max_reference_bytes = max_reference_bytes
        self._reference: list[torch.Tensor] | None = None
        self.reference_perplexity = math.nan

    @property
    def has_reference(self) -> bool:
        """Whether :meth:`compute_reference` has run (``measure`` needs it)."""
        return self._reference is not None

    @property
    def n_tokens(self) -> int:
        """Positions scored (every real token but the last of each paragraph predicts the next)."""
        return sum(len(s) - 1 for s in self.sequences)

    def _batches(self, device: torch.device):
        for lo in range(0, len(self.sequences), self.batch_size):
            chunk = self.sequences[lo : lo + self.batch_size]
            L = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), L), self.pad_id, dtype=torch.long, device=device)
            mask = torch.zeros((len(chunk), L), dtype=torch.long, device=device)
            for row, s in enumerate(chunk):
                ids[row, : len(s)] = torch.tensor(s, device=device)
                mask[row, : len(s)] = 1
            # position t predicts token t+1: valid where both t and t+1 are real tokens
            predict = mask[:, :-1].bool() & mask[:, 1:].bool()
            yield ids, mask, predict

    @torch.no_grad()
    def run(self, model: nn.Module) -> None:
        """Forward the corpus through ``model`` as it stands, scoring nothing: for hooks and
        :func:`hpr_peft.tuner.control.monitor`, which watch the passes."""
        with eval_mode(model):
            for ids, mask, _ in self._batches(input_device(model)):
                model(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def _log_probs(self, model: nn.Module, context: ContextFactory | None):
        device = input_device(model)
        with eval_mode(model), context() if context is not None else contextlib.nullcontext():
            for ids, mask, predict in self._batches(device):
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                logp = torch.log_softmax(logits[predict].float(), dim=-1)
                targets = ids[:, 1:][predict]
                yield logp, targets

    def compute_reference(self, model: nn.Module, reference: ContextFactory | None = None) -> float:
        """Compute and keep the unedited log-probabilities (``reference()`` gives the unedited model).

        Returns the reference perplexity.
        """
        stored, nll, count = [], 0.0, 0
        vocab = None
        for logp, targets in self._log_probs(model, reference):
            vocab = logp.shape[-1]
            nll -= float(logp.gather(-1, targets[:, None]).sum())
            count += int(targets.numel())
            stored.append(logp)
        assert vocab is not None
        if self.n_tokens * vocab * 4 > self.max_reference_bytes:
            stored = [s.half() for s in stored]
        self._reference = stored
        self.reference_perplexity = math.exp(nll / count)
        return self.reference_perplexity

    def measure(self, model: nn.Module, context: ContextFactory | None = None) -> SideEffects:
        """Perplexity and KL to the reference of ``model`` inside ``context()``."""
        if self._reference is None:
            raise ValueError(
                "no reference yet: call compute_reference(model, unedited_context(model)) first."
            )
        nll, count, kl_sum, kl_max = 0.0, 0, 0.0, 0.0
        for (logp, targets), ref in zip(self._log_probs(model, context), self._reference, strict=True):
            if ref.shape != logp.shape:
                raise ValueError("the reference was computed with another model or tokenizer: recompute it.")
            nll -= float(logp.gather(-1, targets[:, None]).sum())
            count += int(targets.numel())
            kl = (logp.exp() * (logp - ref.float())).sum(-1).clamp_min(0.0)
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
        return SideEffects(
            perplexity=math.exp(nll / count),
            kl=kl_sum / count,
            reference_perplexity=self.reference_perplexity,
            n_tokens=count,
            kl_max=kl_max,
        )
