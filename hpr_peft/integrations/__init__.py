"""Bridges to other tools' own entry points (optional dependencies, imported only when used).

- :mod:`~hpr_peft.integrations.lm_eval`: lm-evaluation-harness on HPR adapters, from Python and its
  command line (``pip install 'hpr_peft[lm-eval]'``).
"""

__all__: list[str] = []
