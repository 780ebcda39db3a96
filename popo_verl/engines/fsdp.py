"""POPO's FSDP/FSDP2 engine: pooled final-norm hidden states and the predictor head.

Subclass of verl 0.9.1's `FSDPEngineWithLMHead` (verl/workers/engine/fsdp/transformer_impl.py):
- `_build_module` attaches `core.PredictorHead` as `module.popo_predictor` (fp32) before FSDP wraps
  the model, so the head is sharded with it, trained by the actor's optimizer and saved in its
  checkpoints. Forward-only engines (the siamese) get no head: the BYOL asymmetry.
- With FSDP2 the head is detached while verl wraps the model, then re-attached as its own `fully_shard`
  unit with an fp32 MixedPrecisionPolicy: it is stored and computed in fp32 whatever the model's
  param_dtype (bf16 by default), and still sharded, in the optimizer and in checkpoints.
- A forward hook on the final norm (`module.model.norm`) pools the post-norm hidden states over the
  response tokens (first response token through EOS, as the reference) and, on the trainable engine, applies the head, inside the root module's forward
  (where FSDP2 has the root parameters, the head's among them, unsharded).
- Pooling works on every layout verl feeds the model: packed (remove-padding), packed and split over
  Ulysses sequence-parallel ranks (gathered back with verl's gather, as verl does for the log-probs),
  and padded (use_remove_padding=false).
- The pooled state (`popo_pooled`) and the head's output (`popo_pred`) join verl's model_output.
- `get_per_tensor_param` drops the head from the weights sent to the rollout engine.
tests/test_engine.py builds the engine in-process and pins what this relies on.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import torch

from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from popo_verl import core
from popo_verl.engines.common import PopoEngineBase, Siamese, local_shard, pooled_only, response_states
from popo_verl.protocol import POOLED_KEY, PRED_KEY, PREDICTOR_ATTR, is_predictor_param

def final_norm(module: torch.nn.Module) -> torch.nn.Module:
    """The final norm of an HF causal LM (`model.model.norm` for Llama/Qwen-style models)."""
    inner = getattr(module, "model", None)
    norm = getattr(inner, "norm", None) if inner is not None else None
    if norm is None:
        raise NotImplementedError(
            f"POPO needs the final norm at `module.model.norm`; {type(module).__name__} has none"
        )
    return norm


def head_owner(module: torch.nn.Module) -> torch.nn.Module:
    """The HF model that holds the predictor head: the module itself, or the model inside PEFT's wrapper (LoRA)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


