"""The preference objective: fine-tune HPR editors through the frozen model on answer likelihood.

The paper's objective (:mod:`hpr_peft.fitting.training`) fits each layer's probe and angle net on
cached activations, independently of what the language model then says. :func:`fit_preference`
trains the same editors end to end: for each pair it runs the *edited* model on
``prompt + positive`` and ``prompt + negative`` and minimises

``-logsigmoid(beta · (log p(positive | prompt) − log p(negative | prompt)))``
``+ kl_weight · max(0, mean KL(p_edited || p_unedited) − kl_budget)``

where ``log p`` is the **summed** log-probability of the answer tokens (what TruthfulQA's MC1/MC2
compare) and the KL is over next-token distributions at the prompt tokens (``kl_on="prompts"``) or at
given neutral paragraphs (``kl_on="neutral"``). With ``kl_budget`` 0 every nat of KL costs; a budget
lets the edit spend that much KL for free, which suits a fit whose strength is calibrated to a KL
budget afterwards: an HPR angle is ``π · sigmoid(z)``, so a penalty on all KL can push ``z`` so far
down that no ``alpha`` brings the edit back. The base model is frozen; only the probe, angle net
and gain of the chosen layers learn. Gradients pass the hard gate by the straight-through estimator of
:mod:`hpr_peft.tuner.trainable_edit`; inference keeps the hard gate.

Tokens are cut as the TruthfulQA scorer cuts them (:func:`hpr_peft.data.encoding.encode_pair`). A token
prefix shared by every prompt (TruthfulQA's 6-shot primer) is run once per step without gradients,
with the current editors, and its KV cache read by every row: the values are exactly those of full
forwards; gradients do not flow through the prefix's own edits (``share_prefix=False`` turns it off).

:func:`fit_preference_vectors` gives the additive baseline the same training (BiPO-style): the same
loop trains steering vectors added by :func:`hpr_peft.runtime.steering.additive_steering` instead of
the editors. Which parameters learn and how the edited pass is entered is a :class:`_Trainee`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpr_peft.data.encoding import encode_pair
from hpr_peft.runtime.hooks import HookSet
from hpr_peft.runtime.model_io import (
    ContextFactory,
    HeadGather,
    cache_inputs,
    input_device,
    output_cache,
    pad_token_id,
    stack_contexts,
    unedited_context,
)
from hpr_peft.runtime.progress import progress_bar
from hpr_peft.runtime.steering import additive_steering, check_steering_vectors
from hpr_peft.tuner.model import hpr_tuner

__all__ = [
    "KL_TARGETS",
    "PreferenceEpoch",
    "PreferenceReport",
    "PreferenceSettings",
    "fit_preference",
    "fit_preference_vectors",
    "preference_margins",
]

KL_TARGETS = ("prompts", "neutral")


@dataclass
class PreferenceSettings:
    """Settings of :func:`fit_preference` (``batch_size`` counts pairs; ``beta`` scales the margin
    inside the DPO-style log-sigmoid; ``max_length`` caps the tokens of a row after the shared prefix
    and the tokens of a neutral paragraph; ``kl_budget`` is the mean KL per token, in nats, that the
    penalty lets pass for free; ``freeze_probe`` keeps each editor's probe fixed, so only the
    angle net and gain learn: the gate and, with ``rotation_direction="probe"``, the direction stay
    the paper fit's. Steering vectors have no probe, so it does not change
    :func:`fit_preference_vectors`; ``editor_lr`` is the learning rate of HPR's probes and angle
    nets, None: ``lr``. They read raw hidden states, whose L1 norm is in the thousands on the bundled
    models, so one AdamW step of ``lr`` moves their outputs by up to ``lr · |h|₁``: at 5e-3 that is
    tens of logits per step, which saturates the angle net's sigmoid at 0 or π within an epoch.)"""

    epochs: int = 1
    lr: float = 5e-3
    batch_size: int = 8
    beta: float = 1.0
    kl_weight: float = 1.0
    kl_on: str = "prompts"
    kl_budget: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 256
    share_prefix: bool = True
    freeze_probe: bool = False
    editor_lr: float | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PreferenceSettings.{name} must be a positive int, got {value!r}.")
        for name, low in (("lr", 0.0), ("beta", 0.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= low:
                raise ValueError(
                    f"PreferenceSettings.{name} must be a positive finite number, got {value!r}."
                )
        editor_lr = self.editor_lr
        if editor_lr is not None and (
            isinstance(editor_lr, bool)
            or not isinstance(editor_lr, (int, float))
            or not math.isfinite(editor_lr)
            or editor_lr <= 0
        ):
            raise ValueError(
                f"PreferenceSettings.editor_lr must be a positive finite number or None (None: lr), got {editor_lr!r}."
            )
        zero_means = {"kl_weight": "no KL term", "kl_budget": "every nat of KL costs", "weight_decay": "none"}
        for name, meaning in zero_means.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"PreferenceSettings.{name} must be a finite number >= 0 (0: {meaning}), got {value!r}."
                )
        for name in ("share_prefix", "freeze_probe"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"PreferenceSettings.{name} must be True or False, got {getattr(self, name)!r}."
                )
        if self.kl_on not in KL_TARGETS:
            raise ValueError(
                f"PreferenceSettings.kl_on must be one of {KL_TARGETS} (the pairs' prompt tokens or neutral "
                f"paragraphs), got {self.kl_on!r}."
            )


@dataclass
class PreferenceEpoch:
    """Training means of one epoch (margins in nats of summed answer log-probability) and, with
    validation pairs, the validation preference accuracy and mean margin after it."""

    epoch: int
    loss: float
    margin: float
    kl: float
    accuracy: float
    val_accuracy: float | None = None
    val_margin: float | None = None


@dataclass
class PreferenceReport:
    """What :func:`fit_preference` did: per-epoch metrics, validation before / after, timing."""

    layers: list[int]
    epochs: list[PreferenceEpoch]
    n_pairs: int
    n_val_pairs: int
    shared_prefix_tokens: int
    best_epoch: int | None = None  # 0 = the starting weights were kept
    val_before: dict[str, float] | None = None
    val_after: dict[str, float] | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _EncodedPair:
    prompt: list[int]
    positive: list[int]
    negative: list[int]


def _encode_pairs(tokenizer: Any, pairs: Sequence[Any]) -> list[_EncodedPair]:
    encoded = []
    for pair in pairs:
        prompt, positive = encode_pair(tokenizer, pair.prompt, pair.positive)
        prompt_n, negative = encode_pair(tokenizer, pair.prompt, pair.negative)
        if prompt_n != prompt:  # a context ending in whitespace is cut the same way for both answers
            raise ValueError(f"pair prompt {pair.prompt!r:.60} tokenises differently before its two answers.")
        encoded.append(_EncodedPair(prompt, positive, negative))
    return encoded


def _shared_prefix_length(encoded: Sequence[_EncodedPair]) -> int:
    """Tokens every prompt starts with, leaving at least one prompt token per row."""
    first = encoded[0].prompt
    length = min(len(e.prompt) for e in encoded) - 1
    for e in encoded[1:]:
        common = 0
        while common < length and e.prompt[common] == first[common]:
            common += 1
        length = common
    return max(length, 0)


def _check_lengths(encoded: Sequence[_EncodedPair], prefix: int, max_length: int) -> None:
    longest = max(len(e.prompt) - prefix + max(len(e.positive), len(e.negative)) for e in encoded)
    if longest > max_length:
        raise ValueError(
            f"a pair needs {longest} tokens after the {prefix}-token shared prefix, more than "
            f"max_length={max_length}: raise PreferenceSettings.max_length or shorten the pairs."
        )


# ----------------------------------------------------------------------------------------------------
# Batches


@dataclass
class _Rows:
    """One forward's rows (call tokens after the prefix, right-padded) and where to read logits."""

    input_ids: torch.Tensor  # (R, S)
    attention_mask: torch.Tensor  # (R, S)
    answer: torch.Tensor  # (R, S) bool: positions whose next token is an answer token
    targets: torch.Tensor  # (N,) those next tokens, row-major
    owner: torch.Tensor  # (N,) the row of each
    kl: torch.Tensor  # (R, S) bool: positions whose next-token distribution the KL compares

    def first(self, n: int) -> _Rows:
        """The first ``n`` rows with their KL positions only (for the unedited reference forward)."""
        kl = self.kl[:n]
        return _Rows(
            self.input_ids[:n],
            self.attention_mask[:n],
            torch.zeros_like(kl),
            self.targets[:0],
            self.owner[:0],
            kl,
        )


def _pair_rows(batch: Sequence[_EncodedPair], prefix: int, pad_id: int, kl: bool, device) -> _Rows:
    """Rows ``prompt + positive`` for every pair, then ``prompt + negative`` (KL on the first half)."""
    sequences = [(e.prompt[prefix:], e.positive) for e in batch] + [
        (e.prompt[prefix:], e.negative) for e in batch
    ]
    width = max(len(p) + len(a) for p, a in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros(ids.shape, dtype=torch.bool)
    kl_select = torch.zeros_like(answer)
    targets, owner = [], []
    for row, (prompt, ans) in enumerate(sequences):
        tokens = prompt + ans
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        answer[row, len(prompt) - 1 : len(tokens) - 1] = True
        targets += ans
        owner += [row] * len(ans)
        if kl and row < len(batch):
            kl_select[row, : len(prompt) - 1] = True
    return _Rows(
        ids.to(device),
        mask.to(device),
        answer.to(device),
        torch.tensor(targets, device=device),
        torch.tensor(owner, device=device),
        kl_select.to(device),
    )


def _text_rows(token_lists: Sequence[list[int]], pad_id: int, device) -> _Rows:
    """Rows of neutral text; the KL compares every position that predicts a next real token."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    kl_select = torch.zeros(ids.shape, dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        kl_select[row, : len(tokens) - 1] = True
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return _Rows(
        ids.to(device),
        mask.to(device),
        torch.zeros_like(kl_select).to(device),
        empty,
        empty,
        kl_select.to(device),
    )


# ----------------------------------------------------------------------------------------------------
# Forwards


class _Runner:
    """Runs the model on rows after the shared prefix, the LM head only where logits are needed;
    ``edited`` / ``unedited`` enter the model's edited and unedited states (default: as it stands /
    adapter off)."""

    def __init__(
        self,
        model: nn.Module,
        prefix_ids: list[int],
        hooks: HookSet,
        unedited: ContextFactory | None = None,
        edited: ContextFactory = contextlib.nullcontext,
    ) -> None:
        self.model = model
        self.unedited = unedited or unedited_context(model)
        self.edited = edited
        self.device = input_device(model)
        self.head = HeadGather()
        self.gathered = self.head.attach(model, hooks)
        self.prefix_ids = prefix_ids
        self.unedited_prefix = self.prefix_cache(edited=False)

    @torch.no_grad()
    def prefix_cache(self, edited: bool) -> Any:
        """The KV cache of the shared prefix, edited by the current editors or not; None without one."""
        if not self.prefix_ids:
            return None
        ids = torch.tensor([self.prefix_ids], device=self.device)
        with self.edited() if edited else self.unedited():
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        return output_cache(out)

    def logits(self, rows: _Rows, select: torch.Tensor, cache: Any, edited: bool = True) -> torch.Tensor:
        """Float32 logits ``(N, vocab)`` at the ``select`` positions of ``rows``, row-major, from the
        edited (or unedited) model."""
        mask = rows.attention_mask
        extra: dict[str, Any] = {"use_cache": False}
        if cache is not None:
            cache = copy.deepcopy(cache)
            if rows.input_ids.shape[0] > 1:
                cache.batch_repeat_interleave(rows.input_ids.shape[0])
            prefix = torch.ones(mask.shape[0], len(self.prefix_ids), dtype=mask.dtype, device=mask.device)
            mask = torch.cat([prefix, mask], dim=1)
            extra = cache_inputs(self.model, cache)
        self.head.select = select
        try:
            with self.edited() if edited else self.unedited():
                out = self.model(input_ids=rows.input_ids, attention_mask=mask, **extra)
        finally:
            self.head.select = None
        logits = out.logits[0] if self.gathered else out.logits[select]
        return logits.float()


def _answer_log_probs(logits: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens, ``(R,)``."""
    picked = torch.log_softmax(logits, dim=-1).gather(-1, rows.targets[:, None])[:, 0]
    totals = torch.zeros(rows.input_ids.shape[0], device=logits.device, dtype=picked.dtype)
    return totals.index_add(0, rows.owner, picked)


def _kl(edited_logits: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p_edited || p_unedited)``."""
    if edited_logits.shape[0] == 0:
        return edited_logits.sum() * 0.0
    log_p = torch.log_softmax(edited_logits, dim=-1)
    return (log_p.exp() * (log_p - reference_log_probs)).sum(-1).mean()


# ----------------------------------------------------------------------------------------------------
# The run


@dataclass
class _Trainee:
    """What a preference fit trains and how its edited pass is entered: ``steering`` None means HPR
    editors (the edited model is the model as it stands); otherwise it applies trained steering vectors,
    and the edited model is the model with its adapter off plus these hooks."""

    layers: list[int]
    parameters: list[nn.Parameter]
    steering: ContextFactory | None = None
    reads_hidden_states: list[nn.Parameter] = field(default_factory=list)  # editor_lr's parameters


@dataclass
class _Run:
    """Everything one preference fit works on, checked."""

    model: nn.Module
    layers: list[int]
    parameters: list[nn.Parameter]
    settings: PreferenceSettings
    train: list[_EncodedPair]
    validation: list[_EncodedPair]
    neutral: list[list[int]]
    prefix_ids: list[int]
    pad_id: int
    reads_hidden_states: list[nn.Parameter] = field(default_factory=list)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: the parameters reading hidden states at ``editor_lr`` (when set), the rest at ``lr``."""
        s = self.settings
        if s.editor_lr is None or not self.reads_hidden_states:
            return [{"params": self.parameters}]
        readers = {id(p) for p in self.reads_hidden_states}
        rest = [p for p in self.parameters if id(p) not in readers]
        groups = [{"params": self.reads_hidden_states, "lr": s.editor_lr}]
        return groups + ([{"params": rest}] if rest else [])


def fit_preference(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Any],
    *,
    layers: Sequence[int] | None = None,
    settings: PreferenceSettings | None = None,
    neutral_paragraphs: Sequence[str] | None = None,
    validation_pairs: Sequence[Any] | None = None,
    progress: bool = True,
    adapter_name: str | None = None,
) -> PreferenceReport:
    """Fine-tune the editors of ``layers`` (default: the adapter's selected layers) on the preference
    objective (module docstring); everything else stays frozen.

    ``model`` is a PEFT model with an HPR adapter, usually fitted by :func:`hpr_peft.fit_hpr` first;
    ``pairs`` are :class:`~hpr_peft.data.ContrastivePair` s. With ``validation_pairs`` the validation
    preference accuracy (share of pairs whose positive answer is likelier) and mean margin are measured
    before training and after each epoch, and the best epoch's weights are kept (by accuracy, then
    margin; epoch 0 = the starting weights). ``neutral_paragraphs`` are the texts of
    ``settings.kl_on="neutral"``. The weights are updated in place; requires_grad flags and train/eval
    modes are restored afterwards.
    """
    settings = PreferenceSettings() if settings is None else settings
    settings.validate()
    trainee = _editor_trainee(model, layers, adapter_name, settings.freeze_probe)
    return _fit(model, tokenizer, pairs, trainee, settings, neutral_paragraphs, validation_pairs, progress)


def fit_preference_vectors(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Any],
    vectors: dict[int, torch.Tensor],
    *,
    alpha: float = 1.0,
    settings: PreferenceSettings | None = None,
    neutral_paragraphs: Sequence[str] | None = None,
    validation_pairs: Sequence[Any] | None = None,
    progress: bool = True,
) -> tuple[dict[int, torch.Tensor], PreferenceReport]:
    """Train additive steering vectors on the preference objective (BiPO-style), with the same loop,
    loss, KL, settings and validation as :func:`fit_preference`, so the additive baseline gets the
    training HPR's editors get.

    ``vectors`` ``{decoder block index: (d,) tensor}`` are the starting point (e.g.
    :func:`~hpr_peft.evaluation.baselines.mean_difference_vectors`); the edit is
    :func:`~hpr_peft.runtime.steering.additive_steering` with ``alpha``. ``model`` is a causal LM or a
    PEFT model: its adapter is off in every pass (the edited pass is adapter off + steering, the KL
    reference fully unedited) and none of its weights change. Returns the trained vectors (detached
    float32 copies on the devices of ``vectors``; the inputs are not modified) and the report.
    """
    settings = PreferenceSettings() if settings is None else settings
    settings.validate()
    trainee = _vector_trainee(model, vectors, alpha)
    report = _fit(model, tokenizer, pairs, trainee, settings, neutral_paragraphs, validation_pairs, progress)
    trained = {
        layer: parameter.detach().to(device=vectors[layer].device, dtype=torch.float32).clone()
        for layer, parameter in zip(trainee.layers, trainee.parameters, strict=True)
    }
    return trained, report


