#!/usr/bin/env bash
# GRPO (the drop-in baseline of run_popo_qwen1.5b.sh) on Qwen/Qwen2.5-Math-1.5B: scripts/run_grpo.sh with MODEL=qwen2.5-math SIZE=1.5b.
# PRESET (paper | verl), GRPO_BASELINE (verl | paper) and every other variable of scripts/common.sh still apply.
#   bash scripts/run_grpo_qwen1.5b.sh [hydra overrides]     (--cfg job prints the config, launches nothing)
set -euo pipefail
MODEL=qwen2.5-math SIZE=1.5b exec bash "$(dirname "${BASH_SOURCE[0]}")/run_grpo.sh" "$@"
