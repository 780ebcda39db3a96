#!/usr/bin/env bash
# POPO on any model of the paper, with the reference's budget (PRESET=paper, the default) or a verl-style one.
# Its GRPO twin, identical but for the algorithm: scripts/run_grpo.sh with the same MODEL, SIZE and PRESET.
#   MODEL=qwen2.5-math SIZE=7b bash scripts/run_popo.sh [hydra overrides]   (--cfg job prints the config, launches nothing)
#   MODEL=r1-distill SIZE=1.5b PRESET=verl bash scripts/run_popo.sh
# Models, presets and the environment variables they read: scripts/common.sh.
set -euo pipefail
ALGO_TAG=popo
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ALGO_ARGS=(
  algorithm=popo
  algorithm.popo.alpha="$ALPHA"
  algorithm.popo.beta="$BETA"
  algorithm.popo.tau="$TAU"
  algorithm.popo.feature_noise_std="$FEATURE_NOISE"
  algorithm.popo.predictor_hidden_dim="$PREDICTOR_DIM"
)
launch "${ALGO_ARGS[@]}" -- "$@"
