"""A verl platform for machines without an accelerator (CI, laptops, the tiny demo).

Mirrors verl/plugin/platform/platform_cuda.py (the `PlatformBase` contract of verl 0.9.1). Ray still
schedules workers on logical "GPU" resources (`ray_init.num_gpus=N`), because verl's worker groups
require them (verl/single_controller/ray/base.py); the processes then run on the CPU with gloo.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager, nullcontext
from types import ModuleType
from typing import Any, Optional

import torch

from verl.plugin.platform.platform_base import PlatformBase

#: Set to 1 to run verl on the CPU platform (the run scripts of the CPU demo, the tests and benchmarks do).
FORCE_ENV = "POPO_VERL_CPU"


def cuda_present() -> bool:
    """True where a CUDA device is (or, for CPU-only Ray actors on a GPU node, would be) visible."""
    try:
        if torch.cuda.is_available():
            return True
    except Exception:
        pass
    return shutil.which("nvidia-smi") is not None


def cpu_platform_wanted() -> bool:
    """The CPU backend is on only when asked for: POPO_VERL_CPU=1, or verl's own VERL_PLATFORM=cpu. Never by
    detection: on a machine without a GPU, verl without the flag behaves as verl alone does (its CUDA fallback)."""
    if os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


class _CPUDeviceModule(ModuleType):
    """What verl asks of `torch.cuda` (get_torch_device()), answered for the CPU.

    Memory queries report 0; RNG calls go to the global CPU generator; streams are torch.cpu's.
    """

    def __init__(self):
        super().__init__("popo_verl_cpu_device")

    # device management
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device=None) -> None:
        return None

    def synchronize(self, device=None) -> None:
        return None

    def get_device_name(self, device=None) -> str:
        # the hardware's name, as torch.cuda.get_device_name gives "NVIDIA H100 ...": verl's FLOPS table
        # (verl/utils/flops_counter.py `get_device_flops`) keys the CPU as "CPU", so MFU reads against it
        return "CPU"

    # streams and events
    def current_stream(self, device=None):
        return torch.cpu.current_stream()

    def stream(self, stream=None):
        return nullcontext()

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event

    # RNG
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device=None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None) -> None:
        torch.set_rng_state(state)

    # memory
    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        return None

    def memory_allocated(self, device=None) -> int:
        return 0

    def max_memory_allocated(self, device=None) -> int:
        return 0

    def memory_reserved(self, device=None) -> int:
        return 0

    def max_memory_reserved(self, device=None) -> int:
        return 0

    def reset_peak_memory_stats(self, device=None) -> None:
        return None

    def mem_get_info(self, device=None) -> tuple[int, int]:
        try:
            import psutil

            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        except Exception:
            return 0, 0


CPU_DEVICE_MODULE = _CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """verl on the CPU: device "cpu", collectives over gloo."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        return cpu_platform_wanted()

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def get_device_uuid(self, device_id):
        return f"cpu-{device_id}"

    def ray_resource_name(self) -> str:
        # verl's worker groups place one worker per logical GPU bundle.
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {}

    def get_collective_module(self) -> Any:
        return None

    def cudart(self) -> Any:
        return None
