"""Every verl 0.9.1 method popo-verl overrides still exists in verl with the parameters ours take.

A verl upgrade that renames or re-signs one of them would silently stop calling our override (the
run would fall back to stock behaviour); this fails first, naming the method.
"""

import inspect

import pytest

import verl  # noqa: F401
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from popo_verl.engines.fsdp import PopoFSDPEngine
from popo_verl.trainer import PopoTrainer
from popo_verl.workers import PopoActorRolloutRefWorker, PopoTrainingWorker

OVERRIDES = [
    (PopoTrainer, PPOTrainerSync, ["_init_resource_pool_mgr", "_compute_ref_log_prob", "_compute_advantage",
                                   "_update_actor", "_build_replay_buffer"]),
    (PopoFSDPEngine, FSDPEngineWithLMHead, ["_build_module", "_build_fsdp_module", "prepare_model_inputs",
                                            "prepare_model_outputs", "forward_step", "optimizer_step",
                                            "get_per_tensor_param", "_gather_and_unpad_packed"]),
    (PopoActorRolloutRefWorker, ActorRolloutRefWorker, ["init_model", "save_checkpoint", "load_checkpoint"]),
    (PopoTrainingWorker, TrainingWorker, ["__init__"]),
]


def _params(fn):
    return [p.name for p in inspect.signature(inspect.unwrap(fn)).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


@pytest.mark.parametrize("ours, base, name", [(o, b, n) for o, b, names in OVERRIDES for n in names],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_overridden_verl_method_exists_with_our_parameters(ours, base, name):
    theirs = getattr(base, name, None)
    assert theirs is not None, f"verl's {base.__name__}.{name} is gone: popo-verl's override would never run"
    if name in vars(ours):
        mine = _params(getattr(ours, name))
        if "*" not in str(inspect.signature(inspect.unwrap(getattr(ours, name)))):
            assert mine == _params(theirs), f"{base.__name__}.{name}: verl takes {_params(theirs)}, we take {mine}"


def test_hooks_we_call_into_exist():
    """Attributes of verl objects the glue reads or sets by name."""
    assert hasattr(ActorRolloutRefWorker, "actor_worker_cls")
    assert hasattr(ActorRolloutRefWorker, "ref_worker_cls")
    assert hasattr(TrainingWorker, "set_loss_fn")
    assert "_autocast_dtype" in inspect.getsource(FSDPEngineWithLMHead._build_fsdp_module)
    assert "pad_size" in inspect.getsource(FSDPEngineWithLMHead.prepare_model_inputs)


def test_replay_buffer_poll_is_shortened_on_the_cpu_backend(monkeypatch):
    """verl's v1 ReplayBuffer sleeps `self.poll_interval` (a 2 s constructor default, not a config key)
    between polls; the CPU backend sets it to 50 ms. Fails if verl renames the attribute or the sleep."""
    from verl.trainer.ppo.v1 import replay_buffer

    from popo_verl.cpu import backend as cpu

    assert inspect.signature(replay_buffer.ReplayBuffer.__init__).parameters["poll_interval"].default == 2.0
    assert "time.sleep(self.poll_interval)" in inspect.getsource(replay_buffer.ReplayBuffer._wait_for_next_poll)
    cpu._fast_replay_buffer_poll()
    cpu._fast_replay_buffer_poll()  # idempotent: wrapped once
    assert replay_buffer.ReplayBuffer.__init__._popo_fast_poll
    assert not getattr(replay_buffer.ReplayBuffer.__init__.__wrapped__, "_popo_fast_poll", False)
    monkeypatch.setenv(cpu.POLL_INTERVAL_ENV, "0.25")
    from omegaconf import OmegaConf

    rb = replay_buffer.ReplayBuffer("sync", OmegaConf.create({}), None, "drop", OmegaConf.create({}), poll_interval=2.0)
    assert rb.poll_interval == 0.25


def test_transfer_queue_threads_follow_the_cores():
    """TransferQueue reads TQ_NUM_THREADS per call from these module globals; the plugin sets them to the
    physical cores (<= 8) so it stops warning on every put/get."""
    import psutil
    import transfer_queue.client as client
    import transfer_queue.storage.simple_storage as storage
    from transfer_queue.utils.common import limit_pytorch_auto_parallel_threads

    cores = psutil.cpu_count(logical=False) or 1
    assert client.TQ_NUM_THREADS == storage.TQ_NUM_THREADS <= max(cores, 1)
    assert "TQ_NUM_THREADS" in inspect.getsource(client) and "target_num_threads" in inspect.signature(
        limit_pytorch_auto_parallel_threads).parameters


def test_checkpoint_layout_and_resume_keys_popo_relies_on():
    """popo_verl/checkpoint.py lists verl's shards by name in its manifest, checks `global_step_N/actor`, prints
    `trainer.resume_mode=resume_path trainer.resume_from_path=...` when it refuses one, and counts on verl writing
    latest_checkpointed_iteration.txt only after the actor's save returned (so resume_mode=auto skips a killed save)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    save, load = (inspect.getsource(getattr(FSDPCheckpointManager, m)) for m in ("save_checkpoint", "load_checkpoint"))
    for kind in ("model", "optim", "extra_state"):
        name = f'f"{kind}_world_size_{{self.world_size}}_rank_{{self.rank}}.pt"'
        assert name in save and name in load, f"verl renamed its {kind} shard: popo_verl.checkpoint.verl_files"
    resume = inspect.getsource(PPOTrainer._load_checkpoint)
    assert 'resume_mode == "resume_path"' in resume and "global_step_folder = self.config.trainer.resume_from_path" in resume
    assert 'local_path=os.path.join(global_step_folder, "actor")' in resume
    trainer_save = inspect.getsource(PPOTrainer._save_checkpoint)
    assert trainer_save.index("self.actor_rollout_wg.save_checkpoint(") < trainer_save.index('"latest_checkpointed_iteration.txt"')
