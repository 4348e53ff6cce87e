"""The ``HPR`` PEFT type, in one place: peft's closed ``PeftType`` enum extended, the tuner registered.

``register_peft_method`` only accepts names that are already members of ``PeftType``, and configs are
looked up by ``PeftType`` when ``adapter_config.json`` is loaded, so the enum gets an ``HPR`` member
first. peft's mixed-adapter model (``PeftMixedModel``) cannot host HPR (it dispatches to the tuners built
into peft only); its compatibility check is wrapped so that it says why, and what to do instead
(:data:`MIXED_MODEL_ERROR`). All steps are idempotent; importing :mod:`hpr_peft.tuner` (and so
``import hpr_peft``) runs them.
"""

from __future__ import annotations

from typing import Any

from peft.utils import PeftType

__all__ = ["MIXED_MODEL_ERROR", "PEFT_TYPE_NAME", "ensure_peft_type", "register_hpr"]

PEFT_TYPE_NAME = "HPR"
MIXED_MODEL_ERROR = (
    "HPR cannot be part of a PeftMixedModel: peft's mixed model combines only the tuners built into peft "
    "that wrap linear layers (LoRA, LoHa, LoKr, AdaLoRA, OFT, SHiRA) and cannot host a registered method "
    "that wraps whole decoder blocks. To edit a LoRA fine-tune with HPR, merge the LoRA into the base "
    "weights first: base = PeftModel.from_pretrained(base, lora_dir).merge_and_unload(), then "
    "get_peft_model(base, HPRConfig(...))."
)


def ensure_peft_type() -> PeftType:
    """Add ``HPR`` to peft's closed ``PeftType`` enum (idempotent) and return the member.

    ``register_peft_method`` only accepts names that are already enum members, and configs are
    looked up by ``PeftType`` when loading ``adapter_config.json``. A future peft that defines
    ``HPR`` itself keeps its own member (``register_hpr`` then checks the registered tuner).
    """
    existing = PeftType._member_map_.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing  # type: ignore[return-value]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType  # type: ignore[attr-defined]
    if hasattr(next(iter(PeftType)), "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)  # type: ignore[attr-defined]
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    return member


def register_hpr() -> None:
    """Make ``HPR`` a PEFT method: extend ``PeftType`` and call ``register_peft_method`` (idempotent).

    Safe to call repeatedly and across re-imports of this module. Raises ``RuntimeError`` if peft
    already maps ``HPR`` to a different tuner (e.g. a future peft release with its own HPR).
    """
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    from hpr_peft.tuner.config import HPRConfig
    from hpr_peft.tuner.model import HPRModel

    peft_type = ensure_peft_type()
    _explain_mixed_model_refusal()
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is not None:
        if not _same_class(registered, HPRModel):
            raise RuntimeError(
                f"peft already registers the PEFT type 'HPR' with tuner {registered.__module__}."
                f"{registered.__qualname__}, not hpr_peft's HPRModel: this peft version has its own HPR and "
                "conflicts with hpr_peft. Install a peft version supported by hpr_peft (>=0.21,<0.22)."
            )
        # a re-imported hpr_peft defines new class objects: point the mappings at them
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = HPRModel
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = HPRConfig
        PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = HPRModel.prefix
        return
    register_peft_method(name="hpr", config_cls=HPRConfig, model_cls=HPRModel, prefix=HPRModel.prefix)


def _explain_mixed_model_refusal() -> None:
    """Make peft's ``PeftMixedModel`` refuse HPR with :data:`MIXED_MODEL_ERROR` (its own message only
    lists the compatible types); other configs go through peft's check unchanged."""
    import peft.mixed_model as mixed_model

    check = mixed_model._check_config_compatible
    if getattr(check, "explains_hpr", False):
        return

    def check_config_compatible(peft_config: Any) -> None:
        if str(getattr(peft_config, "peft_type", "")).rsplit(".", 1)[-1] == PEFT_TYPE_NAME:
            raise ValueError(MIXED_MODEL_ERROR)
        check(peft_config)

    check_config_compatible.explains_hpr = True  # type: ignore[attr-defined]
    mixed_model._check_config_compatible = check_config_compatible


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)
