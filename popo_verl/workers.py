"""POPO's actor/rollout/ref worker: the ref role holds the EMA siamese of the policy.

Subclasses verl 0.9.1's `ActorRolloutRefWorker` and `TrainingWorker`
(verl/workers/engine_workers.py). With role `actor_rollout_ref` the ref model lives in the actor's
process on the same mesh and wrap policy (engines/*.py `Siamese`), and its EMA (popo_verl/siamese_ema.py) runs
after every optimizer step of the actor. This module is the wiring: the engines, the loss, the EMA, the
per-step stats and the checkpoints. verl saves the actor only
(`save_checkpoint`), so the siamese shards and the EMA state get their own files next to it, and a manifest
that makes a broken or unfinished checkpoint fail loudly (popo_verl/checkpoint.py).
tests/test_e2e_cpu.py pins what this relies on (through verl's real trainer on the CPU).
"""

from __future__ import annotations

import logging
import os
from functools import partial

import torch.distributed as dist
from torch.distributed.tensor import DTensor

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, HFModelConfig
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from popo_verl import checkpoint
from popo_verl.config import PopoConfig, popo_config
from popo_verl.cpu.platform import cpu_platform_wanted
from popo_verl.engines.fsdp import FsdpSiamese, LoraSiamese, PopoFSDPEngine
from popo_verl.actor_loss import popo_actor_loss
from popo_verl.protocol import WITH_DRIFT_KEY, is_predictor_param
from popo_verl.siamese_ema import SiameseEma
from popo_verl.timing import DeviceTimer

logger = logging.getLogger(__name__)


def _where() -> dict:
    """This process's host and Ray node (a rank's address in a multi-node run)."""
    import socket

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"host": socket.gethostname(), "ray_node": node}


def popo_engine_cls(engine) -> type:
    """POPO's subclass of the stock engine verl built: FSDP/FSDP2, or Megatron (where megatron-core is installed)."""
    if type(engine) is FSDPEngineWithLMHead:
        return PopoFSDPEngine
    try:
        from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead
    except ImportError:  # no megatron-core: verl cannot have built a Megatron engine either
        MegatronEngineWithLMHead = None
    if MegatronEngineWithLMHead is not None and type(engine) is MegatronEngineWithLMHead:
        from popo_verl.engines.megatron import PopoMegatronEngine

        return PopoMegatronEngine
    raise NotImplementedError(
        f"POPO supports verl's FSDP/FSDP2 and Megatron engines (strategy fsdp|fsdp2|megatron); got {type(engine).__name__}"
    )


class PopoTrainingWorker(TrainingWorker):
    """verl's TrainingWorker with POPO's engine in place of the stock FSDP or Megatron engine."""

    #: (POPO's config, the predictor's seed), set by the outer worker before the model is built
    popo_settings: tuple[PopoConfig, int] = (PopoConfig(), 0)

    def __init__(self, config):
        super().__init__(config)
        # Same constructor arguments verl's EngineRegistry.new passed (verl/workers/engine_workers.py).
        self.engine = popo_engine_cls(self.engine)(
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
        )
        self.engine.configure_popo(*self.popo_settings)


