"""`rollout.name=hf`: a rollout server for verl built on HF `generate`, for machines without vLLM.

Three pieces, mirroring verl 0.9.1's vLLM rollout (verl/workers/rollout/vllm_rollout/):
- `HFRolloutServer`: a Ray actor holding an HF model. Concurrent token-in/token-out `generate` calls
  from verl's agent loop are queued and served in batches (one HF `generate` per batch of requests
  sharing sampling parameters), returning token ids (EOS included) and their log-probs.
- `HFReplica`: the `RolloutReplica` that launches one server per replica (RolloutReplicaRegistry "hf").
- `HFServerAdapter`: the `BaseRollout` living in the trainer's worker process (hybrid engine). On each
  weight sync it drains the weight generator on every rank (the FSDP gather is collective) and ships
  the full tensors of its replica to the server.

This is the CPU server (fp32, on the CPU). popo_verl/rollout/hf_gpu.py subclasses it for a GPU: it overrides the
hooks below (`device`, `_load_model`, `_sample`, `_forward_kwargs`, `_server_placement`), which on the CPU do
exactly what this module always did.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import ray
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from popo_verl.protocol import PREDICTOR_PREFIX

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARNING"))

SERVER_NAME_PREFIX = "hf_"
#: Parameter names that never belong in the rollout model (filled by POPO's predictor head, say).
EXCLUDED_WEIGHT_PREFIXES: tuple[str, ...] = (PREDICTOR_PREFIX,)


def _server_name(replica_rank: int, node_rank: int = 0) -> str:
    return f"{SERVER_NAME_PREFIX}server_{replica_rank}_{node_rank}"


def _sampling_key(params: dict[str, Any], max_tokens: int) -> tuple:
    temperature = float(params.get("temperature", 1.0) or 0.0)
    top_p = float(params.get("top_p", 1.0) if params.get("top_p") is not None else 1.0)
    top_k = int(params.get("top_k", -1) if params.get("top_k") is not None else -1)
    return (temperature, top_p, top_k, int(max_tokens), bool(params.get("ignore_eos", False)))


@dataclass
class _Request:
    prompt_ids: list[int]
    key: tuple
    future: asyncio.Future
    request_id: str = ""
    extra: dict = field(default_factory=dict)


def _filter_top_k_top_p(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the top-k tokens and the smallest set whose mass reaches top_p (rows renormalised)."""
    if top_k is not None and top_k > 0 and top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = cum - sorted_p > top_p * cum[..., -1:]
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return probs / probs.sum(-1, keepdim=True).clamp(min=1e-30)