class PopoFSDPEngine(PopoEngineBase, FSDPEngineWithLMHead):
    """FSDP engine that also returns POPO's pooled representation (and predictor output)."""

    # ------------------------------------------------------------------ model construction
    def _build_module(self):
        module = super()._build_module()
        if not self.engine_config.forward_only and self.popo_predictor_layers > 0:
            hidden = module.config.hidden_size
            # Same seed on every rank: FSDP shards identical initial weights.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.popo_predictor_seed)
                head = core.PredictorHead(hidden, self.popo_predictor_hidden, self.popo_predictor_layers)
            setattr(module, PREDICTOR_ATTR, head.to(dtype=torch.float32))
        self._popo_hook = final_norm(module).register_forward_hook(self._popo_norm_hook)
        return module

    # verl/workers/engine/fsdp/transformer_impl.py FSDPEngine._build_model_optimizer applies PEFT after _build_module:
    # with target_modules=all-linear PEFT would wrap the head's Linears in adapters and freeze the head itself.
    def _build_lora_module(self, module):
        """verl's PEFT wrapping with the head held out: it is re-attached to the wrapped HF model afterwards, fully
        trainable and fp32, so no adapter save, merge or rollout sync of PEFT's ever sees it as an adapter."""
        head = getattr(module, PREDICTOR_ATTR, None)
        if head is not None:
            delattr(module, PREDICTOR_ATTR)
        module = super()._build_lora_module(module)
        if head is not None:
            setattr(head_owner(module), PREDICTOR_ATTR, head)
        return module

    def _build_fsdp_module(self, module):
        owner = head_owner(module)
        head = getattr(owner, PREDICTOR_ATTR, None)
        if head is None or self.engine_config.strategy != "fsdp2":
            # FSDP1: the head is one more parameter of the root unit, computed in its param_dtype.
            return super()._build_fsdp_module(module)
        delattr(owner, PREDICTOR_ATTR)
        module = super()._build_fsdp_module(module)
        self._shard_predictor_fp32(head)
        setattr(owner, PREDICTOR_ATTR, head)
        return module

    def _shard_predictor_fp32(self, head: torch.nn.Module) -> None:
        """Its own FSDP2 unit, fp32 params and gradient reduction, offloaded like the model."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from verl.workers.engine.fsdp import transformer_impl  # the CPU backend patches its CPUOffloadPolicy

        offload = transformer_impl.CPUOffloadPolicy(pin_memory=True) if self.engine_config.offload_policy else None
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True)
        fully_shard(head, mesh=self.device_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=self.engine_config.reshard_after_forward)

    @property
    def popo_predictor(self):
        return getattr(self.module, PREDICTOR_ATTR, None)

    # ------------------------------------------------------------------ forward
    def _popo_norm_hook(self, norm_module, inputs, output):
        mb = getattr(self, "_popo_micro_batch", None)
        if mb is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        pooled = self._pool_response_hidden(hidden, mb)
        captured = {POOLED_KEY: pooled}
        head = getattr(self.module, PREDICTOR_ATTR, None)
        if head is not None and torch.is_grad_enabled():
            # fp32 under FSDP2 (its own unit); under FSDP1 the dtype the root unit unshards it to.
            dtype = next(head.parameters()).dtype
            with torch.autocast(device_type=pooled.device.type, enabled=False):
                captured[PRED_KEY] = head(pooled.to(dtype)).float()
        elif self.popo_predictor_layers == 0 and not self.engine_config.forward_only and torch.is_grad_enabled():
            captured[PRED_KEY] = pooled.float()  # identity head (predictor_layers=0): no parameters to shard
        self._popo_captured = captured
        if pooled_only(mb) and isinstance(output, torch.Tensor):
            # Only the pooled states are wanted: the LM head (and verl's fused log-prob kernel) runs on one position.
            return output[:, :1]
        return None

    def _pool_response_hidden(self, hidden: torch.Tensor, micro_batch) -> torch.Tensor:
        """Mean of the final-norm hidden states over each row's response tokens, EOS included -> (B, H) fp32."""
        mask = micro_batch["response_mask"]
        mask = mask.to_padded_tensor(0) if mask.is_nested else mask
        values = self._packed_hidden(hidden, micro_batch)  # (nnz, H), rows back to back
        per_token = response_states(values, micro_batch, width=mask.shape[1])  # (B, R, H): the states *at* the responses
        return core.masked_mean_pool(per_token.float(), mask.to(per_token.device))

    def _packed_hidden(self, hidden: torch.Tensor, micro_batch) -> torch.Tensor:
        """The hidden states of the real tokens, packed like verl's nested input_ids: (nnz, H).

        remove-padding: (1, nnz [+ pad], H), or this rank's slice of it under Ulysses SP, which verl's own
        gather restores (the gather is differentiable, like the one it applies to the log-probs);
        padded: (B, max_len, H) with each row's tokens first.
        """
        ids = micro_batch["input_ids"]
        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            values = self._gather_and_unpad_packed(hidden.squeeze(0), getattr(self, "_popo_pad_size", 0))
            return values[: ids.values().shape[0]]
        lengths = ids.offsets().diff().to(hidden.device)
        keep = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0) < lengths.unsqueeze(1)
        return hidden[keep]

    def prepare_model_inputs(self, micro_batch):
        model_inputs, output_args = super().prepare_model_inputs(micro_batch)
        if pooled_only(micro_batch) and "shift_labels" in model_inputs:  # verl's fused kernels: labels of that one position
            model_inputs["shift_labels"] = model_inputs["shift_labels"][..., :1]
        # tail padding of the global packed sequence (SP alignment + static buckets), for the pooling hook
        self._popo_pad_size = int(output_args.get("pad_size", 0) or 0)
        return model_inputs, output_args

    def forward_step(self, micro_batch, loss_function, forward_only):
        micro_batch = micro_batch.to(self._popo_device())  # once: verl's forward_step finds it there
        self._popo_micro_batch = micro_batch
        self._popo_captured = None
        try:
            return super().forward_step(micro_batch, loss_function=loss_function, forward_only=forward_only)
        finally:
            self._popo_micro_batch = None
            self._popo_captured = None

    def _popo_device(self):
        from verl.utils.device import get_device_id

        return get_device_id()

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        captured = getattr(self, "_popo_captured", None)
        if captured is None:
            raise RuntimeError("POPO: the final-norm hook did not run during the forward pass")
        if pooled_only(micro_batch):
            return dict(captured)
        model_output = super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        model_output.update(captured)
        return model_output

    # ------------------------------------------------------------------ optimizer step

    def _separable_head_params(self) -> list[torch.nn.Parameter]:
        """The head's parameters when they are tensors of their own (FSDP2, or no FSDP); [] under FSDP1, whose
        root flat parameter holds the head with the policy (then one clip covers both, as verl does)."""
        head = self.popo_predictor
        if head is None or self.engine_config.strategy == "fsdp" or getattr(self, "scaler", None) is not None:
            return []  # (an fp16 grad scaler steps the optimizer itself: keep verl's single step)
        return [p for p in head.parameters() if p.grad is not None]

    def optimizer_step(self):
        """verl's step (FSDPEngine.optimizer_step: clip, skip if non-finite, step) with the predictor head kept out of
        the policy's clip norm: the reference clips the policy only (its head is its own optimizer group). The head's
        gradients are hidden while verl clips and steps the policy (so `actor/grad_norm` is the policy's), then the
        head is clipped on its own (`predictor_clip_grad`, 0 = none) and stepped by the same optimizer."""
        head = self._separable_head_params()
        if not head:
            return self._after_step(super().optimizer_step())
        from verl.utils.fsdp_utils import fsdp2_clip_grad_norm_

        clip = float(self.popo_predictor_clip_grad) or float("inf")
        head_norm = fsdp2_clip_grad_norm_(head, max_norm=clip)
        head_norm = head_norm.full_tensor() if hasattr(head_norm, "full_tensor") else head_norm
        self.popo_predictor_grad_norm = float(head_norm)  # the one host read of the head's norm (metric and check)
        head_grads = [p.grad for p in head]
        for p in head:
            p.grad = None
        grad_norm = super().optimizer_step()  # the policy: clipped by its own norm and stepped
        policy = [p for p in self.module.parameters() if p.grad is not None]
        policy_grads = [p.grad for p in policy]
        for p in policy:
            p.grad = None
        for p, g in zip(head, head_grads, strict=True):
            p.grad = g
        # verl's optimizer_step returns the policy's norm as a float (grad_norm.item())
        policy_ok = math.isfinite(grad_norm.item() if isinstance(grad_norm, torch.Tensor) else float(grad_norm))
        if policy_ok and math.isfinite(self.popo_predictor_grad_norm):
            self.optimizer.step()  # only the head has gradients now
        for p, g in zip(policy, policy_grads, strict=True):
            p.grad = g
        return self._after_step(grad_norm)

    #: a context entered around the next forward-only batch (LoRA: the siamese's adapters in the actor's place)
    popo_infer_context = None

    def infer_batch(self, data, loss_function=None):
        context = self.popo_infer_context
        with context() if context is not None else nullcontext():
            return super().infer_batch(data, loss_function=loss_function)

    # ------------------------------------------------------------------ weight export
    def get_per_tensor_param(self, *args, **kwargs):
        params, peft_config = super().get_per_tensor_param(*args, **kwargs)
        return ((name, t) for name, t in params if not is_predictor_param(name)), peft_config


