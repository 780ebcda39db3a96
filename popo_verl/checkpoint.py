"""POPO's checkpoint files next to verl's actor shards, and the check that refuses a broken checkpoint.

`<root>/global_step_N/actor/` of a POPO run, per rank r of W:
  model_world_size_W_rank_r.pt, optim_..., extra_state_...   verl's FSDPCheckpointManager (plain torch.save);
                                        the predictor head and its optimizer state are in these (it is a
                                        module of the actor, trained by the actor's optimizer)
  popo_siamese/rank_r_of_W.pt           the siamese shard and the EMA state, written atomically
  popo_siamese/manifest_rank_r_of_W.json  written last, atomically: the size of each file above

The manifest is the commit record of rank r's part: a checkpoint with `popo_siamese/` but no manifest is one
whose save did not finish, and a file shorter or longer than its manifest entry was truncated or overwritten.
verl alone does not catch either: it writes `latest_checkpointed_iteration.txt` after every rank's save
returned (verl/trainer/ppo/v1/trainer_base.py `_save_checkpoint`), so `resume_mode=auto` skips a save killed
midway, but not a half-rewritten global_step_N that a resumed run was saving again (the tracker still names N
from the first run), nor a tracker that reached the disk before the shards (no fsync), nor a
`resume_from_path` naming an unfinished one. Such a checkpoint is refused, not skipped: the trainer has already
set its step counter and dataloader from the directory it chose before the worker loads it, so only the user
can pick another one; the error names the file and prints the override that resumes from the previous
complete checkpoint. The driver makes the same check before Ray starts (`resume_problem`, called where
popo_verl/plugin.py checks POPO's config), so the refusal comes in seconds, not after the workers' start-up.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable

import torch
import torch.distributed as dist

from popo_verl.resume import resume_step_dir

POPO_DIR = "popo_siamese"
STEP_DIR = re.compile(r"global_step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which file and what to resume from instead."""


def siamese_file(actor_dir: str, rank: int, world: int) -> str:
    return os.path.join(actor_dir, POPO_DIR, f"rank_{rank}_of_{world}.pt")


def manifest_file(actor_dir: str, rank: int, world: int) -> str:
    return os.path.join(actor_dir, POPO_DIR, f"manifest_rank_{rank}_of_{world}.json")


def verl_files(actor_dir: str, rank: int, world: int) -> list[str]:
    """This rank's shards as verl's FSDPCheckpointManager names them (verl/utils/checkpoint/fsdp_checkpoint_manager.py)."""
    names = (f"{kind}_world_size_{world}_rank_{rank}.pt" for kind in ("model", "optim", "extra_state"))
    return [p for p in (os.path.join(actor_dir, n) for n in names) if os.path.exists(p)]


# ------------------------------------------------------------------------------------------------ reading
def full_model_state(actor_dir) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint's actor folder (actor and head), fp32, from verl's FSDP2 shards (every parameter
    Shard(0) over the ranks): for checks and comparisons on the CPU."""
    files = sorted(glob.glob(os.path.join(actor_dir, "model_world_size_*_rank_*.pt")),
                   key=lambda f: int(f.rsplit("_", 1)[1][:-3]))
    # outside a process group, unpickling each DTensor's mesh logs a torch.compile warning: one line per tensor
    mesh_log = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_log.level
    mesh_log.setLevel(logging.ERROR)
    try:
        shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    finally:
        mesh_log.setLevel(level)
    return {k: torch.cat([getattr(s[k], "_local_tensor", s[k]).float() for s in shards], dim=0) for k in shards[0]}


def full_siamese_state(actor_dir) -> tuple[dict[str, torch.Tensor], dict]:
    """The whole siamese of a checkpoint's actor folder, fp32, from its ranks' shards; and rank 0's EMA state."""
    files = sorted(glob.glob(os.path.join(actor_dir, POPO_DIR, "rank_*_of_*.pt")),
                   key=lambda f: int(os.path.basename(f).split("_")[1]))
    states = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    return {k: torch.cat([s["siamese"][k].float() for s in states], dim=0) for k in states[0]["siamese"]}, states[0]


# ------------------------------------------------------------------------------------------------ writing
def _fsync(path: str) -> None:
    """Flush a file's or a directory's (a rename's) pending writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable) -> None:
    """write(file) into a temp file, fsync, rename over `path`: a kill leaves the old file or none, never a short one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(os.path.dirname(path))


