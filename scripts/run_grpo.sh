#!/usr/bin/env bash
# GRPO, the drop-in baseline of scripts/run_popo.sh: same MODEL, SIZE, PRESET and everything else; only the
# algorithm keys differ (tests/test_recipe_scripts.py checks it for every model and preset).
#   GRPO_BASELINE=verl   verl's GRPO: KL loss low_var_kl 0.001, token-mean loss (default)
#   GRPO_BASELINE=paper  the paper's TRL baseline: k3 KL with beta 0.01, per-sequence mean loss
#   MODEL=qwen2.5-math SIZE=7b GRPO_BASELINE=paper bash scripts/run_grpo.sh [hydra overrides]
set -euo pipefail
GRPO_BASELINE=${GRPO_BASELINE:-verl}
ALGO_TAG=grpo-$GRPO_BASELINE
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
case "$GRPO_BASELINE" in
  verl)
    KL_COEF=0.001                   # verl's GRPO examples
    KL_TYPE=low_var_kl              # verl's GRPO examples
    LOSS_AGG=token-mean             # verl's default
    ;;
  paper)
    KL_COEF=0.01                    # REF configs/grpo/default.yaml (beta), POPO.md
    KL_TYPE=k3                      # TRL's KL estimator; verl's k3 is the same formula (an alias of low_var_kl, clamped to +-10)
    LOSS_AGG=seq-mean-token-mean    # REF configs/grpo/default.yaml loss_type grpo: each sequence's token mean, averaged
    ;;
  *) echo "GRPO_BASELINE must be verl or paper, got '$GRPO_BASELINE'" >&2; exit 2 ;;
esac
ALGO_ARGS=(
  algorithm.adv_estimator=grpo
  algorithm.use_kl_in_reward=false
  actor_rollout_ref.actor.use_kl_loss=true
  actor_rollout_ref.actor.kl_loss_coef="$KL_COEF"
  actor_rollout_ref.actor.kl_loss_type="$KL_TYPE"
  actor_rollout_ref.actor.loss_agg_mode="$LOSS_AGG"
  actor_rollout_ref.actor.entropy_coeff=0
)
launch "${ALGO_ARGS[@]}" -- "$@"