class FsdpSiamese(Siamese):
    """The siamese under FSDP/FSDP2: verl's ref engine, built in fp32 on the actor's mesh and wrap policy, so each
    rank's siamese shard pairs with its actor shard and the EMA is a local `lerp_`, with no communication."""

    def __init__(self, actor_engine: PopoFSDPEngine, ref_engine):
        self.actor_engine, self.ref_engine = actor_engine, ref_engine
        self.check_layout()
        _, thetas = self.pairs()
        self.device = thetas[0].device if thetas else torch.device("cpu")
        self._predictor_ids: set[int] | None = None

    def _actor(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.actor_engine.module.named_parameters() if not is_predictor_param(n)}

    def _siamese(self) -> dict[str, torch.Tensor]:
        return dict(self.ref_engine.module.named_parameters())

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(xi, theta) local shards, name by name: one walk over the parameters."""
        actor, siamese = self._actor(), self._siamese()
        names = sorted(siamese)
        return [local_shard(siamese[n].data) for n in names], [local_shard(actor[n].data) for n in names]

    def check_layout(self) -> None:
        actor, siamese = self._actor(), self._siamese()
        if set(actor) != set(siamese):
            missing = sorted(set(actor) ^ set(siamese))[:5]
            raise RuntimeError(f"POPO siamese and actor differ in parameters: {missing}")
        for n, p in siamese.items():
            if p.dtype != torch.float32:
                raise RuntimeError(
                    f"POPO siamese parameter {n} is {p.dtype}; the EMA needs fp32 "
                    "(actor_rollout_ref.ref.fsdp_config.model_dtype=fp32)"
                )
            if local_shard(p.data).shape != local_shard(actor[n].data).shape:
                raise RuntimeError(
                    f"POPO siamese shard of {n} {tuple(local_shard(p.data).shape)} does not match the actor's "
                    f"{tuple(local_shard(actor[n].data).shape)}: ref and actor need the same FSDP mesh and wrap policy"
                )

    @torch.no_grad()
    def copy_from_actor(self) -> None:
        for xi, theta in zip(*self.pairs(), strict=True):
            xi.copy_(theta.to(device=xi.device, dtype=xi.dtype))

    def ema(self, tau: float) -> None:
        core.ema_update_(*self.pairs(), tau)

    def distance_sq(self) -> torch.Tensor:
        return core.parameter_distance_sq(*self.pairs())

    def state(self) -> dict[str, torch.Tensor]:
        return {n: local_shard(p.data).detach().cpu().clone() for n, p in self._siamese().items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self._siamese().items():
            local_shard(p.data).copy_(state[n].to(local_shard(p.data).device))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.actor_engine.optimizer]

    def predictor_param_ids(self) -> set[int]:
        if self._predictor_ids is None:  # the parameters never change identity: name them once
            named = self.actor_engine.module.named_parameters()
            self._predictor_ids = {id(p) for n, p in named if is_predictor_param(n)}
        return self._predictor_ids

    def named_actor_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.actor_engine.module.named_parameters())

    def named_siamese_params(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._siamese().items())


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name is a PEFT LoRA adapter's (`...lora_A.default.weight`, `...lora_B.default.weight`)."""
    return ".lora_A." in name or ".lora_B." in name or ".lora_embedding_A." in name or ".lora_embedding_B." in name


