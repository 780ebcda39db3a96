"""POPO's Megatron engine: pooled final-norm hidden states, the predictor head, the siamese's fp32 shadow.

Subclass of verl 0.9.1's `MegatronEngineWithLMHead` (verl/workers/engine/megatron/transformer_impl.py); needs
megatron-core (`pip install -e ".[megatron]"`): importing this module without it raises ImportError, and
popo_verl.workers imports it only when verl's engine is the Megatron one.
- `_build_megatron_module` hands the model builder one more post-creation callback (mbridge's
  `post_model_creation_callbacks`, Megatron-Bridge's pre-wrap hook): on the last pipeline stage it attaches
  `core.PredictorHead` as `popo_predictor` to the GPTModel *before* DDP wraps it, so the head is in Megatron's
  DDP buffers, its distributed optimizer and its sharded state dict. The head refuses dtype casts
  (`Float16Module` casts the whole model to bf16): it is stored and computed in fp32. Forward-only engines (the
  siamese) get no head: the BYOL asymmetry.
- A forward hook on the final norm (`decoder.final_layernorm`, last stage) pools the post-norm hidden states
  over the response tokens (first response token through EOS, the FSDP engine's window): under sequence
  parallelism the tensor-parallel ranks' slices are gathered first (backward: each rank keeps its slice's
  gradient, the pooled computation being replicated over TP); packed (THD) and padded (BSHD) micro-batches, and
  their context-parallel shards, are unpacked with verl's own helpers (verl/models/mcore/util.py
  `postprocess_thd_engine` / `postprocess_bshd_engine`, as verl does for the log-probs). The head runs on the
  pooled state in fp32; both join verl's model output (`popo_pooled`, `popo_pred`).
- `optimizer_step` keeps the head's gradient out of the policy's clip norm (the FSDP engine's rule): while
  Megatron's optimizer steps, its sub-optimizers list the policy's parameters only for the norm and the clip,
  and the head's main-gradient shards are clipped on their own (`predictor_clip_grad`, 0 = none) just before
  the update.
- The head is hidden from the bridge's HF weight names: from the weights sent to the rollout engine
  (`get_per_tensor_param`), from HF weight loading and from the HF export of verl's checkpoints, and from the
  start-up load of converted Megatron shards (`use_dist_checkpointing`); it stays in checkpoints' dist shards
  and in the optimizer's state.
- `MegatronSiamese`: the siamese in the ref role keeps verl's bf16 forward-only Megatron model (verl allows no
  fp32 Megatron model: `McoreEngineConfig.dtype`) plus an fp32 shadow (same TP/PP layout as the actor's); the EMA
  follows the optimizer's fp32 main parameters (under the distributed optimizer each rank's shadow is the shard of
  the main parameters it owns), and is then written into the model. With the actor or the ref offloaded, the
  shadow lives in pinned host memory and passes through the device parameter by parameter at each update.
tests/test_megatron_engine.py builds these on megatron-core on the CPU (popo_verl/engines/mcore_cpu.py) and
pins what they rely on.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from megatron.core import parallel_state as mpu
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared
from verl.models.mcore.util import (
    postprocess_bshd_engine,
    postprocess_thd_engine,
    preprocess_bshd_engine,
    preprocess_thd_engine,
)
from verl.utils import tensordict_utils as tu
from verl.utils.megatron_utils import unwrap_model
from verl.workers.engine.megatron import transformer_impl
from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

from popo_verl import core
from popo_verl.engines.common import PopoEngineBase, Siamese, response_states
from popo_verl.protocol import POOLED_KEY, PRED_KEY, PREDICTOR_ATTR, is_predictor_param


class Fp32PredictorHead(core.PredictorHead):
    """The predictor head, pinned to fp32: a cast of the whole model (Megatron's `Float16Module` calls
    `module.bfloat16()`) leaves it fp32; moves between devices still apply."""

    def _apply(self, fn, recurse=True):
        # the probe sits where the head does: a dtype-only cast (`Float16Module`'s `module.bfloat16()` after
        # mbridge's `.cuda()`) leaves it there, so the head stays on its device (a CPU probe took it to the CPU)
        here = next(self.parameters(), None)
        probe = fn(torch.zeros(1, device=here.device if here is not None else "cpu"))
        if probe.dtype != torch.float32:  # a dtype cast: keep fp32, follow the device only
            return super()._apply(lambda t: t.to(device=probe.device), recurse)
        return super()._apply(fn, recurse)


def last_stage_chunks(module) -> list[torch.nn.Module]:
    """The unwrapped GPTModel chunks of this rank that hold the final norm and the LM head (post_process)."""
    return [m for m in unwrap_model(list(module)) if getattr(m, "post_process", False)]


def counted_once(param: torch.Tensor) -> bool:
    """Whether this rank's copy of a local model parameter counts in a global sum over all ranks: data- and
    context-parallel replicas and tensor-parallel duplicates (replicated weights such as norms) count once."""
    if mpu.get_data_parallel_rank(with_context_parallel=True) != 0:
        return False
    return distinct_weight(param)


def distinct_weight(param: torch.Tensor) -> bool:
    """Not a copy of a weight counted on another model-parallel rank: a tensor-parallel duplicate, or the last
    pipeline stage's copy of tied embeddings (`shared`): megatron's rule for its grad norm
    (megatron/core/optimizer/optimizer.py `get_main_grads_for_grad_norm`)."""
    return bool(param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param))


@contextlib.contextmanager
def head_detached(models):
    """Take the predictor head out of each model chunk (DDP/Float16Module unwrapped) and put it back after."""
    chunks = unwrap_model(list(models) if isinstance(models, (list, tuple)) else [models])
    detached = [(m, m._modules.pop(PREDICTOR_ATTR)) for m in chunks if PREDICTOR_ATTR in m._modules]
    try:
        yield
    finally:
        for m, head in detached:
            m._modules[PREDICTOR_ATTR] = head


def reindex_mixed_dtype_groups(opt) -> None:
    """Point each model parameter at its own main shard in the distributed optimizer's groups.

    megatron-core 0.16.1's DistributedOptimizer (megatron/core/optimizer/distrib_optimizer.py) numbers a group's
    parameters in grad-buffer order (`_build_optimizer_group_ranges`) but lists the group's main shards fp32 params
    first, then those of bf16/fp16 params (`_build_model_and_main_param_groups`). They agree while a group holds one
    dtype; POPO's fp32 head in a bf16 model makes groups mixed, and then the checkpoint's state lookup
    (`_get_main_param_and_optimizer_states`) pairs parameters with other parameters' states: saving fails on a
    shape assertion, or a load writes states into the wrong parameters. The step itself never uses this map."""
    index = getattr(opt, "model_param_group_index_map", None)
    if index is None:  # not the distributed optimizer: states are keyed by the parameters themselves
        return
    for group, (fp32, float16) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups, strict=True)):
        for order, param in enumerate([*fp32, *float16]):
            index[param] = (group, order)


class PopoMegatronEngine(PopoEngineBase, MegatronEngineWithLMHead):
    """Megatron engine that also returns POPO's pooled representation (and predictor output)."""

    @property
    def _popo_has_head(self) -> bool:
        return not self.engine_config.forward_only and self.popo_predictor_layers > 0

    # ------------------------------------------------------------------ model construction
    def _popo_attach_head(self, model, *args, post_process=None, **kwargs):
        """Post-creation callback (mbridge) / pre-wrap hook (Megatron-Bridge): the head on the last stage."""
        chunks = model if isinstance(model, list) else [model]
        for chunk in chunks:
            last = post_process if post_process is not None else getattr(chunk, "post_process", False)
            if not last:
                continue
            hidden = chunk.config.hidden_size
            # Same seed on every rank: the head's replicas over TP/DP start equal.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.popo_predictor_seed)
                head = Fp32PredictorHead(hidden, self.popo_predictor_hidden, self.popo_predictor_layers)
            setattr(chunk, PREDICTOR_ATTR, head.float())
        return model

    #: the bridges' eager methods that map every model weight to an HF name (which the head has none of):
    #: HF weight loading at build and resume, HF saving in checkpoints (mbridge: load_weights/save_weights,
    #: Megatron-Bridge: load_hf_weights/save_hf_weights; verl/workers/engine/megatron/transformer_impl.py and
    #: verl/utils/checkpoint/megatron_checkpoint_manager.py call them with the model list first)
    BRIDGE_HF_METHODS = ("load_weights", "save_weights", "load_hf_weights", "save_hf_weights")

    def _build_megatron_module(self):
        if self._popo_has_head:
            if self.provider is not None:  # Megatron-Bridge: hooks run before DDP wrapping
                self.provider.register_pre_wrap_hook(self._popo_attach_head)
            else:  # mbridge: its get_model calls each callback on every model it builds, before DDP
                build = self.bridge.get_model

                def get_model(*args, post_model_creation_callbacks=(), **kwargs):
                    callbacks = [*post_model_creation_callbacks, self._popo_attach_head]
                    return build(*args, post_model_creation_callbacks=callbacks, **kwargs)

                self.bridge.get_model = get_model
            for name in self.BRIDGE_HF_METHODS:
                if hasattr(self.bridge, name):
                    setattr(self.bridge, name, self._without_head(getattr(self.bridge, name)))
        # use_dist_checkpointing=True starts from Megatron shards converted from the HF model, which have no head:
        # loaded with it, dist checkpointing fails on the head's keys (verl loads with
        # StrictHandling.ASSUME_OK_UNEXPECTED). verl/workers/engine/megatron/transformer_impl.py
        # `_build_megatron_module` calls that module's `load_mcore_dist_weights`: swapped while it builds.
        load_dist = transformer_impl.load_mcore_dist_weights
        transformer_impl.load_mcore_dist_weights = self._without_head(load_dist)
        try:
            module = super()._build_megatron_module()
        finally:
            transformer_impl.load_mcore_dist_weights = load_dist
            self.bridge.__dict__.pop("get_model", None)
        if self.engine_config.use_dist_checkpointing and getattr(self.bridge, "safetensor_io", ()) is None:
            # mbridge 0.15.1 (mbridge/core/bridge.py) sets up the HF file index that `save_weights` writes through
            # in `load_weights` only, which a start from Megatron shards skips: the checkpoint's HF export failed
            # ('NoneType' object has no attribute 'save_hf_weight'). The index of the model's own HF folder.
            self.bridge.safetensor_io = self.bridge._get_safetensor_io(self.model_config.local_path)
        self._popo_hooks = [m.decoder.final_layernorm.register_forward_hook(self._popo_norm_hook)
                            for m in last_stage_chunks(module)]
        return module

    @staticmethod
    def _without_head(bridge_method):
        def run(models, *args, **kwargs):
            with head_detached(models):
                return bridge_method(models, *args, **kwargs)

        return run

    def initialize(self):
        super().initialize()
        for opt in self._sub_optimizers():
            reindex_mixed_dtype_groups(opt)
        self._popo_head_shards = self._find_head_shards()

    def popo_heads(self) -> list[torch.nn.Module]:
        return [h for h in (getattr(m, PREDICTOR_ATTR, None) for m in unwrap_model(list(self.module))) if h is not None]

    def popo_head_detached(self):
        """The model without the head (for the bridges' HF name mapping, which knows no such weight)."""
        return head_detached(self.module)

    # ------------------------------------------------------------------ forward
    def forward_step(self, batch_iter, model, logits_processor_func, postprocess_micro_batch_func):
        batch = next(batch_iter)
        self._popo_micro_batch = batch.to(self._popo_device())
        self._popo_model = unwrap_model(model)
        self._popo_captured = None
        try:
            output, post = super().forward_step(iter([batch]), model, logits_processor_func, postprocess_micro_batch_func)
            captured = self._popo_captured
        finally:
            self._popo_micro_batch = self._popo_captured = self._popo_model = None
        if captured is not None:  # the last stage: its output is verl's dict of per-token outputs
            if not isinstance(output, dict):
                raise RuntimeError(f"POPO: expected the last stage's output dict, got {type(output).__name__}")
            output.update(captured)
        elif self._popo_model_is_last(model):
            raise RuntimeError("POPO: the final-norm hook did not run during the forward pass")
        return output, post

    @staticmethod
    def _popo_model_is_last(model) -> bool:
        return bool(getattr(unwrap_model(model), "post_process", False))

    def _popo_device(self):
        from verl.utils.device import get_device_id

        return get_device_id()

    def _popo_norm_hook(self, norm_module, inputs, output):
        mb = getattr(self, "_popo_micro_batch", None)
        if mb is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # (s_local, b, H): THD has b = 1
        if self._popo_model.config.sequence_parallel:
            # slices of the sequence over TP ranks; the pooled state and the head are computed on every TP rank
            # alike, so backward keeps each rank's slice of the gradient (no reduction)
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        rows = self._popo_rows(hidden.transpose(0, 1), mb)  # nested (B, j, H): each row's tokens in order
        per_token = response_states(rows.values(), mb)  # (B, R, H): the states *at* the response tokens
        mask = mb["response_mask"]
        mask = mask.to_padded_tensor(0) if mask.is_nested else mask
        pooled = core.masked_mean_pool(per_token.float(), mask[:, : per_token.shape[1]].to(per_token.device))
        captured = {POOLED_KEY: pooled}
        head = getattr(self._popo_model, PREDICTOR_ATTR, None)
        if head is not None and torch.is_grad_enabled():
            with torch.autocast(device_type=pooled.device.type, enabled=False):
                captured[PRED_KEY] = head(pooled.float()).float()
        elif self.popo_predictor_layers == 0 and not self.engine_config.forward_only and torch.is_grad_enabled():
            captured[PRED_KEY] = pooled.float()  # identity head (predictor_layers=0)
        self._popo_captured = captured
        return None

    def _popo_rows(self, hidden: torch.Tensor, mb) -> torch.Tensor:
        """(b, s, H) as the model saw the micro-batch -> nested (B, j, H), every token of each row in order, with
        verl's own unpacking (the one verl applies to the log-probs, context-parallel gather included)."""
        ids = mb["input_ids"]
        cp_layout = self._get_context_parallel_layout(self._popo_model)
        local_cp_size = tu.get_non_tensor_data(data=mb, key="local_cp_size", default=None)
        if self.engine_config.use_remove_padding:
            bucket = self.engine_config.pad_to_length_bucket if self.engine_config.pad_to_length else None
            _, packed, _ = preprocess_thd_engine(ids, pre_process=False, local_cp_size=local_cp_size,
                                                 pad_to_length_bucket=bucket, cp_layout=cp_layout)
            return postprocess_thd_engine(hidden, packed, ids, ids.shape[0], post_process=True,
                                          local_cp_size=local_cp_size, cp_layout=cp_layout)
        forced = tu.get_non_tensor_data(data=mb, key="forced_max_seqlen", default=None)
        _, attention_mask, _ = preprocess_bshd_engine(ids, pre_process=True, forced_max_seqlen=forced)
        return postprocess_bshd_engine(hidden, attention_mask, post_process=True)

    # ------------------------------------------------------------------ optimizer step
    def _sub_optimizers(self) -> list:
        """Megatron's optimizers under a ChainedOptimizer (none for a forward-only engine)."""
        if self.optimizer is None:
            return []
        return list(getattr(self.optimizer, "chained_optimizers", None) or [self.optimizer])

    def _find_head_shards(self) -> dict[int, set[int]]:
        """Per sub-optimizer, the ids of the optimizer's parameters that are (shards of) the head's weights.

        Megatron's optimizers step on main parameters: for the distributed optimizer, fp32 shards paired with
        each model parameter (`model_fp32_groups`/`shard_fp32_groups`, `model_float16_groups`/
        `shard_fp32_from_float16_groups`, megatron/core/optimizer/distrib_optimizer.py); otherwise the model
        parameters (or their fp32 copies, same pairing) themselves."""
        head = {id(p) for h in self.popo_heads() for p in h.parameters()}
        found = {}
        for i, opt in enumerate(self._sub_optimizers()):
            ids = set()
            for model_groups, main_groups in (("model_fp32_groups", "shard_fp32_groups"),
                                              ("model_float16_groups", "shard_fp32_from_float16_groups"),
                                              ("float16_groups", "fp32_from_float16_groups")):
                for mg, sg in zip(getattr(opt, model_groups, []) or [], getattr(opt, main_groups, []) or []):
                    ids |= {id(s) for m, s in zip(mg, sg, strict=True) if id(m) in head and s is not None}
            ids |= {id(p) for p in opt.get_parameters() if id(p) in head}
            found[i] = ids
        return found

    @contextlib.contextmanager
    def _head_out_of_policy_clip(self):
        """During Megatron's step (megatron/core/optimizer/optimizer.py ChainedOptimizer.step: prepare_grads, grad
        norm and clip over each sub-optimizer's `get_parameters()`, then `step_with_ready_grads`), list the policy's
        parameters only, and clip the head's main gradients by their own norm before the update."""
        subs = self._sub_optimizers()
        norms = []
        for i, opt in enumerate(subs):
            head_ids = self._popo_head_shards.get(i, set())
            listed = opt.get_parameters
            step_ready = opt.step_with_ready_grads

            def policy_parameters(listed=listed, head_ids=head_ids):
                return [p for p in listed() if id(p) not in head_ids]

            def step_with_head_clip(step_ready=step_ready, opt=opt, head_ids=head_ids, listed=listed):
                head = [p for p in listed() if id(p) in head_ids]
                grads = [p.grad for p in head if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)]
                # collective over the optimizer's grad-stats group: every rank calls it, with or without a head
                norm = get_grad_norm_fp32(grads, grad_stats_parallel_group=opt.get_grad_stats_parallel_group())
                norms.append(float(norm))
                clip = float(self.popo_predictor_clip_grad)
                if clip > 0 and head:
                    clip_grad_by_total_norm_fp32([p for p in head if p.grad is not None], clip, norm)
                return step_ready()

            opt.get_parameters = policy_parameters
            opt.step_with_ready_grads = step_with_head_clip
        try:
            yield norms
        finally:
            for opt in subs:
                opt.__dict__.pop("get_parameters", None)
                opt.__dict__.pop("step_with_ready_grads", None)

    def optimizer_step(self):
        if not self._popo_has_head:  # (the same answer on every rank: the head's norm below is collective)
            return self._after_step(super().optimizer_step())
        with self._head_out_of_policy_clip() as norms:
            grad_norm = super().optimizer_step()
        if norms:
            self.popo_predictor_grad_norm = float(torch.tensor(norms).square().sum().sqrt())
        return self._after_step(grad_norm)

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self, *args, **kwargs):
        """verl's load, without autograd: the head is an fp32 parameter of a bf16 model, and Megatron's distributed
        optimizer steps fp32 parameters in place through views of them (distrib_optimizer.py "fp32 params"), which
        its state load then writes (`_set_main_param_and_optimizer_states`: copy_ into a view of a leaf that requires
        grad raises outside no_grad)."""
        with torch.no_grad():
            out = super().load_checkpoint(*args, **kwargs)
            self._gather_head_from_its_owners()
        return out

    @contextlib.contextmanager
    def _model_onloaded(self):
        """The model's parameters on the device for a while: with `param_offload` verl's load leaves them offloaded
        (verl/utils/megatron_utils.py `offload_megatron_model_to_cpu` frees the DDP buffers' device storage)."""
        if not self.is_param_offload_enabled:
            yield
            return
        from verl.utils.device import get_device_name

        self.to(get_device_name(), model=True, optimizer=False, grad=False)
        try:
            yield
        finally:
            self.to("cpu", model=True, optimizer=False, grad=False)

    def _gather_head_from_its_owners(self) -> None:
        """After a load, every data-/context-parallel replica of the head holds the checkpoint's values.

        The policy comes back whole on every rank (HF weights through the bridge), the head through the
        distributed optimizer alone: each rank's main parameters are views of its own slice of the fp32 head
        (distrib_optimizer.py `_get_model_param_range_map`), so the load writes that slice only, and the rest of
        each replica kept its built values until the next step's parameter all-gather: the first step after a
        resume ran on a stale head wherever DP x CP > 1. Each element is summed over its owners (and divided by
        their count: several optimizer instances may each own it); an element no optimizer owns is left as is."""
        group = mpu.get_data_parallel_group(with_context_parallel=True)
        if self.optimizer is None or torch.distributed.get_world_size(group) == 1:
            return
        with self._model_onloaded():
            for p in (p for h in self.popo_heads() for p in h.parameters()):
                # both on the head's device (a collective over NCCL takes device tensors; the division mixes them)
                value = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                owners = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                for opt in self._sub_optimizers():
                    if p in getattr(opt, "model_param_gbuf_map", {}):
                        r = opt._get_model_param_range_map(p)["param"]
                        value[r.start:r.end] += p.detach().view(-1)[r.start:r.end].float()
                        owners[r.start:r.end] += 1
                torch.distributed.all_reduce(value, group=group)
                torch.distributed.all_reduce(owners, group=group)
                flat = p.data.view(-1)
                flat.copy_(torch.where(owners > 0, value / owners.clamp(min=1), flat.float()).to(p.dtype))

    # ------------------------------------------------------------------ weight export
    def get_per_tensor_param(self, *args, **kwargs):
        """verl's export (a lazy generator over the bridge's HF-named weights) run on the model without the head,
        which is re-attached once the generator is exhausted or closed."""
        detach = self.popo_head_detached()
        detach.__enter__()
        try:
            params, peft_config = super().get_per_tensor_param(*args, **kwargs)
        except BaseException:
            detach.__exit__(None, None, None)
            raise

        def without_head():
            try:
                for name, tensor in params:
                    if not is_predictor_param(name):
                        yield name, tensor
            finally:
                detach.__exit__(None, None, None)

        return without_head(), peft_config


