"""Hydra overrides checked against verl's trainer config in about a second, before verl is imported.

`python -m verl.trainer.main_ppo` imports verl (seconds; tens under load) before hydra composes its config, and a
misspelled key then ends in hydra's several-line message whose hint (`+key=...`) leads to a second failure. The run
scripts call `python -m popo_verl.config check OVERRIDES` first: it composes verl's own `ppo_trainer.yaml` with
hydra's compose API (reading verl's files, importing none of its modules) and says what is wrong in one line, with
the closest known key, exit status 2. POPO's values (`algorithm.popo.*`) are checked as the driver checks them.
A run whose checkpoint folder already holds its last step (a rerun in the same folder resumes there and trains
nothing) is told so by the CLI too (popo_verl/resume.py), exit status 3, instead of after a minute of verl's start-up.
"""

from __future__ import annotations

import difflib
import re

_UNKNOWN = re.compile(r"Key '([^']+)' is not in struct\s+full_key: (\S+)", re.S)


def _compose(overrides: list[str], config_name: str):
    from hydra import compose, initialize_config_dir

    from hydra_plugins.popo_verl_searchpath import verl_config_dir  # found, not imported: verl stays out

    folder = verl_config_dir()
    if folder is None:
        raise SystemExit("verl is not installed here: pip install -e . installs verl 0.9.1")
    with initialize_config_dir(config_dir=str(folder), version_base=None, job_name="popo_verl_check"):
        return compose(config_name=config_name, overrides=list(overrides))


#: hydra's command-line flags that take a value (hydra/_internal/utils.py get_args_parser)
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


#: hydra's flags that print (the config, help, ...) and run no job: its callbacks, POPO's driver check among them, never run
_NO_JOB_FLAGS = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}


def launches(args: list[str]) -> bool:
    """Whether verl.trainer.main_ppo with these arguments runs the job (not `--cfg job`, `--help`, ...)."""
    return not any(a.partition("=")[0] in _NO_JOB_FLAGS for a in args if a.startswith("-"))


def split_hydra_args(args: list[str]) -> tuple[list[str], str | None]:
    """(the overrides, the config's name) of a verl.trainer.main_ppo command line; the name is None for a config
    of the user's own (--config-path / --config-dir), which this check cannot know."""
    overrides, name, i = [], "ppo_trainer", 0
    while i < len(args):
        a = args[i]
        flag, eq, value = a.partition("=")
        if a.startswith("-"):
            if not eq and flag in _FLAGS_WITH_VALUE and i + 1 < len(args):
                value, i = args[i + 1], i + 1
            if flag in ("--config-name", "-cn"):
                name = value
            elif flag in ("--config-path", "-cp", "--config-dir", "-cd"):
                return overrides, None
        elif eq:
            overrides.append(a)
        i += 1
    return overrides, name


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def closest_keys(cfg, full_key: str) -> list[str]:
    """Known keys next to `full_key` (same parent) that look like it, closest first."""
    from omegaconf import OmegaConf

    parent, _, leaf = full_key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if node is None or not hasattr(node, "keys"):
        return []
    prefix = f"{parent}." if parent else ""
    return [prefix + k for k in difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=3, cutoff=0.6)]


def unknown_key_message(cfg_without, full_key: str) -> str:
    near = closest_keys(cfg_without, full_key)
    hint = f": did you mean {' or '.join(near)}?" if near else ""
    if full_key.startswith("algorithm.popo."):  # POPO's keys are all known: a new one is a typo, never a +key
        return f"unknown config key {full_key}{hint} (POPO's keys: README, Configuration)"
    return (f"unknown config key {full_key}{hint} (a key that verl's config does not have at all takes a leading +, "
            "as in +" + full_key + "=...)")


def problem(overrides: list[str], config_name: str = "ppo_trainer", values: bool = True) -> str | None:
    """What is wrong with these overrides, in one line, or None. `values`: POPO's values checked too, as the driver
    checks them when the job runs (not for `--cfg job`, which composes and prints only)."""
    return checked(overrides, config_name, values)[1]


def checked(overrides: list[str], config_name: str = "ppo_trainer", values: bool = True):
    """(the composed config or None, what is wrong in one line or None)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = _compose(overrides, config_name)
    except (HydraException, OmegaConfBaseException) as e:
        text = f"{e}\n{e.__cause__ or ''}"
        unknown = _UNKNOWN.search(text)
        if unknown:
            full_key = unknown.group(2)
            rest = [o for o in overrides if _key_of(o) != full_key]
            try:
                return None, unknown_key_message(_compose(rest, config_name), full_key)
            except (HydraException, OmegaConfBaseException):
                return None, unknown_key_message(None, full_key)
        return None, " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if values and cfg.get("algorithm", {}).get("popo") is not None:
        from popo_verl.config.driver_check import popo_values_problem

        return cfg, popo_values_problem(cfg)
    return cfg, None
