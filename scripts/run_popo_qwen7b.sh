#!/usr/bin/env bash
# POPO on Qwen/Qwen2.5-Math-7B (DeepScaleR-Preview training data), the paper's reference settings (POPO.md).
# The GRPO baseline with everything else equal: scripts/run_grpo_qwen7b.sh.
#   bash scripts/run_popo_qwen7b.sh [hydra overrides]     (--cfg job prints the config, launches nothing)
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-Math-7B}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-popo_qwen2.5_math_7b}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-1024}
LR=${LR:-1e-7}
ALGO_ARGS=(
  algorithm=popo
  algorithm.popo.alpha=0.1
  algorithm.popo.beta=0.01
  algorithm.popo.tau=0.999
  algorithm.popo.feature_noise_std=0.01
  algorithm.popo.predictor_hidden_dim=4096
)
source "$(dirname "${BASH_SOURCE[0]}")/common_qwen_math.sh"
