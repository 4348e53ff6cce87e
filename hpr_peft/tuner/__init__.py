"""The PEFT tuner: ``HPRConfig``, ``HPRLayer``, ``HPRModel``; importing it registers the ``HPR`` type."""

from hpr_peft.tuner.config import HPRConfig
from hpr_peft.tuner.layer import HPRLayer
from hpr_peft.tuner.model import HPRModel
from hpr_peft.tuner.registration import register_hpr

register_hpr()

__all__ = ["HPRConfig", "HPRLayer", "HPRModel", "register_hpr"]