def _fit(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Any],
    trainee: _Trainee,
    settings: PreferenceSettings,
    neutral_paragraphs: Sequence[str] | None,
    validation_pairs: Sequence[Any] | None,
    progress: bool,
) -> PreferenceReport:
    """The training run of both public fits: only ``trainee.parameters`` learn."""
    started = time.perf_counter()
    run = _prepare(model, tokenizer, pairs, trainee, settings, neutral_paragraphs, validation_pairs)
    with HookSet() as hooks, _OnlyTheseLearn(model, run.parameters) as learning:
        edited = contextlib.nullcontext
        if trainee.steering is not None:
            edited = stack_contexts(learning.unedited, trainee.steering)
        runner = _Runner(model, run.prefix_ids, hooks, learning.unedited, edited)
        report = _train(run, runner, progress)
    report.seconds = time.perf_counter() - started
    return report


def preference_margins(
    model: Any, tokenizer: Any, pairs: Sequence[Any], batch_size: int = 8, share_prefix: bool = True
) -> torch.Tensor:
    """``log p(positive | prompt) − log p(negative | prompt)`` per pair (summed answer log-probs) under
    ``model`` as it stands, float32 ``(len(pairs),)``."""
    encoded = _encode_pairs(tokenizer, pairs)
    prefix = _shared_prefix_length(encoded) if share_prefix else 0
    with HookSet() as hooks:
        runner = _Runner(model, encoded[0].prompt[:prefix], hooks)
        return _margins(runner, encoded, batch_size, pad_token_id(tokenizer))


