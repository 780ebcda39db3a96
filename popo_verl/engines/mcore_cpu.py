"""megatron-core on the CPU: a stand-in for the GPU and for Transformer Engine, for tests and CPU demos only.

megatron-core 0.16.1 (the newest for Python 3.11) with mbridge 0.15.1 (verl's `vanilla_mbridge` path; verl's
default, Megatron-Bridge 0.5.2, needs Python 3.12) does not run on a CPU torch as shipped. The first failing
call, building verl 0.9.1's MegatronEngineWithLMHead on one gloo rank:

    verl/workers/engine/megatron/utils.py:38 set_random_seed -> tensor_parallel.model_parallel_cuda_manual_seed(seed)
    megatron/core/tensor_parallel/random.py:235 CudaRNGStatesTracker.add: orig_rng_state = torch.cuda.get_rng_state()
    AssertionError: Torch not compiled with CUDA enabled

`install()` replaces what only exists with a GPU, each item below the next failure met after the one before:
1. the CUDA RNG tracker keeps CPU generator states (megatron/core/tensor_parallel/random.py);
2. `torch.cuda.current_device/synchronize/get_rng_state/manual_seed` and `Tensor.cuda/Module.cuda` act on the
   CPU (mbridge/core/util.py `get_model`: `.cuda(torch.cuda.current_device())`; p2p_communication.py);
3. a torch-function mode maps `device="cuda"` to the CPU, drops `pin_memory`, and reports CPU tensors' `type()` as
   `torch.cuda.*` (megatron/core/optimizer/optimizer.py: `torch.tensor(..., device='cuda')`; distrib_optimizer.py
   accepts only `torch.cuda.*Tensor` parameters; megatron's rope_utils.py pins memory under context parallelism);
4. mbridge builds Transformer Engine layer specs only (mbridge/core/llm_bridge.py `_get_transformer_layer_spec`,
   TENorm: NameError): use megatron's local spec, with
   - a core attention on torch SDPA that takes packed THD micro-batches (`cu_seqlens_q_padded`) and verl's
     (B, S) padding mask (megatron's local DotProductAttention takes neither), and context parallelism (each
     rank's zigzag shard of queries against the group's gathered keys and values, packed or padded),
   - RMSNorm that allows sequence parallelism (its weight marked `sequence_parallel`, as TE's norm does),
   - mbridge's weight names for the local spec's separate norms (TE fuses them into the linear layers);
5. without Apex or TE, megatron's distributed optimizer cannot build its state dict before its first step, which
   verl's checkpoint load does first: a resumed run gets megatron's dummy states before the load.
`prepare_model_merger()` does the same for verl's MegatronModelMerger (popo_verl/model_merger.py on the CPU).
What runs for real: verl's engine, megatron-core's parallel layers, DDP, distributed optimizer, pipeline
schedules (p2p over gloo), dist checkpointing, mbridge's weight loading and export.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _cpu(device):
    if isinstance(device, str) and (device.startswith("cuda") or device.startswith("cpu:")):
        return "cpu"  # "cpu:cpu": verl's f"{get_device_name()}:{get_device_id()}" on the CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"
    return device


class CudaToCpu(TorchFunctionMode):
    """device='cuda' -> CPU; a CPU tensor's type() reads torch.cuda.* (megatron's optimizers check it)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        if kwargs.get("pin_memory"):  # no pinned memory without an accelerator (rope_utils.py, context parallel)
            kwargs["pin_memory"] = False
        name = getattr(func, "__name__", "")
        if name == "to" and len(args) > 1:  # Tensor.to(device)
            args = (args[0], _cpu(args[1]), *args[2:])
        elif name == "_parse_to" and args:  # Module.to(device)
            args = (_cpu(args[0]), *args[1:])
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and isinstance(out, str) \
                and out.startswith("torch.") and not out.startswith("torch.cuda."):
            out = "torch.cuda." + out[len("torch."):]
        return out


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, device=None, non_blocking=False, memory_format=None: self


