"""`rollout.name=hf` on a GPU: the hf rollout server colocated with the actor, as verl's hybrid engine runs vLLM.

For machines where vLLM cannot be installed. popo_verl/rollout/hf.py is the CPU server; here it runs on the GPU
of the replica's first trainer worker, mirroring verl 0.9.1's vLLM rollout (verl/workers/rollout/vllm_rollout/):
- weights in the rollout's dtype (`actor_rollout_ref.rollout.dtype`, verl's default bfloat16, the actor's
  compute dtype), synced from the actor's full tensors through verl's bucketed CUDA-IPC transfer (no copy
  through host memory);
- verl's sleep / wake_up hooks free the GPU between phases: `sleep` (after generation) moves the weights to
  pinned host memory and empties the CUDA cache, `wake_up(tags=["weights"])` (before a weight sync) brings
  them back; the KV cache is allocated per batch on the GPU and freed when the batch ends, so `kv_cache`
  needs nothing (with `rollout.free_cache_engine=false` the weights stay on the GPU);
- batched decoding with a KV cache on the GPU, logits of the last position only, per-request seeded sampling
  (one uniform per request and token from the request's own generator, drawn on the host 64 tokens at a time
  and copied to the GPU once per block, then one inverse-CDF lookup per step for the whole batch on the GPU);
- a KV-cache budget: `actor_rollout_ref.rollout.engine_kwargs.hf.kv_cache_memory_fraction` (default 0.5; a new
  key, set with `+`) of the memory free on the GPU when a batch starts (the actor stays resident beside it) goes to
  the KV cache, and a batch whose cache would not fit is generated in chunks that do (KV bytes per token =
  2 x layers x kv_heads x head_dim x dtype bytes; each sequence counted at the batch's longest prompt plus its
  max_tokens, as the left-padded cache holds it). Not verl's `rollout.gpu_memory_utilization`: that is vLLM's share of the GPU's total memory
  for the whole engine, fixed at start-up; this is a share of the memory free at each batch, for the cache alone
  (HF's cache grows by concatenation, so the allocator may hold up to twice the live cache: hence 0.5);
- every body that runs in a worker thread (generation, weight receipt, sleep, wake) runs under
  `torch.cuda.device(<the rollout's GPU>)`: the current CUDA device is per thread, and a fresh thread's is GPU 0;
- after a batch, the process's `torch.cuda.max_memory_allocated` is printed when it has grown
  (`peak_line`; benchmarks/cost.py reads it where nvidia-smi cannot name the process).
On the CPU nothing here is used: popo_verl/cpu/backend.py registers this module's classes only where verl runs on
CUDA (or with POPO_VERL_HF_ROLLOUT_DEVICE=cuda).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import ray
import torch

from popo_verl.rollout.hf import EXCLUDED_WEIGHT_PREFIXES, HFReplica, HFRolloutServer, HFServerAdapter
from verl.workers.rollout.utils import ensure_async_iterator

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARNING"))

_TRANSFER = None

#: the rollout's share of the GPU memory free at a batch's start that its KV cache may take (see the docstring)
KV_FRACTION_KEY = "kv_cache_memory_fraction"
DEFAULT_KV_FRACTION = 0.5
#: how many decode steps of uniforms each request's generator draws at a time
UNIFORM_BLOCK = 64
#: the line announcing the server's peak memory (benchmarks/cost.py parses it from the run's log)
PEAK_PREFIX = "popo-verl hf rollout: max_memory_allocated_gb="


def peak_line(gb: float) -> str:
    return f"{PEAK_PREFIX}{gb:.3f}"


def bucketed_weight_transfer():
    """verl's bucketed weight transfer (verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py: CUDA IPC, or
    shared memory where IPC is missing) needs only torch and zmq, but its package's __init__ imports vLLM: load
    the file by itself."""
    global _TRANSFER
    if _TRANSFER is None:
        import verl

        path = Path(verl.__file__).parent / "workers" / "rollout" / "vllm_rollout" / "bucketed_weight_transfer.py"
        spec = importlib.util.spec_from_file_location("popo_verl._verl_bucketed_weight_transfer", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _TRANSFER = module
    return _TRANSFER


def cuda_index(gpu_id: str, visible: Optional[str] = None) -> int:
    """The torch device index, in this process, of the GPU Ray calls `gpu_id`.

    Ray names GPUs by the ids the node lists (CUDA_VISIBLE_DEVICES at its start, else 0..N-1). This process may
    see all of them or a subset, and its CUDA runtime was initialised on import (verl's platform probe), so
    setting CUDA_VISIBLE_DEVICES now, as verl's vLLM server does for its child processes, would change nothing."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not gpu_id:
        return 0
    if visible is None:
        return int(gpu_id)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if gpu_id not in ids:
        raise RuntimeError(f"hf rollout: GPU {gpu_id} of its trainer worker is not visible here (CUDA_VISIBLE_DEVICES={visible})")
    return ids.index(gpu_id)


def rollout_placement(config, device=None, gpu_id: str = "") -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of the GPU server: the trainer worker's GPU unless `device` is given, in verl's rollout
    dtype (`rollout.dtype`, default bfloat16)."""
    from verl.utils.torch_dtypes import PrecisionType

    dtype = PrecisionType.to_dtype(str(getattr(config, "dtype", "bfloat16")))
    if device is not None:
        return torch.device(device), dtype
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU hf rollout found no CUDA device in its process; "
                           "POPO_VERL_HF_ROLLOUT_DEVICE=cpu runs the hf rollout on the CPU")
    return torch.device("cuda", cuda_index(gpu_id)), dtype


# ------------------------------------------------------------------------------------------------ KV-cache budget
def kv_fraction(config) -> float:
    """`rollout.engine_kwargs.hf.kv_cache_memory_fraction` (verl's per-engine extra arguments, where an unknown
    key needs no change to verl's RolloutConfig), in (0, 1]."""
    hf = (getattr(config, "engine_kwargs", None) or {}).get("hf") or {}
    value = float(hf.get(KV_FRACTION_KEY, DEFAULT_KV_FRACTION))
    if not 0.0 < value <= 1.0:
        raise ValueError(f"actor_rollout_ref.rollout.engine_kwargs.hf.{KV_FRACTION_KEY} must lie in (0, 1], got {value}")
    return value


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """Keys and values of one token over all layers: 2 x layers x kv_heads x head_dim x dtype bytes."""
    heads = int(model_config.num_attention_heads)
    kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or model_config.hidden_size // heads)
    return 2 * int(model_config.num_hidden_layers) * kv_heads * head_dim * dtype.itemsize


def kv_budget_bytes(free_bytes: int, fraction: float) -> int:
    return int(free_bytes * fraction)


def sequences_per_chunk(budget_bytes: int, bytes_per_token: int, tokens_per_sequence: int, n: int) -> int:
    """How many of n sequences of up to tokens_per_sequence tokens generate at once within the budget; at least
    one (a sequence that alone exceeds the budget is still tried: the budget is a share, not all, of the free memory)."""
    fits = budget_bytes // max(1, bytes_per_token * tokens_per_sequence)
    return int(max(1, min(n, fits)))


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: the first whose cumulative mass reaches u * total, u in (0, 1] (so a token with zero
    probability is never drawn)."""
    cdf = probs.double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return tok.clamp(max=probs.shape[-1] - 1)


class RowUniforms:
    """Each row's next uniform in (0, 1], from the row's own generator, drawn `block` decode steps at a time.

    A generator's stream does not depend on how its draws are cut, so row i's t-th value is the one a draw per step
    would give: a request's tokens depend on its own seed only, whatever the batch or the block. Per block: one
    host draw per row and one copy to the device, instead of both at every step."""

    def __init__(self, gens: list[torch.Generator], device: torch.device, block: int = UNIFORM_BLOCK):
        self.gens, self.device, self.block = gens, device, int(block)
        self._buf: Optional[torch.Tensor] = None
        self._pos = 0

    def next(self) -> torch.Tensor:
        if self._buf is None or self._pos == self._buf.shape[1]:
            host = 1.0 - torch.stack([torch.rand(self.block, generator=g, dtype=torch.float64) for g in self.gens])
            pinned = self.device.type == "cuda"
            self._buf = (host.pin_memory() if pinned else host).to(self.device, non_blocking=pinned)
            self._pos = 0
        u = self._buf[:, self._pos]
        self._pos += 1
        return u


class HFGPURolloutServer(HFRolloutServer):
    """The hf rollout server on a GPU (or on `device`), sleeping and waking with verl's hybrid engine."""

    # only the last position's logits are sampled from: the prompt's would cost bsz x width x vocab
    _forward_kwargs = {"logits_to_keep": 1}

    def __init__(self, config, model_config, *args, gpu_id: str = "", device=None, **kwargs):
        self.device, self.dtype = rollout_placement(config, device, gpu_id)
        self._cuda_index = -1  # torch.cuda.device(-1) is a no-op: the CPU stand-in of the tests
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this thread's; the worker threads enter _on_device
            self._cuda_index = torch.cuda.current_device()
            self.device = torch.device("cuda", self._cuda_index)
        self.kv_fraction = kv_fraction(config)
        # held while a batch generates and while the weights move or load: verl's sleep never meets a batch midway
        self._weights_lock = threading.RLock()
        self._offloaded = False
        self._host: list[torch.Tensor] = []
        self._uniforms: Optional[RowUniforms] = None
        self._reported_peak_gb = 0.0
        super().__init__(config, model_config, *args, **kwargs)

    def _on_device(self):
        """The rollout's GPU as the calling thread's current CUDA device. asyncio.to_thread bodies (generation,
        weight receipt, sleep, wake) start on GPU 0: there verl's receiver (verl/workers/rollout/vllm_rollout/
        bucketed_weight_transfer.py) would synchronize GPU 0, not the one its copies run on (a bucket refilled
        mid-copy), and every such server would open a context on GPU 0."""
        return torch.cuda.device(self._cuda_index)

    def _load_model(self, path: str, dtype: torch.dtype = torch.float32):
        return super()._load_model(path, dtype=self.dtype).to(self.device)

    def _sample(self, probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        # the base class passes one list of generators for every step of a batch: a new list is a new batch
        if self._uniforms is None or self._uniforms.gens is not gens:
            self._uniforms = RowUniforms(gens, probs.device)
        return inverse_cdf_sample(probs, self._uniforms.next())

    def _free_bytes(self) -> Optional[int]:
        """Device memory this process could take now: the driver's free memory and what torch's allocator holds
        unused; None off a GPU (no budget)."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def _chunk_size(self, prompts: list[list[int]], max_tokens: int) -> int:
        free = self._free_bytes()
        if free is None:
            return len(prompts)
        per_token = kv_bytes_per_token(self.model.config, self.dtype)
        return sequences_per_chunk(kv_budget_bytes(free, self.kv_fraction), per_token,
                                   max(len(p) for p in prompts) + int(max_tokens), len(prompts))

    def _generate_batch(self, prompts, key):
        with self._on_device(), self._weights_lock:
            if self._offloaded:
                # verl wakes the rollout before it generates (checkpoint_engine/base.py update_weights); if a call
                # comes first, serve it with the last synced weights rather than fail
                logger.warning("hf rollout: generate called while asleep; waking the weights")
                self._onload()
            size = self._chunk_size(prompts, key[3])
            if size < len(prompts):
                logger.info("hf rollout: %d sequences in chunks of %d (KV-cache budget)", len(prompts), size)
            results = []
            try:
                # chunks in order: the per-request seeds count a prompt's repeats across calls of one step, so
                # every request samples what it would have in one batch
                for i in range(0, len(prompts), size):
                    results += super()._generate_batch(prompts[i : i + size], key)
            finally:
                self._uniforms = None
            self._report_peak()
            return results

    def _report_peak(self) -> None:
        if self.device.type != "cuda":
            return
        gb = torch.cuda.max_memory_allocated(self.device) / 2**30
        if gb > self._reported_peak_gb + 0.005:
            self._reported_peak_gb = gb
            print(peak_line(gb), flush=True)

    # ------------------------------------------------------------------ weights: sync, sleep, wake
    def _tensors(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + list(self.model.buffers())

    def _offload(self) -> None:
        with self._on_device(), self._weights_lock:
            if self._offloaded:
                return
            tensors = self._tensors()
            if not self._host:  # pinned host buffers, allocated once and reused by every sleep
                pin = self.device.type == "cuda"
                self._host = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin) for t in tensors]
            for t, host in zip(tensors, self._host, strict=True):
                host.copy_(t.data)
                t.data = host
            self._offloaded = True
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _onload(self) -> None:
        with self._on_device(), self._weights_lock:
            if not self._offloaded:
                return
            for t in self._tensors():
                # copy=True: a fresh device allocation, the host buffer stays for the next sleep
                t.data = t.data.to(self.device, copy=True)
            self._offloaded = False

    def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> int:
        with self._on_device(), self._weights_lock:  # loads into the host copies while asleep
            return super().update_weights(named_tensors, global_steps)

    async def update_weights_from_ipc(self, zmq_handle: str, use_shm: bool = False, global_steps: Optional[int] = None) -> int:
        """Receive the actor's full tensors from HFGPUServerAdapter through verl's bucketed transfer."""
        receiver = bucketed_weight_transfer().BucketedWeightReceiver(zmq_handle=zmq_handle, device=self.device, use_shm=use_shm)
        received: dict[str, int] = {}
        unknown: list[str] = []
        failed: list[str] = []

        def load(weights, is_last):
            # never raise here: the sender would wait for its bucket's acknowledgement for ever
            state = self.model.state_dict()
            with torch.no_grad():
                for name, tensor in weights:
                    if name.startswith(EXCLUDED_WEIGHT_PREFIXES):
                        continue
                    if name not in state:
                        unknown.append(name)
                        continue
                    try:
                        state[name].copy_(tensor)
                    except Exception as e:  # a shape mismatch, say: reported once the transfer has ended
                        failed.append(f"{name}: {e}")
                        continue
                    received[name] = 1

        def receive():
            # the lock is taken in the receiving thread: the event loop never waits on a batch. The device: verl's
            # receiver synchronizes the current one before it acknowledges a bucket
            with self._on_device(), self._weights_lock:
                receiver.receive_weights(load)

        await asyncio.to_thread(receive)
        if unknown:
            raise KeyError(f"hf rollout: weights not in the rollout model: {unknown[:5]}")
        if failed:
            raise RuntimeError(f"hf rollout: weights that could not be loaded: {failed[:5]}")
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return len(received)

    def stats(self) -> dict:
        out = dict(super().stats(), device=str(self.device), dtype=str(self.dtype), offloaded=self._offloaded)
        if self.device.type == "cuda":
            out["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    # verl's lifecycle calls (verl/workers/rollout/vllm_rollout/vllm_async_server.py for vLLM)
    async def wake_up(self, tags=None):
        if tags is None or "weights" in tags:
            await asyncio.to_thread(self._onload)

    async def sleep(self):
        if not getattr(self.config, "free_cache_engine", True):
            return
        await self.wait_for_requests_to_drain()
        await asyncio.to_thread(self._offload)


def _node_and_gpu(worker) -> tuple[str, str]:
    """(node id, Ray GPU id) of a trainer worker, run inside it through `__ray_call__`."""
    from verl.utils.device import get_resource_name

    ctx = ray.get_runtime_context()
    ids = ctx.get_accelerator_ids().get(get_resource_name()) or [""]  # "": no GPU of its own, the first visible
    return ctx.get_node_id(), str(ids[0])


class HFGPUReplica(HFReplica):
    """One HFGPURolloutServer per replica, on the GPU of the replica's first trainer worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(HFGPURolloutServer)

    def rollout_worker_use_gpu(self) -> bool:
        return True

    async def _server_placement(self) -> tuple[str, dict, dict]:
        from verl.plugin.platform import get_platform

        node_id, gpu_id = ray.get_runtime_context().get_node_id(), ""
        if self.workers:
            node_id, gpu_id = await self.workers[0].__ray_call__.remote(_node_and_gpu)
        # Ray must leave CUDA_VISIBLE_DEVICES alone in a process that holds no GPU resource of its own (verl's
        # vLLMReplica passes the same variables); the server shares its worker's GPU, as vLLM does.
        env = {var: "1" for var in get_platform().ray_noset_envvars()}
        return node_id, {"num_cpus": 0, "runtime_env": {"env_vars": env}}, {"gpu_id": str(gpu_id)}


async def _without_excluded(weights):
    async for name, tensor in ensure_async_iterator(weights):
        if not name.startswith(EXCLUDED_WEIGHT_PREFIXES):
            yield name, tensor


class HFGPUServerAdapter(HFServerAdapter):
    """The hybrid-engine side of the GPU hf rollout, as verl's vLLM ServerAdapter
    (verl/workers/rollout/vllm_rollout/vllm_rollout.py): resume/release wake and sleep the server when
    `free_cache_engine`, and weight syncs go through verl's bucketed CUDA-IPC transfer."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh, replica_rank=replica_rank, **kwargs)
        from verl.utils.device import is_support_ipc

        # one socket per trainer process and replica (the pid keeps concurrent jobs on a node apart)
        self.zmq_handle = f"ipc:///tmp/popo-hf-rollout-{os.getpid()}-replica-{self.replica_rank}.sock"
        self.use_shm = not is_support_ipc()

    async def resume(self, tags: list[str]):
        if self.config.free_cache_engine and self._has_server:
            await self._server().wake_up.remote(tags=tags)

    async def release(self):
        if self.config.free_cache_engine and self._has_server:
            await self._server().sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout receives full named tensors, not {wire_format!r}")
        weights = _without_excluded(weights)
        if not self._has_server:
            # Every rank drains the generator: producing each full tensor is a collective gather.
            async for _ in weights:
                pass
            return
        receiving = self._server().update_weights_from_ipc.remote(
            self.zmq_handle, use_shm=self.use_shm, global_steps=kwargs.get("global_steps"))
        sender = bucketed_weight_transfer().BucketedWeightSender(
            zmq_handle=self.zmq_handle, bucket_size_mb=self.config.checkpoint_engine.update_weights_bucket_megabytes,
            use_shm=self.use_shm)
        await sender.async_send_weights(weights)
        await receiving
