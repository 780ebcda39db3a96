"""POPO's checkpoint files (popo_verl/checkpoint.py): atomic writes, the manifest check on load, the message that
names the broken file and the checkpoint to resume from instead.

The unit tests save real checkpoints with verl's FSDP2 engine and checkpoint manager in-process (one gloo rank,
no Ray), in the worker's order (PopoActorRolloutRefWorker.save_checkpoint); a run of scripts/run_tiny_cpu.sh
killed in the middle of a save, refused and resumed, is in tests/test_e2e_cpu.py (it shares the killed-worker
test's runs).
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from popo_verl import checkpoint
from test_e2e_cpu import resume_override
from test_engine import build_engine, process_group  # noqa: F401  (process_group: a fixture)

SHARD = "model_world_size_1_rank_0.pt"  # verl's name for rank 0's model shard (the predictor head is in it)
SIAMESE = "popo_siamese/rank_0_of_1.pt"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])




# ------------------------------------------------------------------------------------------------ atomic writes
def test_a_process_killed_while_writing_leaves_the_previous_file(tmp_path):
    """A real kill (os._exit in a child process) halfway through atomic_save's write: the file keeps its old
    content, whole; only the temp file is short."""
    path = tmp_path / "state.pt"
    checkpoint.atomic_save({"step": 1, "w": torch.arange(1000.0)}, str(path))
    child = (
        "import os, sys, torch\n"
        "from popo_verl import checkpoint\n"
        "def half(f):\n"
        "    f.write(b'PK' * 1000); f.flush(); os._exit(9)\n"
        "checkpoint._atomic_write(sys.argv[1], half)\n"
    )
    r = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(1000.0))
    assert (tmp_path / "state.pt.tmp").stat().st_size == 2000


# ------------------------------------------------------------------------------------------------ load checks
@pytest.fixture
def engine(process_group, tiny_random_model):  # noqa: F811
    return build_engine(tiny_random_model, "fp32")


def save(engine, actor_dir: Path, ema_steps: int) -> dict:
    """PopoActorRolloutRefWorker.save_checkpoint's order: begin, verl's save, commit."""
    state = {"siamese": {"w": torch.full((3,), float(ema_steps))}, "ema_steps": ema_steps}
    checkpoint.begin(str(actor_dir), 0, 1)
    engine.save_checkpoint(str(actor_dir), global_step=ema_steps)
    checkpoint.commit(str(actor_dir), 0, 1, state)
    return state


def load(engine, actor_dir: Path):
    return checkpoint.load(str(actor_dir), 0, 1, partial(engine.load_checkpoint, str(actor_dir)))


@pytest.fixture
def two_checkpoints(engine, tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        save(engine, root / f"global_step_{step}" / "actor", step)
    return root


def test_a_complete_checkpoint_loads_the_actor_and_returns_the_siamese_state(engine, tmp_path):
    actor = tmp_path / "global_step_3" / "actor"
    params = dict(engine.module.named_parameters())
    name = next(n for n in params if n.startswith("popo_predictor."))  # the head is saved with the actor
    saved = params[name].full_tensor().clone()
    state = save(engine, actor, 3)
    with torch.no_grad():
        params[name].add_(1.0)
    got = load(engine, actor)
    assert got["ema_steps"] == 3 and torch.equal(got["siamese"]["w"], state["siamese"]["w"])
    assert torch.equal(dict(engine.module.named_parameters())[name].full_tensor(), saved)


def test_a_checkpoint_without_siamese_warns_and_restarts_the_siamese_from_the_actor(engine, tiny_random_model, tmp_path):
    """A checkpoint of a non-POPO run (or saved with another number of ranks): the actor loads, and the siamese
    restarts from the actor's weights with a warning (the worker's load_checkpoint, through SiameseEma.restore)."""
    import shutil

    from popo_verl.engines.fsdp import FsdpSiamese
    from popo_verl.siamese_ema import SiameseEma

    ema = SiameseEma(FsdpSiamese(engine, build_engine(tiny_random_model, "fp32", forward_only=True)), tau=0.9)
    with torch.no_grad():
        for xi in ema.siamese.pairs()[0]:
            xi.add_(1.0)  # the siamese away from the actor
    actor = tmp_path / "global_step_1" / "actor"
    save(engine, actor, 1)
    shutil.rmtree(actor / "popo_siamese")
    state = load(engine, actor)
    assert state is None
    assert ema.siamese.distance_sq().item() > 0
    with pytest.warns(UserWarning, match=r"no siamese state in .*: the siamese restarts from the actor's weights"):
        ema.restore(state, str(actor / "popo_siamese"))
    assert ema.siamese.distance_sq().item() == 0


def test_truncated_actor_shard_names_the_file_and_the_previous_checkpoint(engine, two_checkpoints):
    """Without the check, verl's checkpoint manager fails inside torch.load (EOFError, OSError or "failed finding
    central directory", by where the file ends), naming no file."""
    actor = two_checkpoints / "global_step_2" / "actor"
    truncate(actor / SHARD)
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(engine, actor)
    msg = str(err.value)
    assert f"cannot resume from checkpoint {two_checkpoints / 'global_step_2'}:" in msg
    assert f"{actor / SHARD} is truncated or overwritten" in msg
    assert msg.rstrip().endswith(resume_override(two_checkpoints, 1))


