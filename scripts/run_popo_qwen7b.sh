#!/usr/bin/env bash
# POPO on Qwen/Qwen2.5-Math-7B: scripts/run_popo.sh with MODEL=qwen2.5-math SIZE=7b.
# PRESET (paper | verl) and every other variable of scripts/common.sh still apply.
#   bash scripts/run_popo_qwen7b.sh [hydra overrides]     (--cfg job prints the config, launches nothing)
set -euo pipefail
MODEL=qwen2.5-math SIZE=7b exec bash "$(dirname "${BASH_SOURCE[0]}")/run_popo.sh" "$@"
