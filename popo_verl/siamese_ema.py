"""The siamese's EMA schedule and the drift it allows (POPO.md, Lemma 3.2), on any engine's `Siamese`.

After every optimizer step of the actor: xi <- tau * xi + (1 - tau) * theta, and G_t, the norm of the step direction
just applied, joins the running max G_max. Once a training step: ||theta - xi|| (every `drift_interval` steps),
the bound 2 * lr * G_max * tau / (1 - tau) and POPO's device timings, in one host transfer. Device scalars stay on
the device between those reads: no host sync per optimizer step.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.distributed as dist

from popo_verl import core
from popo_verl.engines.common import Siamese, local_shard
from popo_verl.timing import DeviceTimer

logger = logging.getLogger(__name__)


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
                m, v = local_shard(st["exp_avg"]), local_shard(st["exp_avg_sq"])
                if isinstance(step, torch.Tensor):
                    step = step.to(m.device)
                c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
                u = (m.float() / c1) / ((v.float() / c2).sqrt() + eps)
                sq = u.pow(2).sum(dtype=torch.float64)
                total = sq if total is None else total + sq.to(total.device)
                found += 1
    return (total if total is not None else torch.zeros((), dtype=torch.float64)), found


def collective_device() -> torch.device:
    """Where this rank's collectives run (the CPU under gloo, else its accelerator)."""
    from verl.utils.device import get_device_id, get_device_name

    return torch.device("cpu") if get_device_name() == "cpu" else torch.device(get_device_name(), get_device_id())


class SiameseEma:
    """The EMA of one `Siamese` and its Lemma 3.2 bookkeeping; `state()` / `load_state()` ride in the checkpoint."""

    def __init__(self, siamese: Siamese, tau: float, clip_grad: float | None = None):
        self.siamese, self.tau, self.clip_grad = siamese, float(tau), clip_grad
        self.ema_steps = 0
        self.max_update_norm = 0.0  # G_max up to the last `step_stats`; the steps since then are in:
        self._max_update_norm_dev: torch.Tensor | None = None  # a device scalar (no host sync per optimizer step)
        self.last_lr = 0.0
        self.ema_timer, self.drift_timer = DeviceTimer(), DeviceTimer()

    def after_optimizer_step(self, grad_norm: float, lr: float) -> None:
        """The EMA and G_t after an optimizer step that updated theta (`grad_norm`: its clipped-before norm)."""
        with self.ema_timer.span(self.siamese.device):
            self.siamese.ema(self.tau)
            g = self.update_direction_norm(grad_norm)
            prev = self._max_update_norm_dev
            self._max_update_norm_dev = g if prev is None else torch.maximum(prev, g.to(prev.device))
        self.ema_steps += 1
        self.last_lr = float(lr)

    @torch.no_grad()
    def update_direction_norm(self, grad_norm: float) -> torch.Tensor:
        """G_t: the norm of the step direction just applied (theta_t = theta_{t-1} - lr * u_t), a float64 device scalar.

        For Adam(W) u_t = m_hat / (sqrt(v_hat) + eps), read from the optimizer state (weight decay left out) in one
        pass on the device; for other optimizers the clipped gradient norm.
        """
        total, found = adam_direction_sq(self.siamese.optimizers(), self.siamese.predictor_param_ids())
        clipped = min(grad_norm, self.clip_grad) if self.clip_grad else grad_norm
        if dist.is_initialized() and (found or self.siamese.every_rank_reduces):
            # the count rides along (no host sync): a rank without optimizer state still learns whether any had one
            device = collective_device()
            both = torch.stack([total.to(device), torch.tensor(float(found), dtype=torch.float64, device=device)])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            return torch.where(both[1] > 0, both[0].sqrt(), torch.full_like(both[0], clipped))
        if not found:
            return torch.tensor(clipped, dtype=torch.float64)
        return total.sqrt()

    def _drift_sq(self) -> torch.Tensor:
        """||theta - xi||^2 over all ranks, on the device."""
        with self.drift_timer.span(self.siamese.device):
            sq = self.siamese.distance_sq()
            if dist.is_initialized():
                sq = sq.to(collective_device())
                dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        return sq

    def _fold_max(self, host_value: float | None = None) -> None:
        if self._max_update_norm_dev is not None:
            value = float(self._max_update_norm_dev) if host_value is None else host_value
            self.max_update_norm = max(self.max_update_norm, value)
            self._max_update_norm_dev = None

    def step_stats(self, with_drift: bool) -> dict[str, float]:
        """The drift (when `with_drift`), the bound, the EMA's bookkeeping and timings: one host transfer.
        Collective: call it on every rank."""
        device_values = [self._drift_sq()] if with_drift else []
        if self._max_update_norm_dev is not None:
            device_values.append(self._max_update_norm_dev.to(device_values[0].device) if device_values else self._max_update_norm_dev)
        host = torch.stack(device_values).tolist() if device_values else []
        if self._max_update_norm_dev is not None:
            self._fold_max(host.pop())
        stats = {
            "timing_s/ema_update": self.ema_timer.pop_seconds(),
            "popo/drift_bound": core.drift_bound(self.tau, self.last_lr, self.max_update_norm) if self.ema_steps else 0.0,
            "popo/ema_steps": float(self.ema_steps),
        }
        if with_drift:
            stats["popo/drift"] = math.sqrt(host.pop())
            stats["timing_s/popo_drift"] = self.drift_timer.pop_seconds()
        return stats

    def state(self) -> dict:
        self._fold_max()  # steps since the last step_stats (a save comes after it; to be safe)
        return {"siamese": self.siamese.state(), "ema_steps": self.ema_steps, "max_update_norm": self.max_update_norm,
                "last_lr": self.last_lr, "tau": self.tau}

    def load_state(self, state: dict) -> None:
        self.siamese.load(state["siamese"])
        self.ema_steps = int(state["ema_steps"])
        self.max_update_norm = float(state["max_update_norm"])
        self.last_lr = float(state["last_lr"])

    def restore(self, state: dict | None, where: str) -> None:
        """A checkpoint's EMA state; without one (a checkpoint of a non-POPO run, or saved with another number of
        ranks) a warning, and the siamese restarts from the actor's weights."""
        if state is None:
            msg = (f"POPO: no siamese state in {where} (checkpoint from a non-POPO run, or saved with another number "
                   "of ranks): the siamese restarts from the actor's weights")
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
            self.siamese.copy_from_actor()
            return
        with torch.no_grad():
            self.load_state(state)
