#!/usr/bin/env bash
# POPO on Qwen/Qwen2.5-Math-1.5B (DeepScaleR-Preview training data), the paper's reference settings (POPO.md).
# The GRPO baseline with everything else equal: scripts/run_grpo_qwen1.5b.sh.
#   bash scripts/run_popo_qwen1.5b.sh [hydra overrides]     (--cfg job prints the config, launches nothing)
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-Math-1.5B}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-popo_qwen2.5_math_1.5b}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}
LR=${LR:-1e-6}
ALGO_ARGS=(
  algorithm=popo
  algorithm.popo.alpha=0.1
  algorithm.popo.beta=0.01
  algorithm.popo.tau=0.995
  algorithm.popo.feature_noise_std=0.02
  algorithm.popo.predictor_hidden_dim=1024
)
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen_math.sh"
