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

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from popo_verl.engines.fsdp import PopoFSDPEngine
from popo_verl.replay_buffer import PositiveGroupsReplayBuffer
from popo_verl.trainer import PopoTrainer
from popo_verl.workers import PopoActorRolloutRefWorker, PopoTrainingWorker

OVERRIDES = [
    (PopoTrainer, PPOTrainerSync, ["_init_resource_pool_mgr", "_compute_ref_log_prob", "_compute_advantage",
                                   "_update_actor", "_build_replay_buffer"]),
    (PopoFSDPEngine, FSDPEngineWithLMHead, ["_build_module", "_build_fsdp_module", "prepare_model_inputs",
                                            "prepare_model_outputs", "forward_step", "optimizer_step",
                                            "get_per_tensor_param", "_gather_and_unpad_packed", "_build_lora_module",
                                            "infer_batch"]),
    (PopoActorRolloutRefWorker, ActorRolloutRefWorker, ["init_model", "save_checkpoint", "load_checkpoint",
                                                        "update_actor", "compute_ref_log_prob"]),
    (PopoTrainingWorker, TrainingWorker, ["__init__"]),
    (PositiveGroupsReplayBuffer, ReplayBuffer, ["_dapo_filtered_keys", "_select_prompt_uids", "sample"]),
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


def test_what_the_lora_siamese_rests_on():
    """Under LoRA the worker builds verl's actor_rollout role (no ref engine, the memory LoRA saves) and sends the ref
    mesh's batches to the actor's engine with the siamese's adapters swapped in (workers.py, engines/fsdp.py)."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine

    init = inspect.getsource(ActorRolloutRefWorker.init_model)
    assert 'if "ref" in self.role:' in init and 'if "actor" in self.role:' in init, "verl picks the engines by role"
    assert "_build_lora_module(module)" in inspect.getsource(FSDPEngine._build_model_optimizer), \
        "verl applies PEFT after _build_module, where the head is attached"
    assert "self.engine.infer_batch(" in inspect.getsource(TrainingWorker.infer_batch)
    assert "self.ref.infer_batch(" in inspect.getsource(ActorRolloutRefWorker.compute_ref_log_prob)


def test_update_actor_keeps_verls_dispatch():
    """The worker's update_actor (which returns POPO's step stats with the update) is dispatched and collected as
    verl's: split over the actor mesh's DP ranks, rank 0's metadata kept. Fails if verl changes the mode."""
    from verl.single_controller.base.decorator import MAGIC_ATTR

    def mode(fn):
        attrs = getattr(fn, MAGIC_ATTR)
        d = attrs["dispatch_mode"]
        return attrs["execute_mode"], attrs["blocking"], {k: (f.func, f.args) for k, f in d.items()}

    assert mode(PopoActorRolloutRefWorker.update_actor) == mode(ActorRolloutRefWorker.update_actor)
    assert mode(PopoActorRolloutRefWorker.compute_ref_log_prob) == mode(ActorRolloutRefWorker.compute_ref_log_prob)
    from verl.utils import tensordict_utils as tu

    # verl's concat of metadata-only outputs (the update's metrics) keeps the first rank's
    a, b = tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"x": 1}}), \
        tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"x": 2}})
    assert tu.get(tu.concat_tensordict([a, b]), "metrics") == {"x": 1}


def test_replay_buffer_poll_is_shortened_on_the_cpu_backend(monkeypatch):
    """verl's v1 ReplayBuffer sleeps `self.poll_interval` (a 2 s constructor default, not a config key)
    between polls; the CPU backend sets it to 50 ms where the caller left the default, and keeps a caller's own
    value (verl's separate-async trainer judges idle steps by it). Fails if verl renames the attribute or the sleep."""
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

    args = ("sync", OmegaConf.create({}), None, "drop", OmegaConf.create({}))
    assert replay_buffer.ReplayBuffer(*args).poll_interval == 0.25
    assert replay_buffer.ReplayBuffer(*args, poll_interval=1.0).poll_interval == 1.0
    assert replay_buffer.ReplayBuffer(*args, 2.0).poll_interval == 2.0, "passed by position, kept too"


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


