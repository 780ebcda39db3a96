"""POPO recipe entry (verl-recipe layout): `python -m recipe.popo.main_popo [hydra overrides]`.

Same as `python -m verl.trainer.main_ppo algorithm=popo`, on the `popo_trainer` config, with a TaskRunner
that imports the POPO plugin itself, so a broken install fails loudly instead of training something else.
"""

from __future__ import annotations

import os

import hydra
import ray

import popo_verl.config as popo_config
from verl.trainer.main_ppo import TaskRunnerV1, run_ppo
from verl.utils.device import auto_set_device

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config")


# TaskRunnerV1 is a Ray actor class (verl/trainer/main_ppo.py): subclass the class underneath it.
@ray.remote(num_cpus=1)
class PopoTaskRunner(TaskRunnerV1.__ray_actor_class__):
    def run(self, config):
        import popo_verl.plugin  # noqa: F401  (raises, with its traceback on stderr, if the install is broken)
        from popo_verl.config import validate_popo_config
        from verl.trainer.ppo.v1 import get_trainer_cls

        validate_popo_config(config)
        get_trainer_cls(config.trainer.v1.trainer_mode)  # "popo" must be registered in this process
        return super().run(config)


@hydra.main(config_path=CONFIG_DIR, config_name="popo_trainer", version_base=None)
def main(config):
    auto_set_device(config)
    popo_config.validate_popo_config(config)
    run_ppo(config, task_runner_class=PopoTaskRunner)


if __name__ == "__main__":
    main()