def _prepare(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[Any],
    trainee: _Trainee,
    settings: PreferenceSettings,
    neutral_paragraphs: Sequence[str] | None,
    validation_pairs: Sequence[Any] | None,
) -> _Run:
    from hpr_peft.fitting.fit import check_validation_is_held_out

    if pairs is None or len(pairs) == 0:
        raise ValueError("pairs is empty: a preference fit needs contrastive pairs to learn from.")
    if tokenizer is None:
        raise ValueError("tokenizer is required: a preference fit tokenises the pairs.")
    check_validation_is_held_out(pairs, validation_pairs or [])
    train = _encode_pairs(tokenizer, pairs)
    validation = _encode_pairs(tokenizer, validation_pairs or [])
    prefix = _shared_prefix_length(train + validation) if settings.share_prefix else 0
    _check_lengths(train + validation, prefix, settings.max_length)
    neutral = _neutral_tokens(tokenizer, neutral_paragraphs, settings)
    return _Run(
        model,
        trainee.layers,
        trainee.parameters,
        settings,
        train,
        validation,
        neutral,
        train[0].prompt[:prefix],
        pad_token_id(tokenizer),
        trainee.reads_hidden_states,
    )


def _editor_trainee(
    model: Any, layers: Sequence[int] | None, adapter_name: str | None, freeze_probe: bool = False
) -> _Trainee:
    """The layers to train (checked) and their editors' probe (unless ``freeze_probe``), angle-net
    and gain parameters."""
    try:
        tuner = hpr_tuner(model)
    except TypeError:
        raise TypeError(
            f"fit_preference needs a PEFT model with an HPR adapter, got {type(model).__name__}: wrap the base "
            "model with peft.get_peft_model(model, hpr_peft.HPRConfig(...)) (and fit it with fit_hpr) first."
        ) from None
    adapter = tuner.resolve_adapter(adapter_name)
    if adapter not in tuner.active_adapters:
        raise ValueError(f"adapter {adapter!r} is not active: call model.set_adapter({adapter!r}) first.")
    hpr_layers = tuner.hpr_layers(adapter)
    selected = tuner.selected_layers(adapter)
    chosen = selected if layers is None else sorted({int(x) for x in layers})
    outside = [x for x in chosen if x not in hpr_layers]
    if outside:
        raise ValueError(
            f"layers {outside} are not target layers of adapter {adapter!r} (targets: {sorted(hpr_layers)})."
        )
    idle = [x for x in chosen if x not in selected]
    if idle:
        raise ValueError(
            f"layers {idle} do not edit (selected layers: {selected}): an editor that does not edit gets no "
            "gradient. Select them first with model.base_model.set_selected_layers([...])."
        )
    if not chosen:
        raise ValueError("layers is empty: name at least one editing layer to train.")
    readers, gains = [], []
    for index in chosen:
        layer = hpr_layers[index]
        modules = (
            [layer.hpr_angle[adapter]]
            if freeze_probe
            else [layer.hpr_probe[adapter], layer.hpr_angle[adapter]]
        )
        readers += [p for module in modules for p in module.parameters()]
        gains += list(layer.hpr_gain[adapter].parameters())
    return _Trainee(chosen, [*readers, *gains], reads_hidden_states=readers)