# ---------------------------------------------------------------------------------------------- the siamese
def named_local_params(engine, with_head: bool = False) -> dict[str, torch.nn.Parameter]:
    """This rank's model parameters, keyed `<chunk>.<name in the unwrapped GPTModel>` (DDP and Float16Module
    unwrapped, as verl's `unwrap_model` does): the same keys for the actor and the forward-only ref."""
    out = {}
    for i, chunk in enumerate(unwrap_model(list(engine.module))):
        for name, p in chunk.named_parameters():
            if with_head or not is_predictor_param(name):
                out[f"{i}.{name}"] = p
    return out


def fp32_main_params(engine) -> dict[int, tuple]:
    """id(model parameter) -> (its fp32 main values on this rank, start, end, sharding group) for every parameter
    Megatron's optimizer steps here: the values theta really has, of which the bf16 model weights are a rounding.

    megatron/core/optimizer/distrib_optimizer.py (`use_distributed_optimizer=True`): each rank steps the shard
    [start, end) of the flat parameter it owns in the grad buffer, `shard_fp32_from_float16_groups` (fp32 copies of
    bf16/fp16 parameters; None under the precision-aware optimizer, whose main values TE's FusedAdam keeps: the
    bf16 shard then) or `shard_fp32_groups` (views of fp32 parameters), paired with `model_float16_groups` /
    `model_fp32_groups`. megatron/core/optimizer/optimizer.py (`use_distributed_optimizer=False`):
    Float16OptimizerWithFloat16Params keeps a whole fp32 copy of each bf16/fp16 parameter on every rank
    (`float16_groups` -> `fp32_from_float16_groups`) and steps fp32 ones as they are (`fp32_from_fp32_groups`);
    FP32Optimizer steps the model's own fp32 parameters."""
    found = {}
    for opt in engine._sub_optimizers():
        if hasattr(opt, "model_param_gbuf_map"):
            pairs = [*zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups, opt.shard_float16_groups),
                     *zip(opt.model_fp32_groups, opt.shard_fp32_groups, opt.shard_fp32_groups)]
            for models, mains, own in pairs:
                for m, main, shard in zip(models, mains, own, strict=True):
                    r = opt._get_model_param_range_map(m)["param"]
                    found[id(m)] = (main if main is not None else shard, r.start, r.end, opt.data_parallel_group)
        elif hasattr(opt, "float16_groups"):
            for models, mains in zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True):
                found.update({id(m): (main, 0, m.numel(), None) for m, main in zip(models, mains, strict=True)})
            for models in opt.fp32_from_fp32_groups:
                found.update({id(m): (m, 0, m.numel(), None) for m in models})
        else:
            found.update({id(p): (p, 0, p.numel(), None) for p in opt.get_parameters()})
    return found


