"""The CPU backend's registration into verl: platform, gloo process groups, engine lookup, `hf` rollout."""

from __future__ import annotations

import functools
import inspect
import os
import sys

from popo_verl.cpu.platform import FORCE_ENV, PlatformCPU, cpu_platform_wanted  # noqa: F401
from popo_verl.import_hooks import when_imported

HF_ROLLOUT = "hf"


def _gloo_process_group(init_fn):
    """verl/utils/distributed.py builds the backend "cpu:gloo,cpu:gloo" for a cpu device, which torch rejects."""
    if getattr(init_fn, "_popo_cpu_patched", False):
        return init_fn

    @functools.wraps(init_fn)
    def wrapper(timeout_second=None, backend=None):
        from verl.utils.device import get_device_name

        if backend is None and get_device_name() == "cpu":
            backend = "gloo"
        return init_fn(timeout_second=timeout_second, backend=backend)

    wrapper._popo_cpu_patched = True
    return wrapper


def _patch_process_group() -> None:
    import verl.utils.distributed as dist

    patched = _gloo_process_group(dist.initialize_global_process_group_ray)
    dist.initialize_global_process_group_ray = patched
    # Modules that imported the function by name before us (verl/workers/engine_workers.py,
    # verl/checkpoint_engine/base.py) keep their own reference: rebind those too.
    for mod_name in ("verl.workers.engine_workers", "verl.checkpoint_engine.base"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "initialize_global_process_group_ray"):
            mod.initialize_global_process_group_ray = patched


def _unpinned_offload_policy() -> None:
    """verl offloads forward-only FSDP2 models with CPUOffloadPolicy(pin_memory=True)
    (verl/workers/engine/fsdp/transformer_impl.py); pinning needs an accelerator. On the CPU the
    policy is a no-op move, so swap in a subclass that never pins, before verl imports the name."""
    import dataclasses

    import torch.distributed.fsdp as torch_fsdp

    base = torch_fsdp.CPUOffloadPolicy
    if getattr(base, "_popo_cpu_unpinned", False):
        return

    @dataclasses.dataclass
    class UnpinnedCPUOffloadPolicy(base):
        _popo_cpu_unpinned = True

        def __post_init__(self):
            self.pin_memory = False

    torch_fsdp.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy
    for mod_name in ("verl.utils.fsdp_utils", "verl.workers.engine.fsdp.transformer_impl"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "CPUOffloadPolicy"):
            mod.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


#: seconds between the v1 replay buffer's polls for finished rollouts on the CPU backend
POLL_INTERVAL_ENV = "POPO_VERL_POLL_INTERVAL"
CPU_POLL_INTERVAL = 0.05


def _fast_replay_buffer_poll() -> None:
    """verl's v1 ReplayBuffer sleeps a fixed 2 s between polls for finished rollouts
    (verl/trainer/ppo/v1/replay_buffer.py, `poll_interval=2.0`, not a config key); a tiny CPU rollout
    finishes in well under that, so every step waited ~2 s for nothing. Poll every 50 ms instead
    (POPO_VERL_POLL_INTERVAL overrides) where the caller left the default; a caller's own poll_interval stands.
    A poll is a dict scan in the driver: nothing else changes."""
    from verl.trainer.ppo.v1 import replay_buffer

    for cls in (replay_buffer.ReplayBuffer, getattr(replay_buffer, "ReplayBufferAsync", None)):
        if cls is None or getattr(cls.__init__, "_popo_fast_poll", False):
            continue
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapper(self, *args, _init=init, _signature=signature, **kwargs):
            _init(self, *args, **kwargs)
            if "poll_interval" not in _signature.bind_partial(self, *args, **kwargs).arguments:
                self.poll_interval = float(os.environ.get(POLL_INTERVAL_ENV, CPU_POLL_INTERVAL))

        wrapper._popo_fast_poll = True
        cls.__init__ = wrapper


def _direct_agent_loop_instantiate() -> None:
    """verl builds a new agent loop object per sample with `hydra.utils.instantiate({"_target_": cls}, **kwargs)`
    (verl/experimental/agent_loop/agent_loop.py, `AgentLoopWorker._run_agent_loop`); for a config that holds
    nothing but `_target_` (every `@register` agent loop) that is `cls(**kwargs)`, but hydra first wraps the
    kwargs (the whole trainer config among them) in OmegaConf and merges them, about a third of the agent-loop
    process's time on the CPU. Call the class directly in that case; any other config still goes to hydra."""
    import types

    import hydra
    from hydra.utils import get_class

    from verl.experimental.agent_loop import agent_loop

    if getattr(agent_loop.hydra, "_popo_direct", False):
        return
    hydra_instantiate = hydra.utils.instantiate

    def instantiate(config, *args, **kwargs):
        if not args and isinstance(config, dict) and set(config) == {"_target_"}:
            return get_class(config["_target_"])(**kwargs)
        return hydra_instantiate(config, *args, **kwargs)

    shim = types.SimpleNamespace(utils=types.SimpleNamespace(instantiate=instantiate), _popo_direct=True)
    agent_loop.hydra = shim


#: where the `hf` rollout server runs: cpu, cuda, or auto (the default: the GPU wherever verl itself runs on CUDA)
HF_ROLLOUT_DEVICE_ENV = "POPO_VERL_HF_ROLLOUT_DEVICE"