def _vector_trainee(model: Any, vectors: dict[int, torch.Tensor], alpha: float) -> _Trainee:
    """Float32 parameter copies of ``vectors`` (checked) and the hooks that add ``alpha`` times them."""
    check_steering_vectors(model, vectors, check_width=True)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha == 0
    ):
        raise ValueError(
            f"alpha must be a finite non-zero number (the vectors learn through alpha * v), got {alpha!r}."
        )
    device = input_device(model)
    layers = sorted(vectors)
    parameters = {
        layer: nn.Parameter(vectors[layer].detach().to(device=device, dtype=torch.float32).clone())
        for layer in layers
    }
    steering = functools.partial(additive_steering, model, parameters, float(alpha), differentiable=True)
    return _Trainee(layers, list(parameters.values()), steering)


def _neutral_tokens(
    tokenizer: Any, paragraphs: Sequence[str] | None, settings: PreferenceSettings
) -> list[list[int]]:
    if settings.kl_on == "prompts":
        if paragraphs:
            raise ValueError(
                "neutral_paragraphs were given but kl_on='prompts': set PreferenceSettings(kl_on='neutral') "
                "to measure the KL on them, or drop them."
            )
        return []
    if settings.kl_weight == 0:
        return []
    tokens = [list(tokenizer(p)["input_ids"])[: settings.max_length] for p in paragraphs or []]
    tokens = [t for t in tokens if len(t) >= 2]
    if not tokens:
        raise ValueError(
            "kl_on='neutral' needs neutral_paragraphs of at least two tokens each, e.g. "
            "hpr_peft.evaluation.load_neutral_paragraphs()."
        )
    return tokens


