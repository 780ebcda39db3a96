"""Stop a run after its current step with the policy saved: when its launcher asks (Ctrl-C in the run scripts), or
when the Ray head stops answering.

verl has no graceful stop: a Ctrl-C kills the driver and Ray takes every worker with it, so whatever was
trained since the last checkpoint is lost. The run scripts shield the trainer from SIGINT and, on Ctrl-C,
create the file named by POPO_STOP_FILE; after each step the trainer looks for it, saves a checkpoint
(unless the step just saved one) and leaves its loop, so the run ends normally with the policy on disk.

The Ray head's GCS dying (killed, out of memory) does not stop verl's loop: the actor calls go from process to
process, so training goes on, but its output no longer reaches the driver (Ray forwards it through the GCS), and
60 s later (Ray's gcs_rpc_server_reconnect_timeout_s) every Ray process exits, the trainer mid-step or mid-save,
and the steps since the last checkpoint are lost. With POPO_RAY_HEAD_TIMEOUT_S set, the trainer asks the GCS after
each step (one call, answered in a millisecond when it is up; popo_verl/ray_head.py, which also keeps the driver
from spinning while the GCS is gone); without an answer in that many seconds, it saves a checkpoint the same way
and raises a RuntimeError, whose message reaches the driver in the task's reply (no GCS needed). A builtin class
on purpose: the driver unpickles the error, and a class of ours would import this module there, whose import hooks
verl's trainer and so imports verl, which writes to the dead GCS and hangs.

Without POPO_STOP_FILE or POPO_RAY_HEAD_TIMEOUT_S set, nothing changes.
"""

from __future__ import annotations

import functools
import os

from popo_verl.ray_head import gcs_address, head_timeout_s, ray_head_answers

STOP_FILE_ENV = "POPO_STOP_FILE"
STOP_MESSAGE = "popo-verl: stop requested: checkpoint saved at step {step}; training ends here"
HEAD_LOST_MESSAGE = ("popo-verl: the Ray head stopped answering (its GCS at {address} gave no reply in {timeout:g} s) "
                     "after step {step}: checkpoint saved at step {step}; training ends here. Once the cluster is up "
                     "again, the same command resumes from step {step} (trainer.resume_mode=auto)")


def stop_requested() -> bool:
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def _saved_step(trainer) -> int | None:
    tracker = os.path.join(trainer.config.trainer.default_local_dir, "latest_checkpointed_iteration.txt")
    try:
        with open(tracker) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def stop_after_step(trainer) -> bool:
    """If a stop was requested: save (unless this step saved already) and end `fit` after this step.
    If the Ray head does not answer: save the same way, then raise (a RuntimeError: see the module's docstring)."""
    timeout = head_timeout_s()
    head_lost = timeout is not None and not ray_head_answers(timeout)
    if not head_lost and not stop_requested():
        return False
    if _saved_step(trainer) != trainer.global_steps:
        trainer._save_checkpoint()
    if head_lost:
        raise RuntimeError(HEAD_LOST_MESSAGE.format(address=gcs_address(), timeout=timeout, step=trainer.global_steps))
    print(STOP_MESSAGE.format(step=trainer.global_steps), flush=True)
    # verl's fit loop runs while global_steps <= total_training_steps and increments after the step
    trainer.total_training_steps = trainer.global_steps
    return True


def register() -> None:
    """Hook the check into the sync trainer's end of step (verl/trainer/ppo/v1/trainer_sync.py
    `PPOTrainerSync.on_step_end`, which verl's `fit` calls after the step's own checkpoint); POPO's trainer
    and verl's GRPO both run that schedule. Only in a run whose launcher set POPO_STOP_FILE or POPO_RAY_HEAD_TIMEOUT_S
    (our run scripts; Ray's workers inherit them, or get them through the job's runtime_env): any other run keeps
    verl's method. Idempotent."""
    if not os.environ.get(STOP_FILE_ENV) and head_timeout_s() is None:
        return
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    original = PPOTrainerSync.on_step_end
    if getattr(original, "_popo_stop", False):
        return

    @functools.wraps(original)
    def on_step_end(self):
        original(self)
        stop_after_step(self)

    on_step_end._popo_stop = True
    PPOTrainerSync.on_step_end = on_step_end


# Importing this module hooks the trainer (popo_verl/plugin.py relies on it when verl's first import comes from ours).
register()
