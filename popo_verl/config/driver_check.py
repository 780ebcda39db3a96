"""POPO's settings checked in the driver, before Ray starts.

verl's entry checks its config in the driver (verl/trainer/main_ppo.py `main` -> `validate_config`), but POPO's own
checks would otherwise run only inside the trainer, a Ray actor, after ~40 s of start-up and under a Ray traceback.
Hydra calls this callback before the job's function (`hydra.callbacks` in algorithm/popo.yaml), so it runs for the
runs that compose POPO's config and for no other: nothing of verl's is wrapped. A bad setting ends the run at once
with one line naming the key and exit status 2; so does a checkpoint the workers would refuse (popo_verl/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys

from hydra.experimental.callback import Callback

from popo_verl.config import validate_popo_config

NO_DEVICE = ("popo-verl: no CUDA device on this machine, and the CPU backend is off: set POPO_VERL_CPU=1 to train on "
             "the CPU (scripts/run_tiny_cpu.sh does), or run on a GPU machine")


def refuse(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def verl_problem(config) -> str | None:
    """verl's own check of the config, which its `main` runs right after this callback (verl/trainer/main_ppo.py:
    validate_config), run here first so that a refusal is one line, not a traceback."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its notices come once, from verl's own call
            validate_config(config=copy.deepcopy(config), use_reference_policy=need_reference_policy(config),
                            use_critic=need_critic(config))
    except Exception as e:  # noqa: BLE001 - verl refuses with asserts, ValueErrors and hydra's instantiation errors
        said = " ".join(str(e.__cause__ or e).split())
        if "ppo_mini_batch_size" in said:
            said += (" (data.train_batch_size and actor_rollout_ref.actor.ppo_mini_batch_size count prompts; "
                     "scripts/run_tiny_cpu.sh sets both from TRAIN_BATCH: set TRAIN_BATCH=N instead)")
        return f"verl refuses this configuration: {said}"
    return None


def popo_values_problem(config) -> str | None:
    """What is wrong with `algorithm.popo.*`, in one line, or None (also the run scripts' early check's verdict)."""
    try:
        validate_popo_config(config)
    except ValueError as e:
        return f"invalid configuration: {e}"
    return None


def driver_problem(config) -> str | None:
    """What would stop this POPO run, said in one line, or None."""
    invalid = popo_values_problem(config)
    if invalid:
        return f"popo-verl: {invalid}"
    from popo_verl.checkpoint import resume_problem

    refused = resume_problem(config.trainer)
    if refused:
        return refused
    from popo_verl.cpu.platform import cpu_platform_wanted, cuda_present

    # one node: this machine is where the workers run (a CPU-only head node of a GPU cluster is fine)
    if int(config.trainer.get("nnodes", 1)) == 1 and not cpu_platform_wanted() and not cuda_present():
        return NO_DEVICE
    return None


class DriverCheck(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        problem = driver_problem(config)
        if not problem:
            refused = verl_problem(config)
            problem = f"popo-verl: {refused}" if refused else None
        if problem:
            refuse(problem)