class HFRolloutServer:
    """Serves verl's `generate(prompt_ids, sampling_params, request_id)` with batched HF generation."""

    #: where the model, the batch and the KV cache live (the GPU server sets its own)
    device = torch.device("cpu")
    #: extra keyword arguments of every model forward (none on the CPU)
    _forward_kwargs: dict = {}

    def __init__(
        self,
        config,
        model_config,
        rollout_mode: RolloutMode = RolloutMode.HYBRID,
        workers: Optional[list] = None,
        replica_rank: int = 0,
        node_rank: int = 0,
        gpus_per_node: int = 1,
        nnodes: int = 1,
        cuda_visible_devices: str = "",
        **kwargs,
    ):
        self.config = config
        self.model_config = model_config
        self.rollout_mode = rollout_mode
        self.replica_rank = replica_rank
        self.node_rank = node_rank
        self.global_steps: Optional[int] = None
        self.weight_version = 0
        threads = int(os.environ.get("POPO_VERL_ROLLOUT_THREADS", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        path = getattr(model_config, "local_path", None) or model_config.path
        self.model = self._load_model(path)
        self.model.eval()
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.model.config.eos_token_id
        self.eos_ids: list[int] = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else self.model.config.pad_token_id
        self.pad_id: int = int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self.max_batch = int(getattr(config, "max_num_seqs", 256) or 256)
        self._queue: list[_Request] = []
        self._wakeup: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        self._seed = int(getattr(config, "seed", 0) or 0) + 1000 * replica_rank
        self._seen_step: int | None = None
        self._seen: dict = {}
        self.num_generated = 0

    def _load_model(self, path: str, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation="sdpa",
            trust_remote_code=bool(getattr(self.model_config, "trust_remote_code", False)),
        )

    # ------------------------------------------------------------------ server surface used by verl
    def get_master_address(self):
        return "127.0.0.1", 0, 0

    def get_server_address(self):
        return f"hf-replica-{self.replica_rank}", self.node_rank

    async def launch_server(self, *args, **kwargs):
        return None

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority: int = 0,
        **kwargs,
    ) -> TokenOutput:
        if image_data is not None or video_data is not None or audio_data is not None:
            raise NotImplementedError("the hf rollout serves text-only models")
        prompt_ids = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        params = dict(sampling_params or {})
        max_len = int(self.config.prompt_length + self.config.response_length)
        room = max_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room to generate within {max_len}")
        if "max_tokens" in params:
            max_tokens = int(params.pop("max_tokens"))
        elif "max_new_tokens" in params:
            max_tokens = int(params.pop("max_new_tokens"))
        else:
            max_tokens = int(self.config.response_length)
        max_tokens = max(1, min(max_tokens, room, int(self.config.response_length)))
        loop = asyncio.get_running_loop()
        req = _Request(prompt_ids, _sampling_key(params, max_tokens), loop.create_future(), request_id)
        self._ensure_loop()
        self._queue.append(req)
        self._wakeup.set()
        token_ids, log_probs = await req.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, "weight_version": self.weight_version},
        )

    def _ensure_loop(self):
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self):
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Let concurrent callers of this event-loop tick enqueue before the batch is cut.
            await asyncio.sleep(0.005)
            while self._queue:
                key = self._queue[0].key
                batch = [r for r in self._queue if r.key == key][: self.max_batch]
                ids = {id(r) for r in batch}
                self._queue = [r for r in self._queue if id(r) not in ids]
                try:
                    results = await asyncio.to_thread(self._generate_batch, [r.prompt_ids for r in batch], key)
                    for r, res in zip(batch, results, strict=True):
                        if not r.future.done():
                            r.future.set_result(res)
                except Exception as e:  # surface the error in every waiting agent loop
                    logger.exception("hf rollout: batch generation failed")
                    for r in batch:
                        if not r.future.done():
                            r.future.set_exception(e)

    def _request_seeds(self, prompts: list[list[int]]) -> list[int]:
        """A seed per request from (seed, step, prompt, how often this prompt was seen this step).

        The same prompts at the same step sample the same responses whatever the batching, so a run
        resumed from a checkpoint regenerates exactly what an uninterrupted run would have.
        """
        step = -1 if self.global_steps is None else int(self.global_steps)
        if self._seen_step != step:
            self._seen_step, self._seen = step, {}
        seeds = []
        for p in prompts:
            key = tuple(p)
            k = self._seen.get(key, 0)
            self._seen[key] = k + 1
            digest = hashlib.blake2b(repr((self._seed, step, key, k)).encode(), digest_size=8).digest()
            seeds.append(int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF)
        return seeds

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], key: tuple) -> list[tuple[list[int], list[float]]]:
        """Left-padded batched decoding with a KV cache; per-request seeded sampling."""
        temperature, top_p, top_k, max_tokens, ignore_eos = key
        greedy = temperature <= 0.0
        gens = [] if greedy else [torch.Generator().manual_seed(s) for s in self._request_seeds(prompts)]
        bsz, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((bsz, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        input_ids, mask, position_ids = (t.to(self.device) for t in (input_ids, mask, position_ids))
        eos = torch.tensor(self.eos_ids if not ignore_eos else [], dtype=torch.long, device=self.device)
        finished = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        tokens, logps = [], []
        past, cur_ids, cur_pos = None, input_ids, position_ids
        for _ in range(max_tokens):
            out = self.model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, past_key_values=past, use_cache=True,
                             **self._forward_kwargs)
            past = out.past_key_values
            logits = out.logits[:, -1, :].float()
            if greedy:
                logp = torch.log_softmax(logits, dim=-1)
                tok = logits.argmax(dim=-1)
            else:
                # log-probs of the temperature-scaled model distribution, as the actor computes them
                logp = torch.log_softmax(logits / temperature, dim=-1)
                probs = _filter_top_k_top_p(logp.exp(), top_k, top_p)
                tok = self._sample(probs, gens)
            tok = torch.where(finished, torch.full_like(tok, self.pad_id), tok)
            tokens.append(tok)
            logps.append(logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1))
            if eos.numel():
                finished |= torch.isin(tok, eos)
            if bool(finished.all()):
                break
            cur_ids = tok.unsqueeze(-1)
            cur_pos = cur_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=self.device)], dim=-1)
        toks = torch.stack(tokens, dim=1).cpu()
        lps = torch.stack(logps, dim=1).cpu()
        results = []
        eos_set = set(eos.tolist())
        for i in range(bsz):
            row = toks[i].tolist()
            n = len(row)
            for j, t in enumerate(row):
                if t in eos_set:
                    n = j + 1
                    break
            results.append((row[:n], lps[i, :n].tolist()))
        self.num_generated += bsz
        return results

    @staticmethod
    def _sample(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """One token per row, drawn from that row's request generator."""
        return torch.stack([torch.multinomial(probs[i], 1, generator=gens[i])[0] for i in range(len(gens))])

    def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> int:
        """Load the trainer's weights; returns how many tensors were loaded."""
        state = self.model.state_dict()
        unknown = [n for n in named_tensors if n not in state]
        if unknown:
            raise KeyError(f"hf rollout: weights not in the rollout model: {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in named_tensors.items():
                state[name].copy_(tensor.to(state[name].dtype))
        self.weight_version += 1
        if global_steps is not None:
            self.global_steps = global_steps
        return len(named_tensors)

    def get_state(self) -> dict[str, torch.Tensor]:
        """The rollout model's current weights (tests compare them with the actor's)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def stats(self) -> dict[str, int]:
        return {"num_generated": self.num_generated, "weight_version": self.weight_version}

    # lifecycle calls verl makes on every server; nothing to free on the CPU
    async def wake_up(self, tags=None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    async def wait_for_requests_to_drain(self):
        while self._queue:
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        # Generation is not interruptible mid-batch; queued requests simply run after the sync.
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True):
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self):
        return None

    async def resume_engine_generation(self):
        return None

    async def open_submission_gate(self):
        return None


class HFReplica(RolloutReplica):
    """One `HFRolloutServer` per replica, next to the trainer's workers (verl's RolloutReplica API)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(HFRolloutServer)

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def _server_placement(self) -> tuple[str, dict, dict]:
        """(node id, extra Ray actor options, extra server arguments): the node of the replica's first trainer
        worker, no CPU reserved (the server works while the trainer waits for it)."""
        node_id = ray.get_runtime_context().get_node_id()
        if self.workers:
            node_id = await self.workers[0].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        return node_id, {"num_cpus": 0}, {}

    async def launch_servers(self):
        node_id, options, server_kwargs = await self._server_placement()
        name = _server_name(self.replica_rank)
        if self.is_reward_model:
            name = f"{SERVER_NAME_PREFIX}server_reward_{self.replica_rank}_0{self.name_suffix}"
        elif self.is_teacher_model:
            name = f"{SERVER_NAME_PREFIX}server_teacher_{self.replica_rank}_0{self.name_suffix}"
        server = self.server_class.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            name=name,
            max_concurrency=self.max_concurrency,
            **options,
        ).remote(
            config=self.config,
            model_config=self.model_config,
            rollout_mode=self.rollout_mode,
            replica_rank=self.replica_rank,
            **server_kwargs,
        )
        self.servers = [server]
        address, port = await server.get_server_address.remote()
        await server.launch_server.remote()
        self._server_handle = server
        self._server_address = f"{address}:{port}"


class HFServerAdapter(BaseRollout):
    """The hybrid-engine side of the hf rollout (verl's ServerAdapter contract)."""

    def __init__(self, config, model_config, device_mesh, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = int(self.config.tensor_model_parallel_size) * int(self.config.data_parallel_size)
        world *= int(self.config.pipeline_model_parallel_size)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self._has_server = self.rollout_rank == 0
        self.server_handle = None

    def _server(self):
        if self.server_handle is None:
            self.server_handle = ray.get_actor(_server_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"hf rollout receives full named tensors, not {wire_format!r}")
        collected: dict[str, torch.Tensor] = {}
        # Every rank drains the generator: producing each full tensor is a collective gather.
        async for name, tensor in ensure_async_iterator(weights):
            if name.startswith(EXCLUDED_WEIGHT_PREFIXES):
                continue
            if self._has_server:
                collected[name] = tensor.detach().to("cpu", copy=True)
        if self._has_server:
            await self._server().update_weights.remote(collected, kwargs.get("global_steps"))
