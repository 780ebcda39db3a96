"""verl plugin entry point (`verl.plugins` group: `popo = popo_verl.plugin`).

verl imports every `verl.plugins` entry point in every process that imports verl
(verl/__init__.py), but logs a failure only at DEBUG level. A half-installed POPO must not
silently train something else, so a failure here prints its traceback to stderr and re-raises.

Installing popo-verl must change nothing for a run that does not ask for POPO or the CPU backend, so this module
registers lazily (each registry entry when verl imports that registry: popo_verl/import_hooks.py) and patches nothing
by itself: the CPU backend's changes need POPO_VERL_CPU=1, the Ctrl-C stop needs POPO_STOP_FILE, the stop when the
Ray head dies POPO_RAY_HEAD_TIMEOUT_S (README, "What popo-verl changes in verl").
"""

from __future__ import annotations

import importlib
import logging
import sys
import traceback

from popo_verl.import_hooks import when_imported

logger = logging.getLogger(__name__)

#: the environment through which a run asks for popo-verl's changes to verl, or that those changes set
ENV_SWITCHES = ("POPO_VERL_CPU", "VERL_PLATFORM", "VERL_ENGINE_DEVICE", "POPO_STOP_FILE", "POPO_RAY_HEAD_TIMEOUT_S",
                "TQ_NUM_THREADS")
#: verl and hydra as without popo-verl, short of uninstalling it: verl skips its plugins, hydra our search path
WITHOUT_POPO_VERL = {"VERL_USE_EXTERNAL_PLUGINS": "none", "POPO_VERL_HYDRA": "0"}

#: registers itself at the end of its own import, as well as through register_all
BACKEND = "popo_verl.cpu.backend"

#: (verl's or Ray's module, our module, its registering function): each waits for the import of that module
REGISTRATIONS = (
    ("verl.trainer.ppo.core_algos", "popo_verl.algos", "register"),  # advantage estimator and policy loss "popo"
    ("verl.trainer.ppo.v1", "popo_verl.trainer", None),  # trainer mode "popo" (its @register_trainer)
    ("verl.trainer.ppo.v1.trainer_sync", "popo_verl.stop", "register"),  # Ctrl-C / Ray-head stop, asked for only
    ("ray._private.worker", "popo_verl.ray_head", "register"),  # the driver's GCS polls paused while the head is gone
)


def importing_now() -> set[str]:
    """Our modules whose top-level code is running in this process (CPython marks a module's spec
    `_initializing` from the start of its import to its end: importlib._bootstrap._load_unlocked)."""
    return {
        name for name, mod in list(sys.modules.items())
        if name.split(".")[0] == "popo_verl" and name != __name__  # (this module runs register_all at import)
        and getattr(getattr(mod, "__spec__", None), "_initializing", False)
    }


def _import_and_call(module_name: str, function: str | None):
    """A callback that imports one of our modules and calls its registering function. A module of ours whose import
    is under way registers itself at the end of it (verl's first import came from inside that module)."""

    def register_from() -> None:
        if module_name in importing_now():
            return
        module = importlib.import_module(module_name)
        if function:
            getattr(module, function)()

    return register_from


def register_all() -> None:
    """Imports nothing of verl's. The CPU backend registers its platform now where it is asked for, before anything
    asks verl for its platform (verl caches its first answer)."""
    if BACKEND not in importing_now():
        try:
            importlib.import_module(BACKEND).register()
        except ImportError as e:
            if not importing_now():
                raise
            # verl's first import came from inside another module of ours (a Ray worker unpickling a POPO class)
            # that the backend needs: the backend registers at the end of its own import
            logger.debug("popo-verl: the CPU backend registers later (circular import through %s): %s",
                         sorted(importing_now()), e)
    for verl_module, ours, function in REGISTRATIONS:
        when_imported(verl_module, _import_and_call(ours, function))


try:
    register_all()
except Exception:
    print("popo-verl: failed to register the POPO plugin into verl:", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
    raise
