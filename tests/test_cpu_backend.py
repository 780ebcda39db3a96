"""The CPU backend: platform choice, gloo process groups, offload policy, engine lookup."""

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("POPO_VERL_CPU", "VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=180)


_FAKE_CPU_MACHINE = """
    import torch, shutil
    torch.cuda.is_available = lambda: False          # what a machine without a GPU answers, even where one is
    _which = shutil.which
    shutil.which = lambda cmd, *a, **k: None if cmd == "nvidia-smi" else _which(cmd, *a, **k)
"""


@pytest.mark.parametrize("env, expected", [
    ({"POPO_VERL_CPU": "1"}, ["cpu", "gloo", "GPU", "cuda"]),
    ({"VERL_PLATFORM": "cpu"}, ["cpu", "gloo", "GPU", "cuda"]),  # verl's own switch turns the backend on too
    ({}, ["cuda", "nccl", "GPU", "None"]),  # not asked for: verl's own choice, its CUDA fallback, as without us
])
def test_cpu_platform_only_when_asked_for(env, expected):
    """On a machine without a GPU the CPU backend is on only when asked for; otherwise verl answers as it does
    without popo-verl (verl's tests/plugin/test_platform_abstraction.py test_empty_triggers_auto_detection)."""
    r = _run(
        textwrap.dedent(_FAKE_CPU_MACHINE) + textwrap.dedent("""
        import os, verl
        from verl.utils.device import get_device_name, get_nccl_backend, get_resource_name
        print(get_device_name(), get_nccl_backend(), get_resource_name(), os.environ.get("VERL_ENGINE_DEVICE"))
        """),
        env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-4:] == expected


def test_mfu_reads_against_verls_cpu_entry():
    """verl's FLOPS table keys the CPU as "CPU" (verl/utils/flops_counter.py); with the CPU platform's device module
    the lookup once fell through to inf, and every MFU read 0."""
    r = _run(
        """
        import verl
        from verl.utils.flops_counter import _DEVICE_FLOPS, get_device_flops
        print(get_device_flops(unit="G") == _DEVICE_FLOPS["CPU"] / 1e9)
        """,
        {"POPO_VERL_CPU": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "True"


def test_stock_platform_when_cuda_present():
    """With CUDA visible, verl must behave exactly as stock: nvidia platform, no patches, no env changes."""
    r = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True          # a CUDA machine, as far as anyone asks
        import os, verl
        import verl.utils.distributed as d
        import torch.distributed.fsdp as f
        from verl.plugin.platform import get_platform
        from verl.workers.rollout.replica import RolloutReplicaRegistry
        print(get_platform().device_name, getattr(d.initialize_global_process_group_ray, "_popo_cpu_patched", False),
              getattr(f.CPUOffloadPolicy, "_popo_cpu_unpinned", False), os.environ.get("VERL_ENGINE_DEVICE"),
              "hf" in RolloutReplicaRegistry._registry)
        """,
        {},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-5:] == ["cuda", "False", "False", "None", "True"]


_FAKE_GPU_MACHINE = """
    import torch
    torch.cuda.is_available = lambda: True          # what a GPU machine answers ...
    from verl.plugin.platform.platform_cuda import PlatformCUDA
    PlatformCUDA.check_smi_command = lambda self, path: True   # ... and its nvidia-smi runs
    import shutil
    _which = shutil.which
    shutil.which = lambda cmd, *a, **k: "/usr/bin/nvidia-smi" if cmd == "nvidia-smi" else _which(cmd, *a, **k)
"""


@pytest.mark.parametrize("flag, device", [("1", "cpu"), ("", "cuda")])
def test_force_env_overrides_cuda_detection(flag, device):
    """POPO_VERL_CPU=1 forces the CPU on a GPU machine, where verl's CUDA platform (probed first, through
    nvidia-smi) would otherwise win; without the flag the GPU machine keeps verl's CUDA platform."""
    r = _run(
        _FAKE_GPU_MACHINE
        + """
    import os
    from verl.plugin.platform import get_platform
    print(get_platform().device_name, os.environ.get("VERL_PLATFORM"))
    """,
        {"POPO_VERL_CPU": flag} if flag else {},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == [device, "cpu" if flag else "None"]


def test_gloo_process_group_and_unpinned_offload():
    """The patched verl initialiser gives a gloo group on a cpu device; FSDP2 offload does not pin (the CPU
    platform forced, so that a GPU machine tests the same thing)."""
    r = _run(
        """
        import os, socket
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
        import verl, torch
        from verl.workers import engine_workers  # imports the initialiser by name
        engine_workers.initialize_global_process_group_ray(timeout_second=None)
        print(torch.distributed.get_backend())
        from verl.utils.fsdp_utils import CPUOffloadPolicy
        print(CPUOffloadPolicy(pin_memory=True).pin_memory)
        """,
        {"POPO_VERL_CPU": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["gloo", "False"]


def test_device_module_answers_what_verl_asks():
    """verl calls these on get_torch_device() (grep of verl 0.9.1); each must work on the CPU module."""
    from popo_verl.cpu.platform import CPU_DEVICE_MODULE as m

    import torch

    assert m.is_available() and m.device_count() == 1 and m.current_device() == "cpu"
    m.empty_cache(); m.synchronize(); m.set_device(0); m.ipc_collect(); m.set_per_process_memory_fraction(0.5)
    assert m.memory_allocated() == 0 and m.max_memory_allocated() == 0
    assert m.memory_reserved() == 0 and m.max_memory_reserved() == 0
    free, total = m.mem_get_info()
    assert 0 < free <= total
    state = m.get_rng_state()
    a = torch.rand(3)
    m.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
    with m.stream(m.Stream()):
        pass
    assert m.current_stream() is not None
    assert torch.zeros(2, device=m.current_device()).device.type == "cpu"


def test_platform_registered_under_cpu():
    """Wherever the CPU platform is wanted (here: forced, so that a GPU machine checks the same), verl's registry
    holds ours under "cpu"."""
    r = _run(
        """
        import verl
        from verl.plugin.platform import PlatformRegistry
        from popo_verl.cpu.platform import PlatformCPU
        print(PlatformRegistry.get("cpu") is PlatformCPU)
        """,
        {"POPO_VERL_CPU": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == "True"


_VLLM_REGISTRATION = """
    import verl
    from verl.workers.rollout import base, replica
    from verl.workers.rollout.replica import RolloutReplicaRegistry
    loader = RolloutReplicaRegistry._registry["vllm"]
    print(base._ROLLOUT_REGISTRY[("vllm", "async")], f"{loader.__module__}.{loader.__qualname__}",
          loader is replica._load_vllm)
"""


def test_cpu_vllm_pieces_switch_on_only_on_the_cpu_platform():
    """`rollout.name=vllm`: on the CPU platform, popo_verl/rollout/vllm_cpu.py's adapter and replica (no sleep mode, weights
    kept for re-packing, a bounded weight sync); on a CUDA machine verl's own, untouched (sleep mode, CUDA IPC, its
    worker extension). The registrations only name the classes: nothing here needs vLLM installed."""
    cpu = _run(textwrap.dedent(_FAKE_CPU_MACHINE) + textwrap.dedent(_VLLM_REGISTRATION), {"POPO_VERL_CPU": "1"})
    assert cpu.returncode == 0, cpu.stderr[-2000:]
    assert cpu.stdout.split()[-3:] == ["popo_verl.rollout.vllm_cpu.CPUvLLMServerAdapter",
                                       "popo_verl.cpu.backend._load_cpu_vllm_replica", "False"]
    stock = ["verl.workers.rollout.vllm_rollout.ServerAdapter", "verl.workers.rollout.replica._load_vllm", "True"]
    for machine in ("import torch\ntorch.cuda.is_available = lambda: True\n", textwrap.dedent(_FAKE_CPU_MACHINE)):
        r = _run(machine + textwrap.dedent(_VLLM_REGISTRATION), {})  # a GPU machine; a CPU one without the flag
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split()[-3:] == stock