class _OnlyTheseLearn:
    """Within the block only ``parameters`` require gradients and every module is in eval mode
    (no dropout); the flags and modes of before are restored on exit."""

    def __init__(self, model: nn.Module, parameters: list[nn.Parameter]) -> None:
        self.model = model
        self.parameters = parameters

    def __enter__(self) -> _OnlyTheseLearn:
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.modes = [(m, m.training) for m in self.model.modules()]
        self._freeze()
        self.model.eval()
        return self

    def _freeze(self) -> None:
        for parameter, _ in self.flags:
            parameter.requires_grad_(False)
        for parameter in self.parameters:
            parameter.requires_grad_(True)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """The unedited model; on exit PEFT's ``disable_adapter`` marks every adapter weight trainable
        again, so the weights not trained are frozen anew."""
        with unedited_context(self.model)():
            yield
        self._freeze()

    def __exit__(self, *exc: object) -> None:
        for parameter in self.parameters:
            parameter.grad = None
        for parameter, flag in self.flags:
            parameter.requires_grad_(flag)
        for module, mode in self.modes:
            module.training = mode


# ----------------------------------------------------------------------------------------------------
# Training


def _train(run: _Run, runner: _Runner, progress: bool) -> PreferenceReport:
    s = run.settings
    optimizer = torch.optim.AdamW(run.parameter_groups(), lr=s.lr, weight_decay=s.weight_decay)
    report = PreferenceReport(
        layers=run.layers,
        epochs=[],
        n_pairs=len(run.train),
        n_val_pairs=len(run.validation),
        shared_prefix_tokens=len(run.prefix_ids),
        settings={**asdict(s), "margin": "summed answer log-probability"},
    )
    best = None
    if run.validation:
        report.val_before = _validate(run, runner)
        best = (report.val_before["accuracy"], report.val_before["margin"], 0, _snapshot(run.parameters))
    n_batches = math.ceil(len(run.train) / s.batch_size)
    bar = progress_bar(s.epochs * n_batches, "preference fit", progress, leave=False, mininterval=2.0)
    neutral = _NeutralCycle(run.neutral, s.batch_size)
    for epoch in range(1, s.epochs + 1):
        order = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(s.seed * 1000 + epoch))
        sums = torch.zeros(4)
        for start in range(0, len(run.train), s.batch_size):
            batch = [run.train[i] for i in order[start : start + s.batch_size].tolist()]
            sums += torch.tensor(_step(run, runner, batch, neutral.next(), optimizer)) * len(batch)
            bar.update(1)
        loss, margin, kl, accuracy = (sums / len(run.train)).tolist()
        record = PreferenceEpoch(epoch, loss, margin, kl if s.kl_weight > 0 else None, accuracy)
        if run.validation:
            measured = _validate(run, runner)
            record.val_accuracy, record.val_margin = measured["accuracy"], measured["margin"]
            if (measured["accuracy"], measured["margin"]) > best[:2]:
                best = (measured["accuracy"], measured["margin"], epoch, _snapshot(run.parameters))
        report.epochs.append(record)
    bar.close()
    if best is not None:
        report.best_epoch = best[2]
        _restore(run.parameters, best[3])
        report.val_after = _validate(run, runner)
    return report


