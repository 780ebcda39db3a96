"""verl plugin entry point (`verl.plugins` group: `popo = popo_verl.plugin`).

verl imports every `verl.plugins` entry point in every process that imports verl
(verl/__init__.py), but logs a failure only at DEBUG level. A half-installed POPO must not
silently train something else, so a failure here prints its traceback to stderr and re-raises.
"""

from __future__ import annotations

import sys
import traceback


def register_all() -> None:
    from popo_verl import algos, cpu

    algos.register()
    cpu.register()
    # Importing the trainer registers trainer mode "popo" (verl's register_trainer decorator).
    from popo_verl import trainer  # noqa: F401


try:
    register_all()
except Exception:
    print("popo-verl: failed to register the POPO plugin into verl:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    raise