def hf_rollout_on_gpu() -> bool:
    choice = os.environ.get(HF_ROLLOUT_DEVICE_ENV, "").strip().lower()
    if choice in ("", "auto"):
        return not cpu_platform_wanted()
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"{HF_ROLLOUT_DEVICE_ENV} must be cpu, cuda or auto, got {choice!r}")
    return choice == "cuda"


def _register_hf_rollout_class() -> None:
    from verl.workers.rollout import base as rollout_base

    # the same answer in every process of a run: the env and the machine decide
    rollout_base._ROLLOUT_REGISTRY[(HF_ROLLOUT, "async")] = (
        "popo_verl.rollout.hf_gpu.HFGPUServerAdapter" if hf_rollout_on_gpu() else "popo_verl.rollout.hf.HFServerAdapter"
    )


def _load_hf_replica():
    if hf_rollout_on_gpu():
        from popo_verl.rollout.hf_gpu import HFGPUReplica

        return HFGPUReplica
    from popo_verl.rollout.hf import HFReplica

    return HFReplica


def _register_hf_rollout_replica() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(HF_ROLLOUT, _load_hf_replica)


VLLM_ROLLOUT = "vllm"


def _register_cpu_vllm_rollout_class() -> None:
    """`rollout.name=vllm` on the CPU platform: verl's vLLM classes with the CPU pieces of popo_verl/rollout/vllm_cpu.py
    (imported only when a run builds its rollout: vLLM lives in its own environment, scripts/install_vllm_cpu.sh).
    Replaces verl's entries (verl/workers/rollout/base.py `_ROLLOUT_REGISTRY`, verl/workers/rollout/replica.py
    `RolloutReplicaRegistry`) on the CPU platform only; elsewhere verl's own vLLM path runs untouched."""
    from verl.workers.rollout import base as rollout_base

    rollout_base._ROLLOUT_REGISTRY[(VLLM_ROLLOUT, "async")] = "popo_verl.rollout.vllm_cpu.CPUvLLMServerAdapter"


def _load_cpu_vllm_replica():
    from popo_verl.rollout.vllm_cpu import CPUvLLMReplica

    return CPUvLLMReplica


def _register_cpu_vllm_rollout_replica() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(VLLM_ROLLOUT, _load_cpu_vllm_replica)


def _transfer_queue_threads() -> None:
    """TransferQueue (the v1 trainer's data plane) asks torch for TQ_NUM_THREADS=8 threads on every put/get and,
    on a machine with fewer physical cores, logs a warning each time: thousands of lines per step through Ray's
    log forwarding on 2 cores, and measurable CPU. Ask for the cores that exist, unless the caller set it (read
    once, at TQ's import; Ray workers inherit it from the driver)."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:
        cores = os.cpu_count() or 1
    os.environ.setdefault("TQ_NUM_THREADS", str(max(1, min(8, cores))))
    threads = int(os.environ["TQ_NUM_THREADS"])
    # verl imports TransferQueue before its plugins: its modules read the constant per call, so set it there too
    # (transfer_queue/client.py, transfer_queue/storage/simple_storage.py: TQ_NUM_THREADS).
    for name in ("transfer_queue.client", "transfer_queue.storage.simple_storage"):
        mod = sys.modules.get(name)
        if mod is not None and hasattr(mod, "TQ_NUM_THREADS"):
            mod.TQ_NUM_THREADS = threads


def register() -> None:
    """Idempotent; runs in every process that imports verl (popo_verl.plugin, and this module's import).

    Everywhere: the `hf` rollout joins verl's rollout registries (a name verl does not use) when verl imports them.
    With the CPU backend asked for (POPO_VERL_CPU=1 or VERL_PLATFORM=cpu) and only then: the CPU platform, and the
    changes to verl that running on it takes, each listed in the README ("What popo-verl changes in verl")."""
    when_imported("verl.workers.rollout.base", _register_hf_rollout_class)
    when_imported("verl.workers.rollout.replica", _register_hf_rollout_replica)
    if not cpu_platform_wanted():
        return
    from verl.plugin.platform import PlatformRegistry

    if PlatformRegistry.get("cpu") is not PlatformCPU:
        PlatformRegistry.register(platform="cpu")(PlatformCPU)
    # verl probes its platforms in registration order and CUDA's answers first wherever nvidia-smi runs
    # (verl/plugin/platform/platform_manager.py `_detect_platform_name`); its explicit override comes
    # before any probe, and Ray workers inherit it from the driver. An explicit VERL_PLATFORM still wins.
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    # verl registers its FSDP engines for cuda/npu only (verl/workers/engine/fsdp/transformer_impl.py);
    # on the CPU they run unchanged, so look them up under "cuda".
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    _transfer_queue_threads()
    _unpinned_offload_policy()  # before verl's FSDP modules import the name
    when_imported("verl.utils.distributed", _patch_process_group)
    when_imported("verl.workers.rollout.base", _register_cpu_vllm_rollout_class)
    when_imported("verl.workers.rollout.replica", _register_cpu_vllm_rollout_replica)
    when_imported("verl.trainer.ppo.v1.replay_buffer", _fast_replay_buffer_poll)
    when_imported("verl.experimental.agent_loop.agent_loop", _direct_agent_loop_instantiate)


# Importing this module registers the CPU backend (popo_verl/plugin.py relies on it when verl's first import
# comes from one of our modules).
register()
