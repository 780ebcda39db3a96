"""Installing popo-verl changes nothing for a verl run that does not ask for POPO or the CPU backend.

Each check runs a fresh interpreter twice, with the plugin and with verl's own switch that skips plugins
(VERL_USE_EXTERNAL_PLUGINS=none), on an environment without POPO_VERL_CPU, VERL_PLATFORM or POPO_STOP_FILE: what a
verl user who installed popo-verl next to verl has. verl's own CPU tests are the wider judge (tests/verl_own/run.py,
a CI step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from popo_verl.plugin import ENV_SWITCHES as OUR_SWITCHES
from popo_verl.plugin import WITHOUT_POPO_VERL as WITHOUT_PLUGIN


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OUR_SWITCHES and k not in WITHOUT_PLUGIN}
    env.update(extra or {})
    return env


def _python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(env_extra), capture_output=True,
                       text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_import_verl_loads_only_the_plugin_and_prints_nothing_new():
    """`import verl` once loaded ~1,500 more modules with the plugin (verl's workers, engines and agent loop: +55 %
    CPU time) and printed 5 "engine is not available" warnings. Now the plugin adds its own few modules only."""
    code = """
        import json, sys
        import verl
        print(json.dumps(sorted(sys.modules)))
    """
    with_plugin, without = _python(code), _python(code, WITHOUT_PLUGIN)
    added = set(json.loads(with_plugin.stdout)) - set(json.loads(without.stdout))
    assert added and all(m.split(".")[0] == "popo_verl" for m in added), sorted(added)
    assert len(added) <= 10, sorted(added)
    assert with_plugin.stderr == without.stderr


_VERL_AS_IT_IS = """
    import json, os
    import hydra, torch.distributed.fsdp as torch_fsdp
    import verl
    import verl.trainer.main_ppo as main_ppo
    import verl.utils.config as verl_config
    import verl.utils.distributed as distributed
    from verl.experimental.agent_loop import agent_loop
    from verl.plugin.platform import get_platform
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.v1 import replay_buffer
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
    from verl.workers import engine_workers
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    from verl.utils.flops_counter import get_device_flops

    OUR_ESTIMATORS = ("popo", "psr", "nsr", "w_reinforce")  # POPO's, and the exploration study's baselines

    def wrapped(fn):
        return hasattr(fn, "__wrapped__")

    def answer(fn):
        try:
            return fn()
        except Exception as e:  # verl's CUDA platform on a machine without one: the same error either way
            return type(e).__name__

    verl_side = {
        "platform": get_platform().device_name,
        "flops": answer(get_device_flops),
        "validate_config wrapped": wrapped(verl_config.validate_config) or main_ppo.validate_config is not verl_config.validate_config,
        "on_step_end wrapped": wrapped(PPOTrainerSync.on_step_end),
        "replay buffer __init__ wrapped": wrapped(replay_buffer.ReplayBuffer.__init__),
        "agent loop's hydra": agent_loop.hydra is hydra,
        "CPUOffloadPolicy": f"{torch_fsdp.CPUOffloadPolicy.__module__}.{torch_fsdp.CPUOffloadPolicy.__qualname__}",
        "process group init wrapped": wrapped(distributed.initialize_global_process_group_ray)
                                      or wrapped(engine_workers.initialize_global_process_group_ray),
        "env": {k: os.environ.get(k) for k in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "TQ_NUM_THREADS")},
        "vllm rollout": base._ROLLOUT_REGISTRY[("vllm", "async")],
        "advantage estimators": sorted(k for k in core_algos.ADV_ESTIMATOR_REGISTRY if k not in OUR_ESTIMATORS),
        "policy losses": sorted(k for k in core_algos.POLICY_LOSS_REGISTRY if k != "popo"),
        "trainers": sorted(k for k in TRAINER_REGISTRY if k != "popo"),
    }
    ours = {
        "our estimators": all(k in core_algos.ADV_ESTIMATOR_REGISTRY for k in OUR_ESTIMATORS),
        "popo loss": "popo" in core_algos.POLICY_LOSS_REGISTRY,
        "popo trainer": "popo" in TRAINER_REGISTRY,
        "hf rollout": ("hf", "async") in base._ROLLOUT_REGISTRY and "hf" in RolloutReplicaRegistry._registry,
    }
    print(json.dumps({"verl": verl_side, "ours": ours}, default=str))
