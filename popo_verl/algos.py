"""POPO's entries in verl's `core_algos` registries: the advantage estimators (here) and the policy loss (the
L_nll term of POPO's actor loss, popo_verl/policy_loss.py `compute_policy_loss_popo`).

verl contract mirrored: verl/trainer/ppo/core_algos.py (`register_adv_est`, `register_policy_loss`,
`PolicyLossFn` signature, `agg_loss`) and verl/workers/utils/losses.py (`ppo_loss` calls the policy loss
on one micro-batch with `config.global_batch_info` filled in). tests/test_plugin.py pins both.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from verl.trainer.ppo import core_algos

from popo_verl import core
from popo_verl.config import PopoConfig, popo_config
from popo_verl.policy_loss import compute_policy_loss_popo

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