def test_truncated_siamese_names_the_file(engine, two_checkpoints):
    actor = two_checkpoints / "global_step_2" / "actor"
    truncate(actor / SIAMESE, keep=0.0)  # the old code's torch.load said a bare EOFError
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(engine, actor)
    assert f"{actor / SIAMESE} is truncated or overwritten: 0 bytes" in str(err.value)
    assert resume_override(two_checkpoints, 1) in str(err.value)


def test_without_an_earlier_complete_checkpoint_it_says_to_start_fresh(engine, two_checkpoints):
    truncate(two_checkpoints / "global_step_2" / "actor" / SIAMESE)
    truncate(two_checkpoints / "global_step_1" / "actor" / "optim_world_size_1_rank_0.pt")
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(engine, two_checkpoints / "global_step_2" / "actor")
    msg = str(err.value)
    assert "trainer.resume_mode=disable" in msg and "resume_from_path" not in msg, "step 1 is broken too"
    assert f"{SIAMESE} is truncated" in msg


def test_a_save_that_did_not_finish_is_refused(engine, two_checkpoints):
    """verl's shards complete, POPO's files not: the worker died before the manifest (the e2e test does it for real)."""
    actor = two_checkpoints / "global_step_2" / "actor"
    (actor / "popo_siamese" / "manifest_rank_0_of_1.json").unlink()
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(engine, actor)
    assert "manifest_rank_0_of_1.json is missing: the save of this checkpoint did not finish" in str(err.value)
    assert resume_override(two_checkpoints, 1) in str(err.value)


def test_the_driver_finds_the_checkpoint_to_resume_as_verls_trainer_does(two_checkpoints, tmp_path):
    """resume_problem: the refusal the workers would raise, before Ray starts, for the checkpoint verl's trainer
    would pick (the tracker file under default_local_dir for auto, resume_from_path, relative to the cwd)."""
    from omegaconf import OmegaConf

    def trainer(**kw):
        return OmegaConf.create({"resume_mode": "auto", "default_local_dir": "ckpt", "resume_from_path": None,
                                 "nnodes": 1, "n_gpus_per_node": 1, **kw})

    (two_checkpoints / "latest_checkpointed_iteration.txt").write_text("2")
    assert checkpoint.resume_problem(trainer(), cwd=str(tmp_path)) is None, "both checkpoints are complete"
    truncate(two_checkpoints / "global_step_2" / "actor" / SIAMESE)
    msg = checkpoint.resume_problem(trainer(), cwd=str(tmp_path))
    assert msg and f"{SIAMESE} is truncated" in msg and msg.rstrip().endswith(resume_override(two_checkpoints, 1))
    assert checkpoint.resume_problem(trainer(resume_mode="disable"), cwd=str(tmp_path)) is None
    by_path = trainer(resume_mode="resume_path", resume_from_path="ckpt/global_step_1")
    assert checkpoint.resume_problem(by_path, cwd=str(tmp_path)) is None
    # two ranks: rank 0's manifest is there, rank 1's is not (a checkpoint of a 1-rank run, resumed on 2)
    two_ranks = trainer(resume_mode="resume_path", resume_from_path=str(two_checkpoints / "global_step_1"), n_gpus_per_node=2)
    assert "manifest_rank_0_of_2.json is missing" in checkpoint.resume_problem(two_ranks)
    (two_checkpoints / "latest_checkpointed_iteration.txt").write_text("7")  # a tracker naming no directory
    assert checkpoint.resume_problem(trainer(), cwd=str(tmp_path)) is None, "verl trains from scratch then"


def test_saving_again_into_a_complete_checkpoint_withdraws_its_manifest_first(engine, two_checkpoints):
    """A resumed run saves global_step_2 again while the tracker still names it: until the new save commits, the
    old manifest must not vouch for a mix of new and old files (same sizes, so a size check alone would pass)."""
    actor = two_checkpoints / "global_step_2" / "actor"
    assert checkpoint.problem(str(actor), 0, 1) is None
    checkpoint.begin(str(actor), 0, 1)
    engine.save_checkpoint(str(actor), global_step=2)  # killed here, before commit
    assert "did not finish" in checkpoint.problem(str(actor), 0, 1)


def test_a_checkpoint_without_a_manifest_names_the_broken_file_when_loading_fails(engine, tmp_path):
    """A checkpoint saved before manifests (or by a non-POPO run): loaded as before, but a truncated file that makes
    the load fail is named."""
    root = tmp_path / "ckpt"
    actor = root / "global_step_1" / "actor"
    engine.save_checkpoint(str(actor), global_step=1)
    assert load(engine, actor) is None  # no POPO files: the worker restarts the siamese from the actor, with a warning
    truncate(actor / SHARD)
    with pytest.raises(checkpoint.CheckpointError) as err:
        load(engine, actor)
    assert f"{actor / SHARD} is truncated or damaged (" in str(err.value)  # torch's own error follows
    assert "trainer.resume_mode=disable" in str(err.value)


def test_a_failure_that_is_not_a_broken_file_is_raised_unchanged(engine, two_checkpoints):
    def fails():
        raise ValueError("size mismatch for model.embed_tokens.weight")

    with pytest.raises(ValueError, match="size mismatch"):
        checkpoint.load(str(two_checkpoints / "global_step_2" / "actor"), 0, 1, fails)