def sharding_groups(engine) -> dict[int, object]:
    """id(model parameter) -> the data-parallel group the distributed optimizer shards it over, for every parameter
    in the DDP buffers of a chunk built with `use_distributed_optimizer` (megatron/core/distributed/
    param_and_grad_buffer.py: `_ParamAndGradBuffer.params`, `.data_parallel_group`): a rank owning none of a
    parameter still takes part in its collectives."""
    out = {}
    for chunk in engine.module:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            continue
        for buffer in [*chunk.buffers, *getattr(chunk, "expert_parallel_buffers", [])]:
            out.update({id(p): buffer.data_parallel_group for p in buffer.params})
    return out


class Slot(NamedTuple):
    """One actor parameter as the siamese follows it on this rank."""

    param: torch.nn.Parameter  # the actor's model parameter
    main: torch.Tensor | None  # its fp32 main values [start, end) on this rank (None: the rank owns none of it)
    start: int
    end: int
    group: object | None  # the group whose ranks own the rest of it (None: whole on this rank)
    counted: bool  # whether it counts in a global sum over all ranks (each weight once)


def host_empty(shape) -> torch.Tensor:
    """fp32 in pinned host memory (page-locked: copies to and from the device at full bus speed, asynchronously)."""
    try:
        return torch.empty(shape, dtype=torch.float32, device="cpu", pin_memory=True)
    except RuntimeError:  # no accelerator to pin for
        return torch.empty(shape, dtype=torch.float32, device="cpu")