class PopoActorRolloutRefWorker(ActorRolloutRefWorker):
    """Hybrid worker whose ref role is POPO's siamese network (EMA of the actor, fp32)."""

    actor_worker_cls = PopoTrainingWorker
    ref_worker_cls = PopoTrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        section = self.config.get("popo", None)
        if not section:
            raise ValueError("POPO worker: actor_rollout_ref.popo is missing; start POPO through the popo trainer")
        if self.role != "actor_rollout_ref":
            raise ValueError(f"POPO needs the hybrid role actor_rollout_ref (siamese next to the actor), got {self.role}")
        cfg = self.popo = popo_config(section)
        if self.config.actor.strategy == "megatron" and cpu_platform_wanted():
            from popo_verl.engines import mcore_cpu

            mcore_cpu.prepare_worker(self.config)  # megatron-core needs a stand-in for the GPU here
        # Feature noise is seeded from (seed, optimizer steps so far), which the checkpoint restores, and
        # keyed by each row's tokens: a resumed run, or one on another number of ranks, draws the same noise.
        self._noise_seed = int(self.config.actor.get("data_loader_seed", 0) or 0)
        PopoTrainingWorker.popo_settings = (cfg, self._noise_seed)
        # the key verl's FSDP engine applies PEFT for (FSDPEngine._is_lora); Megatron's lora.rank is refused at start
        self.popo_lora = int(self.config.model.get("lora_rank", 0) or 0) > 0
        if self.popo_lora:
            # Under LoRA the siamese is the actor's own base plus EMA adapters (LoraSiamese): verl's init_model
            # (verl/workers/engine_workers.py) builds a ref engine, a second full model, whenever the role names
            # "ref"; it is built as the actor_rollout role, and the "ref" mesh is the actor's.
            self.role = "actor_rollout"
            try:
                super().init_model()
            finally:
                self.role = "actor_rollout_ref"
            self.set_dispatch_collect(mesh_name="ref", **self.actor.get_dispatch_collect())
        else:
            super().init_model()

        model_config: HFModelConfig = omega_conf_to_dataclass(self.config.model)
        actor_config: ActorConfig = omega_conf_to_dataclass(self.config.actor)
        actor_config.model_config = model_config
        self.noise_timer = DeviceTimer()  # the loss's feature noise, timed on the device, read once a step
        self.loss_fn = partial(
            popo_actor_loss,
            config=actor_config,
            alpha=cfg.alpha,
            beta=cfg.beta,
            noise_std=cfg.feature_noise_std,
            entropy_on=cfg.entropy_on,
            noise_seed=self._step_noise_seed,
            anchor=cfg.anchor,
            nll_norm=cfg.nll_norm,
            noise_timer=self.noise_timer,
        )
        self.actor.set_loss_fn(self.loss_fn)

        engine = self.actor.engine
        if self.popo_lora:
            siamese = LoraSiamese(engine)
        elif isinstance(engine, PopoFSDPEngine):
            siamese = FsdpSiamese(engine, self.ref.engine)
        else:
            from popo_verl.engines.megatron import MegatronSiamese

            siamese = MegatronSiamese(engine, self.ref.engine)
        self.ema = SiameseEma(siamese, tau=cfg.tau, clip_grad=engine.optimizer_config.clip_grad)
        siamese.copy_from_actor()
        engine.popo_after_optimizer_step = self._after_optimizer_step

    def _step_noise_seed(self) -> int:
        """Seed of the feature noise of the next optimizer step: (seed, optimizer steps so far)."""
        return self._noise_seed * 1_000_003 + self.ema.ema_steps * 7919

    def _after_optimizer_step(self, grad_norm: float) -> None:
        groups = self.actor.engine.optimizer.param_groups
        self.ema.after_optimizer_step(grad_norm, lr=float(groups[0]["lr"]) if groups else 0.0)

    # verl/workers/engine_workers.py ActorRolloutRefWorker.compute_ref_log_prob: under LoRA the same forward on the
    # actor's engine, with the siamese's adapters swapped in
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="ref"))
    def compute_ref_log_prob(self, data):
        if not self.popo_lora:
            return super().compute_ref_log_prob(data)
        engine = self.actor.engine
        engine.popo_infer_context = self.ema.siamese.swapped_in
        try:
            output = self.actor.infer_batch(data=data)
        finally:
            engine.popo_infer_context = None
        return output.cpu() if output is not None else None

    # verl/workers/engine_workers.py ActorRolloutRefWorker.update_actor: the same update; the step's POPO stats ride
    # back in its metrics (rank 0's, as verl's metadata concat keeps), not in a second round trip
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        output = super().update_actor(data)
        stats = self.popo_step_stats(bool(tu.get(data, WITH_DRIFT_KEY, default=True)))  # collective: every rank
        if output is not None:
            tu.assign_non_tensor(output, metrics={**tu.get(output, "metrics"), **stats})
        return output

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def popo_stats(self, with_drift: bool = True) -> dict:
        """The step's stats on a step without an update (no positive): see `popo_step_stats`."""
        return self.popo_step_stats(with_drift)

    def popo_step_stats(self, with_drift: bool) -> dict:
        """The siamese's stats of the step (`SiameseEma.step_stats`) and the feature noise's time; collective."""
        return {**self.ema.step_stats(with_drift), "timing_s/popo_noise": self.noise_timer.pop_seconds()}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def popo_skipped_step(self) -> float:
        """A training step without an update: no optimizer step, no EMA, but the LR schedule advances, as verl
        advances it once per training step (train_mini_batch's last mini-batch), so warm-up and decay follow
        the step count. Returns the new learning rate."""
        return float(self.actor.engine.lr_scheduler_step())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def popo_full_state(self) -> dict:
        """Full (gathered) siamese, actor and predictor weights on CPU, for tests and debugging."""
        def full(named):
            return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().cpu().clone() for n, p in named}

        siamese = self.ema.siamese
        actor_named = siamese.named_actor_params()
        return {
            "siamese": full(siamese.named_siamese_params()),
            "actor": full([(n, p) for n, p in actor_named if not is_predictor_param(n)]),
            "predictor": full([(n, p) for n, p in actor_named if is_predictor_param(n)]),
            "ema_steps": self.ema.ema_steps,
        }

    # ------------------------------------------------------------------ checkpoints
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        checkpoint.begin(local_path, self.rank, self.world_size)
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        if self.rank == 0:  # verl's hf_model export includes the training-only predictor head
            from popo_verl.model_merger import merge_lora_in_hf_dir, strip_predictor_from_hf_dir

            hf_dir = os.path.join(local_path, "huggingface")
            # under LoRA verl writes it under PEFT's names, which no HF loader reads: merged here, the head dropped
            # in the same rewrite (the folder is read and written once)
            scaling = float(self.config.model.lora_alpha) / int(self.config.model.lora_rank) if self.popo_lora else 0.0
            if not (self.popo_lora and merge_lora_in_hf_dir(hf_dir, scaling)):
                strip_predictor_from_hf_dir(hf_dir)
        checkpoint.commit(local_path, self.rank, self.world_size, self.ema.state(), written_by=_where())
        if dist.is_initialized():
            dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        siamese = checkpoint.siamese_file(local_path, self.rank, self.world_size)
        keep = os.path.exists(siamese)
        state = checkpoint.load(local_path, self.rank, self.world_size,
                                partial(super().load_checkpoint, local_path, hdfs_path, False if keep else del_local_after_load))
        self.ema.restore(state, os.path.dirname(siamese))