def _sdpa_core_attention():
    from megatron.core.transformer.module import MegatronModule

    class SDPACoreAttention(MegatronModule):
        """Causal attention with torch SDPA, GQA by repeating K/V heads, for THD and BSHD micro-batches."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
            super().__init__(config=config)
            self.cp = config.context_parallel_size
            self.scale = softmax_scale

        def _attend(self, q, k, v, key_mask=None, q_pos=None, k_pos=None):  # (B, S, heads, d)
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if q_pos is not None:  # a context-parallel shard of queries against the whole sequence's keys
                mask = k_pos[None, :] <= q_pos[:, None]
                if key_mask is not None:  # padding keys masked; a padding query attends to itself (no NaN)
                    mask = (mask[None] & key_mask[:, None, :].bool()) | (k_pos[None, :] == q_pos[:, None])[None]
                    mask = mask.unsqueeze(1)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)
            s = q.shape[2]
            mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
            if key_mask is not None:  # padding keys masked; a padding query attends to itself (no NaN)
                mask = (mask.unsqueeze(0) & key_mask[:, None, :].bool()) | torch.eye(s, dtype=torch.bool, device=q.device)
                mask = mask.unsqueeze(1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if self.cp > 1 and packed_seq_params is not None:
                return _thd_context_parallel(self._attend, query, key, value, packed_seq_params)
            if self.cp > 1:
                return _bshd_context_parallel(self._attend, query, key, value, attention_mask)
            if packed_seq_params is not None:  # THD: (t, heads, d), sequences back to back (padded slots)
                cu = packed_seq_params.cu_seqlens_q_padded.tolist()
                out = torch.empty_like(query)
                for a, b in zip(cu[:-1], cu[1:]):
                    out[a:b] = self._attend(query[a:b][None], key[a:b][None], value[a:b][None])[0]
                return out
            q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # (s, b, ...) -> (b, s, ...)
            key_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            out = self._attend(q, k, v, key_mask)
            return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)

    return SDPACoreAttention


class _GatherFromContextParallel(torch.autograd.Function):
    """All ranks' shards of the context-parallel group, stacked (cp, ...); backward: each rank's shard gets the sum
    of every rank's gradient for it (an all-reduce: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        shards = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(shards, x.contiguous(), group=group)
        return torch.stack(shards)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[torch.distributed.get_rank(ctx.group)], None


def _zigzag_positions(rank, chunk, n):
    """Positions in a sequence of n tokens of a context-parallel rank's two chunks (rank and 2cp-1-rank of 2cp)."""
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange(n - (rank + 1) * chunk, n - rank * chunk)])


def _bshd_context_parallel(attend, query, key, value, attention_mask):
    """Padded micro-batches (s_local, b, heads, d), each row split zigzag over the context-parallel ranks (verl's
    `preprocess_bshd_engine`; its (b, s_local) padding mask is each rank's own): every query against the group's
    gathered keys at or before its position."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_context_parallel_group()
    cp, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    s_local = query.shape[0]
    chunk, n = s_local // 2, s_local * cp
    k_pos = torch.cat([_zigzag_positions(r, chunk, n) for r in range(cp)]).to(query.device)
    keys = _GatherFromContextParallel.apply(key, group).flatten(0, 1)  # (cp * s_local, b, heads, d)
    values = _GatherFromContextParallel.apply(value, group).flatten(0, 1)
    key_mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        masks = [torch.empty_like(attention_mask) for _ in range(cp)]
        torch.distributed.all_gather(masks, attention_mask.contiguous(), group=group)
        key_mask = torch.cat(masks, dim=1)  # (b, cp * s_local), in the keys' order
    q, k, v = (x.transpose(0, 1) for x in (query, keys, values))
    out = attend(q, k, v, key_mask, q_pos=_zigzag_positions(rank, chunk, n).to(query.device), k_pos=k_pos)
    return out.transpose(0, 1).reshape(out.shape[1], out.shape[0], -1)


def _thd_context_parallel(attend, query, key, value, packed):
    """Causal attention of this rank's zigzag shard of each packed sequence (chunks r and 2cp-1-r of 2cp, verl's
    `preprocess_thd_engine` layout; `cu_seqlens_q_padded` counts the whole sequences) against every rank's keys:
    the keys and values of the context-parallel group are gathered, each token keeps its position in its sequence,
    and a query sees the keys at or before its own position."""
    from megatron.core import parallel_state as mpu

    group = packed.cp_group if getattr(packed, "cp_group", None) is not None else mpu.get_context_parallel_group()
    cp, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    keys, values = _GatherFromContextParallel.apply(key, group), _GatherFromContextParallel.apply(value, group)
    cu = packed.cu_seqlens_q_padded.tolist()
    out = torch.empty_like(query)
    for start, end in zip(cu[:-1], cu[1:]):
        chunk = (end - start) // (2 * cp)
        a, n = start // cp, end - start  # this sequence's rows in every rank's local buffer: [a, a + 2 * chunk)
        k_pos = torch.cat([_zigzag_positions(r, chunk, n) for r in range(cp)]).to(query.device)
        k = torch.cat([keys[r, a:a + 2 * chunk] for r in range(cp)])
        v = torch.cat([values[r, a:a + 2 * chunk] for r in range(cp)])
        out[a:a + 2 * chunk] = attend(query[a:a + 2 * chunk][None], k[None], v[None],
                                      q_pos=_zigzag_positions(rank, chunk, n).to(query.device), k_pos=k_pos)[0]
    return out


_CORE_ATTENTION = None


def local_block_spec(config, use_transformer_engine=True, vp_stage=None, **kwargs):
    """megatron's decoder block spec on local layers (whatever `use_transformer_engine` asks), attention on SDPA."""
    global _CORE_ATTENTION
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if _CORE_ATTENTION is None:
        _CORE_ATTENTION = _sdpa_core_attention()
    if "vp_stage" in inspect.signature(get_gpt_decoder_block_spec).parameters:
        kwargs["vp_stage"] = vp_stage
    kwargs.setdefault("normalization", "RMSNorm")
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, **kwargs)
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = _CORE_ATTENTION
    return spec


