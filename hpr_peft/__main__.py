"""``python -m hpr_peft`` is the ``hpr-peft`` command line."""

import sys

from hpr_peft.cli import main

sys.exit(main())