def atomic_save(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def begin(actor_dir: str, rank: int, world: int) -> None:
    """Before verl writes its shards: mark the checkpoint as POPO's and withdraw this rank's old manifest, so a
    save into an existing global_step_N that dies midway is never taken for the complete one it overwrites."""
    os.makedirs(os.path.join(actor_dir, POPO_DIR), exist_ok=True)
    manifest = manifest_file(actor_dir, rank, world)
    if os.path.exists(manifest):
        os.remove(manifest)
        _fsync(os.path.dirname(manifest))


def commit(actor_dir: str, rank: int, world: int, siamese_state: dict, written_by: dict | None = None) -> None:
    """After verl's shards: the siamese file, then the manifest of this rank's files (each flushed to disk first);
    `written_by` (the host and Ray node of the rank) goes into the manifest, for whoever reads a multi-node save."""
    atomic_save(siamese_state, siamese_file(actor_dir, rank, world))
    sizes = {}
    for path in [*verl_files(actor_dir, rank, world), siamese_file(actor_dir, rank, world)]:
        _fsync(path)  # verl's torch.save does not fsync: the manifest must not reach the disk before them
        sizes[os.path.relpath(path, actor_dir)] = os.path.getsize(path)
    manifest = json.dumps({"files": sizes, **({"written_by": written_by} if written_by else {})}, indent=1).encode()
    _atomic_write(manifest_file(actor_dir, rank, world), lambda f: f.write(manifest))


# ------------------------------------------------------------------------------------------------ checking
def problem(actor_dir: str, rank: int, world: int) -> str | None:
    """Why rank r's part of this checkpoint cannot be resumed from, or None (also for a checkpoint without
    POPO files: a non-POPO run's, or one saved before manifests, which loads as it always did)."""
    if not os.path.isdir(os.path.join(actor_dir, POPO_DIR)):
        return None
    manifest = manifest_file(actor_dir, rank, world)
    if not os.path.exists(manifest):
        return (f"{manifest} is missing: the save of this checkpoint did not finish (POPO writes it last), or it was "
                f"made by another number of ranks than this run's {world}")
    with open(manifest) as f:
        sizes = json.load(f)["files"]
    for name, size in sizes.items():
        path = os.path.join(actor_dir, name)
        if not os.path.exists(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} is truncated or overwritten: {os.path.getsize(path)} bytes, saved with {size}"
    return None


def previous_complete(actor_dir: str, rank: int, world: int) -> str | None:
    """The newest global_step_M (M < N) next to this checkpoint whose manifest checks out for this rank."""
    actor_dir = os.path.abspath(actor_dir)
    step_dir = os.path.dirname(actor_dir)
    root, match = os.path.dirname(step_dir), STEP_DIR.search(step_dir)
    if match is None:
        return None
    steps = sorted((int(m.group(1)) for m in map(STEP_DIR.match, os.listdir(root)) if m), reverse=True)
    for step in (s for s in steps if s < int(match.group(1))):
        earlier = os.path.join(root, f"global_step_{step}", os.path.basename(actor_dir))
        if os.path.exists(manifest_file(earlier, rank, world)) and problem(earlier, rank, world) is None:
            return os.path.dirname(earlier)
    return None


def refusal(actor_dir: str, rank: int, world: int, reason: str) -> str:
    step_dir = os.path.dirname(os.path.abspath(actor_dir))
    earlier = previous_complete(actor_dir, rank, world)
    if earlier:
        todo = ("resume from the previous complete checkpoint with the overrides\n"
                f"  trainer.resume_mode=resume_path trainer.resume_from_path={earlier}")
    else:
        todo = (f"no earlier complete checkpoint in {os.path.dirname(step_dir)}: start fresh with the override\n"
                "  trainer.resume_mode=disable")
    return f"POPO: cannot resume from checkpoint {step_dir}: {reason}.\nTo go on, {todo}"


def resume_problem(trainer_config, cwd: str | None = None) -> str | None:
    """The refusal every rank's load would raise for the checkpoint this run resumes from, or None; ranks are
    the trainer's nnodes x n_gpus_per_node (the actor's world in verl's hybrid engine)."""
    step_dir = resume_step_dir(trainer_config, cwd)
    if step_dir is None:
        return None
    actor_dir = os.path.join(step_dir, "actor")
    world = int(trainer_config.get("nnodes", 1)) * int(trainer_config.get("n_gpus_per_node", 1))
    for rank in range(world):
        reason = problem(actor_dir, rank, world)
        if reason:
            return refusal(actor_dir, rank, world, reason)
    return None


def _first_on_any_rank(message: str | None) -> str | None:
    """Every rank raises if any rank's part is broken: one rank loading alone would hang in verl's barriers."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return message
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def load(actor_dir: str, rank: int, world: int, load_verl: Callable[[], None]) -> dict | None:
    """Check the checkpoint, run verl's load, return this rank's siamese state (None if it has none).

    Raises CheckpointError naming the file when the manifest does not check out, or when a file fails to load
    and is no complete torch file (a checkpoint without a manifest; torch says EOFError or "failed finding
    central directory" without a file name)."""
    reason = problem(actor_dir, rank, world)
    message = _first_on_any_rank(reason and refusal(actor_dir, rank, world, reason))
    if message:
        raise CheckpointError(message)
    siamese = siamese_file(actor_dir, rank, world)
    try:
        load_verl()
        return torch.load(siamese, map_location="cpu", weights_only=True) if os.path.exists(siamese) else None
    except Exception as e:
        # torch.save writes a zip archive whose directory is at its end: a short file is no zip
        files = [*verl_files(actor_dir, rank, world), siamese]
        broken = next((p for p in files if os.path.exists(p) and not zipfile.is_zipfile(p)), None)
        if broken is None:
            raise
        reason = f"{broken} is truncated or damaged ({type(e).__name__}: {e})"
        raise CheckpointError(refusal(actor_dir, rank, world, reason)) from e