class LoraSiamese(Siamese):
    """The siamese under LoRA: the frozen base, shared with the actor, plus an fp32 EMA of the actor's adapters.

    No second model: the EMA lives in buffers shaped like the adapters' parameters (DTensors under FSDP2, so each
    rank holds its shard). For the siamese forward `swapped_in` copies the EMA into the actor's adapters and
    restores them after (the live adapters wait in a copy meanwhile). Memory: the adapters' size in fp32, once for
    the EMA and once for the copy during the forward, against a full fp32 model for `FsdpSiamese`.
    The EMA is taken of A and B separately, as of any other weight, so the siamese's update B_xi A_xi is not the
    EMA of the products B A.
    """

    def __init__(self, actor_engine: PopoFSDPEngine):
        self.actor_engine = actor_engine
        with torch.no_grad():
            self._ema = {n: p.detach().to(torch.float32).clone() for n, p in self._adapters().items()}
        self.check_layout()
        self.device = next(iter(self._ema.values())).device
        self._predictor_ids: set[int] | None = None

    def _adapters(self) -> dict[str, torch.Tensor]:
        """The actor's trainable adapter parameters, by name (looked up each time: an offload moves them)."""
        return {n: p for n, p in self.actor_engine.module.named_parameters()
                if p.requires_grad and is_adapter_param(n) and not is_predictor_param(n)}

    def pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        adapters = self._adapters()
        names = sorted(self._ema)
        return [local_shard(self._ema[n]) for n in names], [local_shard(adapters[n].data) for n in names]

    def check_layout(self) -> None:
        adapters = self._adapters()
        if not adapters:
            raise RuntimeError("POPO LoRA siamese: the actor has no trainable LoRA adapters (lora_rank > 0 expected)")
        if set(adapters) != set(self._ema):
            raise RuntimeError(f"POPO LoRA siamese and actor adapters differ: {sorted(set(adapters) ^ set(self._ema))[:5]}")

    @torch.no_grad()
    def copy_from_actor(self) -> None:
        for xi, theta in zip(*self.pairs(), strict=True):
            xi.copy_(theta)

    def ema(self, tau: float) -> None:
        core.ema_update_(*self.pairs(), tau)

    def distance_sq(self) -> torch.Tensor:
        return core.parameter_distance_sq(*self.pairs())

    @contextmanager
    def swapped_in(self):
        """The actor's module as the siamese: the EMA adapters in place of the live ones, restored on exit."""
        xis, thetas = self.pairs()
        with torch.no_grad():
            live = [theta.clone() for theta in thetas]
            for xi, theta in zip(xis, thetas, strict=True):
                theta.copy_(xi)
        try:
            yield
        finally:
            with torch.no_grad():
                for theta, saved in zip(thetas, live, strict=True):
                    theta.copy_(saved)

    def state(self) -> dict[str, torch.Tensor]:
        return {n: local_shard(t).detach().cpu().clone() for n, t in self._ema.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self._ema):
            raise RuntimeError(
                "POPO: the checkpoint's siamese is not this run's LoRA siamese (saved without LoRA, or with other "
                f"target modules): {sorted(set(state) ^ set(self._ema))[:5]}"
            )
        for n, t in self._ema.items():
            local_shard(t).copy_(state[n].to(local_shard(t).device))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.actor_engine.optimizer]

    def predictor_param_ids(self) -> set[int]:
        if self._predictor_ids is None:
            self._predictor_ids = {id(p) for n, p in self.actor_engine.module.named_parameters() if is_predictor_param(n)}
        return self._predictor_ids

    def named_actor_params(self) -> list[tuple[str, torch.Tensor]]:
        """The adapters and the head: what the siamese pairs with, and what POPO trains."""
        return [(n, p) for n, p in self.actor_engine.module.named_parameters() if p.requires_grad]

    def named_siamese_params(self) -> list[tuple[str, torch.Tensor]]:
        return sorted(self._ema.items())