class MegatronSiamese(Siamese):
    """The siamese's fp32 shadow next to verl's bf16 forward-only Megatron model in the ref role.

    `shadow[k]` is the fp32 EMA of theta's fp32 main values that this rank's optimizer steps (`fp32_main_params`),
    not of the bf16 model weights: at a small learning rate theta moves by less than a bf16 rounding step, and an
    EMA of the bf16 copy would follow a quantised theta. The ref engine has the actor's TP/PP/CP layout, so a key
    names the same local shard in both. Under the distributed optimizer each rank holds the range of each parameter
    it owns (a shard of the shadow, as of the optimizer's state: its size over the data-parallel ranks); after
    every change the ranks' ranges are summed into the ref model's bf16 weights (each element has one owner), which
    the siamese forward uses. Without it every rank holds whole parameters and nothing is communicated.

    Where the shadow lives: on the device next to the main parameters, unless the actor or the ref is offloaded
    (`param_offload` / `optimizer_offload`): then in pinned host memory, staged through the device one parameter
    at a time by each update (4 B per element each way per step; the device holds one parameter's worth, while
    the step runs), so that it takes no device memory between steps (the rollout's)."""

    every_rank_reduces = True  # a rank of the distributed optimizer may hold no shard, and still joins
    _predictor_ids: set[int] | None = None

    def __init__(self, actor_engine, ref_engine):
        self.actor_engine, self.ref_engine = actor_engine, ref_engine
        self.check_layout()
        self.on_host = any(bool(getattr(e, name, False)) for e in (actor_engine, ref_engine)
                           for name in ("is_param_offload_enabled", "is_optimizer_offload_enabled"))
        self.device = actor_engine._popo_device()
        ref = named_local_params(ref_engine)
        self.shadow = {}
        with torch.no_grad():
            for k, slot in self.slots().items():
                xi = self._empty(self._shape(slot))
                xi.copy_(ref[k].detach().reshape(-1)[slot.start:slot.end].reshape(xi.shape))
                self.shadow[k] = xi

    def _empty(self, shape) -> torch.Tensor:
        return host_empty(shape) if self.on_host else torch.empty(shape, dtype=torch.float32, device=self.device)

    @staticmethod
    def _shape(slot: Slot) -> tuple[int, ...]:
        """The parameter's shape when this rank holds all of it (as the checkpoints of whole shards have it)."""
        whole = (slot.start, slot.end) == (0, slot.param.numel())
        return tuple(slot.param.shape) if whole else (slot.end - slot.start,)

    def actor_params(self) -> dict[str, torch.Tensor]:
        return named_local_params(self.actor_engine)

    def slots(self) -> dict[str, Slot]:
        """Each actor parameter's fp32 main values on this rank, by key (sorted: the same order on every rank)."""
        mains, groups = fp32_main_params(self.actor_engine), sharding_groups(self.actor_engine)
        out = {}
        for k, p in sorted(self.actor_params().items()):
            if id(p) in mains:
                main, start, end, group = mains[id(p)]
                group = groups.get(id(p), group)
            elif id(p) in groups:  # sharded, with no element on this rank
                main, start, end, group = None, 0, 0, groups[id(p)]
            else:  # not stepped by the optimizer (frozen): the model's own values
                main, start, end, group = p, 0, p.numel(), None
            if group is not None and torch.distributed.get_world_size(group) == 1:
                group = None
            # a sharded range is counted on its one owner (in the first optimizer instance), a whole one once
            # over the data-parallel replicas; tensor-parallel duplicates never
            counted = (distinct_weight(p) and end > start and all(
                getattr(o, "distributed_optimizer_instance_id", 0) == 0 for o in self.actor_engine._sub_optimizers())
            ) if group is not None else counted_once(p)
            out[k] = Slot(p, main, start, end, group, bool(counted))
        return out

    def check_layout(self) -> None:
        actor, ref = self.actor_params(), named_local_params(self.ref_engine)
        if set(actor) != set(ref):
            raise RuntimeError(f"POPO siamese and actor differ in parameters: {sorted(set(actor) ^ set(ref))[:5]}")
        for k, p in ref.items():
            if p.shape != actor[k].shape:
                raise RuntimeError(f"POPO siamese shard of {k} {tuple(p.shape)} does not match the actor's "
                                   f"{tuple(actor[k].shape)}: ref and actor need the same TP/PP/CP layout")

    def _pairs(self, counted_only: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        xis, thetas = [], []
        for k, slot in self.slots().items():
            if slot.main is not None and (slot.counted or not counted_only):
                xis.append(self.shadow[k])
                thetas.append(slot.main.detach().reshape(self.shadow[k].shape))
        return xis, thetas

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow, theta's fp32 main values) of every range this rank holds."""
        return self._pairs(counted_only=False)

    def counted_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The pairs whose global sum counts each weight once (for ||theta - xi||)."""
        return self._pairs(counted_only=True)

    @torch.no_grad()
    def distance_sq(self) -> torch.Tensor:
        """||theta - xi||^2 over the ranges this rank counts (sum it over all ranks: each weight once), float64 on the
        device: a shadow living on the host is staged there as by the EMA (theta's main values do not leave it)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k, slot in self.slots().items():
            if slot.main is not None and slot.counted:
                x = self.shadow[k].to(self.device, non_blocking=True)
                theta = slot.main.detach().to(self.device, torch.float32, non_blocking=True).reshape(x.shape)
                total += torch.linalg.vector_norm(theta - x).double().square()
        return total

    def _write(self, slot: Slot, x: torch.Tensor, p: torch.nn.Parameter) -> None:
        """The shadow's values `x` (on the device) into the ref's parameter `p`, every rank's range of it."""
        if slot.group is None:
            p.data.copy_(x.reshape(p.shape))
            return
        whole = torch.zeros(p.numel(), dtype=p.dtype, device=x.device)
        whole[slot.start:slot.end] = x.reshape(-1)
        torch.distributed.all_reduce(whole, group=slot.group)  # one owner per element: the sum is that value
        p.data.copy_(whole.view(p.shape))

    @torch.no_grad()
    def _update(self, step=None) -> None:
        """For each parameter: the shadow on the device (staged from the host when it lives there), `step(x, theta)`
        applied to it in place, the result back home and into the ref model."""
        ref = named_local_params(self.ref_engine)
        for k, slot in self.slots().items():
            xi = self.shadow[k]
            x = xi.to(self.device, non_blocking=True)
            if step is not None and slot.main is not None:
                step(x, slot.main.detach().to(self.device, torch.float32, non_blocking=True).reshape(x.shape))
                if x is not xi:
                    xi.copy_(x)
            self._write(slot, x, ref[k])

    def write_to_model(self) -> None:
        self._update()

    def copy_from_actor(self) -> None:
        self._update(lambda x, theta: x.copy_(theta))

    def ema(self, tau: float) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"ema: tau must lie in [0, 1], got {tau}")
        # core.ema_update_'s rule: xi <- tau * xi + (1 - tau) * theta, in fp32
        self._update(lambda x, theta: x.lerp_(theta, 1.0 - tau))

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """A saved shadow: this rank's own ranges, or whole parameters (a state saved without sharding)."""
        slots = self.slots()
        for k, v in self.shadow.items():
            saved = state[k]
            if saved.shape != v.shape and saved.numel() == slots[k].param.numel():
                saved = saved.reshape(-1)[slots[k].start:slots[k].end]
            v.copy_(saved.reshape(v.shape))
        self.write_to_model()

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers inside Megatron's (chained) optimizer: they step the main shards."""
        return [o.optimizer for o in self.actor_engine._sub_optimizers()]

    def predictor_param_ids(self) -> set[int]:
        if self._predictor_ids is None:  # found once, when the engine initialised: name them once here too
            self._predictor_ids = set().union(*self.actor_engine._popo_head_shards.values())
        return self._predictor_ids

    def named_actor_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(named_local_params(self.actor_engine, with_head=True).items())

    def named_siamese_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.shadow.items())
