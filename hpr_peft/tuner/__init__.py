"""The PEFT tuner: ``HPRConfig``, ``HPRLayer``, ``HPRModel`` and the registration of the ``HPR`` type."""

from hpr_peft.tuner.config import HPRConfig
from hpr_peft.tuner.layer import HPRLayer
from hpr_peft.tuner.model import HPRModel, register_hpr

__all__ = ["HPRConfig", "HPRLayer", "HPRModel", "register_hpr"]