def test_agent_loops_are_built_directly_on_the_cpu_backend():
    """verl builds one agent loop object per sample with `hydra.utils.instantiate({"_target_": cls}, **kwargs)`
    (verl/experimental/agent_loop/agent_loop.py); the CPU backend calls the class directly for such configs and
    leaves any other config to hydra. Fails if verl stops instantiating that way or changes the registry entries."""
    from verl.experimental.agent_loop import agent_loop
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    from popo_verl.cpu import backend as cpu

    assert "hydra.utils.instantiate(" in inspect.getsource(agent_loop.AgentLoopWorker._run_agent_loop)
    entry = agent_loop._agent_loop_registry["single_turn_agent"]
    assert entry == {"_target_": f"{SingleTurnAgentLoop.__module__}.{SingleTurnAgentLoop.__qualname__}"}
    cpu._direct_agent_loop_instantiate()
    cpu._direct_agent_loop_instantiate()  # idempotent
    instantiate = agent_loop.hydra.utils.instantiate
    built = []

    class Probe:
        def __init__(self, **kwargs):
            built.append(kwargs)

    probe = {"_target_": f"{__name__}.Probe"}
    globals()["Probe"] = Probe
    marker = object()  # hydra would wrap this kwarg into OmegaConf; the direct call hands it over as is
    assert isinstance(instantiate(probe, tokenizer=marker), Probe) and built[-1]["tokenizer"] is marker
    assert instantiate({"_target_": "builtins.dict", "a": 1}) == {"a": 1}, "other configs still go to hydra"


def test_the_hooks_for_early_errors_and_ctrl_c_still_fit_verl():
    """POPO's driver check is a hydra callback (popo_verl/config/driver_check.py, named in algorithm/popo.yaml): verl's
    main_ppo must stay a `hydra.main` whose job function runs verl's own checks and starts Ray, so that hydra's
    on_job_start comes before ray.init. popo_verl/stop.py hooks PPOTrainerSync.on_step_end, which fit calls after the
    step's checkpoint and before the loop's exit test."""
    import verl.trainer.main_ppo as main_ppo
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    src = inspect.getsource(main_ppo)
    assert "@hydra.main(" in src and "def main(config):" in src
    main_src = inspect.getsource(main_ppo.main)
    assert "validate_config(" in main_src and main_src.index("validate_config(") < main_src.index("run_ppo(")
    assert "ray.init(" in inspect.getsource(main_ppo.run_ppo)
    import verl.utils.config as verl_config

    assert main_ppo.validate_config is verl_config.validate_config, "verl's own check, unwrapped"
    fit = inspect.getsource(PPOTrainer.fit)
    assert fit.index("self._save_checkpoint()") < fit.index("self.on_step_end()")
    assert "self.global_steps <= self.total_training_steps" in fit


RAY_HEAD_CHECK = """
import os, signal, sys, time
import psutil, ray
import verl  # the plugin: POPO_RAY_HEAD_TIMEOUT_S is set, the driver's GCS subscribers pause (popo_verl/ray_head.py)
from popo_verl import ray_head
ray.init(num_cpus=1, include_dashboard=False)
worker = ray._private.worker.global_worker
print("ours", all(getattr(type(s), "_popo_pausing", False) for s in (worker.gcs_log_subscriber,
                                                                    worker.gcs_error_subscriber)), flush=True)
print("up", ray_head.ray_head_answers(5.0), flush=True)
gcs = [p for p in psutil.Process().children(recursive=True) if "gcs_server" in " ".join(p.cmdline())]
for p in gcs:
    p.kill()
t = time.monotonic()
print("down", ray_head.ray_head_answers(2.0), round(time.monotonic() - t, 1), len(gcs), flush=True)
cpu = time.process_time()
time.sleep(3)
print("cpu", round(time.process_time() - cpu, 2), flush=True)
os._exit(0)  # ray.shutdown would wait for the dead GCS
"""