def _step(
    run: _Run, runner: _Runner, batch: list[_EncodedPair], neutral: list[list[int]], optimizer: Any
) -> tuple[float, float, float, float]:
    """One optimizer step; returns the batch's (loss, mean margin, KL, preference accuracy)."""
    s = run.settings
    with_prompt_kl = s.kl_on == "prompts" and s.kl_weight > 0
    rows = _pair_rows(batch, len(run.prefix_ids), run.pad_id, with_prompt_kl, runner.device)
    select = rows.answer | rows.kl
    logits = runner.logits(rows, select, runner.prefix_cache(edited=True))
    log_probs = _answer_log_probs(logits[rows.answer[select]], rows)
    margin = log_probs[: len(batch)] - log_probs[len(batch) :]
    loss = -F.logsigmoid(s.beta * margin).mean()
    kl = torch.zeros(())
    if with_prompt_kl:
        half = rows.first(len(batch))
        kl = _kl(logits[rows.kl[select]], _reference_log_probs(runner, half, runner.unedited_prefix))
    elif s.kl_weight > 0:
        text = _text_rows(neutral, run.pad_id, runner.device)
        kl = _kl(runner.logits(text, text.kl, None), _reference_log_probs(runner, text, None))
    total = loss + s.kl_weight * (kl - s.kl_budget).clamp(min=0)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    margin = margin.detach()
    return float(total.detach()), float(margin.mean()), float(kl.detach()), float((margin > 0).float().mean())


