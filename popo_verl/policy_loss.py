"""L_nll, POPO's policy loss: registered in verl's policy-loss registry as "popo", and the first term of the actor
loss (popo_verl/actor_loss.py).

verl contract mirrored: verl/trainer/ppo/core_algos.py (`PolicyLossFn` signature, `agg_loss`). This module imports
verl's core_algos only inside its functions: popo_verl/algos.py registers from here when verl imports core_algos,
so a top-level import would make a process that imports this module first import it half-initialised.
"""

from __future__ import annotations

from typing import Any

import torch

from verl.utils import torch_functional as verl_F

from popo_verl import core


def _clip_high(config) -> float:
    if config is None:
        return 0.2
    return config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio


def _ratio_metrics(log_ratio, ratio, response_mask, weighted_rows, clip_high) -> dict[str, Any]:
    """PPO's ratio metrics as device scalars (the caller brings them to the host, in one transfer where it can)."""
    clipped = (ratio > 1.0 + clip_high).float()
    n_weighted = weighted_rows.float().sum()
    clipfrac = torch.where(n_weighted > 0, (clipped * weighted_rows.float()).sum() / n_weighted.clamp(min=1.0),
                           torch.zeros_like(n_weighted))
    return {
        "actor/ppo_kl": verl_F.masked_mean(-log_ratio, response_mask).detach(),
        "actor/pg_clipfrac": clipfrac.detach(),
        "actor/pg_clipfrac_lower": 0.0,
    }


def compute_policy_loss_popo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Weighted NLL of the positives with PPO's upper clip of the importance ratio.

    `advantages` carries the POPO weight w of each row (>= 0). Per token the loss value is -w * log pi_theta
    (the weighted NLL) and its gradient is -w * r * grad log pi_theta while r = pi_theta / pi_old <= 1 + eps_high,
    0 above: what PPO's clipped surrogate does with a positive advantage. At r = 1 (the first mini-batch of a
    rollout batch, and the only one with one optimizer step per rollout batch, as in the reference) that is
    exactly the gradient of the weighted NLL (tests/reference_loss.py); on later mini-batches a positive already pushed past
    1 + eps_high stops pulling. Aggregated by verl's `agg_loss` (loss_agg_mode and global-batch normalisation).
    """
    # checked on the device: a host-side `if` here would be a sync per micro-batch
    torch._assert_async((advantages >= 0).all(), "popo policy loss expects non-negative per-row weights in `advantages`")
    clip_high = _clip_high(config)
    tokens, log_ratio, ratio = core.clipped_nll(log_prob, old_log_prob, clip_high)
    pg_losses = advantages * tokens
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    batch_info = config.global_batch_info if config is not None else {}
    from verl.trainer.ppo.core_algos import agg_loss  # here: see the module's docstring

    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
    weighted_rows = (advantages > 0) & response_mask.bool()
    return pg_loss, _ratio_metrics(log_ratio, ratio, response_mask, weighted_rows, clip_high)


def popo_policy_loss_per_sequence(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    row_weights: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    dp_size: int = 1,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """`nll_norm=sequence`: dp * sum_b s_b * mean_t of the clipped NLL tokens, s the per-row weights normalised over
    the mini-batch (all ranks). Summed over micro-batches and averaged over ranks (verl's convention), it is
    the weighted NLL of the mini-batch (tests/reference_loss.py, norm="sequence") at r = 1."""
    clip_high = _clip_high(config)
    tokens, log_ratio, ratio = core.clipped_nll(log_prob, old_log_prob, clip_high)
    mask = response_mask.to(tokens.dtype)
    per_row = (tokens * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    loss = (row_weights.to(tokens.dtype) * per_row).sum() * dp_size
    weighted_rows = (row_weights > 0).unsqueeze(-1) & response_mask.bool()
    return loss, _ratio_metrics(log_ratio, ratio, response_mask, weighted_rows, clip_high)