def _patch_layer_spec() -> None:
    from mbridge.core import llm_bridge
    from mbridge.models.qwen2 import Qwen2Bridge
    from megatron.core.transformer import torch_norm

    llm_bridge.LLMBridge._get_transformer_layer_spec = lambda self, vp_stage=None: local_block_spec(
        self.config, vp_stage=vp_stage)

    def norm(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
             normalization="LayerNorm"):
        module = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        if config.sequence_parallel:
            module.weight.sequence_parallel = True  # its gradient is summed over TP ranks, as TE's norm
        return module

    torch_norm.WrappedTorchNorm.__new__ = norm
    Qwen2Bridge._OTHER_MAPPING = {
        **getattr(Qwen2Bridge, "_OTHER_MAPPING", {}),
        "input_layernorm.weight": ["model.layers.{layer_number}.input_layernorm.weight"],
    }
    Qwen2Bridge._MLP_MAPPING = {
        **Qwen2Bridge._MLP_MAPPING,
        "pre_mlp_layernorm.weight": ["model.layers.{layer_number}.post_attention_layernorm.weight"],
    }


def _patch_optimizer_resume() -> None:
    """A fresh distributed optimizer without Apex or TE (Adam from torch) has no state yet, so its `state_dict()`
    finds no `step` to save alongside and asserts (megatron/core/optimizer/distrib_optimizer.py `state_dict`:
    `assert len(steps) == 1`), which verl's load calls first: a resumed run failed before loading. Give it
    megatron's own dummy states first (`_init_optimizer_states_with_dummy_values`, what it does for its FSDP
    format); the checkpoint's states then replace them in place."""
    from megatron.core.optimizer import distrib_optimizer

    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        return
    cls = distrib_optimizer.DistributedOptimizer
    original = cls.sharded_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not any(len(state) for state in self.optimizer.state.values()):
            self._init_optimizer_states_with_dummy_values()
        return original(self, {} if model_sharded_state_dict is None else model_sharded_state_dict, is_loading,
                        *args, **kwargs)

    cls.sharded_state_dict = sharded_state_dict


#: the engine overrides megatron needs on the CPU: local attention, CPU initialisation
ENGINE_OVERRIDES = {"attention_backend": "local", "use_cpu_initialization": True}


def prepare_worker(config) -> None:
    """In a verl worker on the CPU (popo_verl/workers.py, before the engines are built from `config`, the
    actor_rollout_ref DictConfig): install the stand-in and set the engine overrides it needs on the actor's and
    the siamese's Megatron configs (a user's own override_transformer_config keys win)."""
    from omegaconf import open_dict

    install()
    for role in ("actor", "ref"):
        megatron = config.get(role, {}).get("megatron", None)
        if megatron is None:
            continue
        with open_dict(megatron):
            if megatron.get("override_transformer_config", None) is None:
                megatron.override_transformer_config = {}
            for key, value in ENGINE_OVERRIDES.items():
                megatron.override_transformer_config.setdefault(key, value)


def prepare_model_merger() -> None:
    """verl's MegatronModelMerger (verl/model_merger/megatron_model_merger.py) on the CPU: the stand-in, gloo instead
    of its NCCL process group, and local layers in verl's own model builders (verl/models/mcore/model_initializer.py
    asks `get_gpt_decoder_block_spec` for Transformer Engine layers). The merger copies weights, computes nothing;
    its dist-checkpoint keys are the same for local and TE layers (megatron maps the local norms to TE's names)."""
    install()
    from verl.model_merger import megatron_model_merger
    from verl.models.mcore import model_initializer

    megatron_model_merger.get_nccl_backend = lambda: "gloo"
    model_initializer.get_gpt_decoder_block_spec = local_block_spec


def install() -> None:
    """Make megatron-core, mbridge and verl's Megatron engine run on the CPU in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("popo_verl.engines.mcore_cpu is for machines without a GPU")
    _patch_rng()
    _patch_layer_spec()
    _patch_optimizer_resume()
    CudaToCpu().__enter__()
    _INSTALLED = True
