"""Hydra search-path plugin for popo-verl (found by hydra in the `hydra_plugins` namespace package).

1. `pkg://popo_verl.config` joins the search path, so `+algorithm=popo` finds algorithm/popo.yaml.
2. A config source placed first serves verl's own `ppo_trainer.yaml` / `ppo_megatron_trainer.yaml`
   with `algorithm: null` appended to their defaults (after `_self_`). That makes `algorithm` an
   overridable group, so the spelling our users were promised, `algorithm=popo`, composes. Stock verl
   only has `algorithm@algorithm.rollout_correction` there, and hydra refuses `algorithm=popo`.
   Without `algorithm=` the composed config is unchanged (tests/test_hydra.py compares it with stock).
Both apply only to an application whose own configs are verl's (`python -m verl.trainer.main_ppo`, hydra's
compose API on verl's config package); any other hydra application in the environment keeps its search path.
recipe/popo names its search path in its own config. Set POPO_VERL_HYDRA=0 to disable both.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

SCHEME = "popo-verl"
VERL_CONFIG_PACKAGE = "verl.trainer.config"
SERVED = ("ppo_trainer.yaml", "ppo_megatron_trainer.yaml")


def _enabled() -> bool:
    return os.environ.get("POPO_VERL_HYDRA", "1").strip().lower() not in ("0", "false", "no")


def _group_added_on_command_line() -> bool:
    # `+algorithm=popo` appends its own `algorithm` default; a second one would clash.
    return any(a.startswith("+algorithm=") for a in sys.argv[1:])


class PopoVerlConfigSource(ConfigSource):
    """Serves verl's primary trainer configs with an overridable `algorithm` group; nothing else."""

    @staticmethod
    def scheme() -> str:
        return SCHEME

    def _served(self, config_path: str) -> Optional[str]:
        name = self._normalize_file_name(config_path).lstrip("/")
        return name if name in SERVED else None

    def load_config(self, config_path: str) -> ConfigResult:
        name = self._served(config_path)
        if name is None:
            raise ConfigLoadError(f"Config not found : {config_path}")
        # read from verl's folder, not through importlib.resources: that would import verl (seconds) just to compose
        text = (verl_config_dir() / name).read_text(encoding="utf-8")
        header = ConfigSource._get_header_dict(text[:512])
        cfg = OmegaConf.create(text)
        defaults = list(cfg.get("defaults", []))
        # ppo_megatron_trainer.yaml includes ppo_trainer.yaml (served here too, so it brings the group) and ends its
        # defaults with `override model_engine: megatron`, after which hydra accepts no new group: add none there.
        inherits = any(isinstance(d, str) and f"{d}.yaml" in SERVED for d in defaults)
        if not _group_added_on_command_line() and not inherits:
            defaults.append({"algorithm": None})
            cfg.defaults = defaults
        return ConfigResult(config=cfg, path=f"{SCHEME}://{self.path}", provider=self.provider, header=header)

    def available(self) -> bool:
        folder = verl_config_dir()
        return folder is not None and (folder / SERVED[0]).is_file()

    def is_group(self, config_path: str) -> bool:
        return False

    def is_config(self, config_path: str) -> bool:
        return self._served(config_path) is not None

    def list(self, config_path: str, results_filter: Optional[ObjectType]) -> List[str]:
        if config_path.strip("/") or results_filter not in (None, ObjectType.CONFIG):
            return []
        return sorted(n[: -len(".yaml")] for n in SERVED)


def verl_config_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("verl")  # finds, does not import
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "trainer" / "config"


def _is_verl_app(search_path: ConfigSearchPath) -> bool:
    """True when one of the application's own config paths is verl's trainer config package."""
    verl_dir = verl_config_dir()
    for element in search_path.get_path():
        path = element.path or ""
        if path.rstrip("/") in (f"pkg://{VERL_CONFIG_PACKAGE}", "pkg://" + VERL_CONFIG_PACKAGE.replace(".", "/")):
            return True
        if "://" in path and not path.startswith("file://"):
            continue
        local = Path(path[len("file://"):] if path.startswith("file://") else path)
        if verl_dir is not None and local.is_dir() and local.resolve() == verl_dir:
            return True
    return False


class PopoVerlSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if not _enabled() or not _is_verl_app(search_path):
            return
        search_path.prepend(provider="popo-verl", path=f"{SCHEME}://{VERL_CONFIG_PACKAGE}")
        search_path.append(provider="popo-verl", path="pkg://popo_verl.config")
