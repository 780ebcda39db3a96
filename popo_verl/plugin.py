"""verl plugin entry point (`verl.plugins` group: `popo = popo_verl.plugin`).

verl imports every `verl.plugins` entry point in every process that imports verl
(verl/__init__.py), but logs a failure only at DEBUG level. A half-installed POPO must not
silently train something else, so a failure here prints its traceback to stderr and re-raises.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

logger = logging.getLogger(__name__)

#: the modules whose import registers POPO into verl (each also registers itself at the end of its import)
REGISTERING_MODULES = ("popo_verl.cpu.backend", "popo_verl.algos", "popo_verl.trainer", "popo_verl.stop")  # platform first


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


def _validate_popo_in_driver() -> None:
    """verl's entry (verl/trainer/main_ppo.py `main`) checks the config with `verl.utils.config.validate_config` in
    the driver, before Ray starts; POPO's own checks would otherwise run only in the trainer, inside a Ray actor,
    after ~40 s of start-up and under a Ray traceback. Wrap that function (main_ppo imports it by name after the
    plugins load) so a bad POPO setting ends the run at once: one line naming the key, exit status 2. A checkpoint
    to resume from that the workers would refuse (popo_verl/checkpoint.py) is refused here the same way."""
    import verl.utils.config as verl_config

    if getattr(verl_config.validate_config, "_popo_checked", False):
        return
    verl_validate = verl_config.validate_config

    def validate_config(config, *args, **kwargs):
        algorithm = config.get("algorithm", None) if hasattr(config, "get") else None
        if algorithm is not None and algorithm.get("popo", None) is not None:
            from popo_verl.config import validate_popo_config

            try:
                validate_popo_config(config)
            except ValueError as e:
                print(f"popo-verl: invalid configuration: {e}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            from popo_verl.checkpoint import resume_problem

            refused = resume_problem(config.trainer)
            if refused:
                print(refused, file=sys.stderr, flush=True)
                raise SystemExit(2)
        return verl_validate(config, *args, **kwargs)

    validate_config._popo_checked = True
    verl_config.validate_config = validate_config


def importing_now() -> set[str]:
    """Our modules whose top-level code is running in this process (CPython marks a module's spec
    `_initializing` from the start of its import to its end: importlib._bootstrap._load_unlocked)."""
    return {
        name for name, mod in list(sys.modules.items())
        if name.split(".")[0] == "popo_verl" and name != __name__  # (this module runs register_all at import)
        and getattr(getattr(mod, "__spec__", None), "_initializing", False)
    }


def register_all() -> None:
    _transfer_queue_threads()
    pending = importing_now()
    if pending:
        _register_around(pending)
        return
    from popo_verl.cpu import backend

    backend.register()  # before anything asks verl for its platform (verl caches its first answer)
    _validate_popo_in_driver()
    from popo_verl import algos

    algos.register()
    # Importing the trainer registers trainer mode "popo" (verl's register_trainer decorator).
    from popo_verl import trainer  # noqa: F401
    from popo_verl import stop

    stop.register()


def _register_around(pending: set[str]) -> None:
    """verl is being imported for the first time from inside one of our modules (a Ray worker unpickling a POPO
    class, a script importing a glue module first). Importing the glue now may meet that module half-initialised;
    every registering module registers itself at the end of its own import, so import those that do not wait on
    a pending module now and leave the rest to finish on their own."""
    for name in REGISTERING_MODULES:
        if name in pending:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            if not importing_now():
                raise
            logger.debug("popo-verl: %s registers later (circular import through %s): %s", name, sorted(pending), e)


try:
    register_all()
except Exception:
    print("popo-verl: failed to register the POPO plugin into verl:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    raise
