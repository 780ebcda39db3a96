"""POPO's entries in verl's `core_algos` registries (advantage estimator and policy loss).

verl contract mirrored: verl/trainer/ppo/core_algos.py (`register_adv_est`, `register_policy_loss`,
`PolicyLossFn` signature, `agg_loss`) and verl/workers/utils/losses.py (`ppo_loss` calls the policy loss
on one micro-batch with `config.global_batch_info` filled in). tests/test_plugin.py pins both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from verl.trainer.ppo import core_algos
from verl.utils import torch_functional as verl_F

from popo_verl import core
from popo_verl.config import PopoConfig, popo_config

NAME = "popo"


def _popo_section(config) -> dict:
    if config is None:
        return {}
    popo = config.get("popo", None) if hasattr(config, "get") else getattr(config, "popo", None)
    return dict(popo) if popo is not None else {}


def popo_row_weights(
    old_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    rewards: torch.Tensor,
    positive: torch.Tensor,
    index,
    popo: PopoConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """POPO's weight w(y) of each row [B] (POPO.md): the softmax over each prompt's positive set of the length-normalised
    sequence log-probs under the rollout policy (`old_log_probs`, padded [B, T]) / weight_temperature; 0 on negatives.
    With reward_mode=graded scaled by the normalised reward (also returned, else None), with length_normalize_weights
    divided by the length, both renormalised per prompt."""
    mask = response_mask.float()
    seq_lp = core.sequence_log_probs(old_log_probs.float(), mask[:, : old_log_probs.shape[1]], length_normalize=True)
    weights = core.popo_weights(seq_lp, positive, index, temperature=popo.weight_temperature, mode=popo.weight_mode)
    r_tilde = None
    if popo.reward_mode == "graded":
        r_tilde = core.normalised_reward(rewards, positive, index, popo.reward_threshold)
        weights = core.graded_weights(weights, r_tilde, index)
    if popo.length_normalize_weights:
        weights = core.length_normalized_weights(weights, mask.sum(-1), index)
    return weights, r_tilde


OUTSIDE_POPOS_TRAINER = (
    "algorithm.adv_estimator=popo computes POPO's weights from the rollout policy's log-probs, which only POPO's "
    "trainer hands it (verl's compute_advantage passes rewards, mask and uid): compose the run with algorithm=popo, "
    "which also sets trainer.v1.trainer_mode=popo"
)


def compute_popo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    old_log_probs: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """POPO's weights (`popo_row_weights`) as verl's "advantages": w(y) on each response token of row y, 0 elsewhere.

    POPO's trainer calls it with the old log-probs; anywhere else (verl's own advantage step) it refuses."""
    if old_log_probs is None:
        raise ValueError(OUTSIDE_POPOS_TRAINER)
    if index is None:
        raise ValueError("popo advantage estimator needs the group ids (`uid`) of the batch")
    popo = popo_config(_popo_section(config))
    with torch.no_grad():
        rewards = token_level_rewards.sum(dim=-1)
        positive = core.positive_mask(rewards, popo.reward_threshold, popo.reward_mode)
        weights, _ = popo_row_weights(old_log_probs, response_mask, rewards, positive, index, popo)
        advantages = weights.unsqueeze(-1).to(token_level_rewards.dtype) * response_mask
    return advantages, advantages


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
    pg_loss = core_algos.agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **batch_info)
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


# The exploration study's baselines (issue #36): verl's own PPO loss on these advantages, selected with
# algorithm.adv_estimator=psr|nsr|w_reinforce (W-REINFORCE's lambda: +algorithm.w_reinforce_lambda, default 0.1).
W_REINFORCE_LAMBDA = 0.1


def _sample_reinforcement_estimator(mode: str):
    def compute_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config=None, **kwargs: Any):
        lam = (config.get("w_reinforce_lambda", None) if config is not None and hasattr(config, "get") else None)
        lam = W_REINFORCE_LAMBDA if lam is None else float(lam)
        with torch.no_grad():
            positive = core.positive_mask(token_level_rewards.sum(dim=-1), None, "binary")
            rows = core.sample_reinforcement_advantages(positive, mode, lam)
            advantages = rows.unsqueeze(-1).to(token_level_rewards.dtype) * response_mask
        return advantages, advantages

    compute_advantage.__name__ = f"compute_{mode}_advantage"
    compute_advantage.__doc__ = f"{mode}: core.sample_reinforcement_advantages on every response token (rewards 0/1)."
    return compute_advantage


SAMPLE_REINFORCEMENT_ESTIMATORS = {mode: _sample_reinforcement_estimator(mode) for mode in core.SAMPLE_REINFORCEMENT_MODES}


def register() -> None:
    """Register POPO (and the study's baselines) in verl's registries; safe to call any number of times."""
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(NAME) is not compute_popo_advantage:
        core_algos.register_adv_est(NAME)(compute_popo_advantage)
    for mode, fn in SAMPLE_REINFORCEMENT_ESTIMATORS.items():
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(mode) is not fn:
            core_algos.register_adv_est(mode)(fn)
    if core_algos.POLICY_LOSS_REGISTRY.get(NAME) is not compute_policy_loss_popo:
        core_algos.register_policy_loss(NAME)(compute_policy_loss_popo)


# Importing this module registers POPO (popo_verl/plugin.py relies on it when verl's first import comes from ours).
register()
