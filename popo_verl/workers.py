"""POPO's actor/rollout/ref worker: the ref role holds the EMA siamese of the policy.

Subclasses verl 0.9.1's `ActorRolloutRefWorker` and `TrainingWorker`
(verl/workers/engine_workers.py). With role `actor_rollout_ref` the ref model lives in the actor's
process on the same mesh and wrap policy, so the EMA is a local, per-shard `lerp_` with no
communication, run after every optimizer step of the actor. verl saves the actor only
(`save_checkpoint`), so the siamese shards and the EMA state get their own files next to it, and a manifest
that makes a broken or unfinished checkpoint fail loudly (popo_verl/checkpoint.py).
tests/test_e2e_cpu.py pins what this relies on (through verl's real trainer on the CPU).
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import ActorConfig, HFModelConfig
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

from popo_verl import checkpoint, core
from popo_verl.timing import DeviceTimer
from popo_verl.cpu.platform import cpu_platform_wanted
from popo_verl.engines.fsdp import WITH_DRIFT_KEY, PopoFSDPEngine, is_predictor_param
from popo_verl.losses import popo_actor_loss

logger = logging.getLogger(__name__)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


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


def optimizer_step_count(optimizer: torch.optim.Optimizer, group: dict, state: dict):
    """Adam's step count t for one parameter: in its state (torch's Adam/AdamW), or in its param group (Transformer
    Engine's and Apex's FusedAdam, which megatron-core uses when they are installed). None before the first step."""
    step = state.get("step", group.get("step"))
    if step is None:
        return None
    return step.to(torch.float64) if isinstance(step, torch.Tensor) else float(step)


@torch.no_grad()
def adam_direction_sq(optimizers, skip_ids: set[int]) -> tuple[torch.Tensor, int]:
    """sum over parameters of ||m_hat / (sqrt(v_hat) + eps)||^2, on the parameters' device, in one pass and without a
    host sync (a step count kept as a device tensor stays there). Returns (float64 scalar, parameters counted)."""
    total, found = None, 0
    for opt in optimizers:
        for group in opt.param_groups:
            betas, eps = group.get("betas"), group.get("eps")
            if betas is None or eps is None:
                continue
            for p in group["params"]:
                st = opt.state.get(p, {})
                if id(p) in skip_ids or "exp_avg" not in st:
                    continue
                step = optimizer_step_count(opt, group, st)
                if step is None:
                    continue
                m, v = _local(st["exp_avg"]), _local(st["exp_avg_sq"])
                if isinstance(step, torch.Tensor):
                    step = step.to(m.device)
                c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
                u = (m.float() / c1) / ((v.float() / c2).sqrt() + eps)
                sq = u.pow(2).sum(dtype=torch.float64)
                total = sq if total is None else total + sq.to(total.device)
                found += 1
    return (total if total is not None else torch.zeros((), dtype=torch.float64)), found


class PopoTrainingWorker(TrainingWorker):
    """verl's TrainingWorker with POPO's engine in place of the stock FSDP or Megatron engine."""

    #: predictor settings, set by the outer worker before the model is built
    popo_settings: dict = {}

    def __init__(self, config):
        super().__init__(config)
        # Same constructor arguments verl's EngineRegistry.new passed (verl/workers/engine_workers.py).
        self.engine = popo_engine_cls(self.engine)(
            model_config=self.model_config,
            engine_config=self.engine_config,
            optimizer_config=self.optimizer_config,
            checkpoint_config=self.checkpoint_config,
        )
        s = self.popo_settings
        self.engine.configure_popo(s.get("predictor_hidden_dim", 1024), s.get("predictor_layers", 2), s.get("seed", 0),
                                   s.get("predictor_clip_grad", 0.0))


class PopoActorRolloutRefWorker(ActorRolloutRefWorker):
    """Hybrid worker whose ref role is POPO's siamese network (EMA of the actor, fp32)."""

    actor_worker_cls = PopoTrainingWorker
    ref_worker_cls = PopoTrainingWorker

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        popo = dict(self.config.get("popo", {}) or {})
        if not popo:
            raise ValueError("POPO worker: actor_rollout_ref.popo is missing; start POPO through the popo trainer")
        if self.role != "actor_rollout_ref":
            raise ValueError(f"POPO needs the hybrid role actor_rollout_ref (siamese next to the actor), got {self.role}")
        self.popo = popo
        if self.config.actor.strategy == "megatron" and cpu_platform_wanted():
            from popo_verl.engines import mcore_cpu

            mcore_cpu.prepare_worker(self.config)  # megatron-core needs a stand-in for the GPU here
        PopoTrainingWorker.popo_settings = {
            "predictor_hidden_dim": int(popo.get("predictor_hidden_dim", 1024)),
            "predictor_layers": int(popo.get("predictor_layers", 2)),
            "seed": int(self.config.actor.get("data_loader_seed", 0) or 0),
            "predictor_clip_grad": float(popo.get("predictor_clip_grad", 0.0)),
        }
        super().init_model()

        model_config: HFModelConfig = omega_conf_to_dataclass(self.config.model)
        actor_config: ActorConfig = omega_conf_to_dataclass(self.config.actor)
        actor_config.model_config = model_config
        # Feature noise is seeded from (seed, optimizer steps so far), which the checkpoint restores, and
        # keyed by each row's tokens: a resumed run, or one on another number of ranks, draws the same noise.
        self._noise_seed = int(self.config.actor.get("data_loader_seed", 0) or 0)
        # POPO's own per-step work, timed on the device (popo_verl/timing.py): read once a step, in _step_stats
        self.noise_timer, self.ema_timer, self.drift_timer = DeviceTimer(), DeviceTimer(), DeviceTimer()
        self.loss_fn = partial(
            popo_actor_loss,
            config=actor_config,
            alpha=float(popo.get("alpha", 0.1)),
            beta=float(popo.get("beta", 0.01)),
            noise_std=float(popo.get("feature_noise_std", 0.0)),
            entropy_on=str(popo.get("entropy_on", "positives")),
            noise_seed=self._step_noise_seed,
            anchor=str(popo.get("anchor", "cosine")),
            nll_norm=str(popo.get("nll_norm", "token")),
            noise_timer=self.noise_timer,
        )
        self.actor.set_loss_fn(self.loss_fn)

        self.tau = float(popo.get("tau", 0.995))
        self.ema_steps = 0
        self.max_update_norm = 0.0  # G_max of Lemma 3.2 up to the last _step_stats; the steps since then are in:
        self._max_update_norm_dev: torch.Tensor | None = None  # a device scalar (no host sync per optimizer step)
        self.last_lr = 0.0
        self._predictor_ids: set[int] | None = None
        self.siamese = None  # Megatron: the fp32 shadow of verl's bf16 ref model (popo_verl/engines/megatron.py)
        if type(self.actor.engine).__name__ == "PopoMegatronEngine":
            from popo_verl.engines.megatron import MegatronSiamese

            self.siamese = MegatronSiamese(self.actor.engine, self.ref.engine)
        self._check_siamese_layout()
        self.copy_actor_to_siamese()
        self.actor.engine.popo_after_optimizer_step = self._after_optimizer_step

    def _step_noise_seed(self) -> int:
        """Seed of the feature noise of the next optimizer step: (seed, optimizer steps so far)."""
        return self._noise_seed * 1_000_003 + self.ema_steps * 7919

    # ------------------------------------------------------------------ siamese <-> actor
    def _actor_params(self) -> dict[str, torch.Tensor]:
        if self.siamese is not None:
            return self.siamese.actor_params()
        return {n: p for n, p in self.actor.engine.module.named_parameters() if not is_predictor_param(n)}

    def _siamese_params(self) -> dict[str, torch.Tensor]:
        if self.siamese is not None:
            return self.siamese.shadow
        return dict(self.ref.engine.module.named_parameters())

    def _paired_locals(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        actor, siamese = self._actor_params(), self._siamese_params()
        names = sorted(siamese)
        return [_local(siamese[n].data) for n in names], [_local(actor[n].data) for n in names]

    def _check_siamese_layout(self) -> None:
        if self.siamese is not None:
            return self.siamese.check_layout()
        actor, siamese = self._actor_params(), self._siamese_params()
        if set(actor) != set(siamese):
            missing = sorted(set(actor) ^ set(siamese))[:5]
            raise RuntimeError(f"POPO siamese and actor differ in parameters: {missing}")
        for n, p in siamese.items():
            if p.dtype != torch.float32:
                raise RuntimeError(
                    f"POPO siamese parameter {n} is {p.dtype}; the EMA needs fp32 "
                    "(actor_rollout_ref.ref.fsdp_config.model_dtype=fp32)"
                )
            if _local(p.data).shape != _local(actor[n].data).shape:
                raise RuntimeError(
                    f"POPO siamese shard of {n} {tuple(_local(p.data).shape)} does not match the actor's "
                    f"{tuple(_local(actor[n].data).shape)}: ref and actor need the same FSDP mesh and wrap policy"
                )

    @torch.no_grad()
    def copy_actor_to_siamese(self) -> None:
        if self.siamese is not None:
            return self.siamese.copy_from_actor()
        targets, onlines = self._paired_locals()
        for xi, theta in zip(targets, onlines, strict=True):
            xi.copy_(theta.to(device=xi.device, dtype=xi.dtype))

    def _paired_and_device(self) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]] | None, torch.device]:
        """(the FSDP siamese/actor local pairs, or None under Megatron; the device of the actor's weights, where the
        EMA's and the drift's work runs), from one walk over the parameters."""
        if self.siamese is not None:
            first = next(iter(self._actor_params().values()), None)
            return None, _local(first.data).device if first is not None else torch.device("cpu")
        paired = self._paired_locals()
        return paired, paired[1][0].device if paired[1] else torch.device("cpu")

    def _after_optimizer_step(self, grad_norm: float) -> None:
        paired, device = self._paired_and_device()
        with self.ema_timer.span(device):
            if paired is None:
                self.siamese.ema(self.tau)
            else:
                core.ema_update_(*paired, self.tau)
            g = self._update_direction_norm(grad_norm)
            prev = self._max_update_norm_dev
            self._max_update_norm_dev = g if prev is None else torch.maximum(prev, g.to(prev.device))
        self.ema_steps += 1
        groups = self.actor.engine.optimizer.param_groups
        self.last_lr = float(groups[0]["lr"]) if groups else 0.0

    def _predictor_param_ids(self) -> set[int]:
        if self._predictor_ids is None:  # the parameters never change identity: name them once
            engine = self.actor.engine
            if self.siamese is not None:
                self._predictor_ids = set().union(*engine._popo_head_shards.values())
            else:
                self._predictor_ids = {id(p) for n, p in engine.module.named_parameters() if is_predictor_param(n)}
        return self._predictor_ids

    @torch.no_grad()
    def _update_direction_norm(self, grad_norm: float) -> torch.Tensor:
        """G_t of Lemma 3.2: the norm of the step direction just applied (theta_t = theta_{t-1} - lr * u_t), a float64
        device scalar (no host sync).

        For Adam(W) u_t = m_hat / (sqrt(v_hat) + eps), read from the optimizer state (weight decay left
        out) in one pass on the device; for other optimizers the clipped gradient norm.
        """
        engine = self.actor.engine
        if self.siamese is not None:  # Megatron: the torch optimizers inside its (chained) optimizer, on main shards
            optimizers = [o.optimizer for o in engine._sub_optimizers()]
        else:
            optimizers = [engine.optimizer]
        total, found = adam_direction_sq(optimizers, self._predictor_param_ids())
        clip = engine.optimizer_config.clip_grad
        clipped_grad_norm = min(grad_norm, clip) if clip else grad_norm
        if self.siamese is not None and dist.is_initialized():
            # every rank joins: a Megatron rank may hold no optimizer shard; the count rides along (no host sync)
            both = torch.stack([total.to(self._collective_device()),
                                torch.tensor(float(found), dtype=torch.float64, device=self._collective_device())])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            return torch.where(both[1] > 0, both[0].sqrt(), torch.full_like(both[0], clipped_grad_norm))
        if not found:
            return torch.tensor(clipped_grad_norm, dtype=torch.float64)
        if dist.is_initialized():
            total = total.to(self._collective_device())
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()

    @torch.no_grad()
    def _global_distance_sq(self, paired) -> torch.Tensor:
        """||theta - xi||^2 over this rank's shards (`paired`, None under Megatron), on the device (float64 scalar;
        sum it over ranks)."""
        if paired is None:  # Megatron: each weight once, on the device (the shadow may live on the host)
            return self.siamese.distance_sq()
        return core.parameter_distance_sq(*paired)

    # verl/workers/engine_workers.py ActorRolloutRefWorker.update_actor: the same update; the step's POPO stats ride
    # back in its metrics (rank 0's, as verl's metadata concat keeps), not in a second round trip
    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor(self, data):
        output = super().update_actor(data)
        stats = self._step_stats(bool(tu.get(data, WITH_DRIFT_KEY, default=True)))  # collective: every rank
        if output is not None:
            tu.assign_non_tensor(output, metrics={**tu.get(output, "metrics"), **stats})
        return output

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def popo_stats(self, with_drift: bool = True) -> dict:
        """The step's stats on a step without an update (no positive): see `_step_stats`."""
        return self._step_stats(with_drift)

    def _step_stats(self, with_drift: bool) -> dict:
        """||theta - xi|| (when `with_drift`), the Lemma 3.2 bound and EMA bookkeeping (collective: call on all ranks).

        One host transfer: the device scalars of the step (drift, G_max) come back together."""
        device_values = []
        if with_drift:
            paired, device = self._paired_and_device()
            with self.drift_timer.span(device):
                sq = self._global_distance_sq(paired)
                if dist.is_initialized():
                    sq = sq.to(self._collective_device())
                    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
            device_values.append(sq)
        if self._max_update_norm_dev is not None:
            device_values.append(self._max_update_norm_dev.to(device_values[0].device) if device_values else self._max_update_norm_dev)
        host = torch.stack(device_values).tolist() if device_values else []
        if self._max_update_norm_dev is not None:
            self.max_update_norm = max(self.max_update_norm, host.pop())
            self._max_update_norm_dev = None
        bound = core.drift_bound(self.tau, self.last_lr, self.max_update_norm) if self.ema_steps else 0.0
        stats = {
            "timing_s/ema_update": self.ema_timer.pop_seconds(),
            "timing_s/popo_noise": self.noise_timer.pop_seconds(),
            "popo/drift_bound": bound,
            "popo/ema_steps": float(self.ema_steps),
        }
        if with_drift:
            stats["popo/drift"] = math.sqrt(host.pop())
            stats["timing_s/popo_drift"] = self.drift_timer.pop_seconds()
        return stats

    def _collective_device(self) -> torch.device:
        from verl.utils.device import get_device_id, get_device_name

        return torch.device("cpu") if get_device_name() == "cpu" else torch.device(get_device_name(), get_device_id())

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

        if self.siamese is not None:
            from popo_verl.engines.megatron import named_local_params

            actor_named = list(named_local_params(self.actor.engine, with_head=True).items())
        else:
            actor_named = list(self.actor.engine.module.named_parameters())
        return {
            "siamese": full(self._siamese_params().items()),
            "actor": full([(n, p) for n, p in actor_named if not is_predictor_param(n)]),
            "predictor": full([(n, p) for n, p in actor_named if is_predictor_param(n)]),
            "ema_steps": self.ema_steps,
        }

    # ------------------------------------------------------------------ checkpoints
    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        checkpoint.begin(local_path, self.rank, self.world_size)
        super().save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
        if self.rank == 0:  # verl's hf_model export includes the training-only predictor head
            from popo_verl.model_merger import strip_predictor_from_hf_dir

            strip_predictor_from_hf_dir(os.path.join(local_path, "huggingface"))
        targets = {n: _local(p.data).detach().cpu().clone() for n, p in self._siamese_params().items()}
        if self._max_update_norm_dev is not None:  # steps since the last _step_stats (a save comes after it; to be safe)
            self.max_update_norm = max(self.max_update_norm, float(self._max_update_norm_dev))
            self._max_update_norm_dev = None
        state = {
            "siamese": targets,
            "ema_steps": self.ema_steps,
            "max_update_norm": self.max_update_norm,
            "last_lr": self.last_lr,
            "tau": self.tau,
        }
        checkpoint.commit(local_path, self.rank, self.world_size, state)
        if dist.is_initialized():
            dist.barrier()

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        siamese = checkpoint.siamese_file(local_path, self.rank, self.world_size)
        keep = os.path.exists(siamese)
        state = checkpoint.load(local_path, self.rank, self.world_size,
                                partial(super().load_checkpoint, local_path, hdfs_path, False if keep else del_local_after_load))
        if state is None:
            msg = (
                f"POPO: no siamese state in {os.path.dirname(siamese)} (checkpoint from a non-POPO run, or saved with "
                "another number of ranks): the siamese restarts from the actor's weights"
            )
            warnings.warn(msg, stacklevel=1)
            logger.warning(msg)
            self.copy_actor_to_siamese()
            return
        if self.siamese is not None:  # Megatron: this rank's shard of the main parameters, or a whole saved tensor
            with torch.no_grad():
                self.siamese.load(state["siamese"])
        else:
            with torch.no_grad():
                for n, p in self._siamese_params().items():
                    _local(p.data).copy_(state["siamese"][n].to(_local(p.data).device))
        self.ema_steps = int(state["ema_steps"])
        self.max_update_norm = float(state["max_update_norm"])
        self.last_lr = float(state["last_lr"])
