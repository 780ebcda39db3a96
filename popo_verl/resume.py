"""Where a run resumes from, found as verl's trainer finds it (verl/trainer/ppo/v1/trainer_base.py `_load_checkpoint`),
and what to say when nothing is left to train there. Torch-free: the override check reads it before verl starts
(popo_verl/config/check.py), the checkpoint check before Ray starts (popo_verl/checkpoint.py), the summary after a run.
"""

from __future__ import annotations

import os

TRACKER = "latest_checkpointed_iteration.txt"


def tracked_step(checkpoint_root) -> int | None:
    """The step verl's tracker file under a checkpoint root names (what `resume_mode=auto` resumes from), or None."""
    try:
        with open(os.path.join(checkpoint_root, TRACKER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def resume_step_dir(trainer_config, cwd: str | None = None) -> str | None:
    """The global_step_N directory the trainer will resume from: resume_mode auto reads the tracker file under
    default_local_dir, resume_path takes resume_from_path; relative paths are under the working directory."""
    cwd = cwd or os.getcwd()
    mode = trainer_config.get("resume_mode", "auto")
    if mode == "auto":
        root = trainer_config.get("default_local_dir")
        step = tracked_step(os.path.join(cwd, root)) if root else None
        if step is None:
            return None
        path = os.path.join(cwd, root, f"global_step_{step}")
    elif mode == "resume_path":
        path = trainer_config.get("resume_from_path")
        if not isinstance(path, str):
            return None
        path = os.path.join(cwd, path)
    else:
        return None
    return path if os.path.isdir(path) else None


def nothing_left_message(checkpoint_root, step: int, lead: str, total: int | None = None) -> str:
    last = f", at or past the last step (trainer.total_training_steps={total})" if total is not None else ""
    return (f"{lead}: {checkpoint_root} already holds step {step}{last}, and a run resumes from its folder "
            "(trainer.resume_mode=auto); train further with a larger trainer.total_training_steps, or start afresh "
            "with another CKPT_DIR (or trainer.resume_mode=disable)")


def nothing_left_to_train(cfg, cwd: str | None = None) -> str | None:
    """The message for a run that would resume (resume_mode auto) at or past its last step: verl would start,
    validate and stop. None where the last step is not set (trainer.total_training_steps) or nothing is resumed."""
    trainer = cfg.get("trainer", {})
    total = trainer.get("total_training_steps")
    if trainer.get("resume_mode", "auto") != "auto" or not total:
        return None
    step_dir = resume_step_dir(trainer, cwd)
    if step_dir is None:
        return None
    root, name = os.path.split(step_dir)
    step = int(name.rsplit("_", 1)[1])
    return nothing_left_message(root, step, "nothing to train", int(total)) if step >= int(total) else None