@torch.no_grad()
def _reference_log_probs(runner: _Runner, rows: _Rows, cache: Any) -> torch.Tensor:
    """The unedited model's next-token log-probabilities at ``rows.kl``."""
    return torch.log_softmax(runner.logits(rows, rows.kl, cache, edited=False), dim=-1)


@torch.no_grad()
def _margins(runner: _Runner, encoded: Sequence[_EncodedPair], batch_size: int, pad_id: int) -> torch.Tensor:
    cache = runner.prefix_cache(edited=True)
    margins = []
    for start in range(0, len(encoded), batch_size):
        batch = list(encoded[start : start + batch_size])
        rows = _pair_rows(batch, len(runner.prefix_ids), pad_id, False, runner.device)
        log_probs = _answer_log_probs(runner.logits(rows, rows.answer, cache), rows)
        margins.append(log_probs[: len(batch)] - log_probs[len(batch) :])
    return torch.cat(margins).cpu()


def _validate(run: _Run, runner: _Runner) -> dict[str, float]:
    margins = _margins(runner, run.validation, run.settings.batch_size, run.pad_id)
    return {"accuracy": float((margins > 0).float().mean()), "margin": float(margins.mean())}


class _NeutralCycle:
    """Successive batches of neutral token lists, wrapping around (empty when there are none)."""

    def __init__(self, tokens: list[list[int]], batch_size: int) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.position = 0

    def next(self) -> list[list[int]]:
        if not self.tokens:
            return []
        size = min(self.batch_size, len(self.tokens))
        batch = [self.tokens[(self.position + i) % len(self.tokens)] for i in range(size)]
        self.position = (self.position + size) % len(self.tokens)
        return batch


def _snapshot(parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


@torch.no_grad()
def _restore(parameters: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for parameter, value in zip(parameters, values, strict=True):
        parameter.copy_(value)