"""


def test_verl_runs_without_popo_see_verls_own_functions():
    """Every change popo-verl makes to verl applies only to POPO's runs (hydra's callback named by
    algorithm/popo.yaml), the CPU backend's (POPO_VERL_CPU=1) or the Ctrl-C stop's (POPO_STOP_FILE). Without them,
    once verl has imported everything a run imports, verl's functions, platform, environment and registries are the
    ones it has without the plugin; the plugin has added its registry entries, under names of its own."""
    with_plugin = json.loads(_python(_VERL_AS_IT_IS).stdout.splitlines()[-1])
    without = json.loads(_python(_VERL_AS_IT_IS, WITHOUT_PLUGIN).stdout.splitlines()[-1])
    assert with_plugin["verl"] == without["verl"]
    assert not any(without["ours"].values())
    assert all(with_plugin["ours"].values()), with_plugin["ours"]
    assert with_plugin["verl"]["validate_config wrapped"] is False and with_plugin["verl"]["agent loop's hydra"] is True


def test_the_stop_hooks_verl_and_ray_only_when_its_launcher_asks():
    """The stop hooks verl's trainer, and the driver's GCS polls pause (popo_verl/ray_head.py), only where the
    launcher asked: POPO_STOP_FILE for the Ctrl-C stop, a positive POPO_RAY_HEAD_TIMEOUT_S for the Ray head's."""
    code = """
        import os
        import ray._raylet as raylet
        from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
        from popo_verl import ray_head, stop
        hooked = lambda: getattr(PPOTrainerSync.on_step_end, "_popo_stop", False)
        pausing = lambda: all(getattr(getattr(raylet, n), "_popo_pausing", False)
                              for n in ("GcsLogSubscriber", "GcsErrorSubscriber"))
        print(hooked(), pausing())
        # the stop when the Ray head dies: asked for by a positive POPO_RAY_HEAD_TIMEOUT_S; 0 is off
        os.environ["POPO_RAY_HEAD_TIMEOUT_S"] = "0"
        stop.register(); ray_head.register()
        print(hooked(), pausing())
        os.environ["POPO_RAY_HEAD_TIMEOUT_S"] = "10"
        stop.register(); ray_head.register()
        print(hooked(), pausing())
    """
    assert _python(code).stdout.split()[-6:] == ["False", "False", "False", "False", "True", "True"]
    # set by the launcher, both are in place once verl is imported (the plugin)
    assert _python(code, {"POPO_RAY_HEAD_TIMEOUT_S": "10"}).stdout.split()[-6:-4] == ["True", "True"]
    # the Ctrl-C stop, hooked at verl's import when the launcher set POPO_STOP_FILE; Ray as it is
    assert _python(code, {"POPO_STOP_FILE": "/nonexistent/stop"}).stdout.split()[-6:-4] == ["True", "False"]


def test_the_cpu_backend_changes_verl_when_asked_for():
    """The other side of the switch: with POPO_VERL_CPU=1 the changes are there (each is pinned against verl's
    source in tests/test_verl_pins.py)."""
    r = json.loads(_python(_VERL_AS_IT_IS, {"POPO_VERL_CPU": "1"}).stdout.splitlines()[-1])["verl"]
    assert r["platform"] == "cpu" and r["replay buffer __init__ wrapped"] and not r["agent loop's hydra"]
    assert r["process group init wrapped"] and r["CPUOffloadPolicy"].startswith("popo_verl.")
    assert r["env"]["VERL_PLATFORM"] == "cpu" and r["env"]["VERL_ENGINE_DEVICE"] == "cuda" and r["env"]["TQ_NUM_THREADS"]
    assert r["vllm rollout"] == "popo_verl.rollout.vllm_cpu.CPUvLLMServerAdapter"
    assert r["validate_config wrapped"] is False, "POPO's driver check is hydra's callback, on every platform"


def test_the_search_path_plugin_leaves_other_hydra_apps_alone(tmp_path):
    """hydra loads every plugin in the environment: ours once added two search-path entries to every hydra
    application. Now only to an application whose configs are verl's."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "app.yaml").write_text("x: 1\n")
    (tmp_path / "app.py").write_text(textwrap.dedent("""
        import hydra

        @hydra.main(config_path="conf", config_name="app", version_base=None)
        def main(cfg):
            print(cfg)

        main()
    """))
    env = _env()
    other = subprocess.run([sys.executable, str(tmp_path / "app.py"), "--info", "searchpath"], capture_output=True,
                           text=True, env=env, timeout=120)
    verl_app = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "--info", "searchpath"],
                              capture_output=True, text=True, env=env, timeout=300, cwd="/")
    assert other.returncode == 0 and verl_app.returncode == 0, other.stderr[-2000:] + verl_app.stderr[-2000:]
    assert "popo" not in other.stdout and "conf" in other.stdout
    assert "popo-verl" in verl_app.stdout and "pkg://popo_verl.config" in verl_app.stdout


def test_driver_check_refuses_a_popo_run_with_no_device_at_once(monkeypatch):
    """On a one-node run with neither a GPU nor the CPU backend, POPO's run ends in the driver with the fix named,
    instead of failing inside Ray after its start-up; where a GPU is, or the CPU backend is asked for, it goes on."""
    from omegaconf import OmegaConf

    from popo_verl.config import driver_check
    from popo_verl.cpu import platform

    cfg = OmegaConf.create(subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "algorithm=popo", "trainer.default_local_dir=/nonexistent",
         "--cfg", "job"], capture_output=True, text=True, env=_env(), timeout=300, cwd="/", check=True).stdout)
    monkeypatch.setattr(platform, "cuda_present", lambda: False)
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    monkeypatch.setenv("POPO_VERL_CPU", "0")
    assert driver_check.driver_problem(cfg) == driver_check.NO_DEVICE
    cfg.trainer.nnodes = 2  # a CPU-only head node of a GPU cluster
    assert driver_check.driver_problem(cfg) is None
    cfg.trainer.nnodes = 1
    monkeypatch.setenv("POPO_VERL_CPU", "1")
    assert driver_check.driver_problem(cfg) is None
    monkeypatch.setattr(platform, "cuda_present", lambda: True)
    monkeypatch.setenv("POPO_VERL_CPU", "0")
    assert driver_check.driver_problem(cfg) is None
    cfg.algorithm.popo.tau = 3.0
    assert "algorithm.popo.tau" in driver_check.driver_problem(cfg)


GRPO = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.use_kl_loss=true",
        "trainer.total_epochs=2"]


@pytest.mark.parametrize("config_name", ["ppo_trainer", "ppo_megatron_trainer"])
def test_verls_configs_compose_as_without_the_plugin(config_name):
    """`--cfg job` of verl's two trainer configs with GRPO's overrides: byte-identical with and without popo-verl
    (without overrides: tests/test_hydra.py)."""
    overrides = GRPO

    def job(env_extra):
        r = subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", "--config-name", config_name, *overrides,
                            "--cfg", "job"], capture_output=True, text=True, env=_env(env_extra), timeout=300, cwd="/")
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    assert job({}) == job(WITHOUT_PLUGIN)
