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