def test_the_ray_head_check_still_fits_ray():
    """popo_verl/ray_head.py asks the GCS through Ray's private GcsClient (`internal_kv_get` with a timeout, raising
    RpcError when the GCS does not answer), and subclasses the driver's two GCS subscribers so that their polls
    pause while it is gone: against a real local Ray whose GCS is killed. Ray 2.60's own driver spends about 2 CPU
    seconds per second then (its log and error threads spin), which slowed the step in flight past Ray's 60 s. In
    a child process: Ray ends a process whose GCS has been gone 60 s."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "POPO_RAY_HEAD_TIMEOUT_S": "10"}
    r = subprocess.run([sys.executable, "-c", RAY_HEAD_CHECK], capture_output=True, text=True, timeout=180, env=env)
    lines = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()
             if line.startswith(("ours", "up", "down", "cpu"))}
    assert lines.get("ours") == ["True"] and lines.get("up") == ["True"], r.stdout + r.stderr[-3000:]
    answered, waited, killed = lines["down"]
    assert answered == "False" and killed == "1" and 1.5 <= float(waited) < 10, lines["down"]
    # the driver without its GCS, 3 s: a poll per second and thread, not two spinning threads
    assert float(lines["cpu"][0]) < 0.5, lines["cpu"]


def test_the_megatron_engine_hooks_still_fit_verl():
    """popo_verl/engines/megatron.py subclasses verl's MegatronEngineWithLMHead
    (verl/workers/engine/megatron/transformer_impl.py); read from verl's source, so it is checked without
    megatron-core installed (tests/test_megatron_engine.py runs the engine where it is)."""
    import importlib.util
    import os

    root = os.path.dirname(importlib.util.find_spec("verl").origin)
    with open(os.path.join(root, "workers", "engine", "megatron", "transformer_impl.py")) as f:
        impl = f.read()
    with open(os.path.join(root, "utils", "megatron_utils.py")) as f:
        utils = f.read()
    with open(os.path.join(root, "utils", "checkpoint", "megatron_checkpoint_manager.py")) as f:
        ckpt = f.read()
    # the head joins the model through the bridge's model builder, before DDP (utils/megatron_utils.py)
    assert "bridge.get_model(\n                post_model_creation_callbacks=post_model_creation_callbacks," in utils
    assert "provider.register_pre_wrap_hook(callback)" in utils
    # the engine methods we override or wrap, with the arguments we pass
    for needle in ("def _build_megatron_module(self):", "def initialize(self):", "def optimizer_step(self):",
                   "def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):",
                   "def get_per_tensor_param(self, base_sync_done=False, **kwargs):", "def load_checkpoint(",
                   "update_successful, grad_norm, num_zeros_in_grad = self.optimizer.step()",
                   "self.bridge.load_weights(module, self.model_config.local_path)", "self.bridge.load_hf_weights(",
                   "def _get_context_parallel_layout(unwrapped_model)", "return output, partial("):
        assert needle in impl, needle
    # the pooled states are unpacked with the helpers verl's forward applies to the log-probs
    with open(os.path.join(root, "models", "mcore", "model_forward.py")) as f:
        forward = f.read()
    assert "postprocess_thd_engine(" in forward and "preprocess_bshd_engine(" in forward
    # HF names go through the bridge's eager load/save with the model list first; export stays lazy
    for needle in ("self.bridge.save_weights(self.model, hf_ckpt_path", "self.bridge.save_hf_weights(self.model, hf_ckpt_path",
                   "self.bridge.load_weights(self.model, hf_model_path)", "self.bridge.load_hf_weights(self.model, hf_model_path)"):
        assert needle in ckpt, needle
    from popo_verl.protocol import PREDICTOR_ATTR

    assert PREDICTOR_ATTR == "popo_predictor"
