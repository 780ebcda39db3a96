"""Stop a run after its current step with the policy saved, when its launcher asks (Ctrl-C in the run scripts).

verl has no graceful stop: a Ctrl-C kills the driver and Ray takes every worker with it, so whatever was
trained since the last checkpoint is lost. The run scripts shield the trainer from SIGINT and, on Ctrl-C,
create the file named by POPO_STOP_FILE; after each step the trainer looks for it, saves a checkpoint
(unless the step just saved one) and leaves its loop, so the run ends normally with the policy on disk.
Without POPO_STOP_FILE set, nothing changes.
"""

from __future__ import annotations

import functools
import os

STOP_FILE_ENV = "POPO_STOP_FILE"
STOP_MESSAGE = "popo-verl: stop requested: checkpoint saved at step {step}; training ends here"


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
    """If a stop was requested: save (unless this step saved already) and end `fit` after this step."""
    if not stop_requested():
        return False
    if _saved_step(trainer) != trainer.global_steps:
        trainer._save_checkpoint()
    print(STOP_MESSAGE.format(step=trainer.global_steps), flush=True)
    # verl's fit loop runs while global_steps <= total_training_steps and increments after the step
    trainer.total_training_steps = trainer.global_steps
    return True


def register() -> None:
    """Hook the check into the sync trainer's end of step (verl/trainer/ppo/v1/trainer_sync.py
    `PPOTrainerSync.on_step_end`, which verl's `fit` calls after the step's own checkpoint); POPO's trainer
    and verl's GRPO both run that schedule. Only in a run whose launcher set POPO_STOP_FILE (our run scripts; Ray's
    workers inherit it): any other run keeps verl's method. Idempotent."""
    if not os.environ.get(STOP_FILE_ENV):
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
