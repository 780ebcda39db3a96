"""verl plugin entry point (`verl.plugins` group: `popo = popo_verl.plugin`).

verl imports every `verl.plugins` entry point in every process that imports verl
(verl/__init__.py), but logs a failure only at DEBUG level. A half-installed POPO must not
silently train something else, so a failure here prints its traceback to stderr and re-raises.
"""

from __future__ import annotations

import os
import sys
import traceback


def _transfer_queue_threads() -> None:
    """TransferQueue (the v1 trainer's data plane) asks torch for TQ_NUM_THREADS=8 threads on every put/get and,
    on a machine with fewer physical cores, logs a warning each time: thousands of lines per step through Ray's
    log forwarding on 2 cores, and measurable CPU. Ask for the cores that exist (read once, at TQ's import;
    Ray workers inherit it from the driver)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        cores = os.cpu_count() or 1
    os.environ.setdefault("TQ_NUM_THREADS", str(max(1, min(8, cores))))
    threads = int(os.environ["TQ_NUM_THREADS"])
    # verl imports TransferQueue before its plugins: its modules read the constant per call, so set it there too
    # (transfer_queue/client.py, transfer_queue/storage/simple_storage.py: TQ_NUM_THREADS).
    for name in ("transfer_queue.client", "transfer_queue.storage.simple_storage"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "TQ_NUM_THREADS"):
            mod.TQ_NUM_THREADS = threads


def register_all() -> None:
    _transfer_queue_threads()
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
