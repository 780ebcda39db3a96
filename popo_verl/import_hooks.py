"""Run a registration when a module finishes importing, not before.

verl imports every plugin inside `import verl` (verl/__init__.py), and the registries POPO joins live in modules
that pull in thousands of others (verl/trainer/ppo/core_algos.py, the v1 trainer, the rollout registries). Importing
them from the plugin made `import verl` cost +55 % for every user of the environment, POPO or not. So the plugin
only asks to be called back when verl itself imports one of them: a run that never loads the v1 trainer never
registers a POPO trainer, and a plain `import verl` loads nothing of ours but this module and the plugin's.

Python has no post-import hook; a finder first in `sys.meta_path` finds the watched module with the finders after
it and wraps that one loader's `exec_module` (an attribute of the loader instance: its type, and so
`importlib.resources` and `inspect`, see nothing different).
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable

_callbacks: dict[str, list[Callable[[], None]]] = {}


def _loaded(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _run(name: str) -> None:
    for callback in _callbacks.pop(name, ()):
        callback()


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        # a watched module that was half-imported when its callback was asked for has finished by now
        for name in [n for n in _callbacks if _loaded(n)]:
            _run(name)
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module, _exec=exec_module):
            _exec(module)
            _run(fullname)

        loader.exec_module = exec_then_register
        return spec


_FINDER = _AfterImport()


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call `callback()` once `name` has been imported: now if it already has, else right after its import."""
    if _loaded(name):
        callback()
        return
    waiting = _callbacks.setdefault(name, [])
    if callback not in waiting:
        waiting.append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def pending() -> set[str]:
    """Watched modules not imported yet (tests, and the import-cost check)."""
    return set(_callbacks)
