"""popo_verl/import_hooks.py: a registration runs when its module has been imported, not before and not twice."""

import importlib
import sys

import pytest

from popo_verl import import_hooks


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh package `hookpkg` whose module `registry` imports `helper` before it defines its entries."""
    root = tmp_path / "hookpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "registry.py").write_text("import hookpkg.helper\nENTRIES = {}\n")
    (root / "helper.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hookpkg"
    for name in [n for n in sys.modules if n.split(".")[0] == "hookpkg"]:
        del sys.modules[name]


def test_the_callback_runs_after_the_module_finished_importing(package):
    seen = []

    def register():
        registry = sys.modules["hookpkg.registry"]
        seen.append(dict(registry.ENTRIES))  # the module's whole body has run
        registry.ENTRIES["ours"] = 1

    import_hooks.when_imported("hookpkg.registry", register)
    import_hooks.when_imported("hookpkg.registry", register)  # asked twice: runs once
    assert seen == [] and "hookpkg.registry" in import_hooks.pending()
    registry = importlib.import_module("hookpkg.registry")
    assert seen == [{}] and registry.ENTRIES == {"ours": 1}
    assert "hookpkg.registry" not in import_hooks.pending()
    assert type(registry.__spec__.loader).__name__ == "SourceFileLoader", "the loader keeps its type"
    import_hooks.when_imported("hookpkg.registry", lambda: seen.append("now"))  # already imported: runs at once
    assert seen[-1] == "now"


def test_a_module_asked_for_while_half_imported_registers_at_the_next_import(package, tmp_path):
    """The callback is asked for from inside the module's own import (what a plugin loaded by verl's __init__ meets):
    its loader cannot be wrapped any more, so the next import anywhere runs it, once the module has finished."""
    (tmp_path / "hookpkg" / "helper.py").write_text(
        "from popo_verl import import_hooks\n"
        "CALLS = []\n"
        "import_hooks.when_imported('hookpkg.registry', lambda: CALLS.append('registered'))\n"
    )
    (tmp_path / "hookpkg" / "later.py").write_text("")
    importlib.import_module("hookpkg.registry")
    helper = sys.modules["hookpkg.helper"]
    assert helper.CALLS == [], "not while the registry was half imported"
    importlib.import_module("hookpkg.later")  # any import of a new module
    assert helper.CALLS == ["registered"]
    importlib.import_module("hookpkg")
    assert helper.CALLS == ["registered"]
