#!/usr/bin/env bash
# verl's GRPO on Qwen/Qwen2.5-Math-1.5B: the drop-in baseline for scripts/run_popo_qwen1.5b.sh (same model, data,
# rollout, lengths, batch, steps, validation and optimizer; only the algorithm differs).
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-Math-1.5B}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-grpo_qwen2.5_math_1.5b}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}
LR=${LR:-1e-6}
ALGO_ARGS=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=false
  actor_rollout_ref.actor.use_kl_loss=true
  actor_rollout_ref.actor.kl_loss_coef=0.001
  actor_rollout_ref.actor.kl_loss_type=low_var_kl
  actor_rollout_ref.actor.entropy_coeff=0
)
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen_math.sh"
